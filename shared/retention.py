"""Retention: delete snapshot files that are old or crowd the disk, but never one still owed to a stage.

Crash order: a row is marked (snapshots.deleted_at) and committed BEFORE its file is unlinked. A crash in
between leaves a marked row whose file still exists, which the next pass's sweep unlinks; the reverse
order could leave an unmarked row pointing at nothing.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from shared.config import Settings
from shared.db import immediate, open_database
from shared.lifecycle import StopFlag
from shared.logging import get_logger
from shared.snapshots import SNAPSHOTS_FOLDER, TEMP_SUFFIX

log = get_logger(__name__)

DAY_S = 86_400.0
# Rows marked per write transaction, so a large first pass never holds the write lock for long.
BATCH_ROWS = 500
# Day folders this recent are never removed: capture may have just created one for its next file.
PROTECTED_DAYS = 1
WAKE_POLL_S = 0.5

_UPLOADED = "EXISTS (SELECT 1 FROM uploads AS u WHERE u.snapshot_id = s.id)"
_DETECTED = "EXISTS (SELECT 1 FROM detections AS d WHERE d.snapshot_id = s.id)"

FreeBytesProbe = Callable[[], int]


@dataclass
class RetentionResult:
    """What one retention pass did and what it had to keep."""

    deleted_uploaded: int = 0
    deleted_unuploaded: int = 0
    kept_not_uploaded: int = 0
    kept_not_detected: int = 0
    freed_bytes: int = 0
    swept_files: int = 0
    removed_temp_files: int = 0
    removed_folders: int = 0
    free_bytes: int = 0
    space_short: bool = False

    @property
    def deleted(self) -> int:
        """Snapshots marked deleted in this pass."""
        return self.deleted_uploaded + self.deleted_unuploaded

    @property
    def did_something(self) -> bool:
        """Whether the pass deleted, swept or removed anything."""
        return bool(self.deleted or self.swept_files or self.removed_temp_files or self.removed_folders)


@dataclass(frozen=True)
class _Marked:
    """A snapshot row just marked deleted, whose file is still to be unlinked."""

    snapshot_id: int
    camera_id: str
    captured_at: float
    path: str
    bytes: int


def _released_condition(settings: Settings) -> str:
    """SQL true for a snapshot no stage still needs: uploaded, or detected when upload is off."""
    return _UPLOADED if settings.upload.enabled else _DETECTED


def _default_probe(settings: Settings) -> FreeBytesProbe:
    """Free bytes on the disk holding the snapshots (data_dir until the first snapshot exists)."""

    def probe() -> int:
        folder = settings.snapshots_dir if settings.snapshots_dir.is_dir() else settings.data_dir
        return shutil.disk_usage(folder).free

    return probe


def _snapshot_file(settings: Settings, relative: str) -> Path | None:
    """The file of a row's path, or None if the path would leave the snapshots folder."""
    parts = PurePosixPath(relative).parts
    if not parts or parts[0] != SNAPSHOTS_FOLDER or ".." in parts or PurePosixPath(relative).is_absolute():
        return None
    return settings.data_dir / relative


def _unlink(settings: Settings, relative: str) -> int:
    """Remove a marked snapshot's file; return the bytes freed (0 if it was already gone)."""
    path = _snapshot_file(settings, relative)
    if path is None:
        log.error("snapshot_path_refused", path=relative)
        return 0
    try:
        size = path.stat().st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    except OSError as error:
        log.warning("snapshot_unlink_failed", path=relative, error=str(error))
        return 0
    return size


def _mark(connection: sqlite3.Connection, ids: list[int], now: float) -> None:
    """Set deleted_at on these rows; call inside the write transaction that chose them."""
    connection.executemany(
        "UPDATE snapshots SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
        [(now, snapshot_id) for snapshot_id in ids],
    )


def _select(connection: sqlite3.Connection, condition: str, params: tuple[float, ...] = ()) -> list[_Marked]:
    """The oldest live snapshots matching `condition`, at most BATCH_ROWS."""
    rows = connection.execute(
        f"""SELECT s.id, s.camera_id, s.captured_at, s.path, s.bytes FROM snapshots AS s
            WHERE s.deleted_at IS NULL AND {condition}
            ORDER BY s.captured_at, s.id LIMIT {BATCH_ROWS}""",
        params,
    ).fetchall()
    return [
        _Marked(row["id"], row["camera_id"], row["captured_at"], row["path"], row["bytes"]) for row in rows
    ]


def _mark_old(connection: sqlite3.Connection, settings: Settings, now: float) -> list[_Marked]:
    """Mark one batch of released snapshots older than retention.days; return them."""
    cutoff = now - settings.retention.days * DAY_S
    condition = f"s.captured_at < ? AND {_released_condition(settings)}"
    with immediate(connection):
        chosen = _select(connection, condition, (cutoff,))
        _mark(connection, [snapshot.snapshot_id for snapshot in chosen], now)
    return chosen


