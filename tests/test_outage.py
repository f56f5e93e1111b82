"""A cloud outage: S3 and the ingest endpoint go away mid-run and come back; nothing is lost or doubled.

One run of the four stages (module fixture) is observed by several tests. "Several minutes" is scaled
down with short retry settings: the outage still spans many retry rounds of every job, fast and parked.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from cloud_fixtures import RECEIVER_API_KEY, S3_ACCESS_KEY, S3_SECRET_KEY
from conftest import MODEL_PATH, PKLOT_DIR
from stage_harness import (
    IngestGate,
    StageProcess,
    add_deleted_jobs_audit,
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

import testbed.seaweed as seaweed_module
from shared.config import Settings
from shared.zone_import import import_zones
from testbed.process import free_ports
from testbed.receiver import Receiver
from testbed.seaweed import SeaweedServer

SERIES = "UFPR04/Cloudy"
OUTAGE_S = 180.0  # "several minutes": long enough for many parked-retry rounds
MAX_OUTAGE_S = 300.0
UPLOAD = {
    "interval": 0.2, "batch_size": 10, "max_retries": 3, "retry_base_s": 0.5, "retry_cap_s": 3.0,
    "parked_retry_s": 8.0, "request_timeout_s": 3.0,
}
STAGE_NAMES = ("capture", "detect", "upload", "api")
PARKED_REASON = "upload job(s) parked after repeated failures"
BACKLOG_SQL = "SELECT count(*) FROM jobs WHERE stage = 'upload' AND state != 'done'"


@dataclass
class OutageRun:
    """What the run left behind and what was seen while the cloud was away."""

    settings: Settings
    s3: SeaweedServer
    received: list[dict[str, Any]]
    stages: dict[str, StageProcess]
    exit_codes: dict[str, int | None]
    away_from: float
    back_at: float
    before: dict[str, int]
    during: dict[str, int]
    health_parked: dict[str, Any]
    health_late: dict[str, Any]
    queue_parked: dict[str, Any]
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outage_s(self) -> float:
        """How long uploads could not reach the cloud, until both servers answered again."""
        return self.back_at - self.away_from

    def count(self, sql: str, *parameters: Any) -> int:
        """One count from the device database."""
        return int(scalar(self.settings, sql, parameters))


def _get_json(url: str) -> dict[str, Any]:
    """GET a JSON document from the status API."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _at(event: dict[str, Any]) -> float:
    """A log event's time stamp as unix seconds."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _restart_on_same_ports(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a stopped server again on its old ports and data, so the device's endpoint works again."""
    ports = list(server.ports.values())
    monkeypatch.setattr(seaweed_module, "free_ports", lambda count: ports[:count])
    server.start()


def _counts(settings: Settings) -> dict[str, int]:
    """Snapshots, detections, uploads and the upload backlog right now."""
    return {
        "snapshots": int(scalar(settings, "SELECT count(*) FROM snapshots")),
        "detections": int(scalar(settings, "SELECT count(*) FROM detections")),
        "uploads": int(scalar(settings, "SELECT count(*) FROM uploads")),
        "backlog": int(scalar(settings, BACKLOG_SQL)),
    }


def _device_config(settings_path: Any, data_dir: Any, folder: Any, api_port: int, s3: SeaweedServer,
                   receiver_url: str) -> Settings:
    """The device: one replayed camera, the small model, short retries, the test's own cloud."""
    series = PKLOT_DIR / SERIES
    return write_config(settings_path, {
        "device_id": f"outage-{uuid.uuid4().hex[:8]}",
        "data_dir": str(data_dir),
        "cameras": [{"id": "ufpr04", "source": str(folder), "width": 1280, "height": 720,
                     "parking_zones": import_zones(sorted(series.glob("*.xml"))[0], "pklot")}],
        "detection": {"model": str(MODEL_PATH), "device": "cpu", "image_size": 320, "tile_size": 0},
        "processing": {"snapshot_interval": 0.25},
        "database": {"lease_s": 10.0},
        "api": {"host": "127.0.0.1", "port": api_port},
        "upload": UPLOAD,
        "aws": {"region": "us-east-1", "data_bucket": s3.data_bucket,
                "metadata_bucket": s3.metadata_bucket, "s3_endpoint_url": s3.endpoint_url,
                "api_endpoint": receiver_url, "api_key": RECEIVER_API_KEY},
        "retention": {"min_free_bytes": 0},
    })


