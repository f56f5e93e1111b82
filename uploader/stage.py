"""One round of the upload stage: claim due UPLOAD jobs, put their objects concurrently, POST one batch."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from collections import defaultdict
from contextlib import suppress

from shared.config import Settings
from shared.db import immediate
from shared.heartbeat import Heartbeat
from shared.jobs import UPLOAD, Job, LeaseLost, claim, extend_lease, mark_done, retry_later
from shared.lifecycle import StopFlag
from shared.logging import get_logger
from uploader.accounting import ByteTally, read_byte_totals, record_bytes
from uploader.backoff import backoff_delay_s, plan_retry
from uploader.delta import KeyframeRules, PlannedRecord, SentState, plan_camera
from uploader.errors import TRANSIENT, ImageMissing, classify, describe
from uploader.images import image_wanted
from uploader.payload import SnapshotUpload, deleted_by_retention, load_snapshot_upload
from uploader.sync import load_sent_states, require_keyframe, save_sent_state, snapshot_skipped
from uploader.worker import ObjectsResult, SnapshotUploader

log = get_logger(__name__)

# After a stop is asked for, an in-flight round gets this long before it is cancelled and requeued.
SHUTDOWN_GRACE_S = 5.0
HEARTBEAT_EVERY_S = 1.0
# Leases of a round's jobs are renewed this often (as a share of lease_s) while the round runs.
LEASE_RENEW_SHARE = 0.3

_BACKLOG = "SELECT count(*) FROM jobs WHERE stage = ? AND state != 'done'"


@dataclasses.dataclass(frozen=True)
class Stored:
    """A job whose snapshot's objects are in S3, waiting for its record to reach the ingest endpoint."""

    job: Job
    snapshot: SnapshotUpload
    objects: ObjectsResult


