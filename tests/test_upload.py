"""The upload stage against a real SeaweedFS, a real receiver process and a real SQLite file."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import sqlite3
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import Settings, load_settings
from shared.db import open_database
from testbed.seaweed import SeaweedServer
from uploader.main import run

REPO_DIR = Path(__file__).resolve().parents[1]
CAMERA_ID = "cam0"
FRAMES_SERIES = "PUCPR/Sunny"


@dataclass(frozen=True)
class Seeded:
    """One snapshot written into the test database, with what the upload must produce from it."""

    snapshot_id: int
    path: str
    jpeg: bytes
    captured_at: float
    result: dict[str, Any]

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.captured_at, UTC).strftime("%Y/%m/%d")

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def stem(self) -> str:
        return Path(self.path).stem


def _captured_at(frame: Path) -> float:
    """A PKLot frame's capture time from its name, read as UTC."""
    return datetime.strptime(frame.stem, "%Y-%m-%d_%H_%M_%S").replace(tzinfo=UTC).timestamp()


def _result(device_id: str, snapshot_id: int, captured_at: float, name: str) -> dict[str, Any]:
    """A detection result in the contract's shape."""
    return {
        "device_id": device_id, "camera_id": CAMERA_ID, "snapshot_id": snapshot_id,
        "captured_at": captured_at, "image": name, "model": "yolov8n-coco.pt", "inference_ms": 41.5,
        "frame": {"width": 1280, "height": 720},
        "vehicles": [{"box": [10.0, 20.0, 110.0, 90.0], "confidence": 0.91, "class_id": 2}],
        "zones": [{"zone_id": "1", "occupied": True, "confidence": 0.91},
                  {"zone_id": "2", "occupied": False, "confidence": 0.0}],
        "occupied": 1, "spaces": 2,
    }


