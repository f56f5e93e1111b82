"""What one snapshot upload is made of: its object keys, its idempotency key and its metadata JSON."""

from __future__ import annotations

import gzip
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from uploader.errors import SnapshotUnavailable

_SELECT = """
SELECT s.id AS snapshot_id, s.device_id, s.camera_id, s.captured_at, s.path, s.deleted_at,
       d.result_json
FROM snapshots AS s LEFT JOIN detections AS d ON d.snapshot_id = s.id
WHERE s.id = ?
"""


@dataclass(frozen=True)
class SnapshotUpload:
    """One snapshot with its detection result, ready to be uploaded; `deleted`: retention removed its JPEG."""

    snapshot_id: int
    device_id: str
    camera_id: str
    captured_at: float
    path: str
    result_json: str
    deleted: bool = False

    @property
    def file_name(self) -> str:
        """The JPEG's file name, e.g. dev_cam0_20120913T070750_000000Z.jpg."""
        return Path(self.path).name

    @property
    def stem(self) -> str:
        """The file name without .jpg."""
        return Path(self.path).stem

    @property
    def date_prefix(self) -> str:
        """YYYY/MM/DD of captured_at in UTC."""
        return datetime.fromtimestamp(self.captured_at, UTC).strftime("%Y/%m/%d")

    @property
    def image_key(self) -> str:
        """Key in the data bucket."""
        return f"snapshots/{self.date_prefix}/{self.file_name}"

    @property
    def metadata_key(self) -> str:
        """Key in the metadata bucket."""
        return f"metadata/{self.date_prefix}/{self.stem}.json"

    @property
    def idempotency_key(self) -> str:
        """The Idempotency-Key header: device/camera/file stem, the same on every retry."""
        return f"{self.device_id}/{self.camera_id}/{self.stem}"

    @property
    def captured_at_iso(self) -> str:
        """captured_at as ISO 8601 UTC with a Z suffix."""
        return iso_utc(self.captured_at)

    def object_metadata(self) -> dict[str, str]:
        """S3 user metadata stored with the JPEG."""
        return {
            "device_id": self.device_id,
            "camera_id": self.camera_id,
            "captured_at": self.captured_at_iso,
        }


def iso_utc(unix_s: float) -> str:
    """A unix time as ISO 8601 UTC, e.g. 2012-09-13T07:07:50.000000Z."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_json(text: str, compress: bool) -> bytes:
    """UTF-8 bytes of a JSON text, gzipped (deterministically) when asked."""
    raw = text.encode("utf-8")
    return gzip.compress(raw, mtime=0) if compress else raw


def load_snapshot_upload(connection: sqlite3.Connection, snapshot_id: int) -> SnapshotUpload:
    """Read a snapshot and its detection result; raise SnapshotUnavailable if either is missing.

    A snapshot whose JPEG retention deleted (deleted_at set) still loads, marked `deleted`: its
    result is still owed to the cloud, only without the image.
    """
    row = connection.execute(_SELECT, (snapshot_id,)).fetchone()
    if row is None:
        raise SnapshotUnavailable(f"snapshot {snapshot_id} is not in the database")
    if row["result_json"] is None:
        raise SnapshotUnavailable(f"snapshot {snapshot_id} has no detection result")
    return SnapshotUpload(
        snapshot_id=row["snapshot_id"],
        device_id=row["device_id"],
        camera_id=row["camera_id"],
        captured_at=row["captured_at"],
        path=row["path"],
        result_json=row["result_json"],
        deleted=row["deleted_at"] is not None,
    )


def deleted_by_retention(connection: sqlite3.Connection, snapshot_id: int) -> bool:
    """Whether retention has marked the snapshot deleted (read afresh, e.g. after its file vanished)."""
    row = connection.execute("SELECT deleted_at FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    return row is not None and row["deleted_at"] is not None
