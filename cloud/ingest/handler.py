"""The ingest Lambda behind API Gateway: POST /detections with a gzip JSON batch, 200/400/409 back."""

from __future__ import annotations

import base64
import json
import os
import time
import zlib
from functools import cache
from typing import Any

import boto3

from cloud.ingest.rebuild import BatchRejected, RecordStore, ingest_batch
from cloud.ingest.store import DynamoRecordStore

# A gzip body is refused once it inflates past this, so a small request cannot exhaust the function.
MAX_BODY_BYTES = 8 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"


def _header(event: dict[str, Any], name: str) -> str | None:
    """A request header, looked up without regard to case."""
    for key, value in (event.get("headers") or {}).items():
        if key.lower() == name:
            return value
    return None


def _inflate(body: bytes) -> bytes:
    """Undo gzip, refusing a stream that inflates past MAX_BODY_BYTES."""
    decompressor = zlib.decompressobj(wbits=31)
    try:
        inflated = decompressor.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as error:
        raise BatchRejected(400, f"body is not valid gzip: {error}") from error
    if len(inflated) > MAX_BODY_BYTES or decompressor.unconsumed_tail:
        raise BatchRejected(400, f"body inflates past {MAX_BODY_BYTES} bytes")
    return inflated


def decode_body(event: dict[str, Any]) -> Any:
    """The JSON document of an API Gateway proxy event, base64 and gzip undone (API Gateway may inflate)."""
    raw = event.get("body") or ""
    body = base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode("utf-8")
    encoding = (_header(event, "content-encoding") or "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise BatchRejected(400, f"unsupported Content-Encoding {encoding!r}")
    if body[:2] == GZIP_MAGIC:
        body = _inflate(body)
    elif len(body) > MAX_BODY_BYTES:
        raise BatchRejected(400, f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as error:
        raise BatchRejected(400, f"body is not JSON: {error}") from error


def response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An API Gateway proxy response with a JSON body."""
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


def handle(event: dict[str, Any], store: RecordStore, now: float | None = None) -> dict[str, Any]:
    """Validate, rebuild and store one batch; 400 with a reason for a bad one, 409 for a missing base."""
    try:
        batch = decode_body(event)
        outcome = ingest_batch(
            batch, store, time.time() if now is None else now, _header(event, "idempotency-key")
        )
    except BatchRejected as rejected:
        return response(rejected.status, {"message": rejected.reason})
    return response(200, outcome.as_json())


@cache
def _default_store() -> DynamoRecordStore:
    """The table named by TABLE_NAME (DYNAMODB_ENDPOINT_URL points at an emulator when set)."""
    resource = boto3.resource("dynamodb", endpoint_url=os.environ.get("DYNAMODB_ENDPOINT_URL") or None)
    return DynamoRecordStore(resource.Table(os.environ["TABLE_NAME"]))


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (cloud.ingest.handler.lambda_handler)."""
    return handle(event, _default_store())


def proxy_event(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The API Gateway proxy event for a raw request body and its headers (base64, as for binary bodies)."""
    return {"body": base64.b64encode(body).decode("ascii"), "isBase64Encoded": True, "headers": dict(headers)}
