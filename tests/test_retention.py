"""Retention: old or space-hungry snapshots go only once no stage needs them; rows never point at nothing."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from shared.config import ConfigError, Settings, load_settings
from shared.db import open_database
from shared.jobs import DETECT
from shared.lifecycle import StopFlag
from shared.retention import RetentionLoop, enforce_retention, snapshot_missing_files
from shared.snapshots import snapshot_file, store_snapshot

REPO_DIR = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()
DAY_S = 86_400.0
HOUR_S = 3_600.0
FREE_PLENTY = 10**15
ENOSPC_ERROR = OSError(errno.ENOSPC, "No space left on device")


def make_settings(tmp_path: Path, *, upload_enabled: bool = True, min_free_bytes: int = 0,
                  check_interval_s: float = 60) -> Settings:
    """Settings for device dev1, camera cam0, data in tmp_path/data, with the given retention knobs."""
    config = tmp_path / "parkmon.yaml"
    document = {
        "device_id": "dev1",
        "cameras": [{"id": "cam0", "source": "/nonexistent"}],
        "upload": {"enabled": upload_enabled},
        "retention": {"days": 30, "min_free_bytes": min_free_bytes, "check_interval_s": check_interval_s},
    }
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_settings(config, data_dir=tmp_path / "data")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Upload enabled, no free-space floor (so only the age rule acts)."""
    return make_settings(tmp_path)