def seed_snapshots(data_dir: Path, frames: list[Path], device_id: str) -> list[Seeded]:
    """Copy frames into data_dir and write snapshots, detections and pending UPLOAD jobs for them."""
    connection = open_database(data_dir / "parkmon.db")
    seeded: list[Seeded] = []
    for frame in frames:
        captured_at = _captured_at(frame)
        moment = datetime.fromtimestamp(captured_at, UTC)
        name = f"{device_id}_{CAMERA_ID}_{moment.strftime('%Y%m%dT%H%M%S_%f')}Z.jpg"
        relative = f"snapshots/{moment.strftime('%Y/%m/%d')}/{name}"
        (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(frame, data_dir / relative)
        jpeg = frame.read_bytes()
        snapshot_id = connection.execute(
            """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height,
                   source_name) VALUES (?, ?, ?, ?, ?, 1280, 720, ?)""",
            (device_id, CAMERA_ID, captured_at, relative, len(jpeg), frame.name),
        ).lastrowid
        result = _result(device_id, snapshot_id, captured_at, name)
        now = time.time()
        connection.execute(
            """INSERT INTO detections (snapshot_id, device_id, camera_id, detected_at, model, inference_ms,
                   vehicles, spaces, occupied, result_json) VALUES (?, ?, ?, ?, ?, ?, 1, 2, 1, ?)""",
            (snapshot_id, device_id, CAMERA_ID, now, result["model"], result["inference_ms"],
             json.dumps(result)),
        )
        connection.execute(
            """INSERT INTO jobs (stage, snapshot_id, available_at, created_at, updated_at)
               VALUES ('upload', ?, ?, ?, ?)""",
            (snapshot_id, now, now, now),
        )
        seeded.append(Seeded(snapshot_id, relative, jpeg, captured_at, result))
    connection.close()
    return seeded


def make_settings(
    tmp_path: Path, s3: SeaweedServer, api_endpoint: str | None, api_key: str, device_id: str,
    upload: dict[str, Any] | None = None, aws: dict[str, Any] | None = None,
) -> Settings:
    """Write a device YAML pointing at the test servers and load it."""
    config = {
        "device_id": device_id,
        "data_dir": str(tmp_path / "data"),
        "upload": {"batch_size": 10, "max_concurrent": 3, "retry_base_s": 2.0, "retry_cap_s": 30.0,
                   "parked_retry_s": 900.0, "request_timeout_s": 10.0, **(upload or {})},
        "aws": {"region": "us-east-1", "data_bucket": s3.data_bucket, "metadata_bucket": s3.metadata_bucket,
                "s3_endpoint_url": s3.endpoint_url, "api_endpoint": api_endpoint, "api_key": api_key,
                **(aws or {})},
    }
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_settings(path)


def jobs_of(settings: Settings) -> list[sqlite3.Row]:
    """Every UPLOAD job row, by id."""
    connection = sqlite3.connect(settings.database_path)
    connection.row_factory = sqlite3.Row
    rows = connection.execute("SELECT * FROM jobs WHERE stage = 'upload' ORDER BY id").fetchall()
    connection.close()
    return rows


def execute(settings: Settings, sql: str, *parameters: Any) -> list[sqlite3.Row]:
    """Run one statement on the test database and return its rows."""
    connection = sqlite3.connect(settings.database_path, isolation_level=None)
    connection.row_factory = sqlite3.Row
    rows = connection.execute(sql, parameters).fetchall()
    connection.close()
    return rows


def make_due_now(settings: Settings) -> None:
    """Pull every waiting job's retry time to now, standing in for the backoff wait."""
    execute(settings, "UPDATE jobs SET available_at = ? WHERE state != 'done'", time.time())


@pytest.fixture
def device_id() -> str:
    """A device id unique to the test, so its keys in the shared buckets are its own."""
    return f"lot-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def frames(pklot_dir: Path) -> list[Path]:
    """Three real PKLot frames."""
    return sorted((pklot_dir / FRAMES_SERIES).glob("*.jpg"))[:3]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The device's data dir."""
    path = tmp_path / "data"
    path.mkdir()
    return path


pytestmark = pytest.mark.usefixtures("s3_credentials")

@pytest.mark.parametrize("checksum", ["when_required", "when_supported"])
def test_upload_puts_both_objects_posts_once_and_records(
    tmp_path, data_dir, frames, device_id, s3_server, receiver, checksum
):
    seeded = seed_snapshots(data_dir, frames, device_id)
    upload = {"checksum": checksum, "batch_size": 2, "max_concurrent": 2}
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload=upload)

    assert run(settings, once=True) == 0

    s3 = s3_server.client()
    for snapshot in seeded:
        image_key = f"snapshots/{snapshot.day}/{snapshot.name}"
        image = s3.get_object(Bucket=s3_server.data_bucket, Key=image_key)
        assert image["Body"].read() == snapshot.jpeg
        # SeaweedFS keeps the CRC32 that when_supported sends; when_required sends none for PutObject.
        head = s3.head_object(Bucket=s3_server.data_bucket, Key=image_key, ChecksumMode="ENABLED")
        expected_crc = base64.b64encode(zlib.crc32(snapshot.jpeg).to_bytes(4, "big")).decode()
        assert head.get("ChecksumCRC32") == (expected_crc if checksum == "when_supported" else None)
        assert image["ContentType"] == "image/jpeg"
        assert image["Metadata"]["device_id"] == device_id
        assert image["Metadata"]["camera_id"] == CAMERA_ID
        assert image["Metadata"]["captured_at"].startswith(snapshot.day.replace("/", "-"))
        metadata = s3.get_object(
            Bucket=s3_server.metadata_bucket, Key=f"metadata/{snapshot.day}/{snapshot.stem}.json"
        )
        assert metadata["ContentEncoding"] == "gzip"
        assert json.loads(gzip.decompress(metadata["Body"].read())) == snapshot.result

    received = {record["idempotency_key"]: record for record in receiver.received()}
    assert set(received) == {f"{device_id}/{CAMERA_ID}/{snapshot.stem}" for snapshot in seeded}
    for snapshot in seeded:
        record = received[f"{device_id}/{CAMERA_ID}/{snapshot.stem}"]
        assert record["deliveries"] == 1
        assert record["content_encoding"] == "gzip"
        assert (record["device_id"], record["camera_id"]) == (device_id, CAMERA_ID)
        assert record["captured_at"] == snapshot.captured_at
        assert record["zones"] == {"1": True, "2": False}
    # Two rounds of two: a keyframe, then deltas on it, the second round chained on the first.
    assert [received[f"{device_id}/{CAMERA_ID}/{s.stem}"]["kind"] for s in seeded] == [
        "keyframe", "delta", "delta",
    ]
    assert receiver.requests()["requests"] == 2

    uploads = {row["snapshot_id"]: row for row in execute(settings, "SELECT * FROM uploads")}
    assert set(uploads) == {snapshot.snapshot_id for snapshot in seeded}
    for snapshot in seeded:
        row = uploads[snapshot.snapshot_id]
        assert row["image_key"] == f"snapshots/{snapshot.day}/{snapshot.name}"
        assert row["metadata_key"] == f"metadata/{snapshot.day}/{snapshot.stem}.json"
        assert row["image_bytes"] == len(snapshot.jpeg)
        assert row["posted"] == 1
        assert row["image_key"] != ""
    assert [job["state"] for job in jobs_of(settings)] == ["done"] * len(seeded)
    beat = execute(settings, "SELECT * FROM heartbeats WHERE process = 'upload'")
    detail = json.loads(beat[0]["detail"])
    assert detail["backlog"] == 0
    jpeg_bytes = sum(len(snapshot.jpeg) for snapshot in seeded)
    assert detail["bytes"]["images"] == {"requests": 3, "raw_bytes": jpeg_bytes, "wire_bytes": jpeg_bytes}
    assert detail["bytes"]["ingest"]["requests"] == 2
    assert 0 < detail["bytes"]["metadata"]["wire_bytes"] < detail["bytes"]["metadata"]["raw_bytes"]


