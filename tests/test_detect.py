"""The detect stage as a real process on real frames: detections, zone state, events, upload jobs, retries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import pytest
import yaml

from shared.db import connect, immediate, open_database
from shared.jobs import DETECT, enqueue
from shared.pklot import read_pklot_spaces
from shared.snapshots import snapshot_relative_path

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"
SERIES = SHARED_DIR / "data" / "pklot" / "UFPR04" / "Cloudy"
MODEL_PATH = SHARED_DIR / "models" / "yolov8n-coco.pt"
# An empty lot, then ten cars; processed in this order, then an older frame arrives late.
FRAMES = ["2013-01-16_08_35_04", "2013-01-16_10_40_06", "2013-01-16_10_45_06"]
LATE_FRAME = "2013-01-16_08_30_04"
# (decided occupied, labelled occupied) -> confusion cell, as `parkmon eval` counts them.
OUTCOME = {(True, True): "tp", (True, False): "fp", (False, True): "fn", (False, False): "tn"}
RUN_DETECT = (
    "import sys\n"
    "from shared.config import load_settings\n"
    "from shared.logging import configure_logging\n"
    "from detect.main import run\n"
    "configure_logging('INFO', process='detect')\n"
    "sys.exit(run(load_settings(sys.argv[1]), once=sys.argv[2] == 'once'))\n"
)


def _captured_at(stem: str) -> float:
    """Unix time of a PKLot frame name."""
    return datetime.strptime(stem, "%Y-%m-%d_%H_%M_%S").replace(tzinfo=UTC).timestamp()


def _add_snapshot(
    connection: sqlite3.Connection, data_dir: Path, stem: str | None, captured_at: float
) -> int:
    """A snapshot row and its DETECT job, with the frame's JPEG copied in (or no file if stem is None)."""
    relative = snapshot_relative_path("lot-7", "ufpr04", captured_at)
    target = data_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if stem is not None:
        shutil.copyfile(SERIES / f"{stem}.jpg", target)
    with immediate(connection):
        cursor = connection.execute(
            """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height,
                                      source_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            ("lot-7", "ufpr04", captured_at, relative, target.stat().st_size if stem else 0, 1280, 720,
             f"{stem}.jpg" if stem else None),
        )
        snapshot_id = int(cursor.lastrowid or 0)
        enqueue(connection, DETECT, snapshot_id)
    return snapshot_id


def _run_detect(config: Path) -> subprocess.CompletedProcess[str]:
    """`detect.main.run(settings, once=True)` in its own process."""
    environment = {**os.environ, "YOLO_OFFLINE": "1"}
    return subprocess.run(
        [str(REPO_DIR / ".venv/bin/python"), "-c", RUN_DETECT, str(config), "once"],
        cwd=REPO_DIR, env=environment, capture_output=True, text=True, timeout=300,
    )


def _events(stderr: str) -> list[dict[str, object]]:
    """The JSON log events a stage wrote."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three frames in time order, a late older frame and a snapshot whose JPEG is missing, detected once."""
    assert MODEL_PATH.is_file(), f"model missing at {MODEL_PATH}"
    tmp_path = tmp_path_factory.mktemp("detect")
    data_dir = tmp_path / "data"
    zones = [
        {"id": space.space_id, "coordinates": space.contour}
        for space in read_pklot_spaces(SERIES / f"{FRAMES[0]}.xml")
    ]
    config = tmp_path / "device.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "lot-7",
        "data_dir": str(data_dir),
        "cameras": [
            {"id": "ufpr04", "source": "unused", "width": 1280, "height": 720, "parking_zones": zones},
        ],
        "detection": {"model": str(MODEL_PATH)},
    }))
    connection = open_database(data_dir / "parkmon.db")
    ids = {stem: _add_snapshot(connection, data_dir, stem, _captured_at(stem)) for stem in FRAMES}
    ids["missing"] = _add_snapshot(connection, data_dir, None, _captured_at(FRAMES[-1]) + 300)
    ids[LATE_FRAME] = _add_snapshot(connection, data_dir, LATE_FRAME, _captured_at(LATE_FRAME))
    ids["four_by_three"] = _add_snapshot(connection, data_dir, FRAMES[0], _captured_at(FRAMES[-1]) + 600)
    [row] = connection.execute("SELECT path FROM snapshots WHERE id = ?", (ids["four_by_three"],)).fetchall()
    four_by_three = cv2.resize(cv2.imread(str(data_dir / row["path"])), (640, 480))
    assert cv2.imwrite(str(data_dir / row["path"]), four_by_three)
    connection.close()

    result = _run_detect(config)
    return {"result": result, "ids": ids, "data_dir": data_dir, "config": config}