def _run_outage(
    tmp: Any, monkeypatch: pytest.MonkeyPatch, s3: SeaweedServer, receiver: Receiver
) -> OutageRun:
    """Run the stages, take the cloud away for OUTAGE_S, bring it back and let everything drain."""
    folder = replay_folder(sorted((PKLOT_DIR / SERIES).glob("*.jpg"))[:4], tmp / "replay")
    [api_port] = free_ports(1)
    api = f"http://127.0.0.1:{api_port}"
    settings = _device_config(tmp / "device.yaml", tmp / "data", folder, api_port, s3, receiver.url)
    add_deleted_jobs_audit(settings)
    stages = {name: StageProcess(settings.config_path, name, tmp / "logs") for name in STAGE_NAMES}
    parked_sql = "SELECT count(*) FROM jobs WHERE stage = 'upload' AND state = 'failed'"
    try:
        for stage in stages.values():
            stage.start()
        running = list(stages.values())
        wait_until(lambda: _counts(settings)["uploads"] >= 5, 120, "the first uploads", running)

        s3.stop()
        receiver.stop()
        away_from = time.time()
        before = _counts(settings)
        # The outage lasts OUTAGE_S, and at least until some job has used up its fast retries.
        wait_until(lambda: scalar(settings, parked_sql) > 0, MAX_OUTAGE_S, "a parked upload", running)
        health_parked = _get_json(f"{api}/health")
        queue_parked = _get_json(f"{api}/queue")
        wait_until(lambda: time.time() - away_from >= OUTAGE_S, OUTAGE_S + 5, "the outage", running)
        during = _counts(settings)
        health_late = _get_json(f"{api}/health")

        _restart_on_same_ports(s3, monkeypatch)
        receiver.start()
        back_at = time.time()
        wait_until(lambda: _get_json(f"{api}/health")["status"] == "healthy", 120, "health back to healthy",
                   running)
        wait_for_heartbeat(settings, stages["capture"])
        assert stages["capture"].terminate() == 0
        running = [stages[name] for name in ("detect", "upload", "api")]
        wait_until(lambda: scalar(settings, "SELECT count(*) FROM jobs WHERE state != 'done'") == 0
                   and scalar(settings, "SELECT count(*) FROM jobs WHERE stage = 'upload'")
                   == scalar(settings, "SELECT count(*) FROM snapshots"), 120, "the backlog drained", running)
        exit_codes = {name: stage.terminate() for name, stage in stages.items()}
    finally:
        for stage in stages.values():
            stage.terminate()
    failures = [
        event for event in stages["upload"].events("upload_failed") if away_from <= _at(event) <= back_at
    ]
    return OutageRun(
        settings, s3, receiver.received(), stages, exit_codes, away_from, back_at, before, during,
        health_parked, health_late, queue_parked, failures,
    )


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRun]:
    """One outage run of the four stages against an S3 server and a receiver of this module's own."""
    tmp = tmp_path_factory.mktemp("outage")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Sign with the test server's key pair through boto's default chain, and nothing else.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3 = SeaweedServer(tmp / "seaweed", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
        with s3, Receiver(tmp / "receiver" / "received.db", RECEIVER_API_KEY) as receiver:
            s3.create_buckets()
            yield _run_outage(tmp, monkeypatch, s3, receiver)


def test_all_stages_ran_through_the_outage_and_stopped_cleanly(outage: OutageRun) -> None:
    assert outage.exit_codes == dict.fromkeys(STAGE_NAMES, 0)
    assert {name: stage.starts for name, stage in outage.stages.items()} == dict.fromkeys(STAGE_NAMES, 1)


def test_while_away_capture_and_detect_carry_on_and_the_upload_backlog_grows(outage: OutageRun) -> None:
    before, during = outage.before, outage.during
    assert during["snapshots"] >= before["snapshots"] + 20
    assert during["detections"] >= before["detections"] + 20
    assert during["uploads"] <= before["uploads"] + UPLOAD["batch_size"]
    assert during["backlog"] >= before["backlog"] + 20


def test_health_says_degraded_and_why_and_queue_lists_the_parked_jobs(outage: OutageRun) -> None:
    for document in (outage.health_parked, outage.health_late):
        assert document["status"] == "degraded"
        assert document["processes"]["capture"]["state"] == "ok"
        assert document["processes"]["detect"]["state"] == "ok"
        parked = [reason for reason in document["reasons"] if PARKED_REASON in reason]
        assert parked and "EndpointConnectionError" in parked[0]
        assert document["uploads"]["parked"] >= 1
    parked_jobs = outage.queue_parked["parked"]
    assert parked_jobs
    assert {(job["stage"], job["error_kind"]) for job in parked_jobs} == {("upload", "transient")}
    assert all(job["attempts"] >= UPLOAD["max_retries"] and job["last_error"] for job in parked_jobs)


def test_each_job_backs_off_capped_with_jitter_then_parks_and_keeps_a_slow_schedule(
    outage: OutageRun,
) -> None:
    failures = outage.failures
    assert len(failures) >= 20
    assert {event["error_kind"] for event in failures} == {"transient"}
    fast = [event for event in failures if not event["parked"]]
    parked = [event for event in failures if event["parked"]]
    assert fast and parked
    assert all(event["attempts"] < UPLOAD["max_retries"] for event in fast)
    assert all(event["attempts"] >= UPLOAD["max_retries"] for event in parked)
    lowest_s = UPLOAD["retry_base_s"] * 0.5 - 0.05
    assert all(lowest_s <= event["retry_in_s"] <= UPLOAD["retry_cap_s"] for event in fast)
    assert {event["retry_in_s"] for event in parked} == {UPLOAD["parked_retry_s"]}
    second_tries = [event["retry_in_s"] for event in fast if event["attempts"] == 2]
    assert len(set(second_tries)) > 1, "retry delays carry jitter"

    by_job: dict[int, list[float]] = defaultdict(list)
    for event in failures:
        by_job[event["job_id"]].append(_at(event))
    # Per job: the fast retries, then one try per parked_retry_s, however long the outage.
    most_per_job = UPLOAD["max_retries"] + math.ceil(outage.outage_s / UPLOAD["parked_retry_s"]) + 1
    assert max(len(times) for times in by_job.values()) <= most_per_job
    for times in by_job.values():
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert all(gap >= lowest_s for gap in gaps), "no tight retry loop for one job"


def test_the_upload_stage_makes_a_bounded_number_of_attempts_per_minute_whatever_the_backlog(
    outage: OutageRun,
) -> None:
    # While every round fails, the stage should back off as a whole (capped at retry_cap_s) rather than
    # claim a fresh batch every poll: then at most one batch is tried per half cap, plus the ramp-up.
    ramp_rounds = math.ceil(math.log2(UPLOAD["retry_cap_s"] / UPLOAD["retry_base_s"])) + 2
    most_rounds = outage.outage_s / (0.5 * UPLOAD["retry_cap_s"]) + ramp_rounds
    attempts_per_minute = len(outage.failures) / (outage.outage_s / 60.0)
    bound_per_minute = UPLOAD["batch_size"] * most_rounds / (outage.outage_s / 60.0)
    assert attempts_per_minute <= bound_per_minute, (
        f"{len(outage.failures)} failed upload attempts in {outage.outage_s:.0f} s "
        f"({attempts_per_minute:.0f}/min, bound {bound_per_minute:.0f}/min)"
    )


def test_after_the_outage_everything_is_delivered_exactly_once_and_no_job_was_dropped(
    outage: OutageRun,
) -> None:
    total = outage.count("SELECT count(*) FROM snapshots")
    assert total >= outage.during["snapshots"]
    assert outage.count("SELECT count(*) FROM detections") == total
    assert outage.count("SELECT count(*) FROM uploads WHERE posted = 1") == total
    assert outage.count("SELECT count(*) FROM jobs WHERE stage = 'detect' AND state = 'done'") == total
    assert outage.count("SELECT count(*) FROM jobs WHERE stage = 'upload' AND state = 'done'") == total
    assert outage.count("SELECT count(*) FROM jobs_deleted") == 0
    assert outage.count("SELECT count(*) FROM jobs WHERE stage = 'upload' AND attempts > ?",
                        UPLOAD["max_retries"]) > 0, "jobs parked during the outage were delivered after it"

    settings, s3 = outage.settings, outage.s3
    keys = snapshot_keys(settings)
    images = device_objects(s3, s3.data_bucket, "snapshots/", settings.device_id)
    metadata = device_objects(s3, s3.metadata_bucket, "metadata/", settings.device_id)
    assert sorted(images) == sorted(image for image, _, _ in keys.values())
    assert sorted(metadata) == sorted(meta for _, meta, _ in keys.values())
    records = [record for record in outage.received if record["device_id"] == settings.device_id]
    expected_records = sorted(key for _, _, key in keys.values())
    assert sorted(record["idempotency_key"] for record in records) == expected_records
    assert [tuple(row) for row in read_rows(settings, "PRAGMA integrity_check")] == [("ok",)]


@pytest.mark.usefixtures("s3_credentials")
def test_a_permanent_refusal_parks_every_job_once_and_the_running_stage_does_not_spin(
    tmp_path: Any, s3_server: SeaweedServer, receiver: Receiver
) -> None:
    frames = sorted((PKLOT_DIR / SERIES).glob("*.jpg"))[:12]
    gate = IngestGate(receiver.url)
    settings = write_config(tmp_path / "device.yaml", {
        "device_id": f"refused-{uuid.uuid4().hex[:8]}",
        "data_dir": str(tmp_path / "data"),
        "upload": {**UPLOAD, "parked_retry_s": 900.0},
        "aws": {"region": "us-east-1", "data_bucket": s3_server.data_bucket,
                "metadata_bucket": s3_server.metadata_bucket, "s3_endpoint_url": s3_server.endpoint_url,
                "api_endpoint": gate.url, "api_key": "not-the-key"},
        "retention": {"min_free_bytes": 0},
    })
    seeded = seed_detected_snapshots(settings, frames)
    upload = StageProcess(settings.config_path, "upload", tmp_path / "logs").start()
    parked_sql = "SELECT count(*) FROM jobs WHERE state = 'failed' AND error_kind = 'permanent'"
    try:
        wait_until(lambda: scalar(settings, parked_sql) == len(seeded), 60, "every job parked", [upload])
        requests = gate.posts
        time.sleep(5.0)
        later = gate.posts
        assert upload.alive()
    finally:
        code = upload.terminate()
        gate.close()

    assert code == 0

    batches = math.ceil(len(seeded) / UPLOAD["batch_size"])
    assert requests == later == batches
    jobs = read_rows(settings, "SELECT attempts, last_error FROM jobs")
    assert [row["attempts"] for row in jobs] == [1] * len(seeded)
    assert all("401" in row["last_error"] and "not-the-key" not in row["last_error"] for row in jobs)
    failures = upload.events("upload_failed")
    assert len(failures) == len(seeded)
    assert {(event["error_kind"], event["parked"], event["retry_in_s"]) for event in failures} == {
        ("permanent", True, 900.0)}
    assert receiver.received() == []
