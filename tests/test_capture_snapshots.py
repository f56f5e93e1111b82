"""Snapshot storage: the JPEG is durably on disk before its row and DETECT job, which appear together."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.config import Settings, load_settings
from shared.db import open_database
from shared.snapshots import snapshot_file, snapshot_relative_path, store_snapshot

FRAME = "UFPR05/Rainy/2013-03-19_06_30_00.jpg"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for device dev1 with one camera, data in tmp_path."""
    config = tmp_path / "parkmon.yaml"
    config.write_text("device_id: dev1\ncameras:\n  - id: cam0\n    source: /nonexistent\n", encoding="utf-8")
    return load_settings(config, data_dir=tmp_path / "data")


@pytest.fixture
def connection(settings: Settings) -> sqlite3.Connection:
    """A writer connection to a fresh database file."""
    connection = open_database(settings.database_path)
    yield connection
    connection.close()


def _files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder`, hidden temp files included."""
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def _counts(connection: sqlite3.Connection) -> tuple[int, int]:
    """Rows in snapshots and jobs."""
    snapshots = connection.execute("SELECT count(*) FROM snapshots").fetchone()[0]
    jobs = connection.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return snapshots, jobs


def test_snapshot_path_is_dated_by_the_utc_capture_time() -> None:
    captured_at = datetime(2024, 1, 2, 23, 59, 59, 123456, tzinfo=UTC).timestamp()

    relative = snapshot_relative_path("dev1", "cam0", captured_at)

    assert relative == "snapshots/2024/01/02/dev1_cam0_20240102T235959_123456Z.jpg"


def test_snapshot_path_refuses_an_id_that_would_leave_the_folder() -> None:
    with pytest.raises(ValueError, match="camera id"):
        snapshot_relative_path("dev1", "../etc", 1_700_000_000.0)


def test_store_writes_the_jpeg_then_row_and_detect_job_together(
    settings: Settings, connection: sqlite3.Connection, pklot_dir: Path
) -> None:
    jpeg = (pklot_dir / FRAME).read_bytes()
    captured_at = 1_700_000_000.25

    snapshot_id = store_snapshot(connection, settings, "cam0", jpeg, captured_at, 1280, 720,
                                 source_name="2013-03-19_06_30_00.jpg")

    row = connection.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    assert row["path"] == snapshot_relative_path("dev1", "cam0", captured_at)
    assert (row["device_id"], row["camera_id"], row["captured_at"]) == ("dev1", "cam0", captured_at)
    assert (row["bytes"], row["width"], row["height"]) == (len(jpeg), 1280, 720)
    assert row["source_name"] == "2013-03-19_06_30_00.jpg"
    stored = snapshot_file(settings, row)
    assert stored.read_bytes() == jpeg
    assert cv2.imread(str(stored)).shape == (720, 1280, 3)
    assert _files_under(settings.snapshots_dir) == [stored]
    jobs = connection.execute("SELECT stage, snapshot_id, state FROM jobs").fetchall()
    assert [tuple(job) for job in jobs] == [("detect", snapshot_id, "pending")]


@pytest.mark.parametrize("failing_call", ["write", "fsync"])
def test_full_disk_leaves_no_jpeg_no_row_and_no_job(
    settings: Settings, connection: sqlite3.Connection, pklot_dir: Path,
    monkeypatch: pytest.MonkeyPatch, failing_call: str,
) -> None:
    jpeg = (pklot_dir / FRAME).read_bytes()
    real_write = os.write
    real_fsync = os.fsync
    calls = {"write": 0}

    def write_half_then_fill_disk(descriptor: int, data: bytes) -> int:
        calls["write"] += 1
        if calls["write"] == 1:
            return real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def fsync_fails_for_files(descriptor: int) -> None:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    if failing_call == "write":
        monkeypatch.setattr(os, "write", write_half_then_fill_disk)
    else:
        monkeypatch.setattr(os, "fsync", fsync_fails_for_files)

    with pytest.raises(OSError) as raised:
        store_snapshot(connection, settings, "cam0", jpeg, 1_700_000_000.5, 1280, 720)

    assert raised.value.errno == errno.ENOSPC
    assert _files_under(settings.snapshots_dir) == []
    assert _counts(connection) == (0, 0)


def test_a_refused_row_removes_the_jpeg_it_was_for(
    settings: Settings, connection: sqlite3.Connection
) -> None:
    connection.execute(
        """CREATE TRIGGER refuse_snapshots BEFORE INSERT ON snapshots
           BEGIN SELECT RAISE(ABORT, 'refused by test'); END"""
    )
    ok, jpeg = cv2.imencode(".jpg", np.zeros((72, 128, 3), dtype=np.uint8))
    assert ok

    with pytest.raises(sqlite3.IntegrityError, match="refused by test"):
        store_snapshot(connection, settings, "cam0", jpeg.tobytes(), 1_700_000_001.0, 128, 72)

    assert _files_under(settings.snapshots_dir) == []
    assert _counts(connection) == (0, 0)


def test_two_snapshots_of_one_camera_get_distinct_files(
    settings: Settings, connection: sqlite3.Connection
) -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((72, 128, 3), 127, dtype=np.uint8))
    assert ok

    first = store_snapshot(connection, settings, "cam0", jpeg.tobytes(), 1_700_000_002.000001, 128, 72)
    second = store_snapshot(connection, settings, "cam0", jpeg.tobytes(), 1_700_000_002.000002, 128, 72)

    rows = connection.execute("SELECT id, path FROM snapshots ORDER BY id").fetchall()
    assert [row["id"] for row in rows] == [first, second]
    assert len({row["path"] for row in rows}) == 2
    assert len(_files_under(settings.snapshots_dir)) == 2
