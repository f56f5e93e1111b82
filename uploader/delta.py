"""Turning a camera's snapshots into ingest records: a keyframe with the full state, then deltas."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uploader.payload import SnapshotUpload

KEYFRAME = "keyframe"
DELTA = "delta"


@dataclass(frozen=True)
class SentState:
    """The last record of a camera that the cloud acknowledged: the base of the next delta."""

    camera_id: str
    snapshot_id: int
    record_key: str
    captured_at: float
    zones: dict[str, bool]
    since_keyframe: int
    sequence: int
    needs_keyframe: bool = False


@dataclass(frozen=True)
class PlannedRecord:
    """One snapshot's record and what sending it makes the camera's sent state."""

    snapshot: SnapshotUpload
    body: dict[str, Any]
    after: SentState
    changed: bool

    @property
    def kind(self) -> str:
        """keyframe or delta."""
        return str(self.body["kind"])


@dataclass(frozen=True)
class KeyframeRules:
    """When a camera's next record must carry the full state."""

    every: int
    gap_s: float


# Whether the device holds a snapshot of the camera captured strictly between two times.
SkippedBetween = Callable[[str, float, float], bool]


def zone_states(result: dict[str, Any]) -> dict[str, bool]:
    """zone id -> occupied, from a detection result."""
    return {str(zone["zone_id"]): bool(zone["occupied"]) for zone in result.get("zones", [])}


def keyframe_reason(
    previous: SentState | None, zones: dict[str, bool], captured_at: float, rules: KeyframeRules,
    skipped: bool,
) -> str | None:
    """Why this record must be a keyframe, or None when a delta on `previous` rebuilds it."""
    if previous is None:
        return "first"
    if previous.needs_keyframe:
        return "resync"
    if captured_at <= previous.captured_at:
        return "out_of_order"
    if set(zones) != set(previous.zones):
        return "zones_changed"
    if previous.since_keyframe + 1 >= rules.every:
        return "period"
    if captured_at - previous.captured_at > rules.gap_s or skipped:
        return "gap"
    return None


def record_body(
    snapshot: SnapshotUpload, zones: dict[str, bool], previous: SentState | None, keyframe: bool,
    vehicles: int,
) -> dict[str, Any]:
    """The record as the schema describes it: full lists for a keyframe, changes only for a delta."""
    if keyframe or previous is None:
        occupied = [zone for zone, value in zones.items() if value]
        vacant = [zone for zone, value in zones.items() if not value]
    else:
        occupied = [zone for zone, value in zones.items() if value and not previous.zones.get(zone)]
        vacant = [zone for zone, value in zones.items() if not value and previous.zones.get(zone)]
    body: dict[str, Any] = {
        "key": snapshot.idempotency_key,
        "camera_id": snapshot.camera_id,
        "captured_at": snapshot.captured_at,
        "kind": KEYFRAME if keyframe else DELTA,
    }
    if not keyframe and previous is not None:
        body["base_at"] = previous.captured_at
    body.update({
        "occupied": occupied, "vacant": vacant, "occupied_count": sum(zones.values()),
        "spaces": len(zones), "vehicles": vehicles,
    })
    return body


def plan_camera(
    snapshots: list[SnapshotUpload], previous: SentState | None, rules: KeyframeRules,
    skipped_between: SkippedBetween,
) -> list[PlannedRecord]:
    """Records for one camera's snapshots in capture order, each a delta on the one before if it can be."""
    planned: list[PlannedRecord] = []
    for snapshot in sorted(snapshots, key=lambda item: (item.captured_at, item.snapshot_id)):
        result = json.loads(snapshot.result_json)
        zones = zone_states(result)
        skipped = previous is not None and skipped_between(
            snapshot.camera_id, previous.captured_at, snapshot.captured_at
        )
        reason = keyframe_reason(previous, zones, snapshot.captured_at, rules, skipped)
        keyframe = reason is not None
        body = record_body(snapshot, zones, previous, keyframe, len(result.get("vehicles", [])))
        after = SentState(
            camera_id=snapshot.camera_id,
            snapshot_id=snapshot.snapshot_id,
            record_key=snapshot.idempotency_key,
            captured_at=snapshot.captured_at,
            zones=zones,
            since_keyframe=0 if keyframe else previous.since_keyframe + 1,  # type: ignore[union-attr]
            sequence=0 if previous is None else previous.sequence + 1,
        )
        changed = previous is None or zones != previous.zones
        planned.append(PlannedRecord(snapshot, body, after, changed))
        previous = after
    return planned