def test_rerunning_a_done_job_changes_nothing_at_the_receiver(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    seeded = seed_snapshots(data_dir, frames, device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    assert run(settings, once=True) == 0
    first = receiver.received()

    execute(settings, "UPDATE jobs SET state = 'pending', done_at = NULL, available_at = ?", time.time())
    assert run(settings, once=True) == 0

    second = receiver.received()
    unchanged = ("idempotency_key", "captured_at", "kind", "zones", "batch_key")
    assert [[post[field] for field in unchanged] for post in second] == [
        [post[field] for field in unchanged] for post in first
    ]
    assert [post["deliveries"] for post in second] == [2] * len(seeded)
    assert s3_server.count_objects(s3_server.data_bucket, f"snapshots/{seeded[0].day}/{device_id}_") == 3
    assert len(execute(settings, "SELECT * FROM uploads")) == len(seeded)
    assert [job["state"] for job in jobs_of(settings)] == ["done"] * len(seeded)


def test_uncompressed_upload_sends_plain_json(tmp_path, data_dir, frames, device_id, s3_server, receiver):
    seeded = seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(
        tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload={"compression": False}
    )
    assert run(settings, once=True) == 0

    metadata = s3_server.client().get_object(
        Bucket=s3_server.metadata_bucket, Key=f"metadata/{seeded[0].day}/{seeded[0].stem}.json"
    )
    assert "ContentEncoding" not in metadata
    assert json.loads(metadata["Body"].read()) == seeded[0].result
    [post] = receiver.received()
    assert post["content_encoding"] is None
    assert post["zones"] == {"1": True, "2": False}


def test_without_api_endpoint_only_s3_is_written(tmp_path, data_dir, frames, device_id, s3_server, receiver):
    seeded = seed_snapshots(data_dir, frames[:2], device_id)
    settings = make_settings(tmp_path, s3_server, None, receiver.api_key, device_id)
    assert run(settings, once=True) == 0

    assert receiver.received() == []
    assert [row["posted"] for row in execute(settings, "SELECT posted FROM uploads")] == [0, 0]
    prefix = f"snapshots/{seeded[0].day}/{device_id}_"
    assert s3_server.count_objects(s3_server.data_bucket, prefix) == 2
    assert [job["state"] for job in jobs_of(settings)] == ["done", "done"]


def test_once_with_nothing_due_exits_zero_and_beats(tmp_path, data_dir, device_id, s3_server, receiver):
    open_database(data_dir / "parkmon.db").close()
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)

    assert run(settings, once=True) == 0

    [beat] = execute(settings, "SELECT * FROM heartbeats WHERE process = 'upload'")
    assert beat["status"] == "stopped"
    nothing = {"requests": 0, "raw_bytes": 0, "wire_bytes": 0}
    assert json.loads(beat["detail"]) == {
        "backlog": 0, "in_flight": 0, "uploaded": 0, "failed": 0, "last_error": None,
        "bytes": {"images": nothing, "metadata": nothing, "ingest": nothing},
    }



def test_disabled_upload_leaves_jobs_alone(tmp_path, data_dir, frames, device_id, s3_server, receiver):
    seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id,
                             upload={"enabled": False})

    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["attempts"]) == ("pending", 0)
    [beat] = execute(settings, "SELECT * FROM heartbeats WHERE process = 'upload'")
    assert beat["status"] == "disabled"
    assert receiver.received() == []
