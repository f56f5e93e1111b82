"""End to end: the four stages as real processes on two cameras of real PKLot frames."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import boto3
import yaml

from shared.db import connect
from shared.zone_import import import_zones

FRAMES_PER_CAMERA = 5
CAMERAS = {"pucpr": "PUCPR/Sunny", "ufpr04": "UFPR04/Cloudy"}


def _replay_folder(pklot_dir: Path, relative: str, target: Path) -> Path:
    """A folder with the first frames of one PKLot series, linked, not copied."""
    target.mkdir(parents=True)
    for frame in sorted((pklot_dir / relative).glob("*.jpg"))[:FRAMES_PER_CAMERA]:
        os.symlink(frame, target / frame.name)
    return target


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_uploads(database: Path, expected: int, stages: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert stages.poll() is None, "parkmon run all exited early"
        if database.exists():
            connection = connect(database, read_only=True)
            try:
                uploaded = connection.execute("SELECT count(*) FROM uploads").fetchone()[0]
            except Exception:
                uploaded = 0
            connection.close()
            if uploaded >= expected:
                return
        time.sleep(0.5)
    raise AssertionError("uploads did not finish in time")


def test_four_stages_process_two_cameras_end_to_end(tmp_path, pklot_dir, model_path, s3_server, receiver):
    data_dir = tmp_path / "data"
    cameras = []
    for camera_id, relative in CAMERAS.items():
        folder = _replay_folder(pklot_dir, relative, tmp_path / "replay" / camera_id)
        first_xml = sorted((pklot_dir / relative).glob("*.xml"))[0]
        cameras.append({
            "id": camera_id, "source": str(folder), "width": 1280, "height": 720,
            "parking_zones": import_zones(first_xml, "pklot"),
        })
    api_port = _free_port()
    config = {
        "device_id": "lot-7",
        "data_dir": str(data_dir),
        "cameras": cameras,
        "detection": {"model": str(model_path)},
        "processing": {"snapshot_interval": 0.2},
        "api": {"host": "127.0.0.1", "port": api_port},
        "upload": {"interval": 1},
        "retention": {"min_free_bytes": 0},
        "aws": {
            "region": "us-east-1",
            "data_bucket": s3_server.data_bucket,
            "metadata_bucket": s3_server.metadata_bucket,
            "s3_endpoint_url": s3_server.endpoint_url,
            "api_endpoint": receiver.url,
        },
    }
    config_path = tmp_path / "device.yaml"
    config_path.write_text(yaml.safe_dump(config))
    environment = {
        **os.environ, "PARKMON_DATA_DIR": str(data_dir), "API_GATEWAY_KEY": receiver.api_key,
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "YOLO_OFFLINE": "1",
    }
    stages = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "--config", str(config_path), "run", "all", "--once"],
        env=environment,
    )
    try:
        expected = FRAMES_PER_CAMERA * len(CAMERAS)
        _wait_for_uploads(data_dir / "parkmon.db", expected, stages)
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/zones", timeout=10) as response:
            zones = json.loads(response.read())
    finally:
        stages.send_signal(signal.SIGTERM)
        assert stages.wait(timeout=60) == 0

    connection = connect(data_dir / "parkmon.db", read_only=True)
    snapshots = connection.execute(
        "SELECT s.*, d.result_json FROM snapshots s LEFT JOIN detections d ON d.snapshot_id = s.id"
    ).fetchall()
    assert len(snapshots) == expected
    assert all(row["result_json"] is not None for row in snapshots)
    assert {row["camera_id"] for row in snapshots} == set(CAMERAS)
    assert all(row["device_id"] == "lot-7" for row in snapshots)
    for row in snapshots:
        source = pklot_dir / CAMERAS[row["camera_id"]] / row["source_name"]
        assert (data_dir / row["path"]).read_bytes() == source.read_bytes(), "a replayed JPEG is stored as is"

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    for row in snapshots:
        name = Path(row["path"]).name
        assert name.startswith(f"lot-7_{row['camera_id']}_")
        day = datetime.fromtimestamp(row["captured_at"], UTC).strftime("%Y/%m/%d")
        image = s3.get_object(Bucket=s3_server.data_bucket, Key=f"snapshots/{day}/{name}")
        assert image["Body"].read() == (data_dir / row["path"]).read_bytes()
        s3.head_object(Bucket=s3_server.metadata_bucket, Key=f"metadata/{day}/{Path(name).stem}.json")

    received = receiver.received()
    assert len(received) == expected
    assert len({post["idempotency_key"] for post in received}) == expected

    zone_rows = zones["zones"]
    per_camera = {camera_id: sum(1 for zone in zone_rows if zone["camera_id"] == camera_id) for camera_id in CAMERAS}
    assert per_camera == {"pucpr": 100, "ufpr04": 28}
    assert all(zone["occupied"] in (True, False) for zone in zone_rows)
