"""One round of the upload stage: claim due UPLOAD jobs, upload them concurrently, record outcomes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

from shared.config import Settings
from shared.heartbeat import Heartbeat
from shared.jobs import UPLOAD, Job, LeaseLost, claim, complete, extend_lease, retry_later
from shared.lifecycle import StopFlag
from shared.logging import get_logger
from uploader.backoff import plan_retry
from uploader.errors import TRANSIENT, classify, describe
from uploader.payload import SnapshotUpload, load_snapshot_upload
from uploader.worker import SnapshotUploader, UploadResult

log = get_logger(__name__)

# Work on a job stops a little before its lease runs out, so no other worker can take it meanwhile.
LEASE_MARGIN = 0.9
# After a stop is asked for, in-flight uploads get this long before they are cancelled and requeued.
SHUTDOWN_GRACE_S = 5.0
HEARTBEAT_EVERY_S = 1.0

_BACKLOG = "SELECT count(*) FROM jobs WHERE stage = ? AND state != 'done'"


class UploadStage:
    """Claims UPLOAD jobs and runs at most `max_concurrent` uploads at once, never dropping a job."""

    def __init__(
        self,
        settings: Settings,
        connection: sqlite3.Connection,
        uploader: SnapshotUploader,
        owner: str,
        stop: StopFlag,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.uploader = uploader
        self.owner = owner
        self.stop = stop
        self.heartbeat = Heartbeat(connection, UPLOAD)
        self._slots = asyncio.Semaphore(settings.upload.max_concurrent)
        self.in_flight = 0
        self.uploaded = 0
        self.failed = 0
        self.last_error: str | None = None

    def backlog(self) -> int:
        """UPLOAD jobs not yet done (pending, leased or parked)."""
        return int(self.connection.execute(_BACKLOG, (UPLOAD,)).fetchone()[0])

    def beat(self, status: str = "running", force: bool = False) -> None:
        """Write the heartbeat with backlog, counters and the last error."""
        detail = {
            "backlog": self.backlog(),
            "in_flight": self.in_flight,
            "uploaded": self.uploaded,
            "failed": self.failed,
            "last_error": self.last_error,
        }
        self.heartbeat.beat(status, json.dumps(detail), force=force)

    async def keep_beating(self) -> None:
        """Beat every HEARTBEAT_EVERY_S until cancelled, also while a round is in flight."""
        while True:
            try:
                self.beat()
            except sqlite3.OperationalError as error:
                log.warning("upload_heartbeat_failed", error=str(error))
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def run_round(self) -> int:
        """Claim up to batch_size due jobs, process them, and return how many were claimed."""
        jobs = claim(
            self.connection, UPLOAD, self.owner, self.settings.database.lease_s,
            limit=self.settings.upload.batch_size,
        )
        if not jobs:
            return 0
        tasks = {asyncio.create_task(self._process(job)): job for job in jobs}
        await self._wait_or_stop(tasks)
        self._report_crashes(tasks)
        return len(jobs)

    def _report_crashes(self, tasks: dict[asyncio.Task[None], Job]) -> None:
        """Log jobs whose bookkeeping itself failed (e.g. a locked database); their lease will lapse."""
        for task, job in tasks.items():
            error = None if task.cancelled() else task.exception()
            if error is not None:
                log.error(
                    "upload_job_crashed", job_id=job.id, snapshot_id=job.snapshot_id, error=describe(error)
                )

    async def _wait_or_stop(self, tasks: dict[asyncio.Task[None], Job]) -> None:
        """Wait for the round; on a stop request allow SHUTDOWN_GRACE_S, then cancel and requeue."""
        pending = set(tasks)
        while pending and not self.stop.stopped:
            _, pending = await asyncio.wait(pending, timeout=0.2)
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            job = tasks[task]
            retry_later(self.connection, job, "upload stage stopped mid-upload", 0.0, error_kind=TRANSIENT)
            log.info("upload_requeued", job_id=job.id, snapshot_id=job.snapshot_id, reason="stopping")

    async def _process(self, job: Job) -> None:
        """Upload one job's snapshot under its lease and record success or failure."""
        async with self._slots:
            lease_s = self.settings.database.lease_s
            try:
                # The lease was taken at claim time; renew it now that this job's turn has come.
                job = extend_lease(self.connection, job, lease_s)
            except LeaseLost:
                log.warning("upload_lease_lost", job_id=job.id, snapshot_id=job.snapshot_id)
                return
            self.in_flight += 1
            try:
                snapshot = load_snapshot_upload(self.connection, job.snapshot_id)
                result = await asyncio.wait_for(
                    self.uploader.upload(snapshot, time.time()), timeout=lease_s * LEASE_MARGIN
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._record_failure(job, error)
                return
            finally:
                self.in_flight -= 1
            self._record_success(job, snapshot, result)

    def _record_success(self, job: Job, snapshot: SnapshotUpload, result: UploadResult) -> None:
        """Insert the uploads row and mark the job done in one transaction."""

        def write_upload(connection: sqlite3.Connection) -> None:
            connection.execute(
                """INSERT OR REPLACE INTO uploads (snapshot_id, image_key, metadata_key, image_bytes,
                       metadata_bytes, posted, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    snapshot.snapshot_id, result.image_key, result.metadata_key, result.image_bytes,
                    result.metadata_bytes, int(result.posted), time.time(),
                ),
            )

        try:
            complete(self.connection, job, write_upload)
        except LeaseLost:
            log.warning("upload_lease_lost", job_id=job.id, snapshot_id=job.snapshot_id)
            return
        self.uploaded += 1
        log.info(
            "upload_done", job_id=job.id, snapshot_id=snapshot.snapshot_id, image_key=result.image_key,
            metadata_key=result.metadata_key, bytes=result.image_bytes,
            metadata_bytes=result.metadata_bytes, posted=result.posted,
        )

    def _record_failure(self, job: Job, error: BaseException) -> None:
        """Give the job back with a backoff delay, parked when permanent or out of fast retries."""
        error_kind = classify(error)
        message = describe(error)
        plan = plan_retry(job.attempts, error_kind, self.settings.upload)
        kept = retry_later(
            self.connection, job, message, plan.delay_s, parked=plan.parked, error_kind=error_kind
        )
        if not kept:
            log.warning("upload_lease_lost", job_id=job.id, snapshot_id=job.snapshot_id)
            return
        self.failed += 1
        self.last_error = message
        log.warning(
            "upload_failed", job_id=job.id, snapshot_id=job.snapshot_id, attempts=job.attempts,
            error=message, error_kind=error_kind, parked=plan.parked, retry_in_s=round(plan.delay_s, 1),
        )
