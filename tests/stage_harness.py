"""Running parkmon stages as real processes for the crash, outage and durability tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from shared.config import Settings, load_settings
from shared.db import connect, immediate, open_database
from shared.jobs import UPLOAD, enqueue
from shared.snapshots import snapshot_relative_path

REPO_DIR = Path(__file__).resolve().parents[1]
FORWARDED_HEADERS = ("Content-Type", "Content-Encoding", "Idempotency-Key", "X-API-Key")


class StageProcess:
    """`parkmon run <stage>` as its own process, as launchd starts it; JSON log lines go to a file."""

    def __init__(self, config: Path, stage: str, log_dir: Path, *extra: str) -> None:
        self.config = config
        self.stage = stage
        self.extra = extra
        self.log_path = log_dir / f"{stage}.log"
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> StageProcess:
        """Start (or restart) the stage; its log file is appended to across restarts."""
        assert not self.alive(), f"{self.stage} is already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "--config", str(self.config), "run", self.stage,
                 *self.extra],
                cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1"},
            )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def exited(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return None if self.process is None else self.process.poll()

    def signal(self, number: int) -> None:
        """Send a signal to the running process."""
        assert self.process is not None
        self.process.send_signal(number)

    def kill9(self) -> None:
        """SIGKILL the process, as a crash would end it, and reap it."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog events written so far (every run), optionally only those called `name`."""
        if not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by SIGKILL
        return [event for event in events if name is None or event.get("event") == name]


def write_config(path: Path, config: dict[str, Any]) -> Settings:
    """Write a device YAML and load it as the stages will."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return load_settings(path)


def read_rows(settings: Settings, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
    """Rows of a read-only query against the device database."""
    connection = connect(settings.database_path, read_only=True)
    try:
        return connection.execute(sql, tuple(parameters)).fetchall()
    finally:
        connection.close()


def scalar(settings: Settings, sql: str, parameters: Iterable[Any] = ()) -> Any:
    """The single value of a read-only query."""
    return read_rows(settings, sql, parameters)[0][0]


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    watched: Iterable[StageProcess] = (),
    poll_s: float = 0.2,
) -> None:
    """Poll until `condition()` holds; fail if a watched stage exits or time runs out."""
    watched = list(watched)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stage in watched:
            code = stage.exited()
            assert code is None, f"{stage.stage} exited with {code} while waiting for {what}"
        try:
            if condition():
                return
        except (sqlite3.OperationalError, IndexError, OSError):
            pass
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def wait_for_heartbeat(settings: Settings, stage: StageProcess, timeout_s: float = 60.0) -> None:
    """Wait until this run of a stage has written its heartbeat, i.e. it is up and handles SIGTERM."""
    wait_until(
        lambda: scalar(settings, "SELECT count(*) FROM heartbeats WHERE process = ? AND pid = ?",
                       (stage.stage, stage.pid)) == 1,
        timeout_s, f"{stage.stage} heartbeat", [stage],
    )


def replay_folder(frames: list[Path], target: Path, copies: int = 1) -> Path:
    """A replay folder of symlinks to real frames, repeated `copies` times in name order."""
    target.mkdir(parents=True)
    for copy in range(copies):
        for frame in frames:
            os.symlink(frame, target / f"{copy:04d}_{frame.name}")
    return target


def result_for(settings: Settings, snapshot_id: int, camera_id: str, captured_at: float, image: str,
               occupied: list[bool]) -> dict[str, Any]:
    """A detection result in the contract's shape."""
    return {
        "device_id": settings.device_id, "camera_id": camera_id, "snapshot_id": snapshot_id,
        "captured_at": captured_at, "image": image, "model": "seeded", "inference_ms": 1.0,
        "frame": {"width": 1280, "height": 720}, "vehicles": [],
        "zones": [{"zone_id": str(index + 1), "occupied": value, "confidence": 0.9 if value else 0.0}
                  for index, value in enumerate(occupied)],
        "occupied": sum(occupied), "spaces": len(occupied),
    }


