"""POSTing one detection result to the ingest endpoint, idempotently."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from uploader.errors import IngestRejected
from uploader.payload import encode_json

_REASON_MAX_CHARS = 200


def detections_url(api_endpoint: str) -> str:
    """`<api_endpoint>/detections`, without a doubled slash."""
    return f"{api_endpoint.rstrip('/')}/detections"


async def post_detection(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str | None,
    idempotency_key: str,
    payload: dict[str, Any],
    compress: bool,
) -> int:
    """POST the payload; return the 2xx status or raise IngestRejected with the status."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    if api_key:
        headers["X-API-Key"] = api_key
    if compress:
        headers["Content-Encoding"] = "gzip"
    body = encode_json(json.dumps(payload, separators=(",", ":")), compress)
    async with session.post(url, data=body, headers=headers) as response:
        if 200 <= response.status < 300:
            return response.status
        reason = (await response.text(errors="replace"))[:_REASON_MAX_CHARS]
        raise IngestRejected(response.status, reason.strip() or response.reason or "")
