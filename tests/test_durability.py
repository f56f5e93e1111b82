"""Stage-level crash safety: leases of killed or frozen stages, and a writer holding the database."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloud_fixtures import RECEIVER_API_KEY
from stage_harness import (
    IngestGate,
    StageProcess,
    device_objects,
    read_rows,
    replay_folder,
    scalar,
    seed_detected_snapshots,
    snapshot_keys,
    wait_for_heartbeat,
    wait_until,
    write_config,
)

from shared.config import Settings
from shared.db import connect
from shared.zone_import import import_zones

pytestmark = pytest.mark.usefixtures("s3_credentials")

SERIES = "PUCPR/Sunny"


@pytest.fixture
def frames(pklot_dir: Path) -> list[Path]:
    """Real PKLot frames."""
    return sorted((pklot_dir / SERIES).glob("*.jpg"))


def _device(tmp_path: Path, s3_server: Any, api_endpoint: str, name: str, **sections: Any) -> Settings:
    """A device config with short leases, pointing at the test S3 server and an ingest endpoint."""
    config: dict[str, Any] = {
        "device_id": f"{name}-{uuid.uuid4().hex[:8]}",
        "data_dir": str(tmp_path / "data"),
        "processing": {"snapshot_interval": 0.1},
        "retention": {"min_free_bytes": 0},
        "database": {"lease_s": 3.0, **sections.pop("database", {})},
        "upload": {"interval": 0.2, "batch_size": 10, "max_concurrent": 3, "retry_base_s": 0.5,
                   "retry_cap_s": 2.0, "request_timeout_s": 30.0, **sections.pop("upload", {})},
        "aws": {"region": "us-east-1", "data_bucket": s3_server.data_bucket,
                "metadata_bucket": s3_server.metadata_bucket, "s3_endpoint_url": s3_server.endpoint_url,
                "api_endpoint": api_endpoint, "api_key": RECEIVER_API_KEY},
        **sections,
    }
    return write_config(tmp_path / "device.yaml", config)


def _upload_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every UPLOAD job, by id."""
    return [dict(row) for row in read_rows(settings, "SELECT * FROM jobs WHERE stage = 'upload' ORDER BY id")]


def _assert_uploaded_once(settings: Settings, s3_server: Any, received: list[dict[str, Any]]) -> None:
    """Each snapshot: one uploads row, one object per bucket key, one record at the receiver."""
    keys = snapshot_keys(settings)
    assert scalar(settings, "SELECT count(*) FROM uploads") == len(keys)
    images = device_objects(s3_server, s3_server.data_bucket, "snapshots/", settings.device_id)
    metadata = device_objects(s3_server, s3_server.metadata_bucket, "metadata/", settings.device_id)
    assert sorted(images) == sorted(image for image, _, _ in keys.values())
    assert sorted(metadata) == sorted(meta for _, meta, _ in keys.values())
    mine = [record for record in received if record["device_id"] == settings.device_id]
    assert sorted(record["idempotency_key"] for record in mine) == sorted(key for _, _, key in keys.values())


def test_an_upload_killed_mid_post_is_redone_by_the_restarted_stage_and_delivered_once(
    tmp_path, frames, s3_server, receiver
):
    gate = IngestGate(receiver.url)
    settings = _device(tmp_path, s3_server, gate.url, "killed")
    seeded = seed_detected_snapshots(settings, frames[:3])
    first = StageProcess(settings.config_path, "upload", tmp_path / "logs-first")
    second = StageProcess(settings.config_path, "upload", tmp_path / "logs-second")
    gate.hold()
    try:
        first.start()
        wait_until(lambda: gate.held == 1, 60, "the first POST in flight", [first])
        leased = _upload_jobs(settings)
        first.kill9()
        # The cloud got the batch although its sender is dead; the device never heard back.
        gate.release()
        wait_until(lambda: len(receiver.received()) == len(seeded), 30, "the held batch stored")

        second.start()
        wait_until(lambda: all(job["state"] == "done" for job in _upload_jobs(settings)), 60,
                   "the restarted stage finishing the jobs", [second])
    finally:
        first.kill9()
        second.terminate()
        gate.close()

    assert [job["state"] for job in leased] == ["leased"] * len(seeded)
    assert {job["lease_owner"] for job in leased} == {f"upload@{socket.gethostname()}:{first.pid}"}
    jobs = _upload_jobs(settings)
    assert [(job["snapshot_id"], job["state"], job["attempts"]) for job in jobs] == [
        (snapshot_id, "done", 2) for snapshot_id in seeded
    ]
    received = receiver.received()
    _assert_uploaded_once(settings, s3_server, received)
    assert [record["deliveries"] for record in received] == [2] * len(seeded)
    assert first.events("upload_done") == []
    assert len(second.events("upload_done")) == len(seeded)