def seed_detected_snapshots(settings: Settings, frames: list[Path], camera_id: str = "cam0") -> list[int]:
    """Snapshots of real frames as detect leaves them: JPEG, row, detection result and UPLOAD job."""
    connection = open_database(settings.database_path)
    ids: list[int] = []
    try:
        for index, frame in enumerate(frames):
            captured_at = time.time() - 60 + index * 0.001
            relative = snapshot_relative_path(settings.device_id, camera_id, captured_at)
            (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(frame, settings.data_dir / relative)
            size = (settings.data_dir / relative).stat().st_size
            with immediate(connection):
                snapshot_id = int(connection.execute(
                    """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height,
                           source_name) VALUES (?, ?, ?, ?, ?, 1280, 720, ?)""",
                    (settings.device_id, camera_id, captured_at, relative, size, frame.name),
                ).lastrowid or 0)
                result = result_for(settings, snapshot_id, camera_id, captured_at, Path(relative).name,
                                    [index % 2 == 0, index % 3 == 0])
                connection.execute(
                    """INSERT INTO detections (snapshot_id, device_id, camera_id, detected_at, model,
                           inference_ms, vehicles, spaces, occupied, result_json)
                       VALUES (?, ?, ?, ?, 'seeded', 1.0, 0, 2, ?, ?)""",
                    (snapshot_id, settings.device_id, camera_id, time.time(), result["occupied"],
                     json.dumps(result)),
                )
                enqueue(connection, UPLOAD, snapshot_id)
            ids.append(snapshot_id)
    finally:
        connection.close()
    return ids


def snapshot_keys(settings: Settings) -> dict[str, tuple[str, str, str]]:
    """Per snapshot path: its data bucket key, metadata bucket key and idempotency key."""
    keys = {}
    for row in read_rows(settings, "SELECT device_id, camera_id, captured_at, path FROM snapshots"):
        day = datetime.fromtimestamp(row["captured_at"], UTC).strftime("%Y/%m/%d")
        name = Path(row["path"]).name
        stem = Path(row["path"]).stem
        keys[row["path"]] = (
            f"snapshots/{day}/{name}",
            f"metadata/{day}/{stem}.json",
            f"{row['device_id']}/{row['camera_id']}/{stem}",
        )
    return keys


def device_objects(s3: Any, bucket: str, prefix: str, device_id: str) -> list[str]:
    """Every key in the bucket under `prefix` whose file name belongs to this device."""
    return [key for key in s3.object_keys(bucket, prefix) if Path(key).name.startswith(f"{device_id}_")]


def add_deleted_jobs_audit(settings: Settings) -> None:
    """A trigger that copies any deleted job row into jobs_deleted, so a dropped job shows."""
    connection = open_database(settings.database_path)
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS jobs_deleted (id INTEGER, stage TEXT, snapshot_id INTEGER, "
            "state TEXT)"
        )
        connection.execute(
            """CREATE TRIGGER IF NOT EXISTS jobs_audit_delete AFTER DELETE ON jobs BEGIN
                   INSERT INTO jobs_deleted VALUES (old.id, old.stage, old.snapshot_id, old.state);
               END"""
        )
    finally:
        connection.close()


class IngestGate:
    """A pass-through in front of the ingest receiver that can hold POSTs in flight on request.

    While `holding`, a POST is kept unanswered until `release()`; it is then forwarded, so the cloud
    gets a request whose sender may be long dead, as happens when a device crashes mid-POST.
    """

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url.rstrip("/")
        self.holding = threading.Event()
        self._released = threading.Event()
        self.posts = 0
        self.held = 0
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                gate.posts += 1
                if gate.holding.is_set():
                    gate.held += 1
                    gate._released.wait()
                status, answer = gate.forward(self.path, body, self.headers)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The value for aws.api_endpoint."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def forward(self, path: str, body: bytes, headers: Any) -> tuple[int, bytes]:
        """Send one request on to the receiver; return its status and body."""
        request = urllib.request.Request(f"{self.target_url}{path}", data=body, method="POST")
        for name in FORWARDED_HEADERS:
            if headers.get(name) is not None:
                request.add_header(name, headers[name])
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError as error:
            return 502, json.dumps({"message": f"receiver unreachable: {error}"}).encode()

    def hold(self) -> None:
        """Keep the next POSTs unanswered until release()."""
        self._released.clear()
        self.holding.set()

    def let_new_through(self) -> None:
        """Forward new POSTs at once while those already held stay held."""
        self.holding.clear()

    def release(self) -> None:
        """Forward every held POST and stop holding new ones."""
        self.holding.clear()
        self._released.set()

    def close(self) -> None:
        """Release anything held and stop serving."""
        self.release()
        self.server.shutdown()
        self.server.server_close()
