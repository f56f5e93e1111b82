"""The device's health: are the stages beating, is work flowing, is anything parked."""

from __future__ import annotations

import shutil
import sqlite3
from typing import Any

from shared.config import Settings
from shared.jobs import DETECT, STAGES, UPLOAD
from shared.status import PROCESSES, read_heartbeats, read_queue

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"

# Heartbeat statuses a stage reports when it is alive but not doing its work.
STALLED_STATUSES = frozenset({"error", "failing", "stalled", "stopped", "stopping", "degraded"})


def stale_after_s(settings: Settings) -> float:
    """How old a heartbeat may be before its process counts as stale."""
    return max(3 * settings.processing.snapshot_interval, 15.0)


def backlog_limits_s(settings: Settings) -> dict[str, float]:
    """How long a job may wait per stage before its backlog counts as growing; none for disabled uploads."""
    snapshot_interval_s = settings.processing.snapshot_interval
    limits = {DETECT: max(10 * snapshot_interval_s, 60.0)}
    if settings.upload.enabled:
        limits[UPLOAD] = max(3 * settings.upload.interval, 10 * snapshot_interval_s, 120.0)
    return limits


def expected_processes(settings: Settings) -> tuple[str, ...]:
    """The stages that must be running; upload only when uploads are enabled."""
    return tuple(name for name in PROCESSES if name != "upload" or settings.upload.enabled)


def _read_backlog(connection: sqlite3.Connection, now: float) -> dict[str, dict[str, Any]]:
    """Per stage: jobs waiting to be (re)done, the oldest one's age, and those retrying after errors."""
    backlog: dict[str, dict[str, Any]] = {
        stage: {"waiting": 0, "oldest_age_s": None, "retrying": 0, "last_error": None}
        for stage in STAGES
    }
    rows = connection.execute(
        """SELECT stage, count(*) AS waiting, min(created_at) AS oldest_created_at,
                  sum(last_error IS NOT NULL) AS retrying
           FROM jobs WHERE state IN ('pending', 'leased') GROUP BY stage"""
    )
    for row in rows:
        backlog[row["stage"]] = {
            "waiting": row["waiting"],
            "oldest_age_s": round(max(0.0, now - row["oldest_created_at"]), 3),
            "retrying": int(row["retrying"]),
            "last_error": None,
        }
    errors = connection.execute(
        """SELECT stage, last_error FROM jobs WHERE state != 'done' AND last_error IS NOT NULL
           ORDER BY updated_at"""
    )
    for row in errors:
        if row["stage"] in backlog:
            backlog[row["stage"]]["last_error"] = row["last_error"]
    return backlog


def _judge_processes(
    heartbeats: dict[str, dict[str, Any]], settings: Settings, reasons: list[str]
) -> dict[str, dict[str, Any]]:
    """Each expected process's heartbeat with a state (ok, stale, stalled, missing); append reasons."""
    limit_s = stale_after_s(settings)
    processes: dict[str, dict[str, Any]] = {}
    for name in expected_processes(settings):
        heartbeat = heartbeats.get(name)
        if heartbeat is None:
            processes[name] = {"state": "missing"}
            reasons.append(f"{name} has never sent a heartbeat")
            continue
        if heartbeat["beat_age_s"] > limit_s:
            state = "stale"
            reasons.append(f"{name} heartbeat is {heartbeat['beat_age_s']:.0f} s old (limit {limit_s:.0f} s)")
        elif heartbeat["status"] in STALLED_STATUSES:
            state = "stalled"
            detail = f": {heartbeat['detail']}" if heartbeat["detail"] else ""
            reasons.append(f"{name} reports {heartbeat['status']}{detail}")
        else:
            state = "ok"
        processes[name] = {**heartbeat, "state": state}
    return processes


def _judge_queue(
    queue: dict[str, dict[str, int]],
    backlog: dict[str, dict[str, Any]],
    settings: Settings,
    reasons: list[str],
) -> None:
    """Append reasons for parked jobs, jobs retrying after errors, and work waiting too long."""
    limits_s = backlog_limits_s(settings)
    for stage, waiting in backlog.items():
        parked = queue.get(stage, {}).get("failed", 0)
        last_error = f" (last error: {waiting['last_error']})" if waiting.get("last_error") else ""
        if parked:
            reasons.append(f"{parked} {stage} job(s) parked after repeated failures{last_error}")
        if waiting["retrying"]:
            reasons.append(f"{waiting['retrying']} {stage} job(s) retrying after errors{last_error}")
        limit_s = limits_s.get(stage)
        age_s = waiting["oldest_age_s"]
        if limit_s is not None and age_s is not None and age_s > limit_s:
            reasons.append(
                f"{stage} backlog: {waiting['waiting']} job(s) waiting, oldest {age_s:.0f} s "
                f"(limit {limit_s:.0f} s)"
            )


def _judge_disk(settings: Settings, reasons: list[str]) -> dict[str, int] | None:
    """Free space on the snapshot disk against the retention floor; None if it cannot be measured."""
    folder = settings.snapshots_dir if settings.snapshots_dir.exists() else settings.data_dir
    try:
        free_bytes = shutil.disk_usage(folder).free
    except OSError:
        return None
    floor = settings.retention.min_free_bytes
    if free_bytes < floor:
        reasons.append(
            f"free disk space {free_bytes / 1e9:.2f} GB is below retention.min_free_bytes {floor / 1e9:.2f} GB"
        )
    return {"free_bytes": free_bytes, "min_free_bytes": floor}


def assess_health(connection: sqlite3.Connection, settings: Settings, now: float) -> dict[str, Any]:
    """The health document: overall status, the reasons for it, processes and queue."""
    reasons: list[str] = []
    heartbeats = read_heartbeats(connection, now)
    queue = read_queue(connection)
    backlog = _read_backlog(connection, now)

    processes = _judge_processes(heartbeats, settings, reasons)
    _judge_queue(queue, backlog, settings, reasons)
    disk = _judge_disk(settings, reasons)

    if all(process["state"] == "missing" for process in processes.values()):
        status = UNHEALTHY
        names = ", ".join(processes)
        reasons = [f"no process has ever sent a heartbeat ({names})", *reasons[len(processes):]]
    else:
        status = DEGRADED if reasons else HEALTHY
    return {
        "status": status,
        "reasons": reasons,
        "device_id": settings.device_id,
        "checked_at": now,
        "processes": processes,
        "queue": {
            "depth": {stage: waiting["waiting"] for stage, waiting in backlog.items()},
            "oldest_waiting_s": {stage: waiting["oldest_age_s"] for stage, waiting in backlog.items()},
            "jobs": queue,
        },
        "uploads": {
            "parked": queue.get(UPLOAD, {}).get("failed", 0),
            "retrying": backlog.get(UPLOAD, {}).get("retrying", 0),
        },
        "disk": disk,
        "limits": {"stale_after_s": stale_after_s(settings), "backlog_s": backlog_limits_s(settings)},
    }


def unreadable_health(settings: Settings, error: Exception, now: float) -> dict[str, Any]:
    """The health document when the database cannot be read at all."""
    return {
        "status": UNHEALTHY,
        "reasons": [f"database cannot be read: {error}"],
        "device_id": settings.device_id,
        "checked_at": now,
        "processes": {},
        "queue": {},
        "uploads": {},
    }
