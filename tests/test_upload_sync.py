"""Cloud sync of the upload stage: keyframes after restarts, failures and gaps; images; multipart; the cap."""

# ruff: noqa: F811  (the shared fixtures below are imported from test_upload)

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from PIL import Image
from test_upload import data_dir, device_id, execute, jobs_of, make_due_now, make_settings  # noqa: F401

import uploader.s3
from shared.db import open_database
from testbed.seaweed import SeaweedServer
from uploader.bench import seed_device
from uploader.delta import SentState, zone_states
from uploader.main import run
from uploader.pacing import BandwidthCap
from uploader.replay import Frame, frames
from uploader.sync import load_sent_states, require_keyframe, save_sent_state

pytestmark = pytest.mark.usefixtures("s3_credentials")


def _series(count: int, camera_id: str = "pucpr-sunny") -> list[Frame]:
    return [frame for frame in frames() if frame.camera_id == camera_id][:count]


def _received_by_key(receiver) -> dict[str, dict[str, Any]]:
    return {record["idempotency_key"]: record for record in receiver.received()}


def _key(device_id: str, result: dict[str, Any]) -> str:
    return f"{device_id}/{result['camera_id']}/{Path(result['image']).stem}"


def _assert_cloud_matches_device(receiver, device_id: str, results: list[dict[str, Any]]) -> None:
    received = _received_by_key(receiver)
    for result in results:
        assert received[_key(device_id, result)]["zones"] == zone_states(result)


def test_a_restart_begins_each_camera_with_a_keyframe_and_deltas_chain_on_the_sqlite_state(
    tmp_path, data_dir, device_id, s3_server, receiver
):
    replay = _series(6)
    results = seed_device(data_dir, device_id, replay[:3])
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    assert run(settings, once=True) == 0
    [state] = execute(settings, "SELECT * FROM cloud_sync")
    assert state["record_key"] == _key(device_id, results[-1])
    assert json.loads(state["zones_json"]) == zone_states(results[-1])

    results += seed_device(data_dir, device_id, replay[3:])
    assert run(settings, once=True) == 0

    received = _received_by_key(receiver)
    kinds = [received[_key(device_id, result)]["kind"] for result in results]
    assert kinds == ["keyframe", "delta", "delta", "keyframe", "delta", "delta"]
    _assert_cloud_matches_device(receiver, device_id, results)
    assert execute(settings, "SELECT sequence FROM cloud_sync")[0]["sequence"] == 5


def test_a_failed_batch_leaves_a_durable_keyframe_mark_and_the_retry_rebuilds_correctly(
    tmp_path, data_dir, device_id, s3_server, receiver
):
    replay = _series(5)
    results = seed_device(data_dir, device_id, replay[:2])
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    assert run(settings, once=True) == 0

    results += seed_device(data_dir, device_id, replay[2:])
    receiver.stop()
    assert run(settings, once=True) == 0
    assert execute(settings, "SELECT needs_keyframe FROM cloud_sync")[0]["needs_keyframe"] == 1
    assert [job["state"] for job in jobs_of(settings)] == ["done", "done", "pending", "pending", "pending"]

    receiver.start()
    make_due_now(settings)
    assert run(settings, once=True) == 0

    received = _received_by_key(receiver)
    kinds = [received[_key(device_id, result)]["kind"] for result in results[2:]]
    assert kinds == ["keyframe", "delta", "delta"]
    assert execute(settings, "SELECT needs_keyframe FROM cloud_sync")[0]["needs_keyframe"] == 0
    _assert_cloud_matches_device(receiver, device_id, results)


def test_a_snapshot_that_cannot_be_sent_makes_the_next_one_a_keyframe(
    tmp_path, data_dir, device_id, s3_server, receiver
):
    results = seed_device(data_dir, device_id, _series(3))
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    middle = data_dir / execute(settings, "SELECT path FROM snapshots ORDER BY captured_at")[1]["path"]
    middle.unlink()

    assert run(settings, once=True) == 0

    assert [job["state"] for job in jobs_of(settings)] == ["done", "failed", "done"]
    received = _received_by_key(receiver)
    assert [received[_key(device_id, results[index])]["kind"] for index in (0, 2)] == ["keyframe", "keyframe"]
    _assert_cloud_matches_device(receiver, device_id, [results[0], results[2]])


