"""The capture stage: one thread per camera takes a snapshot every interval and queues it for detect."""

from __future__ import annotations

import contextvars
import errno
import re
import sqlite3
import threading
import time
from collections.abc import Callable

import cv2
import structlog

from capture.sources import Frame, FrameSource, SourceError, SourceNotFound, open_source
from shared.config import CameraSettings, Settings
from shared.db import open_database
from shared.heartbeat import Heartbeat
from shared.lifecycle import StopFlag
from shared.logging import get_logger
from shared.retention import RetentionLoop
from shared.snapshots import store_snapshot

log = get_logger(__name__)

HEARTBEAT_CHECK_S = 0.5
STOP_WAIT_S = 2.0
STALL_MIN_S = 3.0
RECONNECT_BASE_S = 1.0
# The longest wait between reconnect attempts: a camera that comes back is capturing again within
# this plus one open, well inside 30 s, however long it was away.
RECONNECT_CAP_S = 15.0


def redact_source(source: str) -> str:
    """A camera source fit for logs: credentials in a URL are hidden."""
    return re.sub(r"//[^/@]*@", "//***@", source)


class Backoff:
    """Capped exponential delays between reconnect attempts."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._next_s = base_s

    def next_delay_s(self) -> float:
        """The delay to wait now; the one after it doubles, up to the cap."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self.cap_s)
        return delay_s

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self._next_s = self.base_s


