"""A stand-in for the cloud ingest endpoint: POST /detections into SQLite, GET /received to read back."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from testbed.process import LOOPBACK, free_ports, http_answers, stop_process_group, wait_until

REPO_DIR = Path(__file__).resolve().parents[1]

_SCHEMA = """CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    received_at REAL NOT NULL,
    content_encoding TEXT,
    body_bytes INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 1,
    payload TEXT NOT NULL
)"""


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the receiver's SQLite file."""
    connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(_SCHEMA)
    return connection


def record_delivery(
    connection: sqlite3.Connection, key: str | None, payload: dict[str, Any], encoding: str | None, size: int
) -> bool:
    """Store a payload once per idempotency key; return False when the key was already recorded."""
    cursor = connection.execute(
        """INSERT INTO received (idempotency_key, received_at, content_encoding, body_bytes, payload)
           VALUES (?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING""",
        (key, time.time(), encoding, size, json.dumps(payload)),
    )
    if cursor.rowcount == 1:
        return True
    connection.execute("UPDATE received SET deliveries = deliveries + 1 WHERE idempotency_key = ?", (key,))
    return False


def list_received(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stored payload, oldest first, with how often its key was delivered."""
    rows = connection.execute("SELECT * FROM received ORDER BY id").fetchall()
    return [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]


def _decode_body(body: bytes, encoding: str | None) -> bytes:
    """Undo a gzip Content-Encoding; raise ValueError for anything else or a bad stream."""
    if encoding in (None, "", "identity"):
        return body
    if encoding != "gzip":
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    try:
        return gzip.decompress(body)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"body is not valid gzip: {error}") from error


def create_app(db_path: Path, api_key: str) -> Starlette:
    """The receiver's ASGI app, storing into `db_path` and accepting only `api_key`."""

    async def detections(request: Request) -> JSONResponse:
        offered = request.headers.get("x-api-key", "").encode()
        if not secrets.compare_digest(offered, api_key.encode()):
            return JSONResponse({"message": "Forbidden: missing or wrong X-API-Key"}, status_code=401)
        body = await request.body()
        encoding = request.headers.get("content-encoding")
        try:
            payload = json.loads(_decode_body(body, encoding))
        except ValueError as error:
            return JSONResponse({"message": f"unreadable body: {error}"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"message": "body must be a JSON object"}, status_code=400)
        key = request.headers.get("idempotency-key")
        connection = open_store(db_path)
        try:
            stored = record_delivery(connection, key, payload, encoding, len(body))
        finally:
            connection.close()
        return JSONResponse({"status": "accepted" if stored else "duplicate", "idempotency_key": key})

    async def received(request: Request) -> JSONResponse:
        connection = open_store(db_path)
        try:
            return JSONResponse(list_received(connection))
        finally:
            connection.close()

    open_store(db_path).close()
    routes = [
        Route("/detections", detections, methods=["POST"]),
        Route("/received", received, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class Receiver:
    """Runs `python -m testbed.receiver` on a loopback port; stop() and start() again keep the port."""

    def __init__(
        self,
        db_path: Path | None = None,
        api_key: str = "parkmon-test-key",
        *,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.api_key = api_key
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None:
            self._temp_dir = tempfile.TemporaryDirectory(prefix="parkmon-receiver-")
            db_path = Path(self._temp_dir.name) / "received.db"
        self.db_path = db_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, the value for aws.api_endpoint."""
        if self.port is None:
            raise RuntimeError("Receiver has no port until started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the receiver process logs."""
        return self.db_path.with_suffix(".log")

    def start(self) -> Receiver:
        """Start the receiver process and wait until GET /received answers."""
        if self.process is not None:
            raise RuntimeError("Receiver is already started")
        if self.port is None:
            self.port = free_ports(1)[0]
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "testbed.receiver",
            "--port", str(self.port), "--db", str(self.db_path), "--api-key", self.api_key,
        ]
        path = os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path},
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: http_answers(f"{self.url}/received"),
                self.process, self.startup_timeout_s, "receiver", self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the receiver process by PID and wait for it; stored payloads stay in db_path."""
        if self.process is not None:
            stop_process_group(self.process, grace_s=5.0)
            self.process = None

    def received(self) -> list[dict[str, Any]]:
        """What the receiver has stored, via GET /received."""
        with urllib.request.urlopen(f"{self.url}/received", timeout=5.0) as response:
            return json.load(response)

    def close(self) -> None:
        """Stop the process and remove a temporary store."""
        self.stop()
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Serve the receiver on 127.0.0.1 until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m testbed.receiver", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--db", type=Path, required=True, help="SQLite file the payloads go to")
    parser.add_argument("--api-key", required=True, help="the X-API-Key value to accept")
    args = parser.parse_args(argv)
    app = create_app(args.db, args.api_key)
    uvicorn.run(app, host=LOOPBACK, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
