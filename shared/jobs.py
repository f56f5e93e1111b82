"""The job table: enqueue work for a stage, claim it under a lease, finish or retry it."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.db import immediate

DETECT = "detect"
UPLOAD = "upload"
STAGES = (DETECT, UPLOAD)


class LeaseLost(RuntimeError):
    """The job's lease expired and was taken by another worker; its result must not be kept."""


@dataclass(frozen=True)
class Job:
    """One claimed unit of work for a stage on one snapshot."""

    id: int
    stage: str
    snapshot_id: int
    attempts: int
    lease_owner: str
    lease_expires_at: float


def worker_name(stage: str) -> str:
    """A lease owner name unique to this process."""
    return f"{stage}@{socket.gethostname()}:{os.getpid()}"


def enqueue(connection: sqlite3.Connection, stage: str, snapshot_id: int, now: float | None = None) -> None:
    """Add a stage's job for a snapshot unless it exists; call inside the writer's transaction."""
    now = time.time() if now is None else now
    connection.execute(
        """INSERT INTO jobs (stage, snapshot_id, available_at, created_at, updated_at)
           VALUES (?, ?, ?, ?, ?) ON CONFLICT (stage, snapshot_id) DO NOTHING""",
        (stage, snapshot_id, now, now, now),
    )


_CLAIM = """
UPDATE jobs
SET state = 'leased', lease_owner = :owner, lease_expires_at = :expires,
    attempts = attempts + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM jobs
    WHERE stage = :stage
      AND ((state IN ('pending', 'failed') AND available_at <= :now)
           OR (state = 'leased' AND lease_expires_at < :now))
    ORDER BY available_at, id
    LIMIT :limit
)
RETURNING id, stage, snapshot_id, attempts, lease_owner, lease_expires_at
"""


def claim(
    connection: sqlite3.Connection,
    stage: str,
    owner: str,
    lease_s: float,
    limit: int = 1,
    now: float | None = None,
) -> list[Job]:
    """Lease up to `limit` due jobs of a stage in one atomic statement; expired leases are due."""
    now = time.time() if now is None else now
    with immediate(connection):
        rows = connection.execute(
            _CLAIM,
            {"owner": owner, "expires": now + lease_s, "now": now, "stage": stage, "limit": limit},
        ).fetchall()
    jobs = [Job(**dict(row)) for row in rows]
    return sorted(jobs, key=lambda job: job.id)


def assert_lease(connection: sqlite3.Connection, job: Job) -> None:
    """Raise LeaseLost unless this worker still holds the job; call inside a write transaction."""
    row = connection.execute(
        "SELECT state, lease_owner, attempts FROM jobs WHERE id = ?", (job.id,)
    ).fetchone()
    if row is None or row["state"] != "leased" or row["lease_owner"] != job.lease_owner:
        raise LeaseLost(f"job {job.id} ({job.stage}) is no longer leased to {job.lease_owner}")
    if row["attempts"] != job.attempts:
        raise LeaseLost(f"job {job.id} ({job.stage}) was claimed again after this lease")


def mark_done(connection: sqlite3.Connection, job: Job, now: float | None = None) -> None:
    """Mark a held job done; call inside the transaction that wrote its effects."""
    now = time.time() if now is None else now
    assert_lease(connection, job)
    connection.execute(
        """UPDATE jobs SET state = 'done', lease_owner = NULL, lease_expires_at = NULL,
           last_error = NULL, error_kind = NULL, updated_at = ?, done_at = ? WHERE id = ?""",
        (now, now, job.id),
    )


def complete(
    connection: sqlite3.Connection,
    job: Job,
    write_effects: Callable[[sqlite3.Connection], None] | None = None,
    now: float | None = None,
) -> None:
    """Write a job's effects and mark it done in one transaction, only if the lease still holds."""
    with immediate(connection):
        if write_effects is not None:
            write_effects(connection)
        mark_done(connection, job, now)


def retry_later(
    connection: sqlite3.Connection,
    job: Job,
    error: str,
    delay_s: float,
    *,
    parked: bool = False,
    error_kind: str = "transient",
    now: float | None = None,
) -> bool:
    """Give a held job back to be tried again after `delay_s`; never drops it.

    A parked job is stored as 'failed' (visible as such) and is still retried on its schedule.
    Returns False when the lease had already been lost.
    """
    now = time.time() if now is None else now
    state = "failed" if parked else "pending"
    with immediate(connection):
        cursor = connection.execute(
            """UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,
               available_at = ?, last_error = ?, error_kind = ?, updated_at = ?
               WHERE id = ? AND state = 'leased' AND lease_owner = ? AND attempts = ?""",
            (state, now + delay_s, error[:2000], error_kind, now, job.id, job.lease_owner, job.attempts),
        )
    return cursor.rowcount == 1


def extend_lease(connection: sqlite3.Connection, job: Job, lease_s: float) -> Job:
    """Push a held job's lease expiry forward; raise LeaseLost if it is no longer held."""
    expires = time.time() + lease_s
    with immediate(connection):
        cursor = connection.execute(
            """UPDATE jobs SET lease_expires_at = ?, updated_at = ?
               WHERE id = ? AND state = 'leased' AND lease_owner = ? AND attempts = ?""",
            (expires, time.time(), job.id, job.lease_owner, job.attempts),
        )
    if cursor.rowcount != 1:
        raise LeaseLost(f"job {job.id} ({job.stage}) is no longer leased to {job.lease_owner}")
    return Job(job.id, job.stage, job.snapshot_id, job.attempts, job.lease_owner, expires)


def queue_counts(connection: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Jobs per stage and state, read from the queue_summary view."""
    counts: dict[str, dict[str, int]] = {}
    for row in connection.execute("SELECT stage, state, jobs FROM queue_summary ORDER BY stage, state"):
        counts.setdefault(row["stage"], {})[row["state"]] = row["jobs"]
    return counts
