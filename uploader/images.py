"""Which snapshots' JPEGs go to the data bucket, and at what JPEG quality."""

from __future__ import annotations

import io

from PIL import Image

from shared.config import UploadSettings
from uploader.delta import PlannedRecord


def image_wanted(record: PlannedRecord, settings: UploadSettings) -> bool:
    """upload.images: all; changed (occupancy differs from the last record sent); every_nth per camera."""
    if settings.images == "all":
        return True
    if settings.images == "changed":
        return record.changed
    return record.after.sequence % settings.image_every_n == 0


def reencode_jpeg(jpeg: bytes, quality: int) -> bytes:
    """The JPEG re-encoded at `quality`, or the original when that is not smaller."""
    with Image.open(io.BytesIO(jpeg)) as image:
        output = io.BytesIO()
        image.convert("RGB").save(output, format="JPEG", quality=quality, optimize=True)
    smaller = output.getvalue()
    return smaller if len(smaller) < len(jpeg) else jpeg
