"""`make demo`: replay a folder of PKLot frames through the four stages against local servers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import yaml

from shared.config import load_settings
from shared.db import connect
from shared.pklot import read_pklot_spaces
from shared.zone_import import import_zones
from testbed.receiver import Receiver
from testbed.seaweed import SeaweedServer

DEMO_MARKER = "demo-data-dir"
DATA_BUCKET = "parkmon-demo-data"
METADATA_BUCKET = "parkmon-demo-metadata"
API_KEY = "demo-key"
TIMEOUT_S = 900.0


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _demo_data_dir() -> Path:
    """$PARKMON_DATA_DIR, else var/demo: never the device's own default data folder."""
    configured = os.environ.get("PARKMON_DATA_DIR")
    return Path(configured).expanduser().resolve() if configured else Path("var/demo").resolve()


def _prepare_data_dir(data_dir: Path) -> None:
    """Start from an empty demo folder; refuse any folder the demo did not create empty."""
    marker = data_dir / DEMO_MARKER
    if data_dir.exists() and any(data_dir.iterdir()) and not marker.exists():
        raise SystemExit(
            f"parkmon demo: {data_dir} is not empty and was not made by the demo; "
            "set PARKMON_DATA_DIR to a new or empty folder"
        )
    if marker.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by parkmon demo; deleted and re-created on the next run\n")


def _stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so every server and stage the demo started is stopped."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)


def _frames(source: Path, frames_limit: int | None) -> list[Path]:
    """The folder's frames in replay order."""
    frames = sorted(source.glob("*.jpg"))
    if not frames:
        raise SystemExit(f"parkmon demo: {source}: no .jpg frames")
    return frames[:frames_limit] if frames_limit else frames


def _write_config(
    data_dir: Path, replay_dir: Path, model: Path, zones_file: Path, s3_url: str, receiver_url: str
) -> Path:
    """The demo device's config: one camera replaying the folder, local S3 and receiver."""
    decoded = (cv2.imread(str(path)) for path in sorted(replay_dir.glob("*.jpg")))
    first_frame = next((image for image in decoded if image is not None), None)
    if first_frame is None:
        raise SystemExit(f"parkmon demo: {replay_dir}: no frame in it can be decoded")
    height, width = first_frame.shape[:2]
    camera_id = re.sub(r"[^a-z0-9._-]+", "-", replay_dir.name.lower()).strip("-.") or "cam0"
    config = {
        "device_id": "demo-device",
        "cameras": [{
            "id": camera_id,
            "source": str(replay_dir),
            "width": int(width),
            "height": int(height),
            "parking_zones": import_zones(zones_file, "pklot"),
        }],
        "detection": {"model": str(model)},
        "processing": {"snapshot_interval": 1},
        "api": {"host": "127.0.0.1", "port": _free_port()},
        "upload": {"interval": 1},
        "aws": {
            "region": "us-east-1",
            "data_bucket": DATA_BUCKET,
            "metadata_bucket": METADATA_BUCKET,
            "s3_endpoint_url": s3_url,
            "api_endpoint": receiver_url,
        },
    }
    path = data_dir / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _progress(database: Path) -> dict[str, int]:
    """Snapshots, detections and finished uploads so far."""
    if not database.exists():
        return {"snapshots": 0, "detected": 0, "uploaded": 0}
    connection = connect(database, read_only=True)
    try:
        row = connection.execute(
            """SELECT (SELECT count(*) FROM snapshots) AS snapshots,
                      (SELECT count(*) FROM detections) AS detected,
                      (SELECT count(*) FROM uploads) AS uploaded"""
        ).fetchone()
        return dict(row)
    except Exception:
        return {"snapshots": 0, "detected": 0, "uploaded": 0}
    finally:
        connection.close()


def _wait_for_pipeline(database: Path, expected: int, stages: subprocess.Popen[bytes]) -> dict[str, int]:
    """Poll the database until every frame is detected and uploaded, printing progress."""
    deadline = time.monotonic() + TIMEOUT_S
    last: dict[str, int] = {}
    while time.monotonic() < deadline:
        progress = _progress(database)
        if progress != last:
            print(f"  snapshots {progress['snapshots']:>3}/{expected}  detected {progress['detected']:>3}  "
                  f"uploaded {progress['uploaded']:>3}", flush=True)
            last = progress
        if progress["uploaded"] >= expected and progress["detected"] >= expected:
            return progress
        if stages.poll() is not None:
            raise SystemExit(f"parkmon demo: the stages stopped early (exit {stages.returncode})")
        time.sleep(0.5)
    raise SystemExit(f"parkmon demo: timed out after {TIMEOUT_S:.0f} s at {last}")


