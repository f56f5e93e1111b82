"""Snapshot files on disk and their rows: durable JPEG first, then row and DETECT job together."""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from shared.config import Settings
from shared.db import immediate
from shared.jobs import DETECT, enqueue
from shared.logging import get_logger

log = get_logger(__name__)

SNAPSHOTS_FOLDER = "snapshots"
TEMP_SUFFIX = ".tmp"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_name_part(kind: str, value: str) -> None:
    """Refuse ids that would leave the snapshot folder or split the file name oddly."""
    if not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{kind} {value!r} cannot name a snapshot file (use letters, digits, . _ -)")


def snapshot_relative_path(device_id: str, camera_id: str, captured_at: float) -> str:
    """The snapshot's path relative to data_dir, dated by the UTC time it was captured."""
    _check_name_part("device id", device_id)
    _check_name_part("camera id", camera_id)
    moment = datetime.fromtimestamp(captured_at, tz=UTC)
    name = f"{device_id}_{camera_id}_{moment:%Y%m%dT%H%M%S_%f}Z.jpg"
    return str(PurePosixPath(SNAPSHOTS_FOLDER, f"{moment:%Y}", f"{moment:%m}", f"{moment:%d}", name))


def snapshot_file(settings: Settings, row: Mapping[str, Any] | sqlite3.Row) -> Path:
    """Where a snapshots row's JPEG lives on this device."""
    return settings.data_dir / str(row["path"])


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` survive a power cut."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_directories(directory: Path) -> None:
    """Create `directory` and its missing parents, syncing each parent that gained an entry."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _fsync_directory(folder.parent)


def _write_all(descriptor: int, data: bytes) -> None:
    """Write every byte, looping over short writes."""
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def write_durably(target: Path, data: bytes) -> None:
    """Write a file atomically: temp file beside it, fsync, rename, fsync the folder.

    On any error the temp file is removed, `target` is untouched and the error propagates.
    """
    _make_directories(target.parent)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        try:
            _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _insert_snapshot(connection: sqlite3.Connection, values: dict[str, Any]) -> int:
    """Insert the snapshots row and its DETECT job in one write transaction."""
    with immediate(connection):
        cursor = connection.execute(
            """INSERT INTO snapshots
                   (device_id, camera_id, captured_at, path, bytes, width, height, source_name)
               VALUES (:device_id, :camera_id, :captured_at, :path, :bytes, :width, :height, :source_name)""",
            values,
        )
        snapshot_id = int(cursor.lastrowid or 0)
        enqueue(connection, DETECT, snapshot_id)
    return snapshot_id


def store_snapshot(
    connection: sqlite3.Connection,
    settings: Settings,
    camera_id: str,
    jpeg_bytes: bytes,
    captured_at: float,
    width: int,
    height: int,
    source_name: str | None = None,
) -> int:
    """Write the JPEG durably, then record its row and DETECT job; return the snapshot id."""
    relative = snapshot_relative_path(settings.device_id, camera_id, captured_at)
    target = settings.data_dir / relative
    if target.exists():
        raise FileExistsError(f"{target}: a snapshot with this time stamp already exists")
    write_durably(target, jpeg_bytes)

    values = {
        "device_id": settings.device_id,
        "camera_id": camera_id,
        "captured_at": captured_at,
        "path": relative,
        "bytes": len(jpeg_bytes),
        "width": width,
        "height": height,
        "source_name": source_name,
    }
    try:
        snapshot_id = _insert_snapshot(connection, values)
    except BaseException:
        target.unlink(missing_ok=True)
        raise

    log.info("snapshot_saved", camera_id=camera_id, snapshot_id=snapshot_id, path=relative,
             bytes=len(jpeg_bytes), width=width, height=height, source_name=source_name)
    return snapshot_id
