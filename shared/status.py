"""What the device has done so far, read from the database for `parkmon status` and the API."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shared.config import Settings
from shared.db import connect
from shared.jobs import STAGES, queue_counts
from uploader.accounting import DESTINATIONS, read_byte_totals

PROCESSES = ("capture", "detect", "upload")
JOB_STATES = ("pending", "leased", "done", "failed")


@contextmanager
def reading(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction, so every count comes from the same moment."""
    busy_timeout_s = settings.database.busy_timeout_s
    connection = connect(settings.database_path, busy_timeout_s=busy_timeout_s, read_only=True)
    try:
        connection.execute("BEGIN")
        yield connection
        connection.execute("COMMIT")
    finally:
        connection.close()


def read_heartbeats(connection: sqlite3.Connection, now: float) -> dict[str, dict[str, Any]]:
    """Each process's last heartbeat with its age in seconds."""
    heartbeats: dict[str, dict[str, Any]] = {}
    rows = connection.execute(
        "SELECT process, pid, started_at, beat_at, status, detail FROM heartbeats ORDER BY process"
    )
    for row in rows:
        heartbeats[row["process"]] = {
            "pid": row["pid"],
            "status": row["status"],
            "detail": row["detail"],
            "started_at": row["started_at"],
            "beat_at": row["beat_at"],
            "beat_age_s": round(max(0.0, now - row["beat_at"]), 3),
        }
    return heartbeats


def read_queue(connection: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Jobs per stage and state, with every known stage and state present (zero when empty)."""
    counts = {stage: dict.fromkeys(JOB_STATES, 0) for stage in STAGES}
    for stage, states in queue_counts(connection).items():
        counts.setdefault(stage, dict.fromkeys(JOB_STATES, 0)).update(states)
    return counts


def read_zones_occupied(connection: sqlite3.Connection, settings: Settings) -> dict[str, int]:
    """Occupied zones per camera; configured cameras not yet seen count zero."""
    occupied = {camera.id: 0 for camera in settings.cameras}
    rows = connection.execute(
        "SELECT camera_id, coalesce(sum(occupied), 0) AS occupied FROM zone_state GROUP BY camera_id"
    )
    for row in rows:
        occupied[row["camera_id"]] = int(row["occupied"])
    return occupied


def count_rows(connection: sqlite3.Connection, table: str) -> int:
    """Rows in one of the schema's tables."""
    return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _empty_report(settings: Settings) -> dict[str, Any]:
    """The report of a device that has not stored anything yet."""
    return {
        "device_id": settings.device_id,
        "database": str(settings.database_path),
        "snapshots": 0,
        "snapshots_kept": 0,
        "detections": 0,
        "uploaded": 0,
        "zone_events": 0,
        "queue": {stage: dict.fromkeys(JOB_STATES, 0) for stage in STAGES},
        "zones_occupied": {camera.id: 0 for camera in settings.cameras},
        "zones_configured": {camera.id: len(camera.parking_zones) for camera in settings.cameras},
        "upload_bytes": {
            destination: {"requests": 0, "raw_bytes": 0, "wire_bytes": 0} for destination in DESTINATIONS
        },
        "processes": dict.fromkeys(PROCESSES),
    }


def status_report(settings: Settings, now: float | None = None) -> dict[str, Any]:
    """Counts of snapshots, jobs, detections, uploads, occupied zones and heartbeat ages."""
    now = time.time() if now is None else now
    report = _empty_report(settings)
    if not settings.database_path.exists():
        return report

    with reading(settings) as connection:
        if connection.execute("PRAGMA user_version").fetchone()[0] == 0:
            return report
        report["snapshots"] = count_rows(connection, "snapshots")
        report["snapshots_kept"] = int(
            connection.execute("SELECT count(*) FROM snapshots WHERE deleted_at IS NULL").fetchone()[0]
        )
        report["detections"] = count_rows(connection, "detections")
        report["uploaded"] = count_rows(connection, "uploads")
        report["zone_events"] = count_rows(connection, "zone_events")
        report["queue"] = read_queue(connection)
        report["zones_occupied"] = read_zones_occupied(connection, settings)
        report["upload_bytes"] = read_byte_totals(connection)
        heartbeats = read_heartbeats(connection, now)

    report["processes"] = {**dict.fromkeys(PROCESSES), **heartbeats}
    return report


def _format_process(name: str, heartbeat: dict[str, Any] | None) -> str:
    """One line per process: how long ago it beat and what it said."""
    if heartbeat is None:
        return f"  {name:<8} never seen"
    detail = f" ({heartbeat['detail']})" if heartbeat.get("detail") else ""
    return (
        f"  {name:<8} beat {heartbeat['beat_age_s']:.1f} s ago, pid {heartbeat['pid']}, "
        f"{heartbeat['status']}{detail}"
    )


def format_status(report: dict[str, Any]) -> str:
    """The status report as a few lines for a terminal."""
    lines = [
        f"device {report['device_id']}   database {report['database']}",
        f"snapshots {report['snapshots']} ({report['snapshots_kept']} kept)   "
        f"detections {report['detections']}   uploaded {report['uploaded']}",
        "queue:",
    ]
    for stage, states in report["queue"].items():
        counts = "  ".join(f"{state} {count}" for state, count in states.items())
        lines.append(f"  {stage:<8} {counts}")

    lines.append("zones occupied:")
    configured = report.get("zones_configured", {})
    for camera_id, occupied in report["zones_occupied"].items():
        total = configured.get(camera_id)
        lines.append(f"  {camera_id:<8} {occupied}" + (f" of {total}" if total is not None else ""))

    lines.append("processes:")
    for name, heartbeat in report["processes"].items():
        lines.append(_format_process(name, heartbeat))
    return "\n".join(lines)
