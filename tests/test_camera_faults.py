"""Camera faults: a stream that stalls without closing, long outages, broken replays and cut video files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

import capture.main as capture_main
from api.health import DEGRADED, assess_health
from capture.sources import Frame, SourceError, register_scheme, unregister_scheme
from shared.config import CameraSettings, Settings, load_settings
from shared.db import connect
from shared.lifecycle import StopFlag
from shared.status import reading
from shared.zone_import import import_zones

REPO_DIR = Path(__file__).resolve().parents[1]
SERIES = "UFPR05/Rainy"
CLIP = "video/aerial_crop_14spaces/parking_crop.mp4"
STREAM_SIZE = (640, 360)


class MjpegCamera:
    """An HTTP MJPEG camera on 127.0.0.1 that can stop sending without closing any connection.

    While paused, open streams get no more bytes and new requests get no answer, exactly like a
    camera whose encoder hung: nothing is closed, nothing is refused.
    """

    def __init__(self, jpeg: bytes, fps: float = 10.0) -> None:
        self.jpeg = jpeg
        self.period_s = 1.0 / fps
        self.flowing = threading.Event()
        self.flowing.set()
        self.requests = 0
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                camera.requests += 1
                camera.flowing.wait()
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(camera.jpeg)
                try:
                    while True:
                        camera.flowing.wait()
                        self.wfile.write(part + camera.jpeg + b"\r\n")
                        self.wfile.flush()
                        time.sleep(camera.period_s)
                except OSError:
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The stream URL a camera source points at."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"

    def start(self) -> MjpegCamera:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def pause(self) -> None:
        """Stop sending frames; keep every connection open."""
        self.flowing.clear()

    def resume(self) -> None:
        """Send frames again, on the old connections and to new ones."""
        self.flowing.set()

    def stop(self) -> None:
        """Unblock the handlers and shut the server down."""
        self.flowing.set()
        self.server.shutdown()
        self.server.server_close()


def _real_frame(pklot_dir: Path, index: int = 0) -> np.ndarray:
    """One real PKLot frame, 1280x720 BGR."""
    frame = cv2.imread(str(sorted((pklot_dir / SERIES).glob("*.jpg"))[index]))
    assert frame is not None
    return frame


def _write_config(tmp_path: Path, cameras: list[dict[str, Any]], interval_s: float) -> Path:
    """A device config for these cameras, data under tmp_path/data."""
    config = {
        "device_id": "dev1",
        "data_dir": str(tmp_path / "data"),
        "cameras": cameras,
        "processing": {"snapshot_interval": interval_s},
    }
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class StageProcess:
    """`parkmon run capture` as its own process, its JSON log lines going to a file."""

    def __init__(self, config: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "--config", str(config), "run", "capture", *extra],
            cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog events written so far, optionally only those called `name`."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [event for event in events if name is None or event["event"] == name]

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def _rows(settings: Settings, query: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a read-only query against the device database."""
    connection = connect(settings.database_path, read_only=True)
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def _count(settings: Settings, table: str) -> int:
    """Rows in a table of the device database."""
    return int(_rows(settings, f"SELECT count(*) FROM {table}")[0][0])


def _heartbeat(settings: Settings) -> tuple[str, str]:
    """The capture heartbeat's status and detail."""
    row = _rows(settings, "SELECT status, detail FROM heartbeats WHERE process = 'capture'")[0]
    return row["status"], row["detail"] or ""


def _health(settings: Settings) -> dict[str, Any]:
    """The /health document, computed as the API computes it."""
    with reading(settings) as connection:
        return assess_health(connection, settings, time.time())


def _wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, stage: StageProcess | None = None
) -> None:
    """Poll until `condition()` holds (a database not there yet counts as false); fail if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stage is not None:
            assert stage.alive(), f"capture exited with {stage.process.returncode} while waiting for {what}"
        try:
            if condition():
                return
        except (sqlite3.OperationalError, IndexError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _assert_every_job_is_for_a_stored_snapshot(settings: Settings) -> None:
    """One DETECT job per snapshot row, and each snapshot's JPEG is on disk with its recorded size."""
    snapshots = _rows(settings, "SELECT id, path, bytes FROM snapshots ORDER BY id")
    jobs = _rows(settings, "SELECT snapshot_id FROM jobs WHERE stage = 'detect' ORDER BY snapshot_id")
    assert [job["snapshot_id"] for job in jobs] == [row["id"] for row in snapshots]
    assert _count(settings, "jobs") == len(snapshots)
    for row in snapshots:
        assert (settings.data_dir / row["path"]).stat().st_size == row["bytes"]


@pytest.fixture
def mjpeg_camera(pklot_dir: Path) -> Iterator[MjpegCamera]:
    """A running MJPEG camera streaming a real frame at 640x360."""
    image = cv2.resize(_real_frame(pklot_dir), STREAM_SIZE)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    camera = MjpegCamera(encoded.tobytes()).start()
    yield camera
    camera.stop()


