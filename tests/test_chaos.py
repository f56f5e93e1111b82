"""Chaos: the four stages on a looped replay of real frames, each SIGKILLed at random and restarted.

A kill is what a crash, an OOM kill or a power cut of one process looks like; the restart is what
launchd's KeepAlive does. Whatever the moment, no snapshot may be lost or delivered twice.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cloud_fixtures import RECEIVER_API_KEY
from stage_harness import (
    StageProcess,
    add_deleted_jobs_audit,
    read_rows,
    replay_folder,
    scalar,
    snapshot_keys,
    wait_for_heartbeat,
    wait_until,
    write_config,
)

from shared.zone_import import import_zones
from testbed.process import free_ports

pytestmark = pytest.mark.usefixtures("s3_credentials")

SERIES = "PUCPR/Sunny"
TARGET_SNAPSHOTS = 300
KILLS_PER_STAGE = 3
STAGES = ("capture", "detect", "upload", "api")
# Stages that hold job leases: their kills wait (briefly) for a job in hand, so some land mid-job.
LEASING = {"detect": "detect", "upload": "upload"}
DRAIN_TIMEOUT_S = 240.0


def _chaos_seed() -> int:
    """PARKMON_CHAOS_SEED replays a failing run's schedule; otherwise a fresh seed each run."""
    return int(os.environ.get("PARKMON_CHAOS_SEED") or time.time_ns() % 2**32)


def _leased_by(settings: Any, stage: str, pid: int) -> list[int]:
    """Ids of the jobs a stage process holds a lease on."""
    owner = f"{stage}@{socket.gethostname()}:{pid}"
    rows = read_rows(settings, "SELECT id FROM jobs WHERE state = 'leased' AND lease_owner = ?", (owner,))
    return [row["id"] for row in rows]


def _wait_for_a_lease(settings: Any, stage: StageProcess, timeout_s: float) -> None:
    """Give a leasing stage a moment to have a job in hand, so the kill lands mid-job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _leased_by(settings, stage.stage, stage.pid):
        time.sleep(0.005)


def _kill_schedule(rng: random.Random) -> list[str]:
    """KILLS_PER_STAGE kills of each stage in random order, capture's within the first half.

    Capture stops at TARGET_SNAPSHOTS once its kills are done, so keeping them early bounds the run.
    """
    others = [name for name in STAGES if name != "capture" for _ in range(KILLS_PER_STAGE)]
    rng.shuffle(others)
    half = (len(others) + KILLS_PER_STAGE) // 2
    for position in sorted(rng.sample(range(half), KILLS_PER_STAGE)):
        others.insert(position, "capture")
    return others


def _s3_objects(s3_server: Any, bucket: str, prefix: str, device_id: str) -> dict[str, dict[str, Any]]:
    """This device's objects in a bucket, by key, with size and ETag; a key listed twice fails."""
    client = s3_server.client()
    objects: dict[str, dict[str, Any]] = {}
    duplicates: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not Path(item["Key"]).name.startswith(f"{device_id}_"):
                continue
            if item["Key"] in objects:
                duplicates.append(item["Key"])
            objects[item["Key"]] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
    assert duplicates == []
    return objects