class CameraWorker(threading.Thread):
    """Captures one camera's snapshots on its own thread, so a stalled camera delays no other."""

    def __init__(
        self,
        settings: Settings,
        camera: CameraSettings,
        stop: StopFlag,
        once: bool,
        on_disk_full: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"capture-{camera.id}", daemon=True)
        self.on_disk_full = on_disk_full
        self.settings = settings
        self.camera = camera
        self.stop = stop
        self.once = once
        self.interval_s = settings.processing.snapshot_interval
        self.state = "starting"
        # Set when the source cannot exist (missing folder, unreadable file): a restart would not help.
        self.source_invalid = False
        self.busy_with: str | None = None
        self.busy_since = 0.0
        self.snapshots = 0
        self._backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        self._last_captured_us = 0
        self._size_warned = False
        self._log_context = contextvars.copy_context()

    def _busy(self, what: str | None) -> None:
        """Record what blocking call the thread is in, for stall detection."""
        self.busy_since = time.monotonic()
        self.busy_with = what

    def run(self) -> None:
        """Capture in the log context of the thread that made the worker (process name)."""
        self._log_context.run(self._run_in_context)

    def _run_in_context(self) -> None:
        """Open the source, capture until stopped or the replay ends, reconnecting as needed."""
        structlog.contextvars.bind_contextvars(camera_id=self.camera.id)
        try:
            connection = open_database(
                self.settings.database_path,
                busy_timeout_s=self.settings.database.busy_timeout_s,
                synchronous=self.settings.database.synchronous,
            )
            try:
                self._run_sources(connection)
            finally:
                connection.close()
        except Exception:
            self.state = "failed"
            log.exception("camera_failed", camera_id=self.camera.id)
        if self.state not in ("ended", "failed"):
            self.state = "stopped"

    def _run_sources(self, connection: sqlite3.Connection) -> None:
        """Open, capture, and reopen after a live source stops delivering."""
        while not self.stop.stopped:
            source = self._open()
            if source is None:
                return
            try:
                lost = self._capture_from(source, connection)
            except Exception:
                if not source.live:
                    raise
                log.exception("camera_error", camera_id=self.camera.id)
                lost = True
            finally:
                source.close()
            if not lost:
                return
            delay_s = self._backoff.next_delay_s()
            self.state = "reconnecting"
            log.warning("camera_reconnecting", camera_id=self.camera.id, retry_in_s=delay_s)
            if self.stop.sleep(delay_s):
                return

    def _open(self) -> FrameSource | None:
        """Open the source, retrying with backoff; None when stopping or the source cannot exist."""
        source_text = redact_source(self.camera.source)
        while not self.stop.stopped:
            self._busy("opening")
            try:
                source = open_source(self.camera, self.interval_s, loop=not self.once)
            except SourceNotFound as error:
                self.state = "failed"
                self.source_invalid = True
                log.error("camera_source_invalid", camera_id=self.camera.id, source=source_text,
                          error=str(error))
                return None
            except (SourceError, OSError, cv2.error) as error:
                delay_s = self._backoff.next_delay_s()
                self.state = "reconnecting"
                log.warning("camera_open_failed", camera_id=self.camera.id, source=source_text,
                            error=str(error), retry_in_s=delay_s)
                if self.stop.sleep(delay_s):
                    return None
                continue
            finally:
                self._busy(None)
            self.state = "capturing"
            log.info("camera_opened", camera_id=self.camera.id, source=source_text, live=source.live)
            return source
        return None

    def _capture_from(self, source: FrameSource, connection: sqlite3.Connection) -> bool:
        """Snapshot every interval; True if a live source stopped delivering, False when done."""
        next_due = time.monotonic()
        while not self.stop.sleep(next_due - time.monotonic()):
            next_due = max(next_due + self.interval_s, time.monotonic())
            self._busy("reading")
            try:
                frame = source.read()
            finally:
                self._busy(None)
            if self.stop.stopped:
                return False
            if frame is None and source.ended:
                self.state = "ended"
                log.info("replay_finished", camera_id=self.camera.id, snapshots=self.snapshots)
                return False
            if frame is None:
                if source.live:
                    log.warning("camera_frames_stopped", camera_id=self.camera.id)
                    return True
                continue
            if self._save(frame, connection) and self.once and source.live:
                self.state = "ended"
                return False
        return False

    def _encode(self, frame: Frame) -> bytes | None:
        """The frame as JPEG at the camera's quality, or None (logged) if encoding failed."""
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.camera.jpeg_quality]
        ok, encoded = cv2.imencode(".jpg", frame.image, quality)
        if not ok:
            log.error("frame_encode_failed", camera_id=self.camera.id, source_name=frame.source_name)
            return None
        return encoded.tobytes()

    def _save(self, frame: Frame, connection: sqlite3.Connection) -> bool:
        """Encode the frame as JPEG and store it with its DETECT job; False (logged) if that failed."""
        if (frame.width, frame.height) != (self.camera.width, self.camera.height) and not self._size_warned:
            self._size_warned = True
            log.warning("frame_size_mismatch", camera_id=self.camera.id,
                        expected=f"{self.camera.width}x{self.camera.height}",
                        actual=f"{frame.width}x{frame.height}", source_name=frame.source_name)
        jpeg = frame.jpeg or self._encode(frame)
        if jpeg is None:
            return False
        # Whole microseconds, strictly increasing per camera, so file names never collide.
        captured_us = max(time.time_ns() // 1000, self._last_captured_us + 1)
        try:
            store_snapshot(connection, self.settings, self.camera.id, jpeg, captured_us / 1e6,
                           frame.width, frame.height, source_name=frame.source_name)
        except (OSError, sqlite3.Error) as error:
            log.error("snapshot_store_failed", camera_id=self.camera.id, source_name=frame.source_name,
                      error=str(error))
            if isinstance(error, OSError) and error.errno == errno.ENOSPC and self.on_disk_full:
                self.on_disk_full()
            return False
        self._last_captured_us = captured_us
        self.snapshots += 1
        self._backoff.reset()
        return True


def _stalled(worker: CameraWorker, stall_after_s: float) -> bool:
    """Whether the worker has been inside one read or open for longer than `stall_after_s`."""
    return worker.busy_with is not None and time.monotonic() - worker.busy_since > stall_after_s


def _health(workers: list[CameraWorker], stalled: set[str], once: bool = False) -> tuple[str, str]:
    """Heartbeat status and detail: stalled, degraded (reconnecting, failed or ended cameras) or running."""
    trouble_states = ("reconnecting", "failed") if once else ("reconnecting", "failed", "ended")
    stalls = [f"stalled: {worker.camera.id} ({worker.busy_with})"
              for worker in workers if worker.camera.id in stalled]
    troubles = [f"{worker.state}: {worker.camera.id}"
                for worker in workers if worker.state in trouble_states]
    if stalls or troubles:
        return ("stalled" if stalls else "degraded"), "; ".join(stalls + troubles)
    capturing = sum(1 for worker in workers if worker.state == "capturing")
    return "running", f"{capturing} of {len(workers)} cameras capturing"


def _track_stalls(workers: list[CameraWorker], stalled: set[str], stall_after_s: float) -> None:
    """Log each camera entering or leaving a stall, once per change."""
    for worker in workers:
        camera_id = worker.camera.id
        is_stalled = worker.is_alive() and _stalled(worker, stall_after_s)
        if is_stalled and camera_id not in stalled:
            stalled.add(camera_id)
            log.warning("camera_stalled", camera_id=camera_id, busy=worker.busy_with, after_s=stall_after_s)
        elif not is_stalled and camera_id in stalled:
            stalled.discard(camera_id)
            log.info("camera_recovered", camera_id=camera_id)


def _keep_running(workers: list[CameraWorker], once: bool) -> bool:
    """Whether the capture process should go on: some camera still runs, or only bad sources are left.

    As a service, cameras whose source cannot exist leave the process up, beating "degraded: failed:
    <camera>", instead of exiting into a launchd restart loop that cannot fix a config mistake. A camera
    that stopped for any other reason ends the process once no camera runs, so launchd restarts it.
    """
    if any(worker.is_alive() for worker in workers):
        return True
    return not once and all(worker.source_invalid for worker in workers)


def run(settings: Settings, *, once: bool = False, stop: StopFlag | None = None) -> int:
    """Capture every configured camera until SIGTERM, or until each replay ends when `once`."""
    stop = stop or StopFlag().install()
    connection = open_database(settings.database_path, busy_timeout_s=settings.database.busy_timeout_s,
                               synchronous=settings.database.synchronous)
    heartbeat = Heartbeat(connection, "capture")
    stall_after_s = max(2 * settings.processing.snapshot_interval, STALL_MIN_S)
    retention = RetentionLoop(settings, stop)
    retention.start()
    workers = [CameraWorker(settings, camera, stop, once, retention.wake) for camera in settings.cameras]
    log.info("capture_started", cameras=[camera.id for camera in settings.cameras], once=once,
             interval_s=settings.processing.snapshot_interval)
    for worker in workers:
        worker.start()

    stalled: set[str] = set()
    while _keep_running(workers, once):
        _track_stalls(workers, stalled, stall_after_s)
        try:
            heartbeat.beat(*_health(workers, stalled, once))
        except sqlite3.Error as error:
            log.warning("heartbeat_failed", error=str(error))
        if stop.sleep(HEARTBEAT_CHECK_S):
            break

    stop.set()
    deadline = time.monotonic() + STOP_WAIT_S
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    retention.join(timeout=max(0.0, deadline - time.monotonic()))
    blocked = [worker.camera.id for worker in workers if worker.is_alive()]
    if blocked:
        log.warning("capture_left_blocked_cameras", cameras=blocked)
    failed = [worker.camera.id for worker in workers if worker.state == "failed"]
    final_detail = "; ".join(f"failed: {camera_id}" for camera_id in failed) or None
    try:
        heartbeat.beat("stopped", final_detail, force=True)
    except sqlite3.Error as error:
        log.warning("heartbeat_failed", error=str(error))
    connection.close()
    log.info("capture_stopped", snapshots=sum(worker.snapshots for worker in workers), failed=failed)
    return 1 if failed else 0
