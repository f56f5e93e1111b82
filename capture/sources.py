"""Frame sources for one camera: live device or stream, video file, or a folder of images replayed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from shared.config import CameraSettings
from shared.logging import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
LIVE_READ_TIMEOUT_MIN_S = 10.0
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class SourceError(RuntimeError):
    """A source that cannot deliver frames right now (camera unplugged, stream down)."""


class SourceNotFound(SourceError):
    """A file or folder source that does not exist: a config mistake, not worth retrying."""


@dataclass(frozen=True)
class Frame:
    """One BGR image from a source; source_name is the replayed file's name, else None."""

    image: np.ndarray
    source_name: str | None = None
    jpeg: bytes | None = None

    @property
    def width(self) -> int:
        """Frame width, px."""
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        """Frame height, px."""
        return int(self.image.shape[0])


class FrameSource(Protocol):
    """What capture needs from a source: the next frame, whether it has ended, and close."""

    live: bool

    @property
    def ended(self) -> bool:
        """True once a finite replay has delivered its last frame."""
        ...

    def read(self) -> Frame | None:
        """The next frame, or None when none is available (live failure or replay end)."""
        ...

    def close(self) -> None:
        """Release the device, stream or file."""
        ...


SourceFactory = Callable[[CameraSettings, float, bool], FrameSource]
_SCHEMES: dict[str, SourceFactory] = {}


def register_scheme(scheme: str, factory: SourceFactory) -> None:
    """Serve sources written `<scheme>://...` with `factory(camera, interval_s, loop)`."""
    _SCHEMES[scheme.lower()] = factory


def unregister_scheme(scheme: str) -> None:
    """Forget a scheme registered with register_scheme."""
    _SCHEMES.pop(scheme.lower(), None)


def _complete_image_bytes(data: bytes) -> bool:
    """False for files cut short: a JPEG without its end marker or a PNG without IEND."""
    if data.startswith(b"\xff\xd8"):
        return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG"):
        return b"IEND" in data[-16:]
    return True


def decode_image_file(path: Path) -> np.ndarray | None:
    """Decode an image file to BGR, or None (logged) if it is empty, truncated or unreadable."""
    try:
        data = path.read_bytes()
    except OSError as error:
        log.warning("frame_unreadable", path=str(path), reason=error.strerror or str(error))
        return None
    reason = None
    image = None
    if not data:
        reason = "empty file"
    elif not _complete_image_bytes(data):
        reason = "truncated image"
    else:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        reason = "not a decodable image" if image is None else None
    if reason is not None:
        log.warning("frame_unreadable", path=str(path), bytes=len(data), reason=reason)
        return None
    return image


def _file_signature(path: Path) -> tuple[int, int] | None:
    """A file's size and modification time, to notice it changed; None if it cannot be read."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


class FolderReplay:
    """Images of a folder replayed in file-name order; once through, or looping."""

    live = False

    def __init__(self, folder: Path, loop: bool) -> None:
        if not folder.is_dir():
            raise SourceNotFound(f"{folder}: no such folder")
        self.folder = folder
        self.loop = loop
        self._queue: list[Path] = self._list()
        self._ended = False
        # Broken files already logged, by (size, mtime): a looping replay skips them until they change.
        self._unreadable: dict[Path, tuple[int, int]] = {}
        if not self._queue:
            log.warning("replay_folder_empty", folder=str(folder))

    def _list(self) -> list[Path]:
        """The folder's image files, sorted by name."""
        images = [path for path in self.folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES]
        return sorted((path for path in images if path.is_file()), key=lambda path: path.name)

    @property
    def ended(self) -> bool:
        """True after the last image of a once-through replay."""
        return self._ended

    def read(self) -> Frame | None:
        """The next readable image, skipping broken files; None at the end of a once replay."""
        wrapped = False
        while not self._ended:
            if not self._queue:
                if not self.loop or wrapped:
                    self._ended = not self.loop
                    return None
                self._queue = self._list()
                wrapped = True
                log.info("replay_restarted", folder=str(self.folder), frames=len(self._queue))
                continue
            path = self._queue.pop(0)
            signature = _file_signature(path)
            if signature is not None and self._unreadable.get(path) == signature:
                continue
            image = decode_image_file(path)
            if image is not None:
                self._unreadable.pop(path, None)
                # A replayed JPEG is stored as it is: re-encoding would add a second compression loss.
                original = path.read_bytes() if path.suffix.lower() in (".jpg", ".jpeg") else None
                return Frame(image=image, source_name=path.name, jpeg=original)
            if signature is not None:
                self._unreadable[path] = signature
        return None

    def close(self) -> None:
        """Nothing to release."""


