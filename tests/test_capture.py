"""The capture stage: folder replays, broken frames, many cameras at once, reconnects and SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import capture.main as capture_main
from capture.main import run
from capture.sources import Frame, SourceError, register_scheme, unregister_scheme
from shared.config import CameraSettings, load_settings
from shared.db import connect
from shared.lifecycle import StopFlag

REPO_DIR = Path(__file__).resolve().parents[1]
SERIES = "UFPR05/Rainy"
RUN_CAPTURE = (
    "import sys\n"
    "from shared.config import load_settings\n"
    "from shared.logging import configure_logging\n"
    "from capture.main import run\n"
    "configure_logging('INFO', process='capture')\n"
    "sys.exit(run(load_settings(sys.argv[1]), once=sys.argv[2] == 'once'))\n"
)


def _copy_frames(pklot_dir: Path, folder: Path, count: int) -> list[str]:
    """Copy the first `count` real frames of a series into `folder`; return their names in order."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = sorted((pklot_dir / SERIES).glob("*.jpg"))[:count]
    for frame in frames:
        shutil.copy(frame, folder / frame.name)
    return [frame.name for frame in frames]


def _write_config(tmp_path: Path, cameras: list[dict[str, object]], interval_s: float = 0.05) -> Path:
    """A config file for the given cameras."""
    config = {"device_id": "dev1", "cameras": cameras, "processing": {"snapshot_interval": interval_s}}
    path = tmp_path / "parkmon.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _start_capture(config: Path, data_dir: Path, mode: str) -> subprocess.Popen[str]:
    """Run the capture stage as its own process."""
    environment = {**os.environ, "PARKMON_DATA_DIR": str(data_dir)}
    return subprocess.Popen(
        [str(REPO_DIR / ".venv/bin/python"), "-c", RUN_CAPTURE, str(config), mode],
        cwd=REPO_DIR, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _events(stderr: str) -> list[dict[str, object]]:
    """The JSON log events a stage wrote."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _rows(data_dir: Path, query: str, parameters: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a query against the stage's database."""
    connection = connect(data_dir / "parkmon.db", read_only=True)
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `condition()` until true (a database not created yet counts as false); fail if never."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (sqlite3.OperationalError, IndexError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_once_replay_stores_every_good_frame_in_name_order_and_skips_broken_ones(
    tmp_path: Path, pklot_dir: Path
) -> None:
    frames = tmp_path / "frames"
    good = _copy_frames(pklot_dir, frames, 5)
    (frames / "2013-03-19_06_31_00.jpg").write_bytes(b"")
    (frames / "2013-03-19_06_37_00.jpg").write_bytes((frames / good[0]).read_bytes()[:30_000])
    (frames / "2013-03-19_06_30_00.xml").write_text("<parking/>", encoding="utf-8")
    config = _write_config(tmp_path, [{"id": "ufpr05", "source": str(frames)}])
    data_dir = tmp_path / "data"

    process = _start_capture(config, data_dir, "once")
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    snapshots = _rows(data_dir, "SELECT * FROM snapshots ORDER BY id")
    assert [row["source_name"] for row in snapshots] == good
    assert {(row["camera_id"], row["width"], row["height"]) for row in snapshots} == {("ufpr05", 1280, 720)}
    for row in snapshots:
        image = cv2.imread(str(data_dir / row["path"]))
        assert image is not None and image.shape == (720, 1280, 3)
        assert (data_dir / row["path"]).stat().st_size == row["bytes"]
    jobs = _rows(data_dir, "SELECT stage, snapshot_id, state FROM jobs ORDER BY snapshot_id")
    assert [tuple(job) for job in jobs] == [("detect", row["id"], "pending") for row in snapshots]
    events = _events(stderr)
    unreadable = sorted(Path(str(event["path"])).name for event in events
                        if event["event"] == "frame_unreadable")
    assert unreadable == ["2013-03-19_06_31_00.jpg", "2013-03-19_06_37_00.jpg"]
    saved = [event for event in events if event["event"] == "snapshot_saved"]
    assert [event["path"] for event in saved] == [row["path"] for row in snapshots]
    assert all(event["camera_id"] == "ufpr05" and event["bytes"] > 0 for event in saved)
    heartbeat = _rows(data_dir, "SELECT status FROM heartbeats WHERE process = 'capture'")
    assert [row["status"] for row in heartbeat] == ["stopped"]