@pytest.mark.parametrize(
    ("images", "sent"),
    [("changed", [True, False, False, False, False, True]),
     ("every_nth", [True, False, True, False, True, False])],
)
def test_the_image_setting_decides_which_jpegs_go_to_s3(
    tmp_path, data_dir, device_id, s3_server, receiver, images, sent
):
    # UFPR05 Rainy: its labels have no car in the first five frames, two in the sixth.
    results = seed_device(data_dir, device_id, _series(6, "ufpr05"))
    changes = [zone_states(a) != zone_states(b) for a, b in zip(results, results[1:], strict=False)]
    assert changes == [False, False, False, False, True]
    upload = {"images": images, "image_every_n": 2}
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload=upload)

    assert run(settings, once=True) == 0

    rows = execute(settings, "SELECT * FROM uploads ORDER BY snapshot_id")
    assert [row["image_key"] != "" for row in rows] == sent
    stored = set(s3_server.object_keys(s3_server.data_bucket, "snapshots/"))
    assert {row["image_key"] for row in rows if row["image_key"]} <= stored
    assert len([key for key in stored if device_id in key]) == sum(sent)
    assert s3_server.count_objects(s3_server.metadata_bucket, "metadata/2013/03/19/" + device_id) == 6
    assert len(receiver.received()) == 6
    [images_sent] = execute(settings, "SELECT requests FROM upload_bytes WHERE destination = 'images'")
    assert images_sent["requests"] == sum(sent)


def test_jpeg_quality_reencodes_smaller_images_and_counts_both_sizes(
    tmp_path, data_dir, device_id, s3_server, receiver
):
    [frame] = _series(1)
    seed_device(data_dir, device_id, [frame])
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id,
                             upload={"jpeg_quality": 40})
    assert run(settings, once=True) == 0

    [row] = execute(settings, "SELECT * FROM uploads")
    body = s3_server.client().get_object(Bucket=s3_server.data_bucket, Key=row["image_key"])["Body"].read()
    assert len(body) == row["image_bytes"] < frame.jpeg.stat().st_size
    assert Image.open(io.BytesIO(body)).size == (1280, 720)
    [images] = execute(settings, "SELECT * FROM upload_bytes WHERE destination = 'images'")
    assert (images["raw_bytes"], images["wire_bytes"]) == (frame.jpeg.stat().st_size, len(body))


def _large_snapshot(data_dir: Path, device_id: str, size_bytes: int) -> Path:
    """Seed one snapshot and swap its image for `size_bytes` of incompressible data."""
    seed_device(data_dir, device_id, _series(1))
    [image] = list((data_dir / "snapshots").rglob("*.jpg"))
    image.unlink()
    image.write_bytes(os.urandom(size_bytes))
    return image


MULTIPART = {"multipart_threshold_bytes": 5 * 1024**2, "multipart_part_bytes": 5 * 1024**2}


def test_large_images_go_up_as_multipart_uploads(tmp_path, data_dir, device_id, s3_server, receiver):
    image = _large_snapshot(data_dir, device_id, 11 * 1024**2)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload=MULTIPART)

    assert run(settings, once=True) == 0

    [row] = execute(settings, "SELECT * FROM uploads")
    stored = s3_server.client().get_object(Bucket=s3_server.data_bucket, Key=row["image_key"])
    assert stored["Body"].read() == image.read_bytes()
    assert stored["ETag"].strip('"').endswith("-3")


