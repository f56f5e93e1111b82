"""What one round sends: each snapshot's objects to S3, then one batch of records to the ingest endpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from shared.config import Settings
from uploader.accounting import IMAGES, INGEST, METADATA, ByteTally
from uploader.batch import build_batch, encode_batch
from uploader.errors import ImageMissing
from uploader.images import reencode_jpeg
from uploader.ingest import detections_url, post_batch
from uploader.pacing import BandwidthCap
from uploader.payload import SnapshotUpload, encode_json
from uploader.s3 import put_snapshot_image, put_snapshot_metadata


@dataclass(frozen=True)
class ObjectsResult:
    """What the S3 writes of one snapshot stored, as recorded in the uploads table (no image: key '')."""

    image_key: str
    metadata_key: str
    image_bytes: int
    metadata_bytes: int
    tally: ByteTally


class SnapshotUploader:
    """Sends through one shared S3 client and one shared HTTP session, within the bandwidth cap."""

    def __init__(self, settings: Settings, s3: Any, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.s3 = s3
        self.http = http
        endpoint = settings.aws.api_endpoint
        self.ingest_url = detections_url(endpoint) if endpoint else None
        secret = settings.aws.api_key
        self._api_key = secret.get_secret_value() if secret is not None else None
        self.cap = BandwidthCap(settings.upload.max_bytes_per_s)

    async def _read_image(self, snapshot: SnapshotUpload) -> bytes:
        """The JPEG's bytes, read off the event loop."""
        path = self.settings.data_dir / snapshot.path
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as error:
            raise ImageMissing(f"snapshot {snapshot.snapshot_id} image is missing: {path}") from error

    async def _image_body(self, snapshot: SnapshotUpload) -> tuple[bytes, int]:
        """The JPEG to send (re-encoded at upload.jpeg_quality when set) and the original's size."""
        original = await self._read_image(snapshot)
        quality = self.settings.upload.jpeg_quality
        if quality is None:
            return original, len(original)
        return await asyncio.to_thread(reencode_jpeg, original, quality), len(original)

    async def put_objects(self, snapshot: SnapshotUpload, send_image: bool) -> ObjectsResult:
        """The JPEG (when the image policy wants it and retention kept it) and the metadata JSON.

        Raises ImageMissing when the JPEG of a snapshot not marked deleted is not on disk.
        """
        upload, aws = self.settings.upload, self.settings.aws
        tally = ByteTally()
        image_bytes = 0
        send_image = send_image and not snapshot.deleted
        if send_image:
            image, original_bytes = await self._image_body(snapshot)
            await self.cap.reserve(len(image))
            await put_snapshot_image(self.s3, upload, aws.data_bucket, snapshot, image)
            tally.add(IMAGES, original_bytes, len(image))
            image_bytes = len(image)
        elif not snapshot.deleted and not (self.settings.data_dir / snapshot.path).is_file():
            raise ImageMissing(f"snapshot {snapshot.snapshot_id} image is missing")

        metadata = encode_json(snapshot.result_json, upload.compression)
        await self.cap.reserve(len(metadata))
        await put_snapshot_metadata(
            self.s3, upload, aws.metadata_bucket, snapshot, metadata, upload.compression
        )
        tally.add(METADATA, len(snapshot.result_json.encode("utf-8")), len(metadata))
        return ObjectsResult(
            image_key=snapshot.image_key if send_image else "",
            metadata_key=snapshot.metadata_key,
            image_bytes=image_bytes,
            metadata_bytes=len(metadata),
            tally=tally,
        )

    async def post_records(self, records: list[dict[str, Any]]) -> ByteTally:
        """POST the records as one batch (nothing when no endpoint is configured)."""
        tally = ByteTally()
        if self.ingest_url is None or not records:
            return tally
        compress = self.settings.upload.compression
        batch = build_batch(self.settings.device_id, records)
        body, raw_bytes = encode_batch(batch, compress)
        await self.cap.reserve(len(body))
        await post_batch(self.http, self.ingest_url, self._api_key, batch["batch_key"], body, compress)
        tally.add(INGEST, raw_bytes, len(body))
        return tally