class VideoFileReplay:
    """A video file read as a camera: each read advances by one snapshot interval of video time."""

    live = False

    def __init__(self, path: Path, interval_s: float, loop: bool) -> None:
        if not path.is_file():
            raise SourceNotFound(f"{path}: no such video file")
        self.path = path
        self.loop = loop
        self._capture = cv2.VideoCapture(str(path))
        if not self._capture.isOpened():
            raise SourceNotFound(f"{path}: not a video file OpenCV can read")
        fps = self._capture.get(cv2.CAP_PROP_FPS) or 0.0
        self._frames_per_read = max(1, round(interval_s * fps)) if fps > 0 else 1
        self._read_count = 0
        self._ended = False

    @property
    def ended(self) -> bool:
        """True after the last frame of a once-through replay."""
        return self._ended

    def _next_image(self) -> np.ndarray | None:
        """Skip to the frame one interval on and decode it."""
        if self._read_count > 0:
            for _ in range(self._frames_per_read - 1):
                if not self._capture.grab():
                    return None
        ok, image = self._capture.read()
        return image if ok else None

    def read(self) -> Frame | None:
        """The frame one interval after the last, rewinding when looping."""
        if self._ended:
            return None
        image = self._next_image()
        if image is None and self.loop and self._read_count > 0:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._read_count = 0
            log.info("replay_restarted", path=str(self.path))
            image = self._next_image()
        if image is None:
            self._ended = True
            return None
        self._read_count += 1
        return Frame(image=image, source_name=None)

    def close(self) -> None:
        """Release the file."""
        self._capture.release()


class LiveCamera:
    """A camera index or stream URL; a reader thread decodes every frame and keeps only the newest."""

    live = True

    def __init__(self, source: str, camera: CameraSettings, read_timeout_s: float) -> None:
        target: int | str = int(source) if source.isdigit() else source
        self.source = source
        self.read_timeout_s = read_timeout_s
        self._capture = cv2.VideoCapture(target)
        if not self._capture.isOpened():
            self._capture.release()
            raise SourceError(f"cannot open camera source {source!r}")
        if isinstance(target, int):
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, camera.width)
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, camera.height)
            self._capture.set(cv2.CAP_PROP_FPS, camera.fps)
        self._lock = threading.Lock()
        self._fresh = threading.Event()
        self._failed = False
        self._newest: np.ndarray | None = None
        self._closing = threading.Event()
        self._reader_done = False
        self._release_by_reader = False
        self._reader = threading.Thread(target=self._keep_grabbing, name=f"grab-{camera.id}", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        """A live source never ends; it fails and is reopened."""
        return False

    def _keep_grabbing(self) -> None:
        """Read frames as fast as the camera sends them, keeping only the newest."""
        try:
            while not self._closing.is_set():
                ok, image = self._capture.read()
                with self._lock:
                    if not ok or image is None:
                        self._failed = True
                        self._fresh.set()
                        return
                    self._newest = image
                    self._fresh.set()
        finally:
            with self._lock:
                self._reader_done = True
                release_here = self._release_by_reader
            if release_here:
                # close() gave up waiting for the blocked grab; release now that it has returned.
                self._capture.release()

    def read(self) -> Frame | None:
        """The newest frame not read yet, or None once the camera stopped or sent nothing in time."""
        if not self._fresh.wait(self.read_timeout_s):
            return None
        # Under the lock, so the reader thread's last wake-up ("failed") is never cleared unseen.
        with self._lock:
            if self._failed or self._newest is None:
                return None
            self._fresh.clear()
            image, self._newest = self._newest, None
        return Frame(image=image)

    def close(self) -> None:
        """Stop the reader thread and release the device."""
        self._closing.set()
        self._reader.join(timeout=2.0)
        with self._lock:
            blocked = not self._reader_done
            self._release_by_reader = blocked
        if blocked:
            # Releasing while a grab is still blocked inside FFmpeg can crash the process; the reader
            # thread releases the device itself once that grab returns (FFmpeg's read timeout at worst).
            log.warning("camera_release_deferred", reason="grab still blocked")
            return
        self._capture.release()


def open_source(camera: CameraSettings, interval_s: float, loop: bool) -> FrameSource:
    """Open the camera's source: registered scheme, index, stream URL, image folder or video file."""
    source = camera.source.strip()
    scheme = source.split("://", 1)[0].lower() if "://" in source else None
    if scheme is not None and scheme in _SCHEMES:
        return _SCHEMES[scheme](camera, interval_s, loop)
    if source.isdigit() or source.lower().startswith(STREAM_SCHEMES):
        return LiveCamera(source, camera, read_timeout_s=max(3 * interval_s, LIVE_READ_TIMEOUT_MIN_S))
    path = Path(source).expanduser()
    if path.is_dir():
        return FolderReplay(path, loop)
    if path.is_file():
        return VideoFileReplay(path, interval_s, loop)
    raise SourceNotFound(f"camera {camera.id}: source {source!r} is not a camera index, URL, folder or file")
