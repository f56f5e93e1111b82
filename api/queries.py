"""The read-only queries behind /zones, /changes and /queue."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from shared.config import Settings
from shared.status import read_queue

PARKED_LISTED = 100


def iso_utc(timestamp: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC time, e.g. 2026-12-03T17:05:40.123Z."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _zone_entry(
    camera_id: str, zone_id: str, name: str | None, row: sqlite3.Row | None, configured: bool = True
) -> dict[str, Any]:
    """One zone as the API shows it; occupied is null until detect has judged the zone."""
    entry: dict[str, Any] = {
        "camera_id": camera_id,
        "zone_id": zone_id,
        "name": name,
        "configured": configured,
        "occupied": None,
        "confidence": None,
        "since": None,
        "since_iso": None,
        "updated_at": None,
        "snapshot_id": None,
    }
    if row is not None:
        entry.update(
            occupied=bool(row["occupied"]),
            confidence=row["confidence"],
            since=row["since"],
            since_iso=iso_utc(row["since"]),
            updated_at=row["updated_at"],
            snapshot_id=row["snapshot_id"],
        )
    return entry


def _camera_summary(camera_id: str, zones: list[dict[str, Any]]) -> dict[str, Any]:
    """A camera's zone counts: spaces, occupied, vacant and not yet judged."""
    occupied = sum(1 for zone in zones if zone["occupied"] is True)
    vacant = sum(1 for zone in zones if zone["occupied"] is False)
    return {
        "camera_id": camera_id,
        "spaces": len(zones),
        "occupied": occupied,
        "vacant": vacant,
        "unknown": len(zones) - occupied - vacant,
    }


def read_zones(
    connection: sqlite3.Connection, settings: Settings, camera_id: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every zone (configured ones in file order, then others the database knows) and per-camera counts."""
    sql = "SELECT * FROM zone_state"
    params: tuple[str, ...] = ()
    if camera_id is not None:
        sql += " WHERE camera_id = ?"
        params = (camera_id,)
    rows = connection.execute(sql + " ORDER BY camera_id, zone_id", params)
    states = {(row["camera_id"], row["zone_id"]): row for row in rows}

    cameras: dict[str, list[dict[str, Any]]] = {}
    for camera in settings.cameras:
        if camera_id is not None and camera.id != camera_id:
            continue
        cameras[camera.id] = [
            _zone_entry(camera.id, zone.id, zone.name, states.pop((camera.id, zone.id), None))
            for zone in camera.parking_zones
        ]
    for (state_camera_id, zone_id), row in states.items():
        entry = _zone_entry(state_camera_id, zone_id, None, row, configured=False)
        cameras.setdefault(state_camera_id, []).append(entry)
    return {
        "cameras": [_camera_summary(key, zones) for key, zones in cameras.items()],
        "zones": [zone for zones in cameras.values() for zone in zones],
    }


def read_changes(
    connection: sqlite3.Connection, since: float, limit: int, camera_id: str | None = None
) -> dict[str, Any]:
    """Zone events after `since`, oldest first, cut so that `next_since` never skips an event."""
    sql = "SELECT * FROM zone_events WHERE at > ?"
    params: list[Any] = [since]
    if camera_id is not None:
        sql += " AND camera_id = ?"
        params.append(camera_id)
    rows = connection.execute(sql + " ORDER BY at, id LIMIT ?", [*params, limit + 1]).fetchall()

    truncated = len(rows) > limit
    if truncated:
        boundary_at = rows[limit]["at"]
        kept = [row for row in rows[:limit] if row["at"] < boundary_at]
        rows = kept or rows[:limit]
    events = [
        {
            "id": row["id"],
            "camera_id": row["camera_id"],
            "zone_id": row["zone_id"],
            "event": row["event"],
            "occupied": row["event"] == "occupied",
            "at": row["at"],
            "at_iso": iso_utc(row["at"]),
            "confidence": row["confidence"],
            "snapshot_id": row["snapshot_id"],
        }
        for row in rows
    ]
    next_since = events[-1]["at"] if events else since
    return {
        "since": since,
        "count": len(events),
        "truncated": truncated,
        "next_since": next_since,
        "events": events,
    }


def read_queue_detail(connection: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Jobs per stage and state, the oldest waiting job per stage, and the parked jobs."""
    waiting: dict[str, dict[str, Any]] = {}
    backlog = connection.execute(
        "SELECT stage, waiting, oldest_created_at, most_attempts FROM queue_backlog ORDER BY stage"
    )
    for row in backlog:
        waiting[row["stage"]] = {
            "jobs": row["waiting"],
            "oldest_created_at": row["oldest_created_at"],
            "oldest_age_s": round(max(0.0, now - row["oldest_created_at"]), 3),
            "most_attempts": row["most_attempts"],
        }

    parked_rows = connection.execute(
        """SELECT id, stage, snapshot_id, attempts, last_error, error_kind, updated_at, available_at
           FROM jobs WHERE state = 'failed' ORDER BY updated_at DESC, id DESC LIMIT ?""",
        (PARKED_LISTED,),
    )
    parked = [
        {
            "job_id": row["id"],
            "stage": row["stage"],
            "snapshot_id": row["snapshot_id"],
            "attempts": row["attempts"],
            "last_error": row["last_error"],
            "error_kind": row["error_kind"],
            "parked_at": row["updated_at"],
            "next_retry_at": row["available_at"],
            "next_retry_iso": iso_utc(row["available_at"]),
        }
        for row in parked_rows
    ]
    return {"stages": read_queue(connection), "waiting": waiting, "parked": parked}
