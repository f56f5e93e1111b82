"""The upload stage: drain UPLOAD jobs to S3 and the ingest endpoint, with retries that never drop a job."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from typing import Any

import aiohttp

from shared.config import Settings
from shared.db import open_database
from shared.heartbeat import Heartbeat
from shared.jobs import UPLOAD, worker_name
from shared.lifecycle import StopFlag
from shared.logging import get_logger
from uploader.s3 import s3_client
from uploader.stage import UploadStage
from uploader.worker import SnapshotUploader

log = get_logger(__name__)

# New jobs are looked for this often when the queue is empty, so a snapshot is uploaded within a
# second or so of its detection; upload.interval only caps this wait (interval < POLL_S polls faster).
POLL_S = 0.5
MIN_POLL_S = 0.05


def idle_poll_s(interval_s: float) -> float:
    """How long to wait between claims when no job was due: min(interval, POLL_S), floored."""
    return max(MIN_POLL_S, min(interval_s, POLL_S))


@contextmanager
def _stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """Route SIGTERM/SIGINT to `stop` while the stage runs, restoring the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Callable[..., Any] | int | None] = {
        number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)
    }
    stop.install()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


async def _sleep_unless_stopped(stop: StopFlag, seconds: float) -> None:
    """Sleep on the event loop, waking early when a stop is asked for."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not stop.stopped:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.1))


async def _idle_while_disabled(connection: sqlite3.Connection, stop: StopFlag, once: bool) -> None:
    """upload.enabled is false: keep the heartbeat saying so until stopped."""
    heartbeat = Heartbeat(connection, UPLOAD)
    log.info("upload_disabled")
    while True:
        heartbeat.beat("disabled", None)
        if once or stop.stopped:
            return
        await _sleep_unless_stopped(stop, 1.0)


async def _rounds(stage: UploadStage, stop: StopFlag, once: bool, poll_s: float) -> None:
    """Claim and upload round after round; a full batch is followed at once by the next claim.

    After a round that delivered nothing because the cloud was away, the next claim waits for the
    stage's backoff (retry_base_s doubling to retry_cap_s), so an outage costs few requests.
    """
    batch_size = stage.settings.upload.batch_size
    while not stop.stopped:
        try:
            claimed = await stage.run_round()
        except sqlite3.OperationalError as error:
            # The database stayed busy past busy_timeout_s: nothing was lost, try the round again.
            log.error("upload_round_failed", error=str(error))
            await _sleep_unless_stopped(stop, poll_s)
            continue
        if once and claimed == 0:
            return
        pause_s = stage.pause_s()
        if not once and pause_s > 0:
            log.info("upload_backing_off", failed_rounds=stage.failed_rounds, pause_s=round(pause_s, 2))
            await _sleep_unless_stopped(stop, pause_s)
        elif not once and claimed < batch_size:
            await _sleep_unless_stopped(stop, poll_s)


async def _drain(settings: Settings, connection: sqlite3.Connection, stop: StopFlag, once: bool) -> None:
    """Run rounds until stopped (or, with once, until no job is due), with one S3 client and session."""
    upload = settings.upload
    async with AsyncExitStack() as stack:
        s3 = await stack.enter_async_context(s3_client(settings))
        http = await stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=upload.request_timeout_s),
                connector=aiohttp.TCPConnector(limit=upload.max_concurrent),
            )
        )
        uploader = SnapshotUploader(settings, s3, http)
        stage = UploadStage(settings, connection, uploader, worker_name(UPLOAD), stop)
        aws = settings.aws
        log.info(
            "upload_started", data_bucket=aws.data_bucket, metadata_bucket=aws.metadata_bucket,
            s3_endpoint=aws.s3_endpoint_url, api_endpoint=aws.api_endpoint,
            max_concurrent=upload.max_concurrent, batch_size=upload.batch_size, backlog=stage.backlog(),
        )
        beating = asyncio.create_task(stage.keep_beating())
        try:
            await _rounds(stage, stop, once, idle_poll_s(upload.interval))
        finally:
            beating.cancel()
            with suppress(asyncio.CancelledError):
                await beating
            stage.beat("stopped", force=True)
        log.info("upload_stopped", uploaded=stage.uploaded, failed=stage.failed, backlog=stage.backlog())


def run(settings: Settings, *, once: bool = False) -> int:
    """Upload due snapshots until SIGTERM; with once, exit 0 as soon as no UPLOAD job is due.

    Claims at most upload.batch_size jobs per round and runs upload.max_concurrent at once. A full
    batch is followed at once by the next claim; otherwise the stage polls every
    min(upload.interval, 0.5 s), so upload.interval caps the batching delay instead of setting it.
    """
    stop = StopFlag()
    connection = open_database(
        settings.database_path,
        busy_timeout_s=settings.database.busy_timeout_s,
        synchronous=settings.database.synchronous,
    )
    try:
        with _stop_on_signals(stop):
            if not settings.upload.enabled:
                asyncio.run(_idle_while_disabled(connection, stop, once))
            else:
                asyncio.run(_drain(settings, connection, stop, once))
    finally:
        connection.close()
    return 0
