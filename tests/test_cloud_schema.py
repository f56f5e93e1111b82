"""The ingest batch schema, the device's keyframe/delta records, and rebuilding full state from them."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from cloud.ingest.rebuild import batch_validator, rebuild_zones, schema_problem
from shared.pklot import read_pklot_spaces
from uploader.batch import build_batch, encode_batch
from uploader.bench import label_result
from uploader.delta import KeyframeRules, SentState, plan_camera, zone_states
from uploader.payload import SnapshotUpload

DEVICE = "lot-9"
CAMERA = "pucpr"
RULES = KeyframeRules(every=60, gap_s=900.0)


def _never_skipped(camera_id: str, after: float, before: float) -> bool:
    return False


def _snapshots(
    pklot_dir: Path, series: str = "PUCPR/Sunny", spacing_s: float = 300.0
) -> list[SnapshotUpload]:
    """A camera's snapshots with results made from the series' PKLot labels, spacing_s apart."""
    snapshots = []
    for index, jpeg in enumerate(sorted((pklot_dir / series).glob("*.jpg"))):
        captured_at = 1_347_519_000.0 + index * spacing_s
        name = f"{DEVICE}_{CAMERA}_{index:04d}.jpg"
        result = label_result(DEVICE, CAMERA, index + 1, captured_at, name,
                              read_pklot_spaces(jpeg.with_suffix(".xml")))
        snapshots.append(SnapshotUpload(index + 1, DEVICE, CAMERA, captured_at, f"snapshots/{name}",
                                        json.dumps(result)))
    return snapshots


def _replay(records: list[dict]) -> list[dict[str, bool]]:
    """Full state after each record, rebuilt the way the ingest function does."""
    states: dict[float, dict[str, bool]] = {}
    rebuilt = []
    for record in records:
        zones = rebuild_zones(record, states.get(record.get("base_at")))
        states[record["captured_at"]] = zones
        rebuilt.append(zones)
    return rebuilt


def test_schema_file_is_a_valid_json_schema():
    assert batch_validator().schema["$schema"].endswith("2020-12/schema")


def test_device_batches_of_real_labels_validate_and_rebuild_the_device_state(pklot_dir):
    snapshots = _snapshots(pklot_dir)
    planned = plan_camera(snapshots, None, RULES, _never_skipped)
    records = [record.body for record in planned]
    batch = build_batch(DEVICE, records)

    assert schema_problem(batch) is None
    assert [record["kind"] for record in records] == ["keyframe"] + ["delta"] * (len(records) - 1)
    device_states = [zone_states(json.loads(snapshot.result_json)) for snapshot in snapshots]
    assert _replay(records) == device_states
    for record, before, after in zip(records[1:], device_states[:-1], device_states[1:], strict=True):
        changed = {zone for zone in after if after[zone] != before[zone]}
        assert set(record["occupied"]) | set(record["vacant"]) == changed
        assert record["occupied_count"] == sum(after.values())


def test_deltas_are_much_smaller_than_keyframes_on_the_wire(pklot_dir):
    planned = plan_camera(_snapshots(pklot_dir), None, RULES, _never_skipped)
    keyframe, _ = encode_batch(build_batch(DEVICE, [planned[0].body]), compress=True)
    deltas, raw = encode_batch(build_batch(DEVICE, [record.body for record in planned[1:]]), compress=True)

    assert json.loads(gzip.decompress(deltas))["records"][0]["kind"] == "delta"
    assert len(deltas) < raw / 3
    assert len(deltas) / (len(planned) - 1) < len(keyframe) / 4


def test_batch_key_is_the_same_for_the_same_records_and_differs_otherwise(pklot_dir):
    records = [record.body for record in plan_camera(_snapshots(pklot_dir)[:3], None, RULES, _never_skipped)]
    key = build_batch(DEVICE, records)["batch_key"]
    assert key == build_batch(DEVICE, copy.deepcopy(records))["batch_key"]
    assert key != build_batch(DEVICE, records[:2])["batch_key"]
    assert key.startswith(f"{DEVICE}/batch/")


def _state(snapshot: SnapshotUpload, **changes) -> SentState:
    base = SentState(CAMERA, snapshot.snapshot_id, snapshot.idempotency_key, snapshot.captured_at,
                     zone_states(json.loads(snapshot.result_json)), since_keyframe=0, sequence=0)
    return SentState(**{**base.__dict__, **changes})


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("chained", "delta"),
        ("needs_keyframe", "keyframe"),
        ("period_reached", "keyframe"),
        ("silent_past_gap", "keyframe"),
        ("snapshot_skipped", "keyframe"),
        ("zone_added", "keyframe"),
        ("older_than_sent", "keyframe"),
    ],
)
def test_keyframe_rules(pklot_dir, case, expected):
    first, second = _snapshots(pklot_dir)[:2]
    previous = _state(first)
    skipped = _never_skipped
    rules = RULES
    if case == "needs_keyframe":
        previous = _state(first, needs_keyframe=True)
    if case == "period_reached":
        previous = _state(first, since_keyframe=RULES.every - 1)
    if case == "silent_past_gap":
        rules = KeyframeRules(every=60, gap_s=second.captured_at - first.captured_at - 1)
    if case == "snapshot_skipped":
        def skipped(camera_id: str, after: float, before: float) -> bool:
            return (camera_id, after, before) == (CAMERA, first.captured_at, second.captured_at)
    if case == "zone_added":
        previous = _state(first, zones={**previous.zones, "new-space": False})
    if case == "older_than_sent":
        previous = _state(first, captured_at=second.captured_at + 1)

    [record] = plan_camera([second], previous, rules, skipped)

    assert record.kind == expected
    assert schema_problem(build_batch(DEVICE, [record.body])) is None
    assert rebuild_zones(record.body, previous.zones) == zone_states(json.loads(second.result_json))


def _valid_batch(pklot_dir: Path) -> dict:
    records = [record.body for record in plan_camera(_snapshots(pklot_dir)[:2], None, RULES, _never_skipped)]
    return build_batch(DEVICE, records)


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (lambda batch: batch["records"][1].pop("base_at"), "base_at"),
        (lambda batch: batch["records"][0].update(base_at=1.0), "records/0"),
        (lambda batch: batch.update(batch_key="lot-9/whatever"), "batch_key"),
        (lambda batch: batch.update(records=[]), "records"),
        (lambda batch: batch["records"][0].update(kind="full"), "kind"),
        (lambda batch: batch["records"][0].update(colour="red"), "records/0"),
        (lambda batch: batch.update(schema_version=2), "schema_version"),
        (lambda batch: batch["records"][0]["occupied"].append(1), "occupied"),
    ],
)
def test_schema_rejects_malformed_batches_with_a_reason(pklot_dir, breakage, reason):
    batch = _valid_batch(pklot_dir)
    breakage(batch)
    problem = schema_problem(batch)
    assert problem is not None
    assert reason in problem