def _mark_oldest(
    connection: sqlite3.Connection, condition: str, shortfall_bytes: int, now: float
) -> list[_Marked]:
    """Mark the oldest snapshots matching `condition` whose recorded sizes cover the shortfall."""
    with immediate(connection):
        chosen: list[_Marked] = []
        covered_bytes = 0
        for snapshot in _select(connection, condition):
            chosen.append(snapshot)
            covered_bytes += snapshot.bytes
            if covered_bytes >= shortfall_bytes:
                break
        _mark(connection, [snapshot.snapshot_id for snapshot in chosen], now)
    return chosen


def _count_old_kept(connection: sqlite3.Connection, condition: str, cutoff: float) -> int:
    """Live snapshots older than the cutoff that `condition` says are still owed."""
    row = connection.execute(
        f"""SELECT count(*) FROM snapshots AS s
            WHERE s.deleted_at IS NULL AND s.captured_at < ? AND {condition}""",
        (cutoff,),
    ).fetchone()
    return int(row[0])


def _apply_age_rule(
    connection: sqlite3.Connection, settings: Settings, now: float, result: RetentionResult
) -> None:
    """Delete released snapshots past retention.days; count the old ones that must stay."""
    while True:
        marked = _mark_old(connection, settings, now)
        for snapshot in marked:
            result.freed_bytes += _unlink(settings, snapshot.path)
        result.deleted_uploaded += len(marked)
        if len(marked) < BATCH_ROWS:
            break

    cutoff = now - settings.retention.days * DAY_S
    if settings.upload.enabled:
        result.kept_not_uploaded = _count_old_kept(connection, f"NOT {_UPLOADED}", cutoff)
    else:
        result.kept_not_detected = _count_old_kept(connection, f"NOT {_DETECTED}", cutoff)


def _apply_space_rule(
    connection: sqlite3.Connection, settings: Settings, probe: FreeBytesProbe, now: float,
    result: RetentionResult,
) -> None:
    """While free space is short: oldest released snapshots first, then oldest detected unuploaded."""
    min_free_bytes = settings.retention.min_free_bytes
    tiers = [(_released_condition(settings), False)]
    if settings.upload.enabled:
        tiers.append((f"{_DETECTED} AND NOT {_UPLOADED}", True))

    free_bytes = probe()
    for condition, owed_to_cloud in tiers:
        while free_bytes < min_free_bytes:
            marked = _mark_oldest(connection, condition, min_free_bytes - free_bytes, now)
            if not marked:
                break
            for snapshot in marked:
                freed = _unlink(settings, snapshot.path)
                result.freed_bytes += freed
                if owed_to_cloud:
                    log.error("snapshot_evicted_unuploaded", snapshot_id=snapshot.snapshot_id,
                              camera_id=snapshot.camera_id, captured_at=snapshot.captured_at,
                              path=snapshot.path, bytes=freed, free_bytes=free_bytes,
                              min_free_bytes=min_free_bytes)
            if owed_to_cloud:
                result.deleted_unuploaded += len(marked)
            else:
                result.deleted_uploaded += len(marked)
            free_bytes = probe()

    result.free_bytes = free_bytes
    result.space_short = free_bytes < min_free_bytes


def _day_folders(settings: Settings) -> list[Path]:
    """The snapshots/YYYY/MM/DD folders that exist, oldest first."""
    root = settings.snapshots_dir
    if not root.is_dir():
        return []
    pattern = "[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]"
    return sorted(folder for folder in root.glob(pattern) if folder.is_dir())


def _sweep_marked(connection: sqlite3.Connection, settings: Settings, result: RetentionResult) -> None:
    """Unlink files of rows already marked deleted (an earlier pass stopped between mark and unlink)."""
    for folder in _day_folders(settings):
        prefix = folder.relative_to(settings.data_dir).as_posix() + "/"
        # Every path in this folder sorts between "<prefix>" and "<prefix minus '/'>0" ('0' follows '/').
        rows = connection.execute(
            "SELECT path FROM snapshots WHERE path >= ? AND path < ? AND deleted_at IS NOT NULL",
            (prefix, prefix[:-1] + "0"),
        ).fetchall()
        for row in rows:
            path = _snapshot_file(settings, row["path"])
            if path is None or not path.exists():
                continue
            freed = _unlink(settings, row["path"])
            if not path.exists():
                result.swept_files += 1
                result.freed_bytes += freed
                log.info("snapshot_unlink_finished", path=row["path"], bytes=freed)


def _folder_day(settings: Settings, folder: Path) -> datetime | None:
    """The UTC date a snapshots/YYYY/MM/DD folder stands for, or None if it names no date."""
    year, month, day = folder.relative_to(settings.snapshots_dir).parts
    try:
        return datetime(int(year), int(month), int(day), tzinfo=UTC)
    except ValueError:
        return None