class UploadStage:
    """Claims UPLOAD jobs a round at a time and never drops one; at most `max_concurrent` puts at once."""

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
        self.rules = KeyframeRules(settings.upload.keyframe_every, settings.upload.keyframe_gap_s)
        # Cameras that have had a record acknowledged since this process started; the others begin
        # with a keyframe, so a restart always resynchronises the cloud.
        self._synced_cameras: set[str] = set()
        self.in_flight = 0
        self.uploaded = 0
        self.failed = 0
        self.last_error: str | None = None
        # Consecutive rounds in which nothing was delivered and something failed transiently (the
        # cloud is away): the stage as a whole then waits before claiming again, see pause_s().
        self.failed_rounds = 0
        self._round_delivered = 0
        self._round_transient = 0

    def backlog(self) -> int:
        """UPLOAD jobs not yet done (pending, leased or parked)."""
        return int(self.connection.execute(_BACKLOG, (UPLOAD,)).fetchone()[0])

    def beat(self, status: str = "running", force: bool = False) -> None:
        """Write the heartbeat with backlog, counters, the last error and the bytes delivered."""
        detail = {
            "backlog": self.backlog(),
            "in_flight": self.in_flight,
            "uploaded": self.uploaded,
            "failed": self.failed,
            "last_error": self.last_error,
            "bytes": read_byte_totals(self.connection),
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
        """Claim up to batch_size due jobs, upload them as one batch, and return how many were claimed."""
        jobs = claim(
            self.connection, UPLOAD, self.owner, self.settings.database.lease_s,
            limit=self.settings.upload.batch_size,
        )
        if not jobs:
            return 0
        self._round_delivered = self._round_transient = 0
        renewing = asyncio.create_task(self._renew_leases(jobs))
        syncing = asyncio.create_task(self._sync(jobs))
        try:
            await self._wait_or_stop(syncing, jobs)
        finally:
            renewing.cancel()
            with suppress(asyncio.CancelledError):
                await renewing
        if self._round_delivered:
            self.failed_rounds = 0
        elif self._round_transient:
            self.failed_rounds += 1
        return len(jobs)

    def pause_s(self) -> float:
        """How long to wait before the next claim: 0, or a backoff growing with each failed round.

        Without it every poll would claim a fresh batch of new jobs during an outage, so requests
        would grow with the backlog; with it the stage tries one batch per backoff delay.
        """
        if self.failed_rounds == 0:
            return 0.0
        upload = self.settings.upload
        return backoff_delay_s(self.failed_rounds, upload.retry_base_s, upload.retry_cap_s)

    async def _renew_leases(self, jobs: list[Job]) -> None:
        """Keep the round's leases from running out while slow (or bandwidth-capped) sends go on."""
        lease_s = self.settings.database.lease_s
        while True:
            await asyncio.sleep(lease_s * LEASE_RENEW_SHARE)
            for job in jobs:
                with suppress(LeaseLost):
                    extend_lease(self.connection, job, lease_s)

    async def _wait_or_stop(self, syncing: asyncio.Task[None], jobs: list[Job]) -> None:
        """Wait for the round; on a stop request allow SHUTDOWN_GRACE_S, then cancel and requeue."""
        while not syncing.done() and not self.stop.stopped:
            await asyncio.wait({syncing}, timeout=0.2)
        if not syncing.done():
            await asyncio.wait({syncing}, timeout=SHUTDOWN_GRACE_S)
        if not syncing.done():
            syncing.cancel()
            await asyncio.gather(syncing, return_exceptions=True)
            for job in jobs:
                message = "upload stage stopped mid-upload"
                if retry_later(self.connection, job, message, 0.0, error_kind=TRANSIENT):
                    log.info("upload_requeued", job_id=job.id, snapshot_id=job.snapshot_id, reason="stopping")
            return
        error = syncing.exception()
        if error is not None:
            # Bookkeeping itself failed (e.g. a locked database); the leases will lapse and be reclaimed.
            log.error("upload_round_crashed", jobs=len(jobs), error=describe(error))

    def _load(self, jobs: list[Job]) -> list[tuple[Job, SnapshotUpload]]:
        """Each job's snapshot; jobs whose snapshot cannot be read are given back at once."""
        loaded = []
        for job in jobs:
            try:
                loaded.append((job, load_snapshot_upload(self.connection, job.snapshot_id)))
            except Exception as error:
                self._record_failure([job], error)
        return loaded

    def _plan(self, snapshots: list[SnapshotUpload]) -> dict[str, list[PlannedRecord]]:
        """Per camera, the records for these snapshots, chained on what the cloud last acknowledged."""
        states = load_sent_states(self.connection)
        by_camera: dict[str, list[SnapshotUpload]] = defaultdict(list)
        for snapshot in snapshots:
            by_camera[snapshot.camera_id].append(snapshot)
        plans = {}
        for camera_id, camera_snapshots in sorted(by_camera.items()):
            previous: SentState | None = states.get(camera_id)
            if previous is not None and camera_id not in self._synced_cameras:
                previous = dataclasses.replace(previous, needs_keyframe=True)
            plans[camera_id] = plan_camera(
                camera_snapshots, previous, self.rules,
                lambda camera, after, before: snapshot_skipped(self.connection, camera, after, before),
            )
        return plans

    async def _put(self, job: Job, snapshot: SnapshotUpload, send_image: bool) -> ObjectsResult:
        """One snapshot's S3 writes, within the concurrency limit; without the image if retention took it.

        A JPEG missing from disk is a fault (parked as permanent) unless retention marked the snapshot
        deleted; retention marks before it unlinks, so reading deleted_at after the miss decides.
        """
        async with self._slots:
            self.in_flight += 1
            try:
                if snapshot.deleted:
                    _log_without_image(job, snapshot)
                try:
                    return await self.uploader.put_objects(snapshot, send_image)
                except ImageMissing:
                    if snapshot.deleted or not deleted_by_retention(self.connection, snapshot.snapshot_id):
                        raise
                gone = dataclasses.replace(snapshot, deleted=True)
                _log_without_image(job, gone)
                return await self.uploader.put_objects(gone, send_image)
            finally:
                self.in_flight -= 1

    async def _put_all(self, loaded: list[tuple[Job, SnapshotUpload]]) -> list[Stored]:
        """Put every snapshot's objects concurrently; the ones that fail are given back."""
        planned = self._plan([snapshot for _, snapshot in loaded])
        wanted = {
            record.snapshot.snapshot_id: image_wanted(record, self.settings.upload)
            for records in planned.values() for record in records
        }
        outcomes = await asyncio.gather(
            *(self._put(job, snapshot, wanted[snapshot.snapshot_id]) for job, snapshot in loaded),
            return_exceptions=True,
        )
        stored = []
        for (job, snapshot), outcome in zip(loaded, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                self._record_failure([job], outcome)
            else:
                stored.append(Stored(job, snapshot, outcome))
        return stored

    async def _sync(self, jobs: list[Job]) -> None:
        """Put the objects, then POST the records of those that made it, then record the outcome."""
        loaded = self._load(jobs)
        stored = await self._put_all(loaded) if loaded else []
        if not stored:
            return
        # Planned again over the snapshots whose objects are stored, so no delta rests on a failed one.
        plans = self._plan([item.snapshot for item in stored])
        records = [record.body for camera_id in sorted(plans) for record in plans[camera_id]]
        try:
            ingest = await self.uploader.post_records(records)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            with immediate(self.connection):
                require_keyframe(self.connection, sorted(plans))
            self._record_failure([item.job for item in stored], error)
            return
        self._record_success(stored, plans, ingest)

    def _record_success(
        self, stored: list[Stored], plans: dict[str, list[PlannedRecord]], ingest: ByteTally
    ) -> None:
        """In one transaction: the uploads rows, the jobs done, each camera's new sync state, the bytes."""
        kinds = {record.snapshot.snapshot_id: record.kind for records in plans.values() for record in records}
        tally = ByteTally()
        tally.merge(ingest)
        done: list[Stored] = []
        now = time.time()
        with immediate(self.connection):
            for item in stored:
                try:
                    mark_done(self.connection, item.job, now)
                except LeaseLost:
                    log.warning("upload_lease_lost", job_id=item.job.id, snapshot_id=item.job.snapshot_id)
                    continue
                self._insert_upload(item, now)
                tally.merge(item.objects.tally)
                done.append(item)
            # The cloud holds every record of the batch now, whoever finishes a job whose lease we lost.
            for records in plans.values():
                save_sent_state(self.connection, self.settings.device_id, records[-1].after)
            record_bytes(self.connection, tally)
        self._synced_cameras.update(plans)
        self.uploaded += len(done)
        self._round_delivered += len(done)
        self._log_success(done, kinds, sum(len(records) for records in plans.values()), ingest)

    def _insert_upload(self, item: Stored, now: float) -> None:
        """The uploads row of one snapshot; image_key is empty when the policy or retention left the image."""
        objects = item.objects
        self.connection.execute(
            """INSERT OR REPLACE INTO uploads (snapshot_id, image_key, metadata_key, image_bytes,
                   metadata_bytes, posted, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (
                item.snapshot.snapshot_id, objects.image_key, objects.metadata_key, objects.image_bytes,
                objects.metadata_bytes, int(self.uploader.ingest_url is not None), now,
            ),
        )

    def _log_success(
        self, done: list[Stored], kinds: dict[int, str], records_sent: int, ingest: ByteTally
    ) -> None:
        """One upload_done per snapshot and one ingest_batch_sent per request."""
        posted = self.uploader.ingest_url is not None
        for item in done:
            objects = item.objects
            log.info(
                "upload_done", job_id=item.job.id, snapshot_id=item.snapshot.snapshot_id,
                image_key=objects.image_key, metadata_key=objects.metadata_key, bytes=objects.image_bytes,
                metadata_bytes=objects.metadata_bytes, posted=posted, record=kinds[item.snapshot.snapshot_id],
            )
        if posted:
            log.info(
                "ingest_batch_sent", records=records_sent, raw_bytes=ingest.raw_bytes["ingest"],
                wire_bytes=ingest.wire_bytes["ingest"],
            )

    def _record_failure(self, jobs: list[Job], error: BaseException) -> None:
        """Give each job back with a backoff delay, parked when permanent or out of fast retries."""
        error_kind = classify(error)
        message = describe(error)
        for job in jobs:
            plan = plan_retry(job.attempts, error_kind, self.settings.upload)
            kept = retry_later(
                self.connection, job, message, plan.delay_s, parked=plan.parked, error_kind=error_kind
            )
            if not kept:
                log.warning("upload_lease_lost", job_id=job.id, snapshot_id=job.snapshot_id)
                continue
            self.failed += 1
            self._round_transient += int(error_kind == TRANSIENT)
            self.last_error = message
            log.warning(
                "upload_failed", job_id=job.id, snapshot_id=job.snapshot_id, attempts=job.attempts,
                error=message, error_kind=error_kind, parked=plan.parked, retry_in_s=round(plan.delay_s, 1),
            )


def _log_without_image(job: Job, snapshot: SnapshotUpload) -> None:
    """The snapshot's result goes to the cloud without its JPEG, which retention deleted."""
    log.info(
        "upload_without_image", job_id=job.id, snapshot_id=snapshot.snapshot_id, camera_id=snapshot.camera_id,
        reason="deleted_by_retention",
    )
