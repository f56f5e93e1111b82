"""The one SQLite database the four stages share: connection rules and schema."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

# Durability: WAL keeps readers (the API) from blocking writers. synchronous=FULL fsyncs the WAL
# at every commit, so a committed snapshot row or finished job survives a power cut, not only a
# process crash; at one snapshot every few seconds the extra fsync costs nothing that matters.
# OFF is never allowed: a crash could then corrupt the job table.
ALLOWED_SYNCHRONOUS = ("FULL", "EXTRA", "NORMAL")

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            camera_id TEXT NOT NULL,
            captured_at REAL NOT NULL,
            path TEXT NOT NULL UNIQUE,
            bytes INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            source_name TEXT,
            deleted_at REAL
        )""",
        "CREATE INDEX snapshots_by_camera ON snapshots(camera_id, captured_at)",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            stage TEXT NOT NULL,
            snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'leased', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires_at REAL,
            available_at REAL NOT NULL,
            last_error TEXT,
            error_kind TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            done_at REAL,
            UNIQUE (stage, snapshot_id)
        )""",
        "CREATE INDEX jobs_to_claim ON jobs(stage, state, available_at)",
        """CREATE TABLE detections (
            snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id),
            device_id TEXT NOT NULL,
            camera_id TEXT NOT NULL,
            detected_at REAL NOT NULL,
            model TEXT NOT NULL,
            inference_ms REAL NOT NULL,
            vehicles INTEGER NOT NULL,
            spaces INTEGER NOT NULL,
            occupied INTEGER NOT NULL,
            result_json TEXT NOT NULL
        )""",
        """CREATE TABLE zone_state (
            device_id TEXT NOT NULL,
            camera_id TEXT NOT NULL,
            zone_id TEXT NOT NULL,
            occupied INTEGER NOT NULL,
            confidence REAL NOT NULL,
            since REAL NOT NULL,
            updated_at REAL NOT NULL,
            snapshot_id INTEGER NOT NULL,
            PRIMARY KEY (camera_id, zone_id)
        )""",
        """CREATE TABLE zone_events (
            id INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            camera_id TEXT NOT NULL,
            zone_id TEXT NOT NULL,
            event TEXT NOT NULL CHECK (event IN ('occupied', 'vacated')),
            at REAL NOT NULL,
            confidence REAL NOT NULL,
            snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
            UNIQUE (camera_id, zone_id, snapshot_id)
        )""",
        "CREATE INDEX zone_events_by_time ON zone_events(at)",
        """CREATE TABLE uploads (
            snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id),
            image_key TEXT NOT NULL,
            metadata_key TEXT NOT NULL,
            image_bytes INTEGER NOT NULL,
            metadata_bytes INTEGER NOT NULL,
            posted INTEGER NOT NULL,
            uploaded_at REAL NOT NULL
        )""",
        """CREATE TABLE heartbeats (
            process TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            beat_at REAL NOT NULL,
            status TEXT NOT NULL,
            detail TEXT
        )""",
        """CREATE VIEW queue_summary AS
            SELECT stage, state, count(*) AS jobs FROM jobs GROUP BY stage, state""",
        """CREATE VIEW queue_backlog AS
            SELECT stage, count(*) AS waiting, min(created_at) AS oldest_created_at,
                   max(attempts) AS most_attempts
            FROM jobs WHERE state != 'done' GROUP BY stage""",
    ],
    # Upload stage, cloud sync: per camera the last zone state the cloud acknowledged (the base of
    # the next delta), and the requests and bytes delivered per destination.
    [
        """CREATE TABLE cloud_sync (
            camera_id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            snapshot_id INTEGER NOT NULL,
            record_key TEXT NOT NULL,
            captured_at REAL NOT NULL,
            zones_json TEXT NOT NULL,
            since_keyframe INTEGER NOT NULL,
            sequence INTEGER NOT NULL,
            needs_keyframe INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE upload_bytes (
            destination TEXT PRIMARY KEY,
            requests INTEGER NOT NULL DEFAULT 0,
            raw_bytes INTEGER NOT NULL DEFAULT 0,
            wire_bytes INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL
        )""",
    ],
]


class DatabaseSettingsError(ValueError):
    """A database setting that would put stored data at risk."""


def connect(
    path: Path,
    *,
    busy_timeout_s: float = 30.0,
    synchronous: str = "FULL",
    read_only: bool = False,
) -> sqlite3.Connection:
    """Open the database in autocommit mode with WAL, a busy timeout and the durability level."""
    if synchronous.upper() not in ALLOWED_SYNCHRONOUS:
        raise DatabaseSettingsError(
            f"database.synchronous={synchronous!r} is refused: it can lose or corrupt jobs; "
            f"use one of {', '.join(ALLOWED_SYNCHRONOUS)}"
        )
    if read_only:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    connection.execute("PRAGMA foreign_keys = ON")
    if not read_only:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return connection


@contextmanager
def immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock at BEGIN, so it never fails half-way."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema up to date; return the schema version now in force."""
    with immediate(connection):
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
    return len(MIGRATIONS)


def open_database(
    path: Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL"
) -> sqlite3.Connection:
    """Open the database for writing, creating or migrating the schema first."""
    connection = connect(path, busy_timeout_s=busy_timeout_s, synchronous=synchronous)
    migrate(connection)
    return connection


def as_table_db(connection: sqlite3.Connection) -> sqlite_utils.Database:
    """Wrap a connection for sqlite-utils' read helpers."""
    return sqlite_utils.Database(connection)
