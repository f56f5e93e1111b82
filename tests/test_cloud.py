"""The ingest function against a local DynamoDB emulator (moto's server), alone and behind the device."""

from __future__ import annotations

import base64
import gzip
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.ingest.handler import handle, proxy_event
from cloud.ingest.rebuild import sort_key
from cloud.ingest.store import DynamoRecordStore
from testbed.dynamodb import REGION, DynamoEmulator
from testbed.receiver import Receiver
from uploader.batch import build_batch
from uploader.bench import device_settings, frames, seed_device
from uploader.delta import zone_states
from uploader.main import run

DEVICE = "lot-3"


@pytest.fixture(scope="module")
def dynamodb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynamoEmulator]:
    """One moto server on 127.0.0.1 for this module, stopped by PID at the end."""
    with DynamoEmulator(tmp_path_factory.mktemp("moto")) as emulator:
        yield emulator


@pytest.fixture
def table(dynamodb: DynamoEmulator):
    """A fresh detections table for one test."""
    return dynamodb.create_detections_table(f"detections-{uuid.uuid4().hex[:8]}")


def _record(camera: str, at: float, kind: str, occupied: list[str], vacant: list[str], full: dict[str, bool],
            base_at: float | None = None) -> dict:
    record = {"key": f"{DEVICE}/{camera}/{DEVICE}_{camera}_{int(at)}", "camera_id": camera, "captured_at": at,
              "kind": kind}
    if base_at is not None:
        record["base_at"] = base_at
    record.update({"occupied": occupied, "vacant": vacant, "occupied_count": sum(full.values()),
                   "spaces": len(full)})
    return record


def _chain() -> list[dict]:
    """A keyframe of three spaces, then two deltas, on one camera."""
    return [
        _record("cam0", 100.0, "keyframe", ["1"], ["2", "3"], {"1": True, "2": False, "3": False}),
        _record("cam0", 105.0, "delta", ["2"], [], {"1": True, "2": True, "3": False}, base_at=100.0),
        _record("cam0", 110.0, "delta", ["3"], ["1"], {"1": False, "2": True, "3": True}, base_at=105.0),
    ]


def _event(batch: dict, compress: bool = True, header_key: str | None = None) -> dict:
    body = json.dumps(batch).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": header_key or batch["batch_key"]}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return proxy_event(body, headers)


def _items(table) -> list[dict]:
    return table.scan(ConsistentRead=True)["Items"]


def test_batch_is_rebuilt_into_full_states_in_the_table(table):
    answer = handle(_event(build_batch(DEVICE, _chain())), DynamoRecordStore(table))

    assert answer["statusCode"] == 200
    assert json.loads(answer["body"])["accepted"] == 3
    items = {item["timestamp"]: item for item in _items(table)}
    assert items[sort_key(110.0, "cam0")]["zones"] == {"1": False, "2": True, "3": True}
    assert items[sort_key(105.0, "cam0")]["zones"] == {"1": True, "2": True, "3": False}
    assert items[sort_key(110.0, "cam0")]["idempotency_key"] == f"{DEVICE}/cam0/{DEVICE}_cam0_110"
    assert {item["kind"] for item in items.values()} == {"keyframe", "delta"}


def test_replayed_batches_and_reencoded_records_are_stored_once(table):
    store = DynamoRecordStore(table)
    chain = _chain()
    assert handle(_event(build_batch(DEVICE, chain)), store)["statusCode"] == 200

    again = handle(_event(build_batch(DEVICE, chain), compress=False), store)
    # The same snapshot sent later as a keyframe (after a resync) has the same key: still one item.
    resent = _record("cam0", 110.0, "keyframe", ["2", "3"], ["1"], {"1": False, "2": True, "3": True})
    as_keyframe = handle(_event(build_batch(DEVICE, [resent])), store)

    assert json.loads(again["body"]) == {**json.loads(again["body"]), "accepted": 0, "duplicates": 3}
    assert json.loads(as_keyframe["body"])["duplicates"] == 1
    assert len(_items(table)) == 3