@pytest.fixture
def connection(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A writer connection to a fresh database file in the data dir."""
    connection = open_database(settings.database_path)
    yield connection
    connection.close()


@pytest.fixture
def frames(pklot_dir: Path) -> list[bytes]:
    """Real PKLot JPEGs, 1280x720, about 200 kB each."""
    return [path.read_bytes() for path in sorted((pklot_dir / "PUCPR" / "Sunny").glob("*.jpg"))]


def add_snapshot(connection: sqlite3.Connection, settings: Settings, jpeg: bytes, captured_at: float,
                 *, detected: bool, uploaded: bool) -> int:
    """Store a real JPEG as capture does, then record detect and upload results as those stages do."""
    snapshot_id = store_snapshot(connection, settings, "cam0", jpeg, captured_at, 1280, 720)
    if detected:
        connection.execute(
            """INSERT INTO detections (snapshot_id, device_id, camera_id, detected_at, model,
                   inference_ms, vehicles, spaces, occupied, result_json)
               VALUES (?, 'dev1', 'cam0', ?, 'yolov8n-coco.pt', 12.5, 3, 100, 3, '{}')""",
            (snapshot_id, captured_at + 1),
        )
    if uploaded:
        connection.execute(
            """INSERT INTO uploads (snapshot_id, image_key, metadata_key, image_bytes, metadata_bytes,
                   posted, uploaded_at) VALUES (?, 'snapshots/x.jpg', 'metadata/x.json', ?, 2, 1, ?)""",
            (snapshot_id, len(jpeg), captured_at + 2),
        )
    return snapshot_id


def file_of(connection: sqlite3.Connection, settings: Settings, snapshot_id: int) -> Path:
    """The JPEG path of a snapshot row."""
    row = connection.execute("SELECT path FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    return snapshot_file(settings, row)


def deleted_ids(connection: sqlite3.Connection) -> list[int]:
    """Ids of rows marked deleted."""
    rows = connection.execute("SELECT id FROM snapshots WHERE deleted_at IS NOT NULL ORDER BY id")
    return [row[0] for row in rows]


def files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder`, hidden temp files included."""
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def bytes_under(folder: Path) -> int:
    """Total size of the files below `folder`."""
    return sum(path.stat().st_size for path in files_under(folder))


def growing_free_space(settings: Settings, base_bytes: int) -> Callable[[], int]:
    """A free-space probe: base_bytes plus whatever has been deleted from the snapshots since now."""
    used_at_start = bytes_under(settings.snapshots_dir)
    return lambda: base_bytes + used_at_start - bytes_under(settings.snapshots_dir)


@pytest.fixture
def age_mix(connection: sqlite3.Connection, settings: Settings, frames: list[bytes]) -> dict[str, int]:
    """Six snapshots on six days: four past retention (two uploaded), two recent."""
    plan = {
        "old_uploaded_1": (NOW - 45 * DAY_S, True, True),
        "old_uploaded_2": (NOW - 44 * DAY_S, True, True),
        "old_detected": (NOW - 43 * DAY_S, True, False),
        "old_undetected": (NOW - 42 * DAY_S, False, False),
        "recent_uploaded": (NOW - 2 * DAY_S, True, True),
        "recent_detected": (NOW - HOUR_S, True, False),
    }
    return {
        name: add_snapshot(connection, settings, frames[index], at, detected=detected, uploaded=uploaded)
        for index, (name, (at, detected, uploaded)) in enumerate(plan.items())
    }


def test_retention_settings_have_defaults_and_refuse_nonsense(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text("device_id: dev1\n", encoding="utf-8")
    defaults = load_settings(config, data_dir=tmp_path).retention
    assert (defaults.days, defaults.min_free_bytes, defaults.check_interval_s) == (30, 2 * 1024**3, 60)

    tuned = make_settings(tmp_path, min_free_bytes=123, check_interval_s=5).retention
    assert (tuned.min_free_bytes, tuned.check_interval_s) == (123, 5)

    config.write_text("retention:\n  min_free_bytes: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="min_free_bytes"):
        load_settings(config, data_dir=tmp_path)


def test_age_rule_deletes_only_old_snapshots_already_uploaded(
    connection: sqlite3.Connection, settings: Settings, age_mix: dict[str, int]
) -> None:
    old = ("old_uploaded_1", "old_uploaded_2")
    old_files = [file_of(connection, settings, age_mix[name]) for name in old]
    old_bytes = sum(path.stat().st_size for path in old_files)

    with capture_logs() as events:
        result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert (result.deleted_uploaded, result.deleted_unuploaded, result.kept_not_uploaded) == (2, 0, 2)
    assert result.freed_bytes == old_bytes
    assert deleted_ids(connection) == sorted([age_mix["old_uploaded_1"], age_mix["old_uploaded_2"]])
    marks = {row[0] for row in connection.execute("SELECT deleted_at FROM snapshots WHERE deleted_at > 0")}
    assert marks == {NOW}
    assert not any(path.exists() for path in old_files)
    for name in ("old_detected", "old_undetected", "recent_uploaded", "recent_detected"):
        assert file_of(connection, settings, age_mix[name]).is_file(), name
    assert snapshot_missing_files(connection, settings) == []
    passes = [event for event in events if event["event"] == "retention_pass"]
    assert len(passes) == 1
    assert (passes[0]["deleted"], passes[0]["freed_bytes"]) == (2, old_bytes)

    with capture_logs() as events:
        again = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)
    assert (again.deleted, again.freed_bytes, again.kept_not_uploaded) == (0, 0, 2)
    assert [event for event in events if event["event"] == "retention_pass"] == []


def test_age_rule_with_upload_disabled_deletes_old_detected_snapshots(
    tmp_path: Path, frames: list[bytes]
) -> None:
    settings = make_settings(tmp_path, upload_enabled=False)
    connection = open_database(settings.database_path)
    old = NOW - 45 * DAY_S
    uploaded = add_snapshot(connection, settings, frames[0], old, detected=True, uploaded=True)
    detected = add_snapshot(connection, settings, frames[1], old + 1, detected=True, uploaded=False)
    undetected = add_snapshot(connection, settings, frames[2], old + 2, detected=False, uploaded=False)
    recent = add_snapshot(connection, settings, frames[3], NOW - HOUR_S, detected=True, uploaded=False)

    result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert (result.deleted_uploaded, result.kept_not_uploaded, result.kept_not_detected) == (2, 0, 1)
    assert deleted_ids(connection) == [uploaded, detected]
    assert file_of(connection, settings, undetected).is_file()
    assert file_of(connection, settings, recent).is_file()
    assert snapshot_missing_files(connection, settings) == []
    connection.close()


def test_empty_day_folders_are_removed_but_kept_and_recent_ones_stay(
    connection: sqlite3.Connection, settings: Settings, age_mix: dict[str, int]
) -> None:
    day_folders = {name: file_of(connection, settings, i).parent for name, i in age_mix.items()}
    yesterday = settings.snapshots_dir / "2026" / "12" / "02"
    yesterday.mkdir()
    crashed_write = day_folders["old_detected"].parent / "02" / ".dev1_cam0_x.jpg.abc123.tmp"
    crashed_write.parent.mkdir()
    crashed_write.write_bytes(b"half a jpeg")

    result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert not day_folders["old_uploaded_1"].exists()
    assert not day_folders["old_uploaded_2"].exists()
    assert not crashed_write.parent.exists()
    assert result.removed_temp_files == 1
    assert result.removed_folders == 3
    for name in ("old_detected", "old_undetected", "recent_uploaded", "recent_detected"):
        assert day_folders[name].is_dir(), name
    assert yesterday.is_dir()
    assert settings.snapshots_dir.is_dir()


def test_month_and_year_folders_go_when_their_last_day_goes(
    connection: sqlite3.Connection, settings: Settings, frames: list[bytes]
) -> None:
    old = add_snapshot(connection, settings, frames[0], NOW - 400 * DAY_S, detected=True, uploaded=True)
    year_folder = file_of(connection, settings, old).parents[2]
    assert year_folder.name == "2025"

    result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert result.deleted_uploaded == 1
    assert result.removed_folders == 3
    assert not year_folder.exists()
    assert settings.snapshots_dir.is_dir()


@pytest.fixture
def pressure_mix(tmp_path: Path, frames: list[bytes]) -> Iterator[tuple[Settings, sqlite3.Connection, dict]]:
    """Six recent snapshots stored out of age order: 3 uploaded, 2 detected only, the newest undetected."""
    settings = make_settings(tmp_path)
    connection = open_database(settings.database_path)
    plan = [
        ("uploaded_newest", 5, True, True),
        ("detected_new", 3, True, False),
        ("uploaded_oldest", 10, True, True),
        ("uploaded_mid", 8, True, True),
        ("detected_old", 9, True, False),
        ("undetected_newest", 1, False, False),
    ]
    ids = {
        name: add_snapshot(connection, settings, frames[index], NOW - hours_ago * HOUR_S,
                           detected=detected, uploaded=uploaded)
        for index, (name, hours_ago, detected, uploaded) in enumerate(plan)
    }
    sizes = {name: file_of(connection, settings, i).stat().st_size for name, i in ids.items()}
    yield settings, connection, {"ids": ids, "sizes": sizes}
    connection.close()


def with_floor(settings: Settings, min_free_bytes: int) -> Settings:
    """The same settings with another free-space floor."""
    retention = settings.retention.model_copy(update={"min_free_bytes": min_free_bytes})
    return settings.model_copy(update={"retention": retention})


def test_low_space_deletes_the_oldest_uploaded_snapshots_first(
    pressure_mix: tuple[Settings, sqlite3.Connection, dict],
) -> None:
    settings, connection, mix = pressure_mix
    ids, sizes = mix["ids"], mix["sizes"]
    base_bytes = 1_000_000
    floor = with_floor(settings, base_bytes + sizes["uploaded_oldest"] + sizes["uploaded_mid"] - 1)

    with capture_logs() as events:
        probe = growing_free_space(settings, base_bytes)
        result = enforce_retention(connection, floor, now=NOW, free_bytes=probe)

    assert (result.deleted_uploaded, result.deleted_unuploaded, result.space_short) == (2, 0, False)
    assert result.freed_bytes == sizes["uploaded_oldest"] + sizes["uploaded_mid"]
    assert result.free_bytes == base_bytes + result.freed_bytes
    assert deleted_ids(connection) == sorted([ids["uploaded_oldest"], ids["uploaded_mid"]])
    assert not file_of(connection, settings, ids["uploaded_oldest"]).exists()
    assert file_of(connection, settings, ids["detected_old"]).is_file()
    assert snapshot_missing_files(connection, settings) == []
    assert not [event for event in events if event["event"] == "snapshot_evicted_unuploaded"]


def test_low_space_evicts_detected_unuploaded_only_after_every_uploaded_one(
    pressure_mix: tuple[Settings, sqlite3.Connection, dict],
) -> None:
    settings, connection, mix = pressure_mix
    ids, sizes = mix["ids"], mix["sizes"]
    uploaded = ("uploaded_oldest", "uploaded_mid", "uploaded_newest")
    base_bytes = 1_000_000
    needed = sum(sizes[name] for name in uploaded) + sizes["detected_old"]
    floor = with_floor(settings, base_bytes + needed - 1)

    with capture_logs() as events:
        probe = growing_free_space(settings, base_bytes)
        result = enforce_retention(connection, floor, now=NOW, free_bytes=probe)

    assert (result.deleted_uploaded, result.deleted_unuploaded, result.space_short) == (3, 1, False)
    assert deleted_ids(connection) == sorted([ids[name] for name in (*uploaded, "detected_old")])
    evicted = [event for event in events if event["event"] == "snapshot_evicted_unuploaded"]
    assert [(event["snapshot_id"], event["log_level"]) for event in evicted] == [
        (ids["detected_old"], "error")
    ]
    assert file_of(connection, settings, ids["detected_new"]).is_file()
    assert snapshot_missing_files(connection, settings) == []


def test_low_space_never_deletes_a_snapshot_still_waiting_for_detect(
    pressure_mix: tuple[Settings, sqlite3.Connection, dict],
) -> None:
    settings, connection, mix = pressure_mix
    ids = mix["ids"]
    floor = with_floor(settings, FREE_PLENTY)

    with capture_logs() as events:
        result = enforce_retention(connection, floor, now=NOW, free_bytes=growing_free_space(settings, 0))

    assert (result.deleted_uploaded, result.deleted_unuploaded, result.space_short) == (3, 2, True)
    assert [name for name, snapshot_id in ids.items() if snapshot_id not in deleted_ids(connection)] == [
        "undetected_newest"
    ]
    assert file_of(connection, settings, ids["undetected_newest"]).is_file()
    warnings = [event["event"] for event in events if event["log_level"] == "warning"]
    assert warnings == ["retention_space_short"]
    assert snapshot_missing_files(connection, settings) == []


def test_missing_file_of_an_unmarked_row_is_reported(
    connection: sqlite3.Connection, settings: Settings, frames: list[bytes]
) -> None:
    kept = add_snapshot(connection, settings, frames[0], NOW - HOUR_S, detected=True, uploaded=False)
    lost = add_snapshot(connection, settings, frames[1], NOW - 2 * HOUR_S, detected=True, uploaded=False)
    marked = add_snapshot(connection, settings, frames[2], NOW - 3 * HOUR_S, detected=True, uploaded=True)
    file_of(connection, settings, lost).unlink()
    file_of(connection, settings, marked).unlink()
    connection.execute("UPDATE snapshots SET deleted_at = ? WHERE id = ?", (NOW, marked))

    assert snapshot_missing_files(connection, settings) == [lost]
    assert file_of(connection, settings, kept).is_file()


def test_a_row_path_leaving_the_snapshots_folder_is_never_unlinked(
    connection: sqlite3.Connection, settings: Settings, frames: list[bytes]
) -> None:
    victim = settings.data_dir / "parkmon.yaml.keep"
    victim.write_bytes(b"not a snapshot")
    connection.execute(
        """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height)
           VALUES ('dev1', 'cam0', ?, 'snapshots/2026/10/01/../../../../parkmon.yaml.keep', 14, 1, 1)""",
        (NOW - 60 * DAY_S,),
    )
    connection.execute(
        """INSERT INTO uploads (snapshot_id, image_key, metadata_key, image_bytes, metadata_bytes, posted,
               uploaded_at) SELECT id, 'k', 'm', 14, 2, 1, ? FROM snapshots""",
        (NOW,),
    )

    with capture_logs() as events:
        result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert victim.read_bytes() == b"not a snapshot"
    assert (result.deleted_uploaded, result.freed_bytes) == (1, 0)
    assert [event["event"] for event in events if event["log_level"] == "error"] == ["snapshot_path_refused"]


CRASH_IN_UNLINK = """
import os, sys
from shared.config import load_settings
from shared.db import open_database
from shared.retention import enforce_retention

settings = load_settings(sys.argv[1], data_dir=sys.argv[2])
connection = open_database(settings.database_path)
os.unlink = lambda *args, **kwargs: os._exit(17)
enforce_retention(connection, settings, now=float(sys.argv[3]), free_bytes=lambda: 10**15)
os._exit(0)
"""


def test_a_crash_between_mark_and_unlink_is_finished_by_the_next_pass(
    connection: sqlite3.Connection, settings: Settings, age_mix: dict[str, int]
) -> None:
    old = [age_mix["old_uploaded_1"], age_mix["old_uploaded_2"]]
    old_files = [file_of(connection, settings, snapshot_id) for snapshot_id in old]
    old_bytes = sum(path.stat().st_size for path in old_files)

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_IN_UNLINK, str(settings.config_path), str(settings.data_dir), repr(NOW)],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=60,
    )

    assert crashed.returncode == 17, crashed.stderr
    assert deleted_ids(connection) == sorted(old)
    assert all(path.is_file() for path in old_files)
    assert snapshot_missing_files(connection, settings) == []

    result = enforce_retention(connection, settings, now=NOW, free_bytes=lambda: FREE_PLENTY)

    assert (result.swept_files, result.deleted, result.freed_bytes) == (2, 0, old_bytes)
    assert not any(path.exists() for path in old_files)
    assert not any(path.parent.exists() for path in old_files)
    assert snapshot_missing_files(connection, settings) == []


