"""POSTing one batch of records to the ingest endpoint, idempotently."""

from __future__ import annotations

import aiohttp

from uploader.errors import IngestRejected

_REASON_MAX_CHARS = 200


def detections_url(api_endpoint: str) -> str:
    """`<api_endpoint>/detections`, without a doubled slash."""
    return f"{api_endpoint.rstrip('/')}/detections"


async def post_batch(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str | None,
    idempotency_key: str,
    body: bytes,
    compressed: bool,
) -> int:
    """POST an encoded batch; return the 2xx status or raise IngestRejected with the status."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    if api_key:
        headers["X-API-Key"] = api_key
    if compressed:
        headers["Content-Encoding"] = "gzip"
    async with session.post(url, data=body, headers=headers) as response:
        if 200 <= response.status < 300:
            return response.status
        reason = (await response.text(errors="replace"))[:_REASON_MAX_CHARS]
        raise IngestRejected(response.status, reason.strip() or response.reason or "")
