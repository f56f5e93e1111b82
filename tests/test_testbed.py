"""The local stand-ins: SeaweedFS as S3 and the ingest receiver, as real processes."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from testbed.seaweed import SeaweedServer

LISTEN = "0A"
LOOPBACK_HEX = "0100007F"


def _listening_addresses(ports: set[int]) -> dict[int, set[str]]:
    """For each port, the local addresses it listens on, read from /proc/net/tcp{,6}."""
    found: dict[int, set[str]] = {port: set() for port in ports}
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            port = int(port_hex, 16)
            if fields[3] == LISTEN and port in found:
                found[port].add(address)
    return found


def _client(server: SeaweedServer, access_key: str, secret_key: str):
    return boto3.client(
        "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
    )


def test_seaweed_listens_on_loopback_only_with_telemetry_off(s3_server):
    command = Path(f"/proc/{s3_server.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-master.telemetry=false" in command
    assert b"-master.telemetry.url=http://127.0.0.1:9/" in command

    addresses = _listening_addresses(set(s3_server.ports.values()))
    assert all(found == {LOOPBACK_HEX} for found in addresses.values()), addresses


def test_seaweed_stores_objects_and_checks_signatures(s3_server):
    good = _client(s3_server, s3_server.access_key, s3_server.secret_key)
    good.put_object(Bucket=s3_server.data_bucket, Key="testbed/check.bin", Body=b"parkmon")
    assert good.get_object(Bucket=s3_server.data_bucket, Key="testbed/check.bin")["Body"].read() == b"parkmon"

    with pytest.raises(ClientError) as refused:
        _client(s3_server, s3_server.access_key, "not-the-secret").put_object(
            Bucket=s3_server.data_bucket, Key="testbed/x", Body=b"1"
        )
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as missing:
        good.put_object(Bucket="no-such-bucket", Key="x", Body=b"1")
    assert missing.value.response["Error"]["Code"] == "NoSuchBucket"


def test_open_seaweed_accepts_any_key_and_stop_ends_its_process(monkeypatch):
    # weed would make an identity out of AWS keys in its environment; the caller's must not leak in.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-shell")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-shell-secret")
    server = SeaweedServer()
    with server:
        server.create_buckets(["open-bucket"])
        _client(server, "anyone", "anything").put_object(Bucket="open-bucket", Key="k", Body=b"1")
        assert server.object_keys("open-bucket") == ["k"]
        pid, data_dir, ports = server.process.pid, server.data_dir, set(server.ports.values())

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists()
    sockets = Path("/tmp").glob("seaweedfs-*.sock")
    assert [path for path in sockets if int(path.stem.rsplit("-", 1)[1]) in ports] == []


def test_receiver_refuses_a_missing_or_wrong_api_key(receiver):
    url = f"{receiver.url}/detections"
    assert httpx.post(url, json={"device_id": "d"}).status_code == 401
    assert httpx.post(url, json={"device_id": "d"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert receiver.received() == []


def _batch(*stems: str) -> dict:
    """A valid one-camera ingest batch of keyframes, one per stem."""
    records = [
        {"key": f"lot-1/cam0/{stem}", "camera_id": "cam0", "captured_at": 1000.0 + index, "kind": "keyframe",
         "occupied": ["1"], "vacant": [], "occupied_count": 1, "spaces": 1}
        for index, stem in enumerate(stems)
    ]
    return {"schema_version": 1, "batch_key": f"lot-1/batch/{'0' * 23}{len(stems)}", "device_id": "lot-1",
            "records": records}


def test_receiver_records_each_idempotency_key_once(receiver):
    url = f"{receiver.url}/detections"
    headers = {"X-API-Key": receiver.api_key, "Content-Encoding": "gzip"}
    body = gzip.compress(json.dumps(_batch("a")).encode())

    first = httpx.post(url, content=body, headers=headers)
    again = httpx.post(url, content=body, headers=headers)
    plain = json.dumps(_batch("a", "b")).encode()
    other = httpx.post(url, content=plain, headers={"X-API-Key": receiver.api_key})

    assert (first.status_code, again.status_code, other.status_code) == (200, 200, 200)
    assert (first.json()["accepted"], again.json()["duplicates"]) == (1, 1)
    assert (other.json()["accepted"], other.json()["duplicates"]) == (1, 1)
    received = receiver.received()
    assert [(post["idempotency_key"], post["deliveries"]) for post in received] == [
        ("lot-1/cam0/a", 3), ("lot-1/cam0/b", 1),
    ]
    assert [post["content_encoding"] for post in received] == ["gzip", None]
    totals = receiver.requests()
    assert (totals["requests"], totals["accepted"]) == (3, 3)
    assert totals["body_bytes"] == 2 * len(body) + len(plain)


def test_receiver_rejects_unreadable_bodies(receiver):
    headers = {"X-API-Key": receiver.api_key, "Content-Encoding": "gzip"}
    assert httpx.post(f"{receiver.url}/detections", content=b"not gzip", headers=headers).status_code == 400
    plain = {"X-API-Key": receiver.api_key}
    assert httpx.post(f"{receiver.url}/detections", content=b"[1, 2]", headers=plain).status_code == 400
    assert receiver.received() == []


def test_receiver_restart_keeps_its_port_and_store(receiver):
    headers = {"X-API-Key": receiver.api_key}
    httpx.post(f"{receiver.url}/detections", json=_batch("k"), headers=headers)
    url = receiver.url

    receiver.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/received")
    receiver.start()

    assert receiver.url == url
    assert [post["idempotency_key"] for post in receiver.received()] == ["lot-1/cam0/k"]