def test_retention_loop_runs_at_start_and_again_when_woken(
    tmp_path: Path, frames: list[bytes]
) -> None:
    settings = make_settings(tmp_path, check_interval_s=3600)
    connection = open_database(settings.database_path)
    stop = StopFlag()
    loop = RetentionLoop(settings, stop, free_bytes=lambda: FREE_PLENTY)
    loop.start()
    wait_for(lambda: loop.passes >= 1)
    old_at = time.time() - 45 * DAY_S
    old = add_snapshot(connection, settings, frames[0], old_at, detected=True, uploaded=True)

    loop.wake()
    wait_for(lambda: loop.passes >= 2)
    stop.set()
    loop.join(timeout=10)

    assert not loop.is_alive()
    assert loop.last_result is not None and loop.last_result.deleted_uploaded == 1
    assert deleted_ids(connection) == [old]
    connection.close()


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll until `condition` holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def counts(connection: sqlite3.Connection) -> tuple[int, int]:
    """Rows in snapshots and DETECT jobs."""
    snapshots = connection.execute("SELECT count(*) FROM snapshots").fetchone()[0]
    jobs = connection.execute("SELECT count(*) FROM jobs WHERE stage = ?", (DETECT,)).fetchone()[0]
    return snapshots, jobs


def test_a_write_on_a_full_disk_leaves_nothing_and_the_next_one_succeeds(
    connection: sqlite3.Connection, settings: Settings, frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def fill_disk_after_a_few_bytes(descriptor: int, data: Any) -> int:
        if len(data) > 4096:
            real_write(descriptor, bytes(data[:4096]))
        raise ENOSPC_ERROR

    monkeypatch.setattr(os, "write", fill_disk_after_a_few_bytes)
    with pytest.raises(OSError) as raised:
        store_snapshot(connection, settings, "cam0", frames[0], NOW, 1280, 720)
    assert raised.value.errno == errno.ENOSPC
    assert files_under(settings.snapshots_dir) == []
    assert counts(connection) == (0, 0)

    monkeypatch.undo()
    snapshot_id = store_snapshot(connection, settings, "cam0", frames[0], NOW, 1280, 720)

    assert counts(connection) == (1, 1)
    job = connection.execute("SELECT stage, state FROM jobs WHERE snapshot_id = ?", (snapshot_id,)).fetchone()
    assert tuple(job) == (DETECT, "pending")
    assert files_under(settings.snapshots_dir) == [file_of(connection, settings, snapshot_id)]
    assert file_of(connection, settings, snapshot_id).read_bytes() == frames[0]


class SimulatedSmallDisk:
    """A folder with a byte quota: os.write into files below it fails with ENOSPC past the quota."""

    def __init__(self, root: Path, capacity_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        real_write = os.write

        def quota_write(descriptor: int, data: Any) -> int:
            info = os.fstat(descriptor)
            inside = {(path.stat().st_dev, path.stat().st_ino) for path in files_under(root)}
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) in inside:
                if self.used_bytes() + len(data) > self.capacity_bytes:
                    raise ENOSPC_ERROR
            return real_write(descriptor, data)

        monkeypatch.setattr(os, "write", quota_write)

    def used_bytes(self) -> int:
        """Bytes in files below the root."""
        return bytes_under(self.root)

    def free(self) -> int:
        """Bytes still writable."""
        return self.capacity_bytes - self.used_bytes()


class TmpfsSmallDisk:
    """A real 1 MiB tmpfs mounted on the snapshots folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def free(self) -> int:
        """Free bytes the kernel reports for the mount."""
        return os.statvfs(self.root).f_bavail * os.statvfs(self.root).f_frsize


SMALL_DISK_BYTES = 1024 * 1024


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(request: pytest.FixtureRequest, settings: Settings,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[TmpfsSmallDisk | SimulatedSmallDisk]:
    """A 1 MiB snapshots disk: a real tmpfs when mounting works (root on Linux), else simulated."""
    root = settings.snapshots_dir
    root.mkdir(parents=True)
    mounted = False
    if request.param == "tmpfs" and sys.platform == "linux":
        command = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(root)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    try:
        yield TmpfsSmallDisk(root) if mounted else SimulatedSmallDisk(root, SMALL_DISK_BYTES, monkeypatch)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def test_a_full_small_disk_refuses_cleanly_and_retention_makes_room(
    small_disk: TmpfsSmallDisk | SimulatedSmallDisk, settings: Settings, connection: sqlite3.Connection,
    frames: list[bytes],
) -> None:
    stored: list[int] = []
    failure: OSError | None = None
    for index, jpeg in enumerate(frames):
        try:
            stored.append(add_snapshot(connection, settings, jpeg, NOW - (20 - index) * HOUR_S,
                                       detected=True, uploaded=True))
        except OSError as error:
            failure = error
            break

    assert failure is not None and failure.errno == errno.ENOSPC
    assert len(stored) >= 2
    assert counts(connection) == (len(stored), len(stored))
    assert files_under(settings.snapshots_dir) == sorted(file_of(connection, settings, i) for i in stored)
    assert snapshot_missing_files(connection, settings) == []

    room_for_two = with_floor(settings, 2 * max(len(jpeg) for jpeg in frames) + 64 * 1024)
    # On the real tmpfs the default probe (free space of the snapshots folder's disk) is what runs.
    probe = None if isinstance(small_disk, TmpfsSmallDisk) else small_disk.free
    result = enforce_retention(connection, room_for_two, now=NOW, free_bytes=probe)

    assert result.space_short is False
    assert result.deleted_uploaded >= 1
    assert deleted_ids(connection) == stored[: result.deleted_uploaded]
    assert snapshot_missing_files(connection, settings) == []
    next_id = store_snapshot(connection, settings, "cam0", frames[-1], NOW, 1280, 720)
    assert file_of(connection, settings, next_id).read_bytes() == frames[-1]
    job = connection.execute("SELECT stage FROM jobs WHERE snapshot_id = ?", (next_id,)).fetchone()
    assert job["stage"] == DETECT