def test_random_kills_of_every_stage_lose_nothing_and_deliver_each_snapshot_once(
    tmp_path: Path, pklot_dir: Path, model_path: Path, s3_server: Any, receiver: Any
) -> None:
    seed = _chaos_seed()
    rng = random.Random(seed)
    print(f"chaos seed {seed} (rerun with PARKMON_CHAOS_SEED={seed})")
    series = pklot_dir / SERIES
    folder = replay_folder(sorted(series.glob("*.jpg"))[:5], tmp_path / "replay")
    zones = import_zones(sorted(series.glob("*.xml"))[0], "pklot")
    [api_port] = free_ports(1)
    device_id = f"chaos-{uuid.uuid4().hex[:8]}"
    settings = write_config(tmp_path / "device.yaml", {
        "device_id": device_id,
        "data_dir": str(tmp_path / "data"),
        "cameras": [{"id": "pucpr", "source": str(folder), "width": 1280, "height": 720,
                     "parking_zones": zones}],
        # The small model at 320 px without tiles: what is under test is the bookkeeping, not accuracy.
        "detection": {"model": str(model_path), "device": "cpu", "image_size": 320, "tile_size": 0},
        "processing": {"snapshot_interval": 0.05},
        "database": {"lease_s": 5.0},
        "api": {"host": "127.0.0.1", "port": api_port},
        "upload": {"interval": 0.2, "batch_size": 10, "retry_base_s": 0.5, "retry_cap_s": 2.0,
                   "request_timeout_s": 10.0},
        "aws": {"region": "us-east-1", "data_bucket": s3_server.data_bucket,
                "metadata_bucket": s3_server.metadata_bucket, "s3_endpoint_url": s3_server.endpoint_url,
                "api_endpoint": receiver.url, "api_key": RECEIVER_API_KEY},
        "retention": {"min_free_bytes": 0},
    })
    add_deleted_jobs_audit(settings)
    logs = tmp_path / "logs"
    stages = {name: StageProcess(settings.config_path, name, logs) for name in STAGES}
    kills = _kill_schedule(rng)
    killed: list[str] = []
    mid_job: dict[str, list[int]] = {name: [] for name in LEASING}
    capture_stopped = False

    def snapshots() -> int:
        return int(scalar(settings, "SELECT count(*) FROM snapshots"))

    def running() -> list[StageProcess]:
        return [stage for name, stage in stages.items() if not (name == "capture" and capture_stopped)]

    def stop_capture_when_done(remaining: list[str]) -> None:
        nonlocal capture_stopped
        if not capture_stopped and snapshots() >= TARGET_SNAPSHOTS and "capture" not in remaining:
            wait_for_heartbeat(settings, stages["capture"])
            assert stages["capture"].terminate() == 0
            capture_stopped = True

    try:
        for stage in stages.values():
            stage.start()
        wait_until(lambda: scalar(settings, "SELECT count(*) FROM detections") >= 1, 120,
                   "the first detection", running())

        for index, name in enumerate(kills):
            time.sleep(rng.uniform(0.5, 2.5))
            for stage in running():
                assert stage.alive(), f"{stage.stage} died on its own (seed {seed})"
            stop_capture_when_done(kills[index:])
            if name == "capture" and capture_stopped:
                continue
            stage = stages[name]
            if name in LEASING:
                _wait_for_a_lease(settings, stage, timeout_s=10.0)
            pid = stage.pid
            stage.kill9()
            killed.append(name)
            if name in LEASING:
                mid_job[name] += _leased_by(settings, name, pid)
            time.sleep(rng.uniform(0.05, 0.5))
            stage.start()

        wait_until(lambda: snapshots() >= TARGET_SNAPSHOTS, 120, "enough snapshots", running())
        stop_capture_when_done([])
        wait_until(
            lambda: scalar(settings, "SELECT count(*) FROM jobs WHERE state != 'done'") == 0
            and scalar(settings, "SELECT count(*) FROM jobs WHERE stage = 'upload'") == snapshots(),
            DRAIN_TIMEOUT_S, "every job done", running(),
        )
        for name in LEASING:
            wait_for_heartbeat(settings, stages[name])  # a stage just restarted is up before SIGTERM
        exit_codes = {stage.stage: stage.terminate() for stage in stages.values()}
    finally:
        for stage in stages.values():
            stage.terminate()

    assert exit_codes == dict.fromkeys(STAGES, 0), f"seed {seed}"
    assert sorted(killed) == sorted(kills), f"seed {seed}"
    count = snapshots()
    assert count >= TARGET_SNAPSHOTS

    # Every captured snapshot has its JPEG, exactly one result, and one done job per stage.
    rows = read_rows(settings, "SELECT id, path, bytes FROM snapshots ORDER BY id")
    for row in rows:
        assert (settings.data_dir / row["path"]).stat().st_size == row["bytes"]
    assert scalar(settings, "SELECT count(*) FROM detections") == count
    without_result = """SELECT count(*) FROM snapshots s
                         WHERE NOT EXISTS (SELECT 1 FROM detections d WHERE d.snapshot_id = s.id)"""
    assert scalar(settings, without_result) == 0
    jobs = read_rows(settings, "SELECT stage, state, count(*) AS n FROM jobs GROUP BY stage, state")
    assert {(row["stage"], row["state"]): row["n"] for row in jobs} == {("detect", "done"): count,
                                                                         ("upload", "done"): count}
    assert scalar(settings, "SELECT count(*) FROM jobs_deleted") == 0
    assert scalar(settings, "SELECT count(*) FROM uploads WHERE posted = 1") == count
    redone = {name: [row["attempts"] for row in read_rows(
        settings, f"SELECT attempts FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids)]
        for name, ids in mid_job.items() if ids}
    for name, attempts in redone.items():
        assert all(value >= 2 for value in attempts), f"{name} jobs killed mid-job were not redone"

    # Exactly one object per bucket key, each the stored JPEG; one record per snapshot at the receiver.
    keys = snapshot_keys(settings)
    images = _s3_objects(s3_server, s3_server.data_bucket, "snapshots/", device_id)
    metadata = _s3_objects(s3_server, s3_server.metadata_bucket, "metadata/", device_id)
    assert sorted(images) == sorted(image for image, _, _ in keys.values())
    assert sorted(metadata) == sorted(meta for _, meta, _ in keys.values())
    for path, (image_key, _, _) in keys.items():
        local = (settings.data_dir / path).read_bytes()
        assert images[image_key] == {"size": len(local), "etag": hashlib.md5(local).hexdigest()}
    received = [record for record in receiver.received() if record["device_id"] == device_id]
    expected_records = sorted(key for _, _, key in keys.values())
    assert sorted(record["idempotency_key"] for record in received) == expected_records

    # The database survived every kill intact.
    assert [tuple(row) for row in read_rows(settings, "PRAGMA integrity_check")] == [("ok",)]
    assert read_rows(settings, "PRAGMA foreign_key_check") == []
    # A capture killed between writing a JPEG and committing its row leaves at most that one file.
    jpegs = settings.snapshots_dir.rglob("*.jpg")
    on_disk = {path.relative_to(settings.data_dir).as_posix() for path in jpegs}
    orphans = on_disk - set(keys)
    assert len(orphans) <= killed.count("capture")
    print(f"chaos: {count} snapshots, kills {killed}, mid-job {mid_job}, orphan JPEGs {len(orphans)}, "
          f"redeliveries {sum(record['deliveries'] for record in received) - len(received)}")