def test_a_frozen_upload_that_wakes_after_its_lease_cannot_overwrite_the_newer_result(
    tmp_path, frames, s3_server, receiver
):
    gate = IngestGate(receiver.url)
    settings = _device(tmp_path, s3_server, gate.url, "stale")
    [snapshot_id] = seed_detected_snapshots(settings, frames[:1])
    frozen = StageProcess(settings.config_path, "upload", tmp_path / "logs-frozen")
    fresh = StageProcess(settings.config_path, "upload", tmp_path / "logs-fresh")
    gate.hold()
    try:
        frozen.start()
        wait_until(lambda: gate.held == 1, 60, "the first POST in flight", [frozen])
        freeze = _freeze_outside_a_write(settings, frozen)
        while not freeze():
            frozen.signal(signal.SIGCONT)
            time.sleep(0.05)
        [stale_lease] = _upload_jobs(settings)
        wait_until(lambda: time.time() > stale_lease["lease_expires_at"] + 0.5, 30, "the lease to lapse")

        gate.let_new_through()
        fresh.start()
        wait_until(lambda: _upload_jobs(settings)[0]["state"] == "done", 60, "the fresh upload", [fresh])
        assert fresh.terminate() == 0
        finished_job = _upload_jobs(settings)[0]
        [finished_upload] = [dict(row) for row in read_rows(settings, "SELECT * FROM uploads")]

        # The frozen stage wakes with its answer on the way, long after its lease was taken over.
        gate.release()
        frozen.signal(signal.SIGCONT)
        wait_until(lambda: len(frozen.events("upload_lease_lost")) >= 1, 30, "the frozen stage to notice",
                   [frozen])
        time.sleep(1.0)
        after_job = _upload_jobs(settings)[0]
        after_uploads = [dict(row) for row in read_rows(settings, "SELECT * FROM uploads")]
    finally:
        if frozen.alive():
            frozen.signal(signal.SIGCONT)
        frozen.terminate()
        fresh.terminate()
        gate.close()

    assert (stale_lease["state"], stale_lease["attempts"]) == ("leased", 1)
    assert (finished_job["state"], finished_job["attempts"]) == ("done", 2)
    assert after_job == finished_job
    assert after_uploads == [finished_upload]
    assert [event["snapshot_id"] for event in frozen.events("upload_lease_lost")] == [snapshot_id]
    assert frozen.events("upload_done") == []
    received = receiver.received()
    _assert_uploaded_once(settings, s3_server, received)
    assert [record["deliveries"] for record in received] == [2]


def _detect_device(tmp_path: Path, s3_server: Any, api_endpoint: str, name: str, folder: Path,
                   pklot_dir: Path, model_path: Path, **sections: Any) -> Settings:
    """A device with one PKLot camera replaying `folder`, the small model, short leases."""
    first_xml = sorted((pklot_dir / SERIES).glob("*.xml"))[0]
    camera = {"id": "pucpr", "source": str(folder), "width": 1280, "height": 720,
              "parking_zones": import_zones(first_xml, "pklot")}
    detection = {"model": str(model_path), "device": "cpu", "image_size": 320, "tile_size": 0}
    return _device(tmp_path, s3_server, api_endpoint, name, cameras=[camera], detection=detection, **sections)


def _capture_once(settings: Settings, logs: Path) -> int:
    """Replay the camera folder once through a real capture process; return the snapshots stored."""
    capture = StageProcess(settings.config_path, "capture", logs, "--once").start()
    assert capture.process is not None
    assert capture.process.wait(timeout=120) == 0
    return int(scalar(settings, "SELECT count(*) FROM snapshots"))