def test_a_delta_on_a_stored_base_from_an_earlier_batch_is_rebuilt(table):
    store = DynamoRecordStore(table)
    first, second, third = _chain()
    assert handle(_event(build_batch(DEVICE, [first])), store)["statusCode"] == 200
    assert handle(_event(build_batch(DEVICE, [second, third])), store)["statusCode"] == 200
    assert store.get_zones(DEVICE, "cam0", 110.0) == {"1": False, "2": True, "3": True}


def test_a_delta_without_its_base_is_refused_with_409_and_nothing_wrong_is_stored(table):
    _, second, _ = _chain()
    answer = handle(_event(build_batch(DEVICE, [second])), DynamoRecordStore(table))

    assert answer["statusCode"] == 409
    assert "keyframe" in json.loads(answer["body"])["message"]
    assert _items(table) == []


def test_counts_that_the_rebuild_does_not_reach_are_refused(table):
    store = DynamoRecordStore(table)
    first, second, _ = _chain()
    assert handle(_event(build_batch(DEVICE, [first])), store)["statusCode"] == 200
    wrong = {**second, "occupied_count": 3}
    answer = handle(_event(build_batch(DEVICE, [wrong])), store)
    assert answer["statusCode"] == 409
    assert "counts" in json.loads(answer["body"])["message"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (proxy_event(b"\x1f\x8bnot really gzip", {"Content-Encoding": "gzip"}), "gzip"),
        (proxy_event(b"{not json", {}), "not JSON"),
        (proxy_event(json.dumps({"device_id": DEVICE}).encode(), {}), "schema"),
        (_event(build_batch(DEVICE, _chain()), header_key=f"{DEVICE}/batch/{'f' * 24}"), "Idempotency-Key"),
        (_event(build_batch("other-device", _chain())), "does not start with"),
        (proxy_event(b"{}", {"Content-Encoding": "br"}), "Content-Encoding"),
    ],
)
def test_bad_payloads_are_refused_with_400_and_a_reason(table, event, reason):
    answer = handle(event, DynamoRecordStore(table))
    assert answer["statusCode"] == 400
    assert reason in json.loads(answer["body"])["message"]
    assert _items(table) == []


def test_a_gzip_bomb_is_refused(table):
    bomb = gzip.compress(b" " * (9 * 1024 * 1024))
    event = {"body": base64.b64encode(bomb).decode(), "isBase64Encoded": True, "headers": {}}
    answer = handle(event, DynamoRecordStore(table))
    assert answer["statusCode"] == 400
    assert "inflates" in json.loads(answer["body"])["message"]


@pytest.mark.usefixtures("s3_credentials")
def test_device_to_receiver_to_dynamodb_rebuilds_the_device_state_at_every_record(
    tmp_path: Path, s3_server, dynamodb, table
):
    replay = frames()
    receiver = Receiver(
        tmp_path / "receiver" / "requests.db", "cloud-test-key", dynamodb_endpoint=dynamodb.endpoint_url,
        table=table.name, environment={"AWS_DEFAULT_REGION": REGION},
    )
    with receiver:
        upload = {"batch_size": 10, "max_concurrent": 5}
        settings = device_settings(tmp_path, s3_server, receiver, DEVICE, upload)
        results = seed_device(settings.data_dir, DEVICE, replay)
        assert run(settings, once=True) == 0
        first_requests = receiver.requests()

        # Every job run again (as after a crash before the device recorded them): nothing new is stored.
        connection = sqlite3.connect(settings.database_path, isolation_level=None)
        connection.execute(
            "UPDATE jobs SET state = 'pending', done_at = NULL, available_at = ?", (time.time(),)
        )
        connection.close()
        assert run(settings, once=True) == 0
        second_requests = receiver.requests()

    items = {item["timestamp"]: item for item in _items(table)}
    assert len(items) == len(replay) == 63
    assert len({item["idempotency_key"] for item in items.values()}) == 63
    for result in results:
        item = items[sort_key(result["captured_at"], result["camera_id"])]
        assert item["zones"] == zone_states(result), item["idempotency_key"]
        assert item["idempotency_key"] == f"{DEVICE}/{result['camera_id']}/{Path(result['image']).stem}"
    kinds = [item["kind"] for item in items.values()]
    assert 4 <= kinds.count("keyframe") < 20
    assert first_requests["requests"] == first_requests["accepted"] == 7
    assert second_requests["accepted"] == 14