def test_a_stream_that_stops_sending_is_shown_stalled_and_capture_resumes_when_it_returns(
    tmp_path: Path, mjpeg_camera: MjpegCamera
) -> None:
    width, height = STREAM_SIZE
    config = _write_config(
        tmp_path, [{"id": "gate", "source": mjpeg_camera.url, "width": width, "height": height}], 0.2
    )
    settings = load_settings(config)
    stage = StageProcess(config, tmp_path / "capture.log")
    try:
        _wait_until(lambda: _count(settings, "snapshots") >= 5, 60, "first snapshots", stage)
        _wait_until(lambda: _heartbeat(settings)[0] == "running", 10, "a running heartbeat", stage)

        mjpeg_camera.pause()
        paused_at = time.monotonic()
        _wait_until(lambda: _heartbeat(settings)[0] == "stalled", 20, "the stall in the heartbeat", stage)
        status, detail = _heartbeat(settings)
        assert detail.startswith("stalled: gate (")
        health = _health(settings)
        assert health["status"] == DEGRADED
        assert health["processes"]["capture"]["state"] == "stalled"
        stall_reason = "capture reports stalled: stalled: gate"
        assert any(reason.startswith(stall_reason) for reason in health["reasons"])
        # Past the live read timeout: capture gives the stream up and tries a new connection, which hangs too.
        _wait_until(lambda: len(stage.events("camera_reconnecting")) >= 1, 30, "a reconnect", stage)
        _wait_until(lambda: mjpeg_camera.requests >= 2, 30, "a second connection", stage)
        during_pause = _count(settings, "snapshots")
        time.sleep(max(0.0, 14.0 - (time.monotonic() - paused_at)))
        assert _count(settings, "snapshots") == during_pause

        mjpeg_camera.resume()
        _wait_until(lambda: _count(settings, "snapshots") >= during_pause + 5, 30,
                    "snapshots after the camera came back", stage)
        _wait_until(lambda: _heartbeat(settings)[0] == "running", 10, "the heartbeat back to running", stage)
        assert stage.alive()

        # Stalled again, and asked to stop meanwhile: the blocked camera does not keep the process alive.
        mjpeg_camera.pause()
        _wait_until(lambda: _heartbeat(settings)[0] == "stalled", 20, "the second stall", stage)
    finally:
        code = stage.terminate(timeout_s=15.0)

    assert code == 0
    assert stage.events("capture_stopped")
    assert len(stage.events("camera_stalled")) >= 1
    assert len(stage.events("camera_recovered")) >= 1
    assert len(stage.events("camera_frames_stopped")) >= 1
    assert len(stage.events("camera_opened")) >= 2
    assert stage.events("camera_failed") == []
    sizes = {tuple(row) for row in _rows(settings, "SELECT width, height FROM snapshots")}
    assert sizes == {STREAM_SIZE}
    _assert_every_job_is_for_a_stored_snapshot(settings)
    assert _heartbeat(settings)[0] == "stopped"


class InstantStop(StopFlag):
    """A StopFlag whose waits return at once, so a long outage of backoff sleeps runs in no time."""

    def sleep(self, seconds: float) -> bool:
        return self._event.wait(0.0)


class OneFrameSource:
    """A live source that delivers one frame, then reports the stream lost."""

    live = True
    ended = False

    def __init__(self, image: np.ndarray) -> None:
        self.frames = [image]

    def read(self) -> Frame | None:
        return Frame(image=self.frames.pop()) if self.frames else None

    def close(self) -> None:
        return None


def test_reconnect_waits_stop_growing_at_the_cap_however_long_the_camera_is_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_opens = 14
    delays: list[float] = []

    class RecordingBackoff(capture_main.Backoff):
        def next_delay_s(self) -> float:
            delay_s = super().next_delay_s()
            delays.append(delay_s)
            return delay_s

    monkeypatch.setattr(capture_main, "Backoff", RecordingBackoff)
    opens: list[int] = []
    image = np.full((360, 640, 3), 120, dtype=np.uint8)

    def away_then_back(camera: CameraSettings, interval_s: float, loop: bool) -> OneFrameSource:
        opens.append(len(opens))
        if len(opens) <= failed_opens:
            raise SourceError("connection refused")
        return OneFrameSource(image)

    register_scheme("away", away_then_back)
    try:
        config = _write_config(tmp_path, [{"id": "gate", "source": "away://gate", "width": 640,
                                           "height": 360}], 0.05)
        rc = capture_main.run(load_settings(config), once=True, stop=InstantStop())
    finally:
        unregister_scheme("away")

    assert rc == 0
    assert len(opens) == failed_opens + 1
    expected = [min(capture_main.RECONNECT_BASE_S * 2**n, capture_main.RECONNECT_CAP_S)
                for n in range(failed_opens)]
    assert delays == expected
    # However long the outage, the camera is retried at least every RECONNECT_CAP_S, so one that comes
    # back is capturing again within that plus one open: well inside 30 s.
    assert delays[-1] == capture_main.RECONNECT_CAP_S <= 20.0
    rows = _rows(load_settings(config), "SELECT camera_id, width, height FROM snapshots")
    assert [tuple(row) for row in rows] == [("gate", 640, 360)]


