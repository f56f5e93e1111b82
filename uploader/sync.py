"""The per-camera cloud sync state in SQLite: the last acknowledged record, kept across restarts."""

from __future__ import annotations

import json
import sqlite3
import time

from uploader.delta import SentState

_SKIPPED = """SELECT EXISTS (SELECT 1 FROM snapshots
               WHERE camera_id = ? AND captured_at > ? AND captured_at < ?)"""


def load_sent_states(connection: sqlite3.Connection) -> dict[str, SentState]:
    """Every camera's last acknowledged record, by camera id."""
    states: dict[str, SentState] = {}
    for row in connection.execute("SELECT * FROM cloud_sync"):
        states[row["camera_id"]] = SentState(
            camera_id=row["camera_id"],
            snapshot_id=row["snapshot_id"],
            record_key=row["record_key"],
            captured_at=row["captured_at"],
            zones=json.loads(row["zones_json"]),
            since_keyframe=row["since_keyframe"],
            sequence=row["sequence"],
            needs_keyframe=bool(row["needs_keyframe"]),
        )
    return states


def save_sent_state(connection: sqlite3.Connection, device_id: str, state: SentState) -> None:
    """Store a camera's last acknowledged record unless a newer one is stored (a late, stale worker).

    Call inside the transaction that completes the jobs.
    """
    connection.execute(
        """INSERT INTO cloud_sync (camera_id, device_id, snapshot_id, record_key, captured_at, zones_json,
               since_keyframe, sequence, needs_keyframe, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
           ON CONFLICT (camera_id) DO UPDATE SET device_id = excluded.device_id,
               snapshot_id = excluded.snapshot_id, record_key = excluded.record_key,
               captured_at = excluded.captured_at, zones_json = excluded.zones_json,
               since_keyframe = excluded.since_keyframe, sequence = excluded.sequence,
               needs_keyframe = 0, updated_at = excluded.updated_at
           WHERE excluded.captured_at >= cloud_sync.captured_at""",
        (
            state.camera_id, device_id, state.snapshot_id, state.record_key, state.captured_at,
            json.dumps(state.zones), state.since_keyframe, state.sequence, time.time(),
        ),
    )


def require_keyframe(connection: sqlite3.Connection, camera_ids: list[str]) -> None:
    """After a failed send the cloud may hold more or less than we think: the next record is a keyframe."""
    connection.executemany(
        "UPDATE cloud_sync SET needs_keyframe = 1, updated_at = ? WHERE camera_id = ?",
        [(time.time(), camera_id) for camera_id in camera_ids],
    )


def snapshot_skipped(connection: sqlite3.Connection, camera_id: str, after: float, before: float) -> bool:
    """Whether the camera has a snapshot captured strictly between two times (a gap in the chain)."""
    return bool(connection.execute(_SKIPPED, (camera_id, after, before)).fetchone()[0])
