"""`parkmon run upload` as a real process: it keeps polling, and SIGTERM stops it without losing jobs."""

# ruff: noqa: F811  (the shared fixtures below are imported from test_upload)

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_upload import (  # noqa: F401
    data_dir,
    device_id,
    execute,
    frames,
    jobs_of,
    make_settings,
    seed_snapshots,
)

from shared.config import Settings

pytestmark = pytest.mark.usefixtures("s3_credentials")

REPO_DIR = Path(__file__).resolve().parents[1]


def start_stage(settings: Settings) -> subprocess.Popen[bytes]:
    """`parkmon run upload` as its own process, logging JSON lines to a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "--config", str(settings.config_path), "run", "upload"],
        cwd=REPO_DIR, env=os.environ.copy(), stderr=subprocess.PIPE,
    )


def _wait_for(condition, stage: subprocess.Popen[bytes], what: str, timeout_s: float = 60.0) -> None:
    """Poll until `condition()` holds; fail if the stage process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert stage.poll() is None, f"upload stage exited early with {stage.returncode}"
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_running_stage_uploads_new_jobs_and_stops_on_sigterm(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id,
                             upload={"interval": 60})
    stage = start_stage(settings)
    try:
        _wait_for(lambda: len(receiver.received()) == 1, stage, "the first upload")
        seed_snapshots(data_dir, frames[1:3], device_id)
        _wait_for(lambda: len(receiver.received()) == 3, stage, "jobs added while running")
    finally:
        stage.send_signal(signal.SIGTERM)
        _, stderr = stage.communicate(timeout=30)

    assert stage.returncode == 0
    events = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    done = [event for event in events if event["event"] == "upload_done"]
    assert len(done) == 3
    assert all(event["bytes"] > 0 and event["image_key"].startswith("snapshots/") for event in done)
    assert events[-1]["event"] == "upload_stopped"
    assert receiver.api_key not in stderr.decode()
    [beat] = execute(settings, "SELECT * FROM heartbeats WHERE process = 'upload'")
    assert beat["status"] == "stopped"


def test_sigterm_mid_upload_requeues_the_job(tmp_path, data_dir, frames, device_id, s3_server):
    [snapshot] = seed_snapshots(data_dir, frames[:1], device_id)
    # An endpoint that takes connections but never answers, so the POST is in flight when SIGTERM comes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    settings = make_settings(tmp_path, s3_server, endpoint, "key", device_id,
                             upload={"request_timeout_s": 60})
    stage = start_stage(settings)
    try:
        metadata_prefix = f"metadata/{snapshot.day}/{snapshot.stem}"
        _wait_for(lambda: s3_server.count_objects(s3_server.metadata_bucket, metadata_prefix) == 1,
                  stage, "the S3 puts before the POST")
    finally:
        stage.send_signal(signal.SIGTERM)
        _, stderr = stage.communicate(timeout=30)
        silent.close()

    assert stage.returncode == 0
    [job] = jobs_of(settings)
    assert (job["state"], job["attempts"]) == ("pending", 1)
    assert job["last_error"] == "upload stage stopped mid-upload"
    assert "upload_requeued" in stderr.decode()
