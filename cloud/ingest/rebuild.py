"""Checking an ingest batch against the schema and rebuilding each record's full zone state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).with_name("batch.schema.json")


@dataclass(frozen=True)
class StoredRecord:
    """One snapshot's rebuilt full state, as the cloud keeps it."""

    device_id: str
    camera_id: str
    captured_at: float
    key: str
    batch_key: str
    kind: str
    zones: dict[str, bool]
    occupied_count: int
    spaces: int
    vehicles: int | None
    received_at: float

    @property
    def sort_key(self) -> str:
        """The table's sort key: capture time (ISO 8601 UTC) then camera id."""
        return sort_key(self.captured_at, self.camera_id)


class RecordStore(Protocol):
    """Where rebuilt records go: DynamoDB in the cloud, SQLite in the test receiver."""

    def get_zones(self, device_id: str, camera_id: str, captured_at: float) -> dict[str, bool] | None:
        """The full zone state stored for one record, or None when there is no such record."""

    def put_record(self, record: StoredRecord) -> bool:
        """Store a record unless its key is there already; return False for a duplicate."""


class BatchRejected(Exception):
    """A batch the cloud will not record: 400 for a malformed one, 409 when a delta has no base."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class IngestOutcome:
    """What one accepted batch did."""

    batch_key: str
    accepted: int
    duplicates: int

    def as_json(self) -> dict[str, Any]:
        """The 200 response body."""
        return {"batch_key": self.batch_key, "accepted": self.accepted, "duplicates": self.duplicates}


def sort_key(captured_at: float, camera_id: str) -> str:
    """`<capture time ISO 8601 UTC, microseconds>#<camera_id>`, sorting by time within a device."""
    moment = datetime.fromtimestamp(captured_at, UTC).isoformat(timespec="microseconds")
    return f"{moment.replace('+00:00', 'Z')}#{camera_id}"


@cache
def batch_validator() -> Draft202012Validator:
    """The validator for the batch schema shipped beside this module."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_problem(batch: Any) -> str | None:
    """Why a batch breaks the schema (the first problem, with where), or None when it is valid."""
    errors = sorted(batch_validator().iter_errors(batch), key=lambda error: list(error.absolute_path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(part) for part in first.absolute_path) or "(top level)"
    return f"{where}: {first.message}"


def _check_record_identity(device_id: str, record: dict[str, Any]) -> None:
    """A record's key must name its own device and camera."""
    prefix = f"{device_id}/{record['camera_id']}/"
    if not record["key"].startswith(prefix):
        raise BatchRejected(400, f"record {record['key']!r} does not start with {prefix!r}")
    if set(record["occupied"]) & set(record["vacant"]):
        raise BatchRejected(400, f"record {record['key']!r} lists a zone as both occupied and vacant")


def rebuild_zones(record: dict[str, Any], base: dict[str, bool] | None) -> dict[str, bool]:
    """The full state after a record: a keyframe's own lists, or the base with a delta's changes."""
    zones = {} if record["kind"] == "keyframe" else dict(base or {})
    zones.update(dict.fromkeys(record["occupied"], True))
    zones.update(dict.fromkeys(record["vacant"], False))
    return zones


ZoneStates = dict[tuple[str, float], dict[str, bool]]


def _base_zones(
    store: RecordStore, device_id: str, record: dict[str, Any], in_batch: ZoneStates
) -> dict[str, bool] | None:
    """The state a delta applies to, from earlier in this batch or from the store; None for keyframes."""
    if record["kind"] == "keyframe":
        return None
    where = (record["camera_id"], float(record["base_at"]))
    base = in_batch.get(where)
    if base is None:
        base = store.get_zones(device_id, *where)
    if base is None:
        reason = f"record {record['key']!r}: no base record at {record['base_at']}; send a keyframe"
        raise BatchRejected(409, reason)
    return base


def ingest_batch(
    batch: Any, store: RecordStore, now: float, idempotency_key: str | None = None
) -> IngestOutcome:
    """Validate a batch, rebuild every record's full state and store each record once."""
    problem = schema_problem(batch)
    if problem is not None:
        raise BatchRejected(400, f"payload does not match the batch schema: {problem}")
    if idempotency_key is not None and idempotency_key != batch["batch_key"]:
        raise BatchRejected(400, "Idempotency-Key header differs from batch_key")
    device_id = batch["device_id"]
    if not batch["batch_key"].startswith(f"{device_id}/"):
        raise BatchRejected(400, "batch_key does not start with the device id")

    in_batch: ZoneStates = {}
    accepted = duplicates = 0
    for record in batch["records"]:
        _check_record_identity(device_id, record)
        zones = rebuild_zones(record, _base_zones(store, device_id, record, in_batch))
        if sum(zones.values()) != record["occupied_count"] or len(zones) != record["spaces"]:
            raise BatchRejected(
                409, f"record {record['key']!r}: rebuilt state does not match its counts; send a keyframe"
            )
        stored = StoredRecord(
            device_id=device_id, camera_id=record["camera_id"], captured_at=float(record["captured_at"]),
            key=record["key"], batch_key=batch["batch_key"], kind=record["kind"], zones=zones,
            occupied_count=record["occupied_count"], spaces=record["spaces"],
            vehicles=record.get("vehicles"), received_at=now,
        )
        if store.put_record(stored):
            accepted += 1
        else:
            duplicates += 1
        in_batch[(stored.camera_id, stored.captured_at)] = zones
    return IngestOutcome(batch["batch_key"], accepted, duplicates)
