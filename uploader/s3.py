"""The one long-lived S3 client of the upload stage, and the object writes it makes."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from shared.config import Settings, UploadSettings
from shared.logging import get_logger
from uploader.payload import SnapshotUpload

JPEG_CONTENT_TYPE = "image/jpeg"
JSON_CONTENT_TYPE = "application/json"

log = get_logger(__name__)


def s3_client(settings: Settings) -> AbstractAsyncContextManager[Any]:
    """An aiobotocore S3 client (enter it once, at start); credentials come from boto's default chain.

    The chain (environment, profile, SSO, container or instance role) yields refreshable credentials
    where the source expires them, and botocore renews those before they lapse.
    """
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


async def _put_multipart(client: Any, part_bytes: int, body: bytes, **object_args: Any) -> None:
    """A multipart upload of `body`; on any error the upload is aborted so no parts are left billed."""
    created = await client.create_multipart_upload(**object_args)
    upload_id = created["UploadId"]
    bucket, key = object_args["Bucket"], object_args["Key"]
    try:
        parts = []
        for number, offset in enumerate(range(0, len(body), part_bytes), start=1):
            answer = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                Body=body[offset:offset + part_bytes],
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        log.warning("multipart_aborted", bucket=bucket, key=key, upload_id=upload_id)
        raise


async def put_object(client: Any, upload: UploadSettings, body: bytes, **object_args: Any) -> None:
    """One PutObject, or a multipart upload from multipart_threshold_bytes on."""
    if len(body) >= upload.multipart_threshold_bytes:
        await _put_multipart(client, upload.multipart_part_bytes, body, **object_args)
        return
    await client.put_object(Body=body, **object_args)


async def put_snapshot_image(
    client: Any, upload: UploadSettings, bucket: str, snapshot: SnapshotUpload, body: bytes
) -> None:
    """Store the JPEG under its dated key with device, camera and capture time as metadata."""
    await put_object(
        client, upload, body, Bucket=bucket, Key=snapshot.image_key, ContentType=JPEG_CONTENT_TYPE,
        Metadata=snapshot.object_metadata(),
    )


async def put_snapshot_metadata(
    client: Any, upload: UploadSettings, bucket: str, snapshot: SnapshotUpload, body: bytes, compressed: bool
) -> None:
    """Store the detection JSON under its dated key, marked gzip-encoded when compressed."""
    extra = {"ContentEncoding": "gzip"} if compressed else {}
    await put_object(
        client, upload, body, Bucket=bucket, Key=snapshot.metadata_key, ContentType=JSON_CONTENT_TYPE,
        Metadata={"device_id": snapshot.device_id, "camera_id": snapshot.camera_id}, **extra,
    )
