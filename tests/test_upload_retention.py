"""Snapshots whose JPEG retention deleted before or during upload: the result still reaches the cloud."""

# ruff: noqa: F811  (the shared fixtures below are imported from test_upload)

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError
from structlog.testing import capture_logs
from test_upload import (  # noqa: F401
    Seeded,
    data_dir,
    device_id,
    execute,
    frames,
    jobs_of,
    make_settings,
    seed_snapshots,
)

from shared.config import Settings
from shared.db import open_database
from shared.retention import enforce_retention
from testbed.seaweed import SeaweedServer
from uploader.main import run
from uploader.payload import SnapshotUpload
from uploader.worker import SnapshotUploader

pytestmark = pytest.mark.usefixtures("s3_credentials")


def short_of_space_once(settings: Settings) -> Callable[[], int]:
    """A free-space probe one byte short of the floor on its first call, plenty after it."""
    calls = [0]

    def probe() -> int:
        calls[0] += 1
        return settings.retention.min_free_bytes - 1 if calls[0] == 1 else 10**15

    return probe


def evict_oldest(settings: Settings) -> None:
    """One real retention pass that, short of space, evicts the oldest detected but unuploaded snapshot."""
    connection = open_database(settings.database_path)
    try:
        result = enforce_retention(connection, settings, free_bytes=short_of_space_once(settings))
    finally:
        connection.close()
    assert result.deleted_unuploaded == 1


def image_exists(s3_server: SeaweedServer, key: str) -> bool:
    """Whether the data bucket holds an object at `key`."""
    try:
        s3_server.client().head_object(Bucket=s3_server.data_bucket, Key=key)
    except ClientError as error:
        assert error.response["Error"]["Code"] in {"404", "NoSuchKey"}
        return False
    return True


def stored_metadata(s3_server: SeaweedServer, snapshot: Seeded) -> dict:
    """The metadata JSON the upload stored for a snapshot, decompressed."""
    body = s3_server.client().get_object(
        Bucket=s3_server.metadata_bucket, Key=f"metadata/{snapshot.day}/{snapshot.stem}.json"
    )["Body"].read()
    return json.loads(gzip.decompress(body))


def uploads_by_snapshot(settings: Settings) -> dict[int, sqlite3.Row]:
    """The uploads rows by snapshot id."""
    return {row["snapshot_id"]: row for row in execute(settings, "SELECT * FROM uploads")}


def assert_delivered_without_image(
    settings: Settings, s3_server: SeaweedServer, receiver, device_id: str, snapshot: Seeded
) -> None:
    """No JPEG in S3, the metadata JSON there, the record at the receiver, an uploads row with no image."""
    assert not image_exists(s3_server, f"snapshots/{snapshot.day}/{snapshot.name}")
    assert stored_metadata(s3_server, snapshot) == snapshot.result
    received = {record["idempotency_key"]: record for record in receiver.received()}
    record = received[f"{device_id}/cam0/{snapshot.stem}"]
    assert record["zones"] == {"1": True, "2": False}
    row = uploads_by_snapshot(settings)[snapshot.snapshot_id]
    assert (row["image_key"], row["image_bytes"], row["posted"]) == ("", 0, 1)
    assert row["metadata_key"] == f"metadata/{snapshot.day}/{snapshot.stem}.json"
    assert row["metadata_bytes"] > 0


def test_a_snapshot_evicted_by_retention_before_upload_is_delivered_without_its_image(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    evicted, kept = seed_snapshots(data_dir, frames[:2], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    evict_oldest(settings)
    assert not (data_dir / evicted.path).exists()
    assert execute(settings, "SELECT deleted_at FROM snapshots WHERE id = ?", evicted.snapshot_id)[0][0]

    with capture_logs() as events:
        assert run(settings, once=True) == 0

    assert [job["state"] for job in jobs_of(settings)] == ["done", "done"]
    assert_delivered_without_image(settings, s3_server, receiver, device_id, evicted)
    kept_key = f"snapshots/{kept.day}/{kept.name}"
    image = s3_server.client().get_object(Bucket=s3_server.data_bucket, Key=kept_key)
    assert image["Body"].read() == kept.jpeg
    assert uploads_by_snapshot(settings)[kept.snapshot_id]["image_bytes"] == len(kept.jpeg)
    without = [event for event in events if event["event"] == "upload_without_image"]
    assert [(event["snapshot_id"], event["reason"]) for event in without] == [
        (evicted.snapshot_id, "deleted_by_retention")
    ]
    [images] = execute(settings, "SELECT * FROM upload_bytes WHERE destination = 'images'")
    assert (images["requests"], images["wire_bytes"]) == (1, len(kept.jpeg))


def test_a_snapshot_evicted_while_its_upload_runs_is_delivered_without_its_image(
    tmp_path, data_dir, frames, device_id, s3_server, receiver, monkeypatch
):
    [snapshot] = seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    read_image = SnapshotUploader._read_image

    async def evicted_first(self: SnapshotUploader, loaded: SnapshotUpload) -> bytes:
        # The job was loaded with deleted_at unset; retention evicts it before the JPEG is read.
        assert not loaded.deleted
        evict_oldest(settings)
        return await read_image(self, loaded)

    monkeypatch.setattr(SnapshotUploader, "_read_image", evicted_first)
    with capture_logs() as events:
        assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert_delivered_without_image(settings, s3_server, receiver, device_id, snapshot)
    assert [event["snapshot_id"] for event in events if event["event"] == "upload_without_image"] == [
        snapshot.snapshot_id
    ]


@pytest.mark.parametrize("when", ["before_upload", "during_upload"])
def test_a_missing_image_not_deleted_by_retention_stays_parked_as_permanent(
    tmp_path, data_dir, frames, device_id, s3_server, receiver, monkeypatch, when
):
    [snapshot] = seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    if when == "before_upload":
        (data_dir / snapshot.path).unlink()
    else:
        read_image = SnapshotUploader._read_image

        async def vanished_first(self: SnapshotUploader, loaded: SnapshotUpload) -> bytes:
            (data_dir / snapshot.path).unlink()
            return await read_image(self, loaded)

        monkeypatch.setattr(SnapshotUploader, "_read_image", vanished_first)

    with capture_logs() as events:
        assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["error_kind"]) == ("failed", "permanent")
    assert "image is missing" in job["last_error"]
    assert execute(settings, "SELECT * FROM uploads") == []
    assert receiver.received() == []
    assert s3_server.count_objects(s3_server.metadata_bucket, f"metadata/{snapshot.day}/{device_id}_") == 0
    assert not [event for event in events if event["event"] == "upload_without_image"]


def test_a_deleted_snapshot_without_a_detection_result_stays_parked_as_permanent(
    tmp_path, data_dir, frames, device_id, s3_server, receiver
):
    [snapshot] = seed_snapshots(data_dir, frames[:1], device_id)
    settings = make_settings(tmp_path, s3_server, receiver.url, receiver.api_key, device_id)
    execute(settings, "DELETE FROM detections WHERE snapshot_id = ?", snapshot.snapshot_id)
    execute(settings, "UPDATE snapshots SET deleted_at = 1 WHERE id = ?", snapshot.snapshot_id)
    (data_dir / snapshot.path).unlink()

    assert run(settings, once=True) == 0

    [job] = jobs_of(settings)
    assert (job["state"], job["error_kind"]) == ("failed", "permanent")
    assert "no detection result" in job["last_error"]
    assert receiver.received() == []