class _FailingSecondPart:
    """An S3 client that refuses the second part of every multipart upload, as a dropped link would."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def upload_part(self, **arguments: Any) -> Any:
        if arguments["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "link dropped"}}, "UploadPart")
        return await self._client.upload_part(**arguments)


def test_a_failed_multipart_upload_is_aborted_and_the_job_retried(
    tmp_path, data_dir, device_id, s3_server, receiver, monkeypatch
):
    _large_snapshot(data_dir, device_id, 11 * 1024**2)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload=MULTIPART)
    real_client = uploader.s3.s3_client

    class _Wrapped:
        def __init__(self, settings):
            self._context = real_client(settings)

        async def __aenter__(self):
            return _FailingSecondPart(await self._context.__aenter__())

        async def __aexit__(self, *exc):
            return await self._context.__aexit__(*exc)

    monkeypatch.setattr("uploader.main.s3_client", _Wrapped)

    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["error_kind"]) == ("pending", "transient")
    assert "InternalError" in job["last_error"]
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.data_bucket).get("Uploads", [])
    assert [upload for upload in uploads if device_id in upload["Key"]] == []
    assert receiver.received() == []


def test_bandwidth_cap_books_sends_so_the_average_stays_at_the_cap():
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    cap = BandwidthCap(1000, clock=lambda: now[0], sleep=fake_sleep)

    async def send_all() -> None:
        for size in (500, 2000, 1500, 0):
            await cap.reserve(size)

    asyncio.run(send_all())
    assert slept == [0.5, 2.0]
    assert now[0] - 100.0 == pytest.approx(2.5)
    assert cap.waited_s == pytest.approx(2.5)
    unlimited = BandwidthCap(None, clock=lambda: 0.0, sleep=fake_sleep)
    asyncio.run(unlimited.reserve(10**9))
    assert slept == [0.5, 2.0]


def test_every_byte_the_stage_sends_passes_the_bandwidth_cap(
    tmp_path, data_dir, device_id, s3_server, receiver, monkeypatch
):
    booked: list[int] = []
    original = BandwidthCap.reserve

    async def recording(self, size_bytes: int) -> None:
        booked.append(size_bytes)
        await original(self, size_bytes)

    monkeypatch.setattr(BandwidthCap, "reserve", recording)
    seed_device(data_dir, device_id, _series(3))
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id,
                             upload={"max_bytes_per_s": 10**9})
    started = time.time()
    assert run(settings, once=True) == 0

    [wire] = execute(settings, "SELECT sum(wire_bytes) AS total, sum(requests) AS requests FROM upload_bytes")
    assert sum(booked) == wire["total"] > 0
    assert len(booked) == wire["requests"] == 3 + 3 + 1
    assert execute(settings, "SELECT max(updated_at) AS at FROM upload_bytes")[0]["at"] >= started


CREDENTIAL_PROCESS = '''
import datetime, json, pathlib, sys
counter = pathlib.Path(sys.argv[1])
calls = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(calls))
expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
print(json.dumps({"Version": 1, "AccessKeyId": "test", "SecretAccessKey": "test",
                  "SessionToken": f"session-token-{calls}", "Expiration": expires.isoformat()}))
'''


def test_expiring_credentials_from_the_default_chain_are_refreshed_and_never_logged(
    tmp_path, data_dir, device_id, receiver
):
    # A profile whose credential_process hands out session tokens about to expire: botocore must
    # fetch fresh ones while the stage runs, and no token may reach the logs. The shared S3 server
    # checks one static key pair, so this test runs its own open one, which takes session tokens.
    script = tmp_path / "credentials.py"
    script.write_text(CREDENTIAL_PROCESS, encoding="utf-8")
    calls = tmp_path / "credential-calls"
    config = tmp_path / "aws-config"
    config.write_text(f"[profile device]\ncredential_process = {sys.executable} {script} {calls}\n")
    seed_device(data_dir, device_id, _series(3))

    with SeaweedServer(tmp_path / "open-s3") as open_s3:
        open_s3.create_buckets()
        settings = make_settings(tmp_path, open_s3, receiver.url, receiver.api_key, device_id)
        environment = {**os.environ, "AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "device"}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            environment.pop(name)
        command = [sys.executable, "-m", "shared.cli", "--config", str(settings.config_path), "run", "upload",
                   "--once"]
        stage = subprocess.run(
            command, cwd=Path(__file__).resolve().parents[1], env=environment, capture_output=True, text=True,
            timeout=120,
        )
        stored = open_s3.count_objects(open_s3.data_bucket, "snapshots/")

    assert stage.returncode == 0, stage.stderr
    assert [job["state"] for job in jobs_of(settings)] == ["done"] * 3, jobs_of(settings)[0]["last_error"]
    assert stored == 3
    assert int(calls.read_text()) > 1
    assert "session-token" not in stage.stderr + stage.stdout
    assert receiver.api_key not in stage.stderr + stage.stdout


def test_a_late_worker_cannot_move_the_sync_state_back(tmp_path):
    connection = open_database(tmp_path / "parkmon.db")
    newer = SentState("cam0", 2, "lot/cam0/b", 200.0, {"1": True}, since_keyframe=1, sequence=1)
    older = SentState("cam0", 1, "lot/cam0/a", 100.0, {"1": False}, since_keyframe=0, sequence=0)
    save_sent_state(connection, "lot", newer)
    require_keyframe(connection, ["cam0"])

    save_sent_state(connection, "lot", older)

    assert load_sent_states(connection) == {"cam0": SentState(**{**newer.__dict__, "needs_keyframe": True})}
    save_sent_state(connection, "lot", newer)
    assert load_sent_states(connection)["cam0"].needs_keyframe is False
