"""The upload stage when the cloud refuses or is away: jobs wait, park, and are never dropped."""

# ruff: noqa: F811  (the shared fixtures below are imported from test_upload)

from __future__ import annotations

import time

import pytest
from test_upload import (  # noqa: F401
    data_dir,
    device_id,
    execute,
    frames,
    jobs_of,
    make_due_now,
    make_settings,
    seed_snapshots,
)

from uploader.main import run

pytestmark = pytest.mark.usefixtures("s3_credentials")


def test_receiver_down_keeps_jobs_pending_then_drains_when_back(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    seeded = seed_snapshots(data_dir, frames, device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    receiver.stop()

    started = time.time()
    assert run(settings, once=True) == 0

    jobs = jobs_of(settings)
    assert len(jobs) == len(seeded)
    for job in jobs:
        assert job["state"] == "pending"
        assert job["attempts"] == 1
        assert job["error_kind"] == "transient"
        assert job["available_at"] > started + settings.upload.retry_base_s * 0.5 - 0.001
        assert job["last_error"]
    assert execute(settings, "SELECT * FROM uploads") == []

    receiver.start()
    make_due_now(settings)
    assert run(settings, once=True) == 0

    assert [job["state"] for job in jobs_of(settings)] == ["done"] * len(seeded)
    assert [job["attempts"] for job in jobs_of(settings)] == [2] * len(seeded)
    assert len(receiver.received()) == len(seeded)
    assert len(execute(settings, "SELECT * FROM uploads WHERE posted = 1")) == len(seeded)


def test_transient_failures_park_after_max_retries_and_parked_jobs_still_drain(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(
        tmp_path, s3_server, receiver.url, receiver.api_key, device_id, upload={"max_retries": 2}
    )
    receiver.stop()

    assert run(settings, once=True) == 0
    assert jobs_of(settings)[0]["state"] == "pending"
    make_due_now(settings)
    started = time.time()
    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["attempts"], job["error_kind"]) == ("failed", 2, "transient")
    assert job["available_at"] >= started + settings.upload.parked_retry_s

    receiver.start()
    make_due_now(settings)
    assert run(settings, once=True) == 0
    assert jobs_of(settings)[0]["state"] == "done"
    assert len(receiver.received()) == 1


def test_wrong_api_key_is_parked_as_permanent(tmp_path, data_dir, frames, device_id, s3_server, receiver):
    seeded = seed_snapshots(data_dir, frames[:2], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, "not-the-key", device_id)

    started = time.time()
    assert run(settings, once=True) == 0

    jobs = jobs_of(settings)
    assert len(jobs) == len(seeded)
    for job in jobs:
        assert (job["state"], job["attempts"], job["error_kind"]) == ("failed", 1, "permanent")
        assert "401" in job["last_error"]
        assert "not-the-key" not in job["last_error"]
        assert job["available_at"] >= started + settings.upload.parked_retry_s
    assert receiver.received() == []
    assert execute(settings, "SELECT * FROM uploads") == []


@pytest.mark.parametrize(
    ("case", "expected_error"),
    [("wrong_secret", "SignatureDoesNotMatch"), ("unknown_key", "InvalidAccessKeyId"),
     ("missing_bucket", "NoSuchBucket")],
)
def test_s3_refusals_are_parked_as_permanent(
    tmp_path, data_dir, frames, device_id, s3_server, receiver, monkeypatch, case, expected_error
):
    seed_snapshots(data_dir, frames[:1], device_id)
    aws = {"data_bucket": f"absent-{device_id}"} if case == "missing_bucket" else {}
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id, aws=aws)
    if case == "wrong_secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    if case == "unknown_key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")

    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["error_kind"]) == ("failed", "permanent")
    assert expected_error in job["last_error"]
    assert receiver.received() == []


def test_missing_image_file_is_parked_not_dropped(tmp_path, data_dir, frames, device_id, s3_server, receiver):
    [snapshot] = seed_snapshots(data_dir, frames[:1], device_id)
    (data_dir / snapshot.path).unlink()
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)

    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["error_kind"]) == ("failed", "permanent")
    assert "image is missing" in job["last_error"]