def test_frames_of_another_size_are_stored_as_they_are_with_one_warning(
    tmp_path: Path, pklot_dir: Path
) -> None:
    frames = tmp_path / "frames"
    _copy_frames(pklot_dir, frames, 3)
    config = _write_config(tmp_path, [{"id": "cam0", "source": str(frames), "width": 640, "height": 360}])
    data_dir = tmp_path / "data"

    process = _start_capture(config, data_dir, "once")
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    sizes = _rows(data_dir, "SELECT width, height FROM snapshots")
    assert [tuple(size) for size in sizes] == [(1280, 720)] * 3
    warnings = [event for event in _events(stderr) if event["event"] == "frame_size_mismatch"]
    assert len(warnings) == 1
    assert (warnings[0]["expected"], warnings[0]["actual"]) == ("640x360", "1280x720")


def test_sigterm_stops_a_looping_replay_cleanly(tmp_path: Path, pklot_dir: Path) -> None:
    frames = tmp_path / "frames"
    _copy_frames(pklot_dir, frames, 2)
    config = _write_config(tmp_path, [{"id": "cam0", "source": str(frames)}], interval_s=0.1)
    data_dir = tmp_path / "data"

    process = _start_capture(config, data_dir, "forever")
    try:
        _wait_until(lambda: len(_rows(data_dir, "SELECT id FROM snapshots")) >= 4)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    names = [row["source_name"] for row in _rows(data_dir, "SELECT source_name FROM snapshots ORDER BY id")]
    assert names[:4] == [*sorted(path.name for path in frames.iterdir())] * 2
    heartbeat = _rows(data_dir, "SELECT status FROM heartbeats WHERE process = 'capture'")
    assert [row["status"] for row in heartbeat] == ["stopped"]


class BlockedSource:
    """A live source whose read never returns until the test releases it."""

    live = True
    ended = False

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def read(self) -> Frame | None:
        self.release.wait()
        return None

    def close(self) -> None:
        return None


class SequenceSource:
    """A live source that yields the frames it is given, then reports a lost stream."""

    live = True
    ended = False

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = list(frames)

    def read(self) -> Frame | None:
        return Frame(image=self.frames.pop(0)) if self.frames else None

    def close(self) -> None:
        return None