def _detect_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every DETECT job, by id."""
    return [dict(row) for row in read_rows(settings, "SELECT * FROM jobs WHERE stage = 'detect' ORDER BY id")]


def _owner(stage: StageProcess) -> str:
    """The lease owner name of a stage process."""
    return f"{stage.stage}@{socket.gethostname()}:{stage.pid}"


def _catch_mid_job(
    settings: Settings, stage: StageProcess, act: Callable[[], bool], undo: Callable[[], None],
    timeout_s: float = 120.0,
) -> list[int]:
    """Wait for the stage to hold a job, `act()` on it (kill or freeze), and return the jobs it held then.

    If the job finished in the instant between seeing its lease and acting, or `act()` reports the
    moment unusable, `undo()` (restart or thaw) and wait for the next job.
    """
    sql = "SELECT id FROM jobs WHERE state = 'leased' AND lease_owner = ?"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert stage.alive(), f"{stage.stage} exited with {stage.exited()}"
        owner = _owner(stage)
        if read_rows(settings, sql, (owner,)):
            usable = act()
            held = [row["id"] for row in read_rows(settings, sql, (owner,))]
            if usable and held:
                return held
            undo()
        time.sleep(0.002)
    raise AssertionError(f"{stage.stage} never held a job")


def _kill(stage: StageProcess) -> Callable[[], bool]:
    """SIGKILL the stage: any moment of a job is a moment a crash can hit."""

    def act() -> bool:
        stage.kill9()
        return True

    return act


def _freeze_outside_a_write(settings: Settings, stage: StageProcess) -> Callable[[], bool]:
    """SIGSTOP the stage; usable only if it is not frozen inside a write transaction.

    A process frozen while it holds SQLite's write lock stops every writer (that is SQLite, not a
    lease question), so the stale-lease case needs the freeze to land while the job is being worked on.
    """

    def act() -> bool:
        stage.signal(signal.SIGSTOP)
        probe = connect(settings.database_path, busy_timeout_s=0.5)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            probe.close()

    return act


def test_a_detect_killed_mid_job_has_the_job_redone_by_the_restarted_stage_with_one_result(
    tmp_path, frames, pklot_dir, model_path, s3_server, receiver
):
    folder = replay_folder(frames[:4], tmp_path / "replay", copies=2)
    settings = _detect_device(tmp_path, s3_server, receiver.url, "detkill", folder, pklot_dir, model_path,
                              upload={"enabled": False})
    captured = _capture_once(settings, tmp_path / "logs")
    first = StageProcess(settings.config_path, "detect", tmp_path / "logs-first").start()
    second = StageProcess(settings.config_path, "detect", tmp_path / "logs-second")
    try:
        killed_at = time.time()
        held = _catch_mid_job(settings, first, _kill(first), first.start)
        second.start()
        wait_until(lambda: all(job["state"] == "done" for job in _detect_jobs(settings)), 120,
                   "the restarted detect", [second])
    finally:
        first.kill9()
        second.terminate()

    assert second.exited() == 0
    jobs = _detect_jobs(settings)
    assert len(jobs) == captured == 8
    assert [job["state"] for job in jobs] == ["done"] * captured
    assert {job["id"]: job["attempts"] for job in jobs if job["id"] in held} == dict.fromkeys(held, 2)
    assert scalar(settings, "SELECT count(*) FROM detections") == captured
    assert scalar(settings, "SELECT count(*) FROM jobs WHERE stage = 'upload'") == captured
    redone = [job["snapshot_id"] for job in jobs if job["id"] in held]
    marks = ",".join("?" * len(redone))
    redone_sql = f"SELECT detected_at FROM detections WHERE snapshot_id IN ({marks})"
    detected = read_rows(settings, redone_sql, redone)
    assert all(row["detected_at"] > killed_at for row in detected)
    done_by_second = {event["snapshot_id"] for event in second.events("detection_done")}
    assert set(redone) <= done_by_second
    assert [tuple(row) for row in read_rows(settings, "PRAGMA integrity_check")] == [("ok",)]


def test_a_frozen_detect_that_wakes_after_its_lease_cannot_overwrite_the_newer_result(
    tmp_path, frames, pklot_dir, model_path, s3_server, receiver
):
    folder = replay_folder(frames[:3], tmp_path / "replay", copies=2)
    settings = _detect_device(tmp_path, s3_server, receiver.url, "detstale", folder, pklot_dir, model_path,
                              upload={"enabled": False}, database={"lease_s": 2.0})
    captured = _capture_once(settings, tmp_path / "logs")
    frozen = StageProcess(settings.config_path, "detect", tmp_path / "logs-frozen").start()
    fresh = StageProcess(settings.config_path, "detect", tmp_path / "logs-fresh")
    try:
        [held] = _catch_mid_job(settings, frozen, _freeze_outside_a_write(settings, frozen),
                                lambda: frozen.signal(signal.SIGCONT))
        [stale_lease] = [job for job in _detect_jobs(settings) if job["id"] == held]
        wait_until(lambda: time.time() > stale_lease["lease_expires_at"] + 0.5, 30, "the lease to lapse")
        fresh.start()
        wait_until(lambda: all(job["state"] == "done" for job in _detect_jobs(settings)), 120,
                   "the fresh detect", [fresh])
        assert fresh.terminate() == 0
        snapshot_id = stale_lease["snapshot_id"]
        tables = {
            "jobs": "SELECT * FROM jobs ORDER BY id",
            "detections": "SELECT * FROM detections ORDER BY snapshot_id",
            "zone_state": "SELECT * FROM zone_state ORDER BY camera_id, zone_id",
            "zone_events": "SELECT * FROM zone_events ORDER BY id",
        }
        newer = {name: [dict(row) for row in read_rows(settings, sql)] for name, sql in tables.items()}

        frozen.signal(signal.SIGCONT)
        wait_until(lambda: len(frozen.events("detect_lease_lost")) >= 1, 60, "the frozen detect to notice",
                   [frozen])
        after = {name: [dict(row) for row in read_rows(settings, sql)] for name, sql in tables.items()}
    finally:
        if frozen.alive():
            frozen.signal(signal.SIGCONT)
        frozen.terminate()
        fresh.terminate()

    assert (stale_lease["state"], stale_lease["attempts"], stale_lease["lease_owner"]) == (
        "leased", 1, f"detect@{socket.gethostname()}:{frozen.pid}")
    assert after == newer
    assert [event["snapshot_id"] for event in frozen.events("detect_lease_lost")] == [snapshot_id]
    assert snapshot_id not in {event["snapshot_id"] for event in frozen.events("detection_done")}
    assert [job["attempts"] for job in newer["jobs"] if job["id"] == held] == [2]
    assert len(newer["detections"]) == captured


def test_a_writer_holding_the_database_past_the_busy_timeout_delays_stages_but_fails_no_job(
    tmp_path, frames, pklot_dir, model_path, s3_server, receiver
):
    busy_timeout_s = 1.0
    folder = replay_folder(frames[:3], tmp_path / "replay")
    settings = _detect_device(tmp_path, s3_server, receiver.url, "locked", folder, pklot_dir, model_path,
                              database={"busy_timeout_s": busy_timeout_s})
    stages = {name: StageProcess(settings.config_path, name, tmp_path / "logs")
              for name in ("capture", "detect", "upload")}
    running = list(stages.values())
    try:
        for stage in running:
            stage.start()
        wait_until(lambda: scalar(settings, "SELECT count(*) FROM uploads") >= 5, 120, "the first uploads",
                   running)

        # Another process holds the write lock four times longer than the stages' busy timeout.
        locker = connect(settings.database_path)
        locker.execute("BEGIN IMMEDIATE")
        time.sleep(4 * busy_timeout_s)
        locker.execute("COMMIT")
        locker.close()

        before = scalar(settings, "SELECT count(*) FROM snapshots")
        wait_until(lambda: scalar(settings, "SELECT count(*) FROM snapshots") >= before + 5, 60,
                   "capture after the lock", running)
        wait_for_heartbeat(settings, stages["capture"])
        assert stages["capture"].terminate() == 0
        running = [stages["detect"], stages["upload"]]
        wait_until(lambda: scalar(settings, "SELECT count(*) FROM jobs WHERE state != 'done'") == 0
                   and scalar(settings, "SELECT count(*) FROM uploads")
                   == scalar(settings, "SELECT count(*) FROM snapshots"), 120, "the drain", running)
    finally:
        exit_codes = {name: stage.terminate() for name, stage in stages.items()}

    assert exit_codes == {"capture": 0, "detect": 0, "upload": 0}
    jobs = [dict(row) for row in read_rows(settings, "SELECT * FROM jobs")]
    assert [job for job in jobs if job["last_error"] and "locked" in job["last_error"]] == []
    assert [job for job in jobs if job["state"] != "done"] == []
    # Every snapshot row has its file, one result and one job per stage; a frame whose row could not
    # be written while the lock was held left no file and no job behind.
    rows = read_rows(settings, "SELECT id, path FROM snapshots")
    assert scalar(settings, "SELECT count(*) FROM detections") == len(rows)
    assert scalar(settings, "SELECT count(*) FROM jobs WHERE stage = 'detect'") == len(rows)
    assert scalar(settings, "SELECT count(*) FROM jobs WHERE stage = 'upload'") == len(rows)
    jpegs = settings.snapshots_dir.rglob("*.jpg")
    assert {path.relative_to(settings.data_dir).as_posix() for path in jpegs} == {row["path"] for row in rows}