def _write_clip(clip: Path, target: Path, frames: int) -> None:
    """Re-encode the first frames of a real clip as an MJPG AVI (header first, index last)."""
    source = cv2.VideoCapture(str(clip))
    fps = source.get(cv2.CAP_PROP_FPS)
    size = (int(source.get(cv2.CAP_PROP_FRAME_WIDTH)), int(source.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    try:
        for _ in range(frames):
            ok, image = source.read()
            assert ok
            writer.write(image)
    finally:
        writer.release()
        source.release()


def _decodable_frames(path: Path) -> int:
    """How many frames OpenCV can read from a video file, start to end."""
    video = cv2.VideoCapture(str(path))
    count = 0
    while video.read()[0]:
        count += 1
    video.release()
    return count


def test_a_truncated_video_file_replays_the_frames_it_still_has(tmp_path: Path, pklot_dir: Path) -> None:
    whole = tmp_path / "whole.avi"
    _write_clip(pklot_dir.parent / CLIP, whole, 60)
    cut = tmp_path / "cut.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    readable = _decodable_frames(cut)
    assert 0 < readable < 60
    # One snapshot per video frame at 30 fps, so every readable frame becomes one snapshot.
    camera = {"id": "drone", "source": str(cut), "width": 380, "height": 452}
    config = _write_config(tmp_path, [camera], 1 / 30)
    settings = load_settings(config)

    stage = StageProcess(config, tmp_path / "capture.log", "--once")
    stage.process.wait(timeout=120)
    code = stage.terminate()

    assert code == 0
    assert _count(settings, "snapshots") == readable
    sizes = {tuple(row) for row in _rows(settings, "SELECT width, height FROM snapshots")}
    assert sizes == {(380, 452)}
    assert [event["snapshots"] for event in stage.events("replay_finished")] == [readable]
    _assert_every_job_is_for_a_stored_snapshot(settings)


def test_a_video_cut_before_its_index_fails_that_camera_without_a_restart_loop(
    tmp_path: Path, pklot_dir: Path
) -> None:
    data = (pklot_dir.parent / CLIP).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    config = _write_config(tmp_path, [{"id": "drone", "source": str(cut), "width": 380, "height": 452}], 0.1)
    settings = load_settings(config)

    stage = StageProcess(config, tmp_path / "capture.log")
    try:
        _wait_until(lambda: _heartbeat(settings) == ("degraded", "failed: drone"), 30,
                    "the failed camera in the heartbeat", stage)
        first_beat = _rows(settings, "SELECT beat_at FROM heartbeats WHERE process = 'capture'")[0][0]
        # Several heartbeats later: still the same process, still saying why, not exiting to be restarted.
        _wait_until(lambda: _rows(settings, "SELECT beat_at FROM heartbeats")[0][0] >= first_beat + 4, 30,
                    "later heartbeats", stage)
        health = _health(settings)
        assert stage.alive()
    finally:
        code = stage.terminate()

    assert code == 1
    assert health["status"] == DEGRADED
    assert "capture reports degraded: failed: drone" in health["reasons"]
    [invalid] = stage.events("camera_source_invalid")
    assert invalid["camera_id"] == "drone"
    assert len(stage.events("capture_started")) == 1
    assert _count(settings, "snapshots") == 0
    assert _count(settings, "jobs") == 0


def test_a_camera_that_stops_for_another_reason_ends_the_process_so_launchd_restarts_it(
    tmp_path: Path,
) -> None:
    class BrokenReplay:
        live = False
        ended = False

        def read(self) -> Frame | None:
            raise RuntimeError("decoder bug")

        def close(self) -> None:
            return None

    register_scheme("buggy", lambda camera, interval_s, loop: BrokenReplay())
    try:
        config = _write_config(tmp_path, [{"id": "gate", "source": "buggy://gate"}], 0.05)
        rc = capture_main.run(load_settings(config), once=False, stop=StopFlag())
    finally:
        unregister_scheme("buggy")

    assert rc == 1
    beat = _rows(load_settings(config), "SELECT status, detail FROM heartbeats WHERE process = 'capture'")[0]
    assert tuple(beat) == ("stopped", "failed: gate")


def test_a_looping_replay_logs_each_broken_file_once_and_queues_only_stored_frames(
    tmp_path: Path, pklot_dir: Path
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    real = sorted((pklot_dir / SERIES).glob("*.jpg"))
    good = [real[0].name, real[1].name]
    for frame in real[:2]:
        os.symlink(frame, frames / frame.name)
    whole = real[2].read_bytes()
    broken = {
        "2013-03-19_00_00_01.jpg": b"",
        "2013-03-19_00_00_02.jpg": b"\xff\xd8\xff\xe0 not a jpeg at all" * 10,
        "2013-03-19_00_00_03.jpg": whole[: len(whole) // 2],
    }
    for name, content in broken.items():
        (frames / name).write_bytes(content)
    small = "2013-03-19_00_00_04.jpg"
    cv2.imwrite(str(frames / small), cv2.resize(_real_frame(pklot_dir, 3), (640, 360)))
    config = _write_config(tmp_path, [{"id": "ufpr05", "source": str(frames)}], 0.05)
    settings = load_settings(config)

    stage = StageProcess(config, tmp_path / "capture.log")
    try:
        _wait_until(lambda: len(stage.events("replay_restarted")) >= 5, 60, "five passes", stage)
    finally:
        code = stage.terminate()

    assert code == 0
    unreadable = sorted(Path(event["path"]).name for event in stage.events("frame_unreadable"))
    assert unreadable == sorted(broken)
    rows = _rows(settings, "SELECT source_name, width, height FROM snapshots ORDER BY id")
    assert {row["source_name"] for row in rows} == {*good, small}
    assert len(rows) >= 5 * 3
    assert {(row["width"], row["height"]) for row in rows if row["source_name"] == small} == {(640, 360)}
    assert {(row["width"], row["height"]) for row in rows if row["source_name"] != small} == {(1280, 720)}
    assert len(stage.events("frame_size_mismatch")) == 1
    _assert_every_job_is_for_a_stored_snapshot(settings)


def test_frames_of_another_size_are_detected_on_scaled_zones_or_parked_never_crash_detect(
    tmp_path: Path, pklot_dir: Path, model_path: Path
) -> None:
    series = pklot_dir / "PUCPR/Sunny"
    real = sorted(series.glob("*.jpg"))
    frames = tmp_path / "frames"
    frames.mkdir()
    for frame in real[:2]:
        os.symlink(frame, frames / frame.name)
    smaller = "2012-09-13_99_00_01.jpg"
    other_aspect = "2012-09-13_99_00_02.jpg"
    image = cv2.imread(str(real[2]))
    cv2.imwrite(str(frames / smaller), cv2.resize(image, (640, 360)))
    cv2.imwrite(str(frames / other_aspect), np.ascontiguousarray(image[:, :1000]))
    zones = import_zones(sorted(series.glob("*.xml"))[0], "pklot")
    config = _write_config(tmp_path, [{"id": "pucpr", "source": str(frames), "parking_zones": zones}], 0.05)
    text = yaml.safe_load(config.read_text())
    text["detection"] = {"model": str(model_path), "device": "cpu", "image_size": 320, "tile_size": 0}
    config.write_text(yaml.safe_dump(text), encoding="utf-8")
    settings = load_settings(config)

    capture = StageProcess(config, tmp_path / "capture.log", "--once")
    capture.process.wait(timeout=120)
    assert capture.terminate() == 0
    detect = subprocess.run(
        [sys.executable, "-m", "shared.cli", "--config", str(config), "run", "detect", "--once"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )

    assert detect.returncode == 0, detect.stderr[-2000:]
    rows = {row["source_name"]: row for row in _rows(settings, """
        SELECT s.source_name, s.width, s.height, j.state, j.error_kind, j.last_error, d.result_json
        FROM snapshots s JOIN jobs j ON j.snapshot_id = s.id AND j.stage = 'detect'
        LEFT JOIN detections d ON d.snapshot_id = s.id""")}
    assert set(rows) == {real[0].name, real[1].name, smaller, other_aspect}
    for name in (real[0].name, real[1].name, smaller):
        result = json.loads(rows[name]["result_json"])
        assert rows[name]["state"] == "done"
        assert result["spaces"] == len(zones)
        frame = (result["frame"]["width"], result["frame"]["height"])
        assert frame == (rows[name]["width"], rows[name]["height"])
    assert (rows[smaller]["width"], rows[smaller]["height"]) == (640, 360)
    parked = rows[other_aspect]
    assert (parked["width"], parked["height"], parked["result_json"]) == (1000, 720, None)
    assert parked["state"] == "failed"
    assert parked["error_kind"] == "zone_scale" and "aspect" in parked["last_error"]
    upload_jobs = _rows(settings, "SELECT snapshot_id FROM jobs WHERE stage = 'upload'")
    assert len(upload_jobs) == 3
    assert detect.stderr.count('"detect_started"') == 1