def _rows(processed: dict[str, object], query: str, parameters: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a query against the stage's database."""
    connection = connect(Path(str(processed["data_dir"])) / "parkmon.db", read_only=True)
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def test_the_stage_exits_zero_once_no_job_is_due(processed: dict[str, object]) -> None:
    result = processed["result"]
    assert isinstance(result, subprocess.CompletedProcess)

    assert result.returncode == 0, result.stderr[-3000:]
    done = [event for event in _events(result.stderr) if event["event"] == "detection_done"]
    assert len(done) == 4
    assert all(event["spaces"] == 28 and float(event["inference_ms"]) > 0 for event in done)


def test_each_frame_gets_a_detection_row_in_the_contract_shape(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    rows = _rows(processed, "SELECT * FROM detections ORDER BY snapshot_id")

    assert [row["snapshot_id"] for row in rows] == sorted(ids[stem] for stem in [*FRAMES, LATE_FRAME])
    for row in rows:
        document = json.loads(row["result_json"])
        assert set(document) == {
            "device_id", "camera_id", "snapshot_id", "captured_at", "image", "model", "inference_ms",
            "frame", "vehicles", "zones", "occupied", "spaces",
        }
        assert document["device_id"] == "lot-7" and document["camera_id"] == "ufpr04"
        assert document["snapshot_id"] == row["snapshot_id"]
        assert document["image"].startswith("lot-7_ufpr04_") and document["image"].endswith("Z.jpg")
        assert document["model"] == "yolov8n-coco.pt" == row["model"]
        assert document["frame"] == {"width": 1280, "height": 720}
        assert document["spaces"] == len(document["zones"]) == row["spaces"] == 28
        assert document["occupied"] == sum(zone["occupied"] for zone in document["zones"]) == row["occupied"]
        assert len(document["vehicles"]) == row["vehicles"]
        assert all(len(vehicle["box"]) == 4 and vehicle["class_id"] in (2, 3, 5, 7)
                   for vehicle in document["vehicles"])


def test_frame_decisions_match_the_ground_truth(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    for stem in FRAMES:
        [row] = _rows(processed, "SELECT result_json FROM detections WHERE snapshot_id = ?", (ids[stem],))
        decided = {zone["zone_id"]: zone["occupied"] for zone in json.loads(row["result_json"])["zones"]}
        truth = {space.space_id: space.occupied for space in read_pklot_spaces(SERIES / f"{stem}.xml")}
        right = sum(decided[zone_id] == occupied for zone_id, occupied in truth.items())
        assert right / len(truth) >= 0.96, stem


def test_the_stage_decides_each_frame_as_parkmon_eval_scores_it(
    processed: dict[str, object], tmp_path: Path
) -> None:
    from detect.evaluate import evaluate_dataset
    from shared.config import load_settings

    ids = processed["ids"]
    assert isinstance(ids, dict)
    dataset = tmp_path / "UFPR04" / "Cloudy"
    dataset.mkdir(parents=True)
    confusion = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for stem in FRAMES:
        for suffix in (".jpg", ".xml"):
            shutil.copyfile(SERIES / f"{stem}{suffix}", dataset / f"{stem}{suffix}")
        [row] = _rows(processed, "SELECT result_json FROM detections WHERE snapshot_id = ?", (ids[stem],))
        decided = {zone["zone_id"]: zone["occupied"] for zone in json.loads(row["result_json"])["zones"]}
        for space in read_pklot_spaces(SERIES / f"{stem}.xml"):
            confusion[OUTCOME[(decided[space.space_id], bool(space.occupied))]] += 1

    report = evaluate_dataset(tmp_path, load_settings(Path(str(processed["config"]))))

    assert report["per_camera"]["UFPR04"]["confusion"] == confusion
    assert report["per_camera"]["UFPR04"]["spaces"] == 3 * 28


def test_zone_state_follows_the_newest_frame_not_the_late_older_one(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    newest = ids[FRAMES[-1]]
    [detection] = _rows(processed, "SELECT result_json FROM detections WHERE snapshot_id = ?", (newest,))
    decided = {zone["zone_id"]: zone["occupied"] for zone in json.loads(detection["result_json"])["zones"]}

    states = _rows(processed, "SELECT * FROM zone_state ORDER BY zone_id")

    assert len(states) == 28
    assert all(state["snapshot_id"] == newest for state in states)
    assert {state["zone_id"]: bool(state["occupied"]) for state in states} == decided
    assert sum(state["occupied"] for state in states) >= 8


def test_arrivals_are_recorded_once_as_occupied_events(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    events = _rows(processed, "SELECT * FROM zone_events ORDER BY zone_id, at")
    arrived = [event for event in events if event["snapshot_id"] == ids[FRAMES[1]]]

    assert len(arrived) >= 8
    assert all(event["event"] == "occupied" for event in arrived)
    assert all(event["at"] == _captured_at(FRAMES[1]) for event in arrived)
    assert not [event for event in events if event["snapshot_id"] in (ids[FRAMES[0]], ids[LATE_FRAME])]
    latest = {event["zone_id"]: event for event in events}
    since = {row["zone_id"]: row["since"] for row in _rows(processed, "SELECT * FROM zone_state")}
    assert all(since[zone_id] == event["at"] for zone_id, event in latest.items())


def test_every_detected_snapshot_is_queued_for_upload(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    upload = _rows(
        processed, "SELECT snapshot_id, state FROM jobs WHERE stage = 'upload' ORDER BY snapshot_id"
    )
    detect_done = _rows(processed, "SELECT snapshot_id FROM jobs WHERE stage = 'detect' AND state = 'done'")

    expected = sorted(ids[stem] for stem in [*FRAMES, LATE_FRAME])
    assert [row["snapshot_id"] for row in upload] == expected
    assert all(row["state"] == "pending" for row in upload)
    assert sorted(row["snapshot_id"] for row in detect_done) == expected


def test_a_missing_jpeg_is_retried_later_with_its_error(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    missing = (ids["missing"],)
    [job] = _rows(processed, "SELECT * FROM jobs WHERE stage = 'detect' AND snapshot_id = ?", missing)

    assert job["state"] == "pending" and job["attempts"] == 1
    assert "cannot read snapshot image" in job["last_error"] and job["error_kind"] == "unreadable_image"
    assert not _rows(processed, "SELECT 1 FROM detections WHERE snapshot_id = ?", missing)
    assert not _rows(processed, "SELECT 1 FROM jobs WHERE stage = 'upload' AND snapshot_id = ?", missing)


def test_the_stage_leaves_a_heartbeat(processed: dict[str, object]) -> None:
    [beat] = _rows(processed, "SELECT * FROM heartbeats WHERE process = 'detect'")

    assert beat["status"] == "stopped"
    assert (Path(str(processed["data_dir"])) / "ultralytics").is_dir()


def test_detecting_a_snapshot_again_changes_nothing_but_its_row(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    before_events = _rows(processed, "SELECT count(*) AS n FROM zone_events")[0]["n"]
    connection = connect(Path(str(processed["data_dir"])) / "parkmon.db")
    with immediate(connection):
        connection.execute(
            "UPDATE jobs SET state = 'pending', available_at = 0 WHERE stage = 'detect' AND snapshot_id = ?",
            (ids[FRAMES[1]],),
        )
    connection.close()

    result = _run_detect(Path(str(processed["config"])))

    assert result.returncode == 0, result.stderr[-3000:]
    assert _rows(processed, "SELECT count(*) AS n FROM zone_events")[0]["n"] == before_events
    assert len(_rows(processed, "SELECT * FROM detections")) == 4
    assert len(_rows(processed, "SELECT * FROM jobs WHERE stage = 'upload'")) == 4


def test_a_frame_of_another_aspect_ratio_is_parked_with_the_reason(processed: dict[str, object]) -> None:
    ids = processed["ids"]
    assert isinstance(ids, dict)
    query = "SELECT * FROM jobs WHERE stage = 'detect' AND snapshot_id = ?"
    [job] = _rows(processed, query, (ids["four_by_three"],))

    assert job["state"] == "failed" and job["error_kind"] == "zone_scale"
    assert "640x480" in job["last_error"] and "1280x720" in job["last_error"]


def test_sigterm_stops_an_idle_stage_cleanly(processed: dict[str, object]) -> None:
    environment = {**os.environ, "YOLO_OFFLINE": "1"}
    stage = subprocess.Popen(
        [str(REPO_DIR / ".venv/bin/python"), "-c", RUN_DETECT, str(processed["config"]), "loop"],
        cwd=REPO_DIR, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            beats = _rows(processed, "SELECT * FROM heartbeats WHERE pid = ?", (stage.pid,))
            if beats and beats[0]["status"] == "idle":
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the detect stage never went idle")
        stage.send_signal(signal.SIGTERM)
        _, stderr = stage.communicate(timeout=30)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()

    assert stage.returncode == 0, stderr[-3000:]
    assert "detect_stopped" in stderr
    [beat] = _rows(processed, "SELECT * FROM heartbeats WHERE process = 'detect'")
    assert beat["status"] == "stopped" and beat["pid"] == stage.pid