def _get_json(url: str) -> Any:
    """GET a JSON document from the local status API."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _frame_table(database: Path, source: Path) -> tuple[str, int, int]:
    """Per-frame occupied spaces found vs the frame's own XML, and overall agreement counts."""
    connection = connect(database, read_only=True)
    rows = connection.execute(
        """SELECT s.source_name, d.result_json FROM snapshots s
           JOIN detections d ON d.snapshot_id = s.id ORDER BY s.id"""
    ).fetchall()
    connection.close()
    lines = [f"{'frame':<28} {'found':>6} {'truth':>6} {'spaces':>7} {'agree':>7}"]
    agree_total = labelled_total = 0
    for row in rows:
        result = json.loads(row["result_json"])
        found = {zone["zone_id"]: bool(zone["occupied"]) for zone in result["zones"]}
        truth = {
            space.space_id: space.occupied
            for space in read_pklot_spaces(source / Path(row["source_name"]).with_suffix(".xml"))
            if space.occupied is not None
        }
        agree = sum(1 for zone_id, occupied in truth.items() if found.get(zone_id) == occupied)
        agree_total += agree
        labelled_total += len(truth)
        lines.append(
            f"{row['source_name']:<28} {sum(found.values()):>6} {sum(truth.values()):>6} "
            f"{len(truth):>7} {100.0 * agree / max(1, len(truth)):>6.1f}%"
        )
    return "\n".join(lines), agree_total, labelled_total


def run_demo(source: Path, model: Path, frames_limit: int | None = None) -> int:
    """Run the whole demo and print what the pipeline found; stops every process it started."""
    source = source.resolve()
    model = model.resolve()
    if not source.is_dir():
        raise SystemExit(f"parkmon demo: {source}: not a folder")
    if not model.is_file():
        raise SystemExit(f"parkmon demo: {model}: no such model file")
    frames = _frames(source, frames_limit)
    if not frames[0].with_suffix(".xml").is_file():
        raise SystemExit(f"parkmon demo: {frames[0].with_suffix('.xml')}: no PKLot XML to take the zones from")
    data_dir = _demo_data_dir()
    _prepare_data_dir(data_dir)
    _stop_on_signals()
    replay_dir = source
    if frames_limit:
        replay_dir = data_dir / "replay" / source.name
        replay_dir.mkdir(parents=True)
        for frame in frames:
            os.symlink(frame, replay_dir / frame.name)
    zones_file = frames[0].with_suffix(".xml")

    print(f"parkmon demo: {len(frames)} frames from {source}")
    print(f"  data dir {data_dir}")
    with SeaweedServer(data_dir / "demo-s3") as s3, Receiver(data_dir / "demo-receiver.db", API_KEY) as receiver:
        s3.create_buckets([DATA_BUCKET, METADATA_BUCKET])
        print(f"  local S3 at {s3.endpoint_url}, ingest receiver at {receiver.url}")
        config = _write_config(data_dir, replay_dir, model, zones_file, s3.endpoint_url, receiver.url)
        settings = load_settings(config)
        environment = {
            **os.environ,
            "PARKMON_DATA_DIR": str(data_dir),
            "PARKMON_CONFIG": str(config),
            "API_GATEWAY_KEY": API_KEY,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "demo"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "demo"),
            "YOLO_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "shared.cli", "--config", str(config), "run", "all", "--once"]
        stages = subprocess.Popen(command, env=environment)
        try:
            print(f"  four stages started under supervisord (logs in {data_dir / 'logs'})")
            _wait_for_pipeline(data_dir / "parkmon.db", len(frames), stages)
            api_url = f"http://{settings.api.host}:{settings.api.port}"
            health = _get_json(f"{api_url}/health")
            zones = _get_json(f"{api_url}/zones")
            received = _get_json(f"{receiver.url}/received")
            requests = receiver.requests()
        finally:
            stages.send_signal(signal.SIGTERM)
            stages.wait(timeout=60)
        objects = s3.count_objects(DATA_BUCKET), s3.count_objects(METADATA_BUCKET)

    table, agree, labelled = _frame_table(data_dir / "parkmon.db", source)
    print()
    print(table)
    print()
    zone_list = zones.get("zones", zones) if isinstance(zones, dict) else zones
    occupied_now = sum(1 for zone in zone_list if zone.get("occupied"))
    print(f"per-space agreement with the XML labels: {agree}/{labelled} = {100.0 * agree / max(1, labelled):.1f}%")
    print(f"S3 objects: {objects[0]} snapshots, {objects[1]} metadata; ingest: {len(received)} records "
          f"in {requests['accepted']} gzip POSTs ({requests['body_bytes']:,} B)")
    reasons = "; ".join(health.get("reasons", [])) or "all stages beating"
    print(f"/health: {health.get('status')} ({reasons})")
    print(f"/zones: {occupied_now} of {len(zone_list)} spaces occupied now")
    print(f"inspect: PARKMON_DATA_DIR={data_dir} .venv/bin/parkmon --config {config} status --json")
    return 0
