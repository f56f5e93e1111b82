"""The one long-lived S3 client of the upload stage, and the two object writes it makes."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from shared.config import Settings
from uploader.payload import SnapshotUpload

JPEG_CONTENT_TYPE = "image/jpeg"
JSON_CONTENT_TYPE = "application/json"


def s3_client(settings: Settings) -> AbstractAsyncContextManager[Any]:
    """An aiobotocore S3 client (enter it once, at start); credentials come from boto's default chain."""
    upload = settings.upload
    config = AioConfig(
        retries={"mode": "standard"},
        request_checksum_calculation=upload.checksum,
        response_checksum_validation=upload.checksum,
        connect_timeout=upload.request_timeout_s,
        read_timeout=upload.request_timeout_s,
        max_pool_connections=max(10, upload.max_concurrent * 2),
    )
    return get_session().create_client(
        "s3",
        region_name=settings.aws.region,
        endpoint_url=settings.aws.s3_endpoint_url,
        config=config,
    )


async def put_snapshot_image(client: Any, bucket: str, snapshot: SnapshotUpload, body: bytes) -> None:
    """Store the JPEG under its dated key with device, camera and capture time as metadata."""
    await client.put_object(
        Bucket=bucket,
        Key=snapshot.image_key,
        Body=body,
        ContentType=JPEG_CONTENT_TYPE,
        Metadata=snapshot.object_metadata(),
    )


async def put_snapshot_metadata(
    client: Any, bucket: str, snapshot: SnapshotUpload, body: bytes, compressed: bool
) -> None:
    """Store the detection JSON under its dated key, marked gzip-encoded when compressed."""
    extra = {"ContentEncoding": "gzip"} if compressed else {}
    await client.put_object(
        Bucket=bucket,
        Key=snapshot.metadata_key,
        Body=body,
        ContentType=JSON_CONTENT_TYPE,
        Metadata={"device_id": snapshot.device_id, "camera_id": snapshot.camera_id},
        **extra,
    )