class BrokenDriverSource(SequenceSource):
    """A live source whose driver raises an unexpected error on read."""

    def read(self) -> Frame | None:
        raise RuntimeError("driver fault")


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Registers the `blocked://` scheme; setting the event unblocks its reads."""
    event = threading.Event()
    register_scheme("blocked", lambda camera, interval_s, loop: BlockedSource(event))
    yield event
    event.set()
    unregister_scheme("blocked")


def test_a_blocked_camera_does_not_delay_the_other_cameras(
    tmp_path: Path, pklot_dir: Path, release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_main, "STALL_MIN_S", 0.3)
    frames = tmp_path / "frames"
    good = _copy_frames(pklot_dir, frames, 4)
    config = _write_config(tmp_path, [
        {"id": "stuck", "source": "blocked://front-gate"},
        {"id": "yard", "source": str(frames)},
    ], interval_s=0.1)
    settings = load_settings(config, data_dir=tmp_path / "data")
    stop = StopFlag()
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", run(settings, once=True, stop=stop)))

    runner.start()
    try:
        _wait_until(lambda: len(_rows(settings.data_dir, "SELECT id FROM snapshots")) == len(good))
        _wait_until(lambda: tuple(_rows(settings.data_dir, "SELECT status, detail FROM heartbeats")[0])
                    == ("stalled", "stalled: stuck (reading)"))
    finally:
        stop.set()
        runner.join(timeout=10)

    assert not runner.is_alive()
    assert result["rc"] == 0
    rows = _rows(settings.data_dir, "SELECT camera_id, source_name FROM snapshots ORDER BY id")
    assert [(row["camera_id"], row["source_name"]) for row in rows] == [("yard", name) for name in good]
    jobs = _rows(settings.data_dir, "SELECT count(*) AS jobs FROM jobs WHERE stage = 'detect'")
    assert jobs[0]["jobs"] == len(good)


def test_a_live_camera_that_fails_or_errors_is_reopened_until_it_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_main, "RECONNECT_BASE_S", 0.01)
    opened: list[str] = []
    image = np.full((360, 640, 3), 90, dtype=np.uint8)

    def flaky(camera: CameraSettings, interval_s: float, loop: bool) -> SequenceSource:
        opened.append(camera.id)
        if len(opened) == 1:
            raise SourceError("camera unplugged")
        if len(opened) == 2:
            return SequenceSource([])
        if len(opened) == 3:
            return BrokenDriverSource([])
        return SequenceSource([image])

    register_scheme("flaky", flaky)
    try:
        camera = {"id": "gate", "source": "flaky://gate", "width": 640, "height": 360}
        config = _write_config(tmp_path, [camera])
        settings = load_settings(config, data_dir=tmp_path / "data")
        rc = run(settings, once=True, stop=StopFlag())
    finally:
        unregister_scheme("flaky")

    assert rc == 0
    assert opened == ["gate"] * 4
    rows = _rows(settings.data_dir, "SELECT camera_id, width, height, source_name FROM snapshots")
    assert [tuple(row) for row in rows] == [("gate", 640, 360, None)]


def test_a_missing_replay_folder_fails_that_camera_only(tmp_path: Path, pklot_dir: Path) -> None:
    frames = tmp_path / "frames"
    good = _copy_frames(pklot_dir, frames, 2)
    config = _write_config(tmp_path, [
        {"id": "gone", "source": str(tmp_path / "no-such-folder")},
        {"id": "yard", "source": str(frames)},
    ])
    settings = load_settings(config, data_dir=tmp_path / "data")

    rc = run(settings, once=True, stop=StopFlag())

    assert rc == 1
    rows = _rows(settings.data_dir, "SELECT camera_id, source_name FROM snapshots ORDER BY id")
    assert [(row["camera_id"], row["source_name"]) for row in rows] == [("yard", name) for name in good]
    detail = _rows(settings.data_dir, "SELECT status, detail FROM heartbeats")[0]
    assert (detail["status"], detail["detail"]) == ("stopped", "failed: gone")


def test_a_camera_id_that_cannot_name_a_file_is_refused_at_load(tmp_path: Path) -> None:
    config = _write_config(tmp_path, [{"id": "front gate", "source": "0"}])

    with pytest.raises(ValueError, match="front gate"):
        load_settings(config, data_dir=tmp_path / "data")


def test_the_capture_module_does_not_import_torch() -> None:
    probe = "import sys, capture.main; sys.exit(int(bool({'torch', 'ultralytics'} & set(sys.modules))))"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO_DIR).returncode == 0


def test_a_full_disk_loses_that_snapshot_only_and_capture_goes_on(
    tmp_path: Path, pklot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = tmp_path / "frames"
    good = _copy_frames(pklot_dir, frames, 3)
    config = _write_config(tmp_path, [{"id": "cam0", "source": str(frames)}])
    settings = load_settings(config, data_dir=tmp_path / "data")
    real_store = capture_main.store_snapshot
    calls: list[str | None] = []

    def disk_full_on_second(*args: object, **kwargs: object) -> int:
        calls.append(kwargs.get("source_name"))  # type: ignore[arg-type]
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_store(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(capture_main, "store_snapshot", disk_full_on_second)

    rc = run(settings, once=True, stop=StopFlag())

    assert rc == 0
    assert calls == good
    rows = _rows(settings.data_dir, "SELECT source_name FROM snapshots ORDER BY id")
    assert [row["source_name"] for row in rows] == [good[0], good[2]]
    assert len(_rows(settings.data_dir, "SELECT id FROM jobs")) == 2
