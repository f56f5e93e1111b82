"""Uploading one snapshot: JPEG and metadata to S3, result to the ingest endpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from shared.config import Settings
from uploader.errors import SnapshotUnavailable
from uploader.ingest import detections_url, post_detection
from uploader.payload import SnapshotUpload, encode_json
from uploader.s3 import put_snapshot_image, put_snapshot_metadata


@dataclass(frozen=True)
class UploadResult:
    """What one finished upload wrote, as recorded in the uploads table."""

    image_key: str
    metadata_key: str
    image_bytes: int
    metadata_bytes: int
    posted: bool


class SnapshotUploader:
    """Sends snapshots through one shared S3 client and one shared HTTP session."""

    def __init__(self, settings: Settings, s3: Any, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.s3 = s3
        self.http = http
        endpoint = settings.aws.api_endpoint
        self.ingest_url = detections_url(endpoint) if endpoint else None
        secret = settings.aws.api_key
        self._api_key = secret.get_secret_value() if secret is not None else None

    async def _read_image(self, snapshot: SnapshotUpload) -> bytes:
        """The JPEG's bytes, read off the event loop."""
        path = self.settings.data_dir / snapshot.path
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as error:
            raise SnapshotUnavailable(f"snapshot {snapshot.snapshot_id} image is missing: {path}") from error

    async def upload(self, snapshot: SnapshotUpload, upload_time: float) -> UploadResult:
        """Put both objects, then POST the result (skipped when no endpoint is configured)."""
        compress = self.settings.upload.compression
        image = await self._read_image(snapshot)
        metadata = encode_json(snapshot.result_json, compress)
        aws = self.settings.aws

        await put_snapshot_image(self.s3, aws.data_bucket, snapshot, image)
        await put_snapshot_metadata(self.s3, aws.metadata_bucket, snapshot, metadata, compress)

        if self.ingest_url is not None:
            payload = snapshot.ingest_payload(upload_time)
            await post_detection(
                self.http, self.ingest_url, self._api_key, snapshot.idempotency_key, payload, compress
            )

        return UploadResult(
            image_key=snapshot.image_key,
            metadata_key=snapshot.metadata_key,
            image_bytes=len(image),
            metadata_bytes=len(metadata),
            posted=self.ingest_url is not None,
        )
