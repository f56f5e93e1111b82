"""One ingest request: up to batch_size records, a content-derived batch key, compact gzip JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from uploader.payload import encode_json

SCHEMA_VERSION = 1
_KEY_HEX_CHARS = 24


def compact_json(document: Any) -> str:
    """JSON without spaces, keys in the order given."""
    return json.dumps(document, separators=(",", ":"))


def batch_key(device_id: str, records: list[dict[str, Any]]) -> str:
    """`<device_id>/batch/<hash of the records>`: a resent batch of the same records has the same key."""
    digest = hashlib.sha256(compact_json(records).encode("utf-8")).hexdigest()
    return f"{device_id}/batch/{digest[:_KEY_HEX_CHARS]}"


def build_batch(device_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The POST /detections body for these records (see cloud/ingest/batch.schema.json)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "batch_key": batch_key(device_id, records),
        "device_id": device_id,
        "records": records,
    }


def encode_batch(batch: dict[str, Any], compress: bool) -> tuple[bytes, int]:
    """The request body (gzipped when asked) and the uncompressed size in bytes."""
    text = compact_json(batch)
    return encode_json(text, compress), len(text.encode("utf-8"))
