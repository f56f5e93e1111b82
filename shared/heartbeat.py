"""Per-process heartbeat rows that /health reads."""

from __future__ import annotations

import os
import sqlite3
import time

from shared.db import immediate


class Heartbeat:
    """Writes this process's liveness row at most every `every_s` seconds, or on a status change."""

    def __init__(self, connection: sqlite3.Connection, process: str, every_s: float = 2.0) -> None:
        self.connection = connection
        self.process = process
        self.every_s = every_s
        self.started_at = time.time()
        self._last_beat = 0.0
        self._last_status: tuple[str, str | None] | None = None

    def beat(self, status: str = "running", detail: str | None = None, force: bool = False) -> None:
        """Record that the process is alive, with what it is doing."""
        now = time.time()
        changed = self._last_status != (status, detail)
        if not (force or changed or now - self._last_beat >= self.every_s):
            return
        with immediate(self.connection):
            self.connection.execute(
                """INSERT INTO heartbeats (process, pid, started_at, beat_at, status, detail)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (process) DO UPDATE SET pid = excluded.pid,
                       started_at = excluded.started_at, beat_at = excluded.beat_at,
                       status = excluded.status, detail = excluded.detail""",
                (self.process, os.getpid(), self.started_at, now, status, detail),
            )
        self._last_beat = now
        self._last_status = (status, detail)