def _is_leftover_temp(path: Path) -> bool:
    """A temp file a crashed store_snapshot left behind (never referenced by a row)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file()


def _remove_if_empty(folder: Path) -> bool:
    """rmdir a folder if nothing is in it; a file arriving meanwhile simply keeps it."""
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _tidy_folders(settings: Settings, now: float, result: RetentionResult) -> None:
    """Drop crash-left temp files and empty YYYY/MM/DD folders older than the protected days."""
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    oldest_protected = today - timedelta(days=PROTECTED_DAYS)
    for folder in _day_folders(settings):
        day = _folder_day(settings, folder)
        if day is None or day >= oldest_protected:
            continue
        for entry in folder.iterdir():
            if _is_leftover_temp(entry):
                result.freed_bytes += _unlink(settings, entry.relative_to(settings.data_dir).as_posix())
                result.removed_temp_files += 1
                log.warning("snapshot_temp_file_removed", path=str(entry))
        for candidate in (folder, folder.parent, folder.parent.parent):
            if not _remove_if_empty(candidate):
                break
            result.removed_folders += 1


def enforce_retention(
    connection: sqlite3.Connection,
    settings: Settings,
    *,
    now: float | None = None,
    free_bytes: FreeBytesProbe | None = None,
) -> RetentionResult:
    """Run one retention pass: finish earlier unlinks, apply the age rule, then the free-space rule."""
    now = time.time() if now is None else now
    probe = free_bytes or _default_probe(settings)
    result = RetentionResult()

    _sweep_marked(connection, settings, result)
    _apply_age_rule(connection, settings, now, result)
    _apply_space_rule(connection, settings, probe, now, result)
    _tidy_folders(settings, now, result)

    if result.did_something:
        log.info("retention_pass", deleted=result.deleted, deleted_uploaded=result.deleted_uploaded,
                 deleted_unuploaded=result.deleted_unuploaded, kept_not_uploaded=result.kept_not_uploaded,
                 kept_not_detected=result.kept_not_detected, freed_bytes=result.freed_bytes,
                 swept_files=result.swept_files, removed_folders=result.removed_folders,
                 free_bytes=result.free_bytes)
    if result.space_short:
        log.warning("retention_space_short", free_bytes=result.free_bytes,
                    min_free_bytes=settings.retention.min_free_bytes,
                    kept_not_uploaded=result.kept_not_uploaded)
    return result


def snapshot_missing_files(connection: sqlite3.Connection, settings: Settings) -> list[int]:
    """Ids of snapshot rows not marked deleted whose JPEG is missing on disk."""
    live = "SELECT id, path FROM snapshots WHERE deleted_at IS NULL ORDER BY id"
    rows = connection.execute(live).fetchall()
    listings: dict[Path, set[str]] = {}
    missing: list[int] = []
    for row in rows:
        path = settings.data_dir / row["path"]
        if path.parent not in listings:
            try:
                listings[path.parent] = set(os.listdir(path.parent))
            except OSError:
                listings[path.parent] = set()
        if path.name not in listings[path.parent]:
            missing.append(int(row["id"]))
    return missing


class RetentionLoop(threading.Thread):
    """Runs enforce_retention every retention.check_interval_s on its own connection until stopped."""

    def __init__(self, settings: Settings, stop: StopFlag, free_bytes: FreeBytesProbe | None = None) -> None:
        super().__init__(name="retention", daemon=True)
        self.settings = settings
        self.stop = stop
        self.free_bytes = free_bytes
        self.passes = 0
        self.last_result: RetentionResult | None = None
        self._wake = threading.Event()
        self._log_context = contextvars.copy_context()

    def wake(self) -> None:
        """Run the next pass now (e.g. after a write failed with ENOSPC)."""
        self._wake.set()

    def run(self) -> None:
        """Pass, wait, repeat, in the log context of the thread that made the loop."""
        self._log_context.run(self._run_in_context)

    def _run_in_context(self) -> None:
        """Open a connection and run passes until the stop flag is set."""
        database = self.settings.database
        connection = open_database(self.settings.database_path, busy_timeout_s=database.busy_timeout_s,
                                   synchronous=database.synchronous)
        try:
            while not self.stop.stopped:
                self._pass(connection)
                self._wait()
        finally:
            connection.close()

    def _pass(self, connection: sqlite3.Connection) -> None:
        """One pass; a failure is logged and the next pass tries again."""
        try:
            self.last_result = enforce_retention(connection, self.settings, free_bytes=self.free_bytes)
        except Exception:
            log.exception("retention_failed")
        self.passes += 1

    def _wait(self) -> None:
        """Sleep check_interval_s, cut short by wake() or the stop flag."""
        deadline = time.monotonic() + self.settings.retention.check_interval_s
        while not self._wake.is_set():
            left_s = deadline - time.monotonic()
            if left_s <= 0 or self.stop.sleep(min(left_s, WAKE_POLL_S)):
                break
        self._wake.clear()
