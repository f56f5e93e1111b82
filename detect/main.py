"""The detect stage: claim DETECT jobs, find vehicles, decide zones, hand the snapshot to upload."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import cv2
import numpy as np

from detect.analysis import analyse_frame
from detect.detector import DetectorError, VehicleDetector
from detect.occupancy import ZoneScaleError, scale_zones
from detect.results import result_document, write_detection
from detect.smoothing import SmoothingRule, smoothing_rule
from shared.config import Settings
from shared.db import open_database
from shared.heartbeat import Heartbeat
from shared.jobs import DETECT, Job, LeaseLost, claim, complete, retry_later, worker_name
from shared.lifecycle import StopFlag
from shared.logging import get_logger

log = get_logger(__name__)

IDLE_POLL_S = 0.5
RETRY_BASE_S = 5.0
RETRY_CAP_S = 300.0
# Fast retries for an unreadable snapshot before the job is parked (still retried, slowly).
PARK_AFTER_ATTEMPTS = 5
PARKED_RETRY_S = 900.0


class JobProblem(Exception):
    """A job that cannot be processed now; `permanent` when retrying soon cannot help."""

    def __init__(self, message: str, kind: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.permanent = permanent


def _retry_delay_s(attempts: int) -> float:
    """Doubling delay before the next try of a job."""
    return min(RETRY_CAP_S, RETRY_BASE_S * 2 ** max(0, attempts - 1))


def _read_snapshot(
    settings: Settings, connection: sqlite3.Connection, job: Job
) -> tuple[sqlite3.Row, np.ndarray]:
    """The job's snapshot row and decoded JPEG, or JobProblem."""
    snapshot = connection.execute("SELECT * FROM snapshots WHERE id = ?", (job.snapshot_id,)).fetchone()
    if snapshot is None:
        raise JobProblem(f"snapshot {job.snapshot_id} has no row", "missing_snapshot", permanent=True)
    path = settings.data_dir / snapshot["path"]
    image = cv2.imread(str(path)) if path.is_file() else None
    if image is None:
        raise JobProblem(f"cannot read snapshot image {path}", "unreadable_image")
    return snapshot, image


class DetectStage:
    """One detect worker: the loaded model, the database connection and the smoothing rule."""

    def __init__(self, settings: Settings, connection: sqlite3.Connection, detector: VehicleDetector) -> None:
        self.settings = settings
        self.connection = connection
        self.detector = detector
        self.rule: SmoothingRule = smoothing_rule(settings.processing)
        self.owner = worker_name(DETECT)

    def process(self, job: Job) -> None:
        """Detect one snapshot and write its results, or give the job back to be retried."""
        try:
            snapshot, image = _read_snapshot(self.settings, self.connection, job)
            try:
                camera = self.settings.camera(snapshot["camera_id"])
            except KeyError:
                raise JobProblem(
                    f"camera {snapshot['camera_id']!r} is not in the config", "unknown_camera", permanent=True
                ) from None
            height, width = image.shape[:2]
            try:
                spaces = scale_zones(camera, width, height)
            except ZoneScaleError as error:
                raise JobProblem(str(error), "zone_scale", permanent=True) from None
            analysis = analyse_frame(self.detector, image, spaces)
        except JobProblem as problem:
            self._give_back(job, str(problem), problem.kind, problem.permanent)
            return
        except Exception as error:  # one bad frame must not stop the stage
            self._give_back(job, f"{type(error).__name__}: {error}", "detect_error", False)
            return

        document = result_document(snapshot, analysis, self.detector.model_name)
        changes: list[tuple[str, str]] = []

        def write(connection: sqlite3.Connection) -> None:
            changes.extend(write_detection(connection, snapshot, analysis, document, self.rule))

        try:
            complete(self.connection, job, write)
        except LeaseLost as error:
            log.warning("detect_lease_lost", job_id=job.id, snapshot_id=job.snapshot_id, error=str(error))
            return
        except sqlite3.OperationalError as error:
            # Nothing was kept; the lease runs out and the job is claimed again.
            log.error("detect_write_failed", job_id=job.id, snapshot_id=job.snapshot_id, error=str(error))
            return
        log.info(
            "detection_done",
            snapshot_id=job.snapshot_id,
            camera_id=snapshot["camera_id"],
            occupied=analysis.occupied,
            spaces=len(analysis.decisions),
            vehicles=len(analysis.vehicles),
            inference_ms=analysis.inference_ms,
        )
        for zone_id, event in changes:
            log.info("zone_changed", camera_id=snapshot["camera_id"], zone_id=zone_id, change=event,
                     snapshot_id=job.snapshot_id)

    def _give_back(self, job: Job, error: str, kind: str, permanent: bool) -> None:
        """Schedule the job again: soon with doubling delays, or parked after repeated failures."""
        parked = permanent or job.attempts >= PARK_AFTER_ATTEMPTS
        delay_s = PARKED_RETRY_S if parked else _retry_delay_s(job.attempts)
        try:
            held = retry_later(self.connection, job, error, delay_s, parked=parked, error_kind=kind)
        except sqlite3.OperationalError as db_error:
            # The lease runs out and the job is claimed again; nothing is lost.
            log.warning("detect_give_back_failed", job_id=job.id, error=str(db_error))
            held = False
        log.warning("detect_retry", job_id=job.id, snapshot_id=job.snapshot_id, error=error, error_kind=kind,
                    attempts=job.attempts, delay_s=delay_s, parked=parked, lease_held=held)


def _beat(heartbeat: Heartbeat, status: str) -> None:
    """Write the heartbeat; a locked database only delays it."""
    try:
        heartbeat.beat(status)
    except sqlite3.OperationalError as error:
        log.warning("heartbeat_failed", error=str(error))


def _stop_flag() -> StopFlag:
    """A stop flag wired to SIGTERM/SIGINT when running on the main thread."""
    flag = StopFlag()
    if threading.current_thread() is threading.main_thread():
        flag.install()
    return flag


def run(settings: Settings, *, once: bool = False) -> int:
    """Run the detect stage until SIGTERM, or with once=True until no detect job is due."""
    stop = _stop_flag()
    connection = open_database(
        settings.database_path,
        busy_timeout_s=settings.database.busy_timeout_s,
        synchronous=settings.database.synchronous,
    )
    heartbeat = Heartbeat(connection, DETECT)
    heartbeat.beat("starting", force=True)
    try:
        detector = VehicleDetector(settings.detection, Path(settings.data_dir))
    except DetectorError as error:
        log.error("detector_failed", error=str(error))
        heartbeat.beat("failed", str(error), force=True)
        connection.close()
        return 1
    stage = DetectStage(settings, connection, detector)
    log.info("detect_started", owner=stage.owner, once=once)
    try:
        while not stop.stopped:
            try:
                jobs = claim(connection, DETECT, stage.owner, settings.database.lease_s, limit=1)
            except sqlite3.OperationalError as error:
                log.warning("detect_claim_failed", error=str(error))
                stop.sleep(IDLE_POLL_S)
                continue
            if not jobs:
                if once:
                    break
                _beat(heartbeat, "idle")
                stop.sleep(IDLE_POLL_S)
                continue
            _beat(heartbeat, "running")
            stage.process(jobs[0])
        try:
            heartbeat.beat("stopped", force=True)
        except sqlite3.OperationalError as error:
            log.warning("heartbeat_failed", error=str(error))
    finally:
        connection.close()
    log.info("detect_stopped", once=once)
    return 0
