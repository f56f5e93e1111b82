"""A local ingest endpoint running the ingest function: POST /detections, GET /received and /requests."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cloud.ingest.handler import handle, proxy_event
from cloud.ingest.rebuild import RecordStore, StoredRecord
from cloud.ingest.store import DynamoRecordStore
from testbed.process import LOOPBACK, LocalServer, free_ports, http_answers, stop_process_group, wait_until

REPO_DIR = Path(__file__).resolve().parents[1]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS received (
        id INTEGER PRIMARY KEY,
        idempotency_key TEXT UNIQUE NOT NULL,
        device_id TEXT NOT NULL,
        camera_id TEXT NOT NULL,
        captured_at REAL NOT NULL,
        batch_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        zones TEXT NOT NULL,
        received_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 1,
        content_encoding TEXT,
        UNIQUE (device_id, camera_id, captured_at)
    )""",
    """CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        idempotency_key TEXT,
        content_encoding TEXT,
        body_bytes INTEGER NOT NULL,
        status INTEGER NOT NULL,
        response TEXT NOT NULL
    )""",
)


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the receiver's SQLite file."""
    connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode = WAL")
    for statement in _SCHEMA:
        connection.execute(statement)
    return connection


class SqliteRecordStore:
    """The ingest function's record store kept in the receiver's SQLite file, one row per record key."""

    def __init__(self, connection: sqlite3.Connection, content_encoding: str | None) -> None:
        self.connection = connection
        self.content_encoding = content_encoding

    def get_zones(self, device_id: str, camera_id: str, captured_at: float) -> dict[str, bool] | None:
        """The rebuilt full state of one stored record."""
        row = self.connection.execute(
            "SELECT zones FROM received WHERE device_id = ? AND camera_id = ? AND captured_at = ?",
            (device_id, camera_id, captured_at),
        ).fetchone()
        return None if row is None else json.loads(row["zones"])

    def put_record(self, record: StoredRecord) -> bool:
        """Store a record once per key; a repeat only counts one more delivery."""
        cursor = self.connection.execute(
            """INSERT INTO received (idempotency_key, device_id, camera_id, captured_at, batch_key, kind,
                   zones, received_at, content_encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT DO NOTHING""",
            (record.key, record.device_id, record.camera_id, record.captured_at, record.batch_key,
             record.kind, json.dumps(record.zones), record.received_at, self.content_encoding),
        )
        if cursor.rowcount == 1:
            return True
        self.connection.execute(
            "UPDATE received SET deliveries = deliveries + 1 WHERE idempotency_key = ?", (record.key,)
        )
        return False


def list_received(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stored record, oldest first, with its rebuilt zone state and how often it was delivered."""
    rows = connection.execute("SELECT * FROM received ORDER BY id").fetchall()
    return [{**dict(row), "zones": json.loads(row["zones"])} for row in rows]


def request_totals(connection: sqlite3.Connection) -> dict[str, int]:
    """Requests answered, by outcome, and the body bytes they carried."""
    row = connection.execute(
        """SELECT count(*) AS requests, coalesce(sum(body_bytes), 0) AS body_bytes,
                  coalesce(sum(status = 200), 0) AS accepted FROM requests"""
    ).fetchone()
    return {"requests": row["requests"], "body_bytes": row["body_bytes"], "accepted": row["accepted"]}


def create_app(db_path: Path, api_key: str, record_store: RecordStore | None = None) -> Starlette:
    """The receiver's ASGI app: runs the ingest function on each POST, accepting only `api_key`.

    Records go to `record_store` (e.g. DynamoDB) when given, else into the SQLite file at `db_path`,
    which also logs every request.
    """

    async def detections(request: Request) -> JSONResponse:
        offered = request.headers.get("x-api-key", "").encode()
        if not secrets.compare_digest(offered, api_key.encode()):
            return JSONResponse({"message": "Forbidden: missing or wrong X-API-Key"}, status_code=401)
        body = await request.body()
        encoding = request.headers.get("content-encoding")
        connection = open_store(db_path)
        try:
            with _transaction(connection):
                store = record_store or SqliteRecordStore(connection, encoding)
                answer = handle(proxy_event(body, dict(request.headers)), store)
                connection.execute(
                    """INSERT INTO requests (received_at, idempotency_key, content_encoding, body_bytes,
                           status, response) VALUES (?, ?, ?, ?, ?, ?)""",
                    (time.time(), request.headers.get("idempotency-key"), encoding, len(body),
                     answer["statusCode"], answer["body"]),
                )
        finally:
            connection.close()
        return JSONResponse(json.loads(answer["body"]), status_code=answer["statusCode"])

    async def received(request: Request) -> JSONResponse:
        connection = open_store(db_path)
        try:
            return JSONResponse(list_received(connection))
        finally:
            connection.close()

    async def requests(request: Request) -> JSONResponse:
        connection = open_store(db_path)
        try:
            return JSONResponse(request_totals(connection))
        finally:
            connection.close()

    open_store(db_path).close()
    routes = [
        Route("/detections", detections, methods=["POST"]),
        Route("/received", received, methods=["GET"]),
        Route("/requests", requests, methods=["GET"]),
    ]
    return Starlette(routes=routes)


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """One write transaction per request, so a batch's records and its log row land together."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


class Receiver(LocalServer):
    """Runs `python -m testbed.receiver` on a loopback port; stop() and start() again keep the port.

    With dynamodb_endpoint and table, records go to that DynamoDB (e.g. moto's server) instead of
    the SQLite file, as the Lambda function writes them; requests are still logged in the file.
    """

    def __init__(
        self,
        db_path: Path | None = None,
        api_key: str = "parkmon-test-key",
        *,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        dynamodb_endpoint: str | None = None,
        table: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        if (dynamodb_endpoint is None) != (table is None):
            raise ValueError("give both dynamodb_endpoint and table, or neither")
        self.api_key = api_key
        self.port = port
        self.dynamodb_endpoint = dynamodb_endpoint
        self.table = table
        self.environment = environment or {}
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
        if self.dynamodb_endpoint is not None and self.table is not None:
            command += ["--dynamodb-endpoint", self.dynamodb_endpoint, "--table", self.table]
        path = os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment, "PYTHONPATH": path},
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
        """One entry per snapshot record stored (SQLite mode), via GET /received."""
        with urllib.request.urlopen(f"{self.url}/received", timeout=5.0) as response:
            return json.load(response)

    def requests(self) -> dict[str, int]:
        """Requests answered, those accepted, and the body bytes they carried, via GET /requests."""
        with urllib.request.urlopen(f"{self.url}/requests", timeout=5.0) as response:
            return json.load(response)

    def close(self) -> None:
        """Stop the process and remove a temporary store."""
        self.stop()
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None



def main(argv: list[str] | None = None) -> int:
    """Serve the receiver on 127.0.0.1 until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m testbed.receiver", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--db", type=Path, required=True, help="SQLite file the payloads go to")
    parser.add_argument("--api-key", required=True, help="the X-API-Key value to accept")
    parser.add_argument("--dynamodb-endpoint", help="store records in this DynamoDB (e.g. moto) ...")
    parser.add_argument("--table", help="... in this table")
    args = parser.parse_args(argv)
    record_store = None
    if args.dynamodb_endpoint and args.table:
        resource = boto3.resource("dynamodb", endpoint_url=args.dynamodb_endpoint)
        record_store = DynamoRecordStore(resource.Table(args.table))
    app = create_app(args.db, args.api_key, record_store)
    uvicorn.run(app, host=LOOPBACK, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
