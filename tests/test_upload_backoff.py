"""Retry planning and error classification of the upload stage."""

from __future__ import annotations

import random

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from shared.config import UploadSettings
from uploader.backoff import backoff_delay_s, plan_retry
from uploader.errors import PERMANENT, TRANSIENT, IngestRejected, SnapshotUnavailable, classify


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


def test_backoff_doubles_from_base_within_jitter_and_stops_at_cap():
    rng = random.Random(7)
    for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 20.0), (9, 20.0), (500, 20.0)]:
        delays = [backoff_delay_s(attempts, 2.0, 20.0, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= delay <= ceiling for delay in delays)
        assert max(delays) - min(delays) > ceiling * 0.2


def test_retries_back_off_until_max_retries_then_park():
    settings = UploadSettings(max_retries=3, retry_base_s=2.0, retry_cap_s=300.0, parked_retry_s=900.0)
    first, second, third = (plan_retry(attempts, TRANSIENT, settings) for attempts in (1, 2, 3))
    assert not first.parked and 1.0 <= first.delay_s <= 2.0
    assert not second.parked and 2.0 <= second.delay_s <= 4.0
    assert third.parked and third.delay_s == 900.0
    assert plan_retry(40, TRANSIENT, settings).parked


def test_permanent_errors_park_on_the_first_attempt():
    plan = plan_retry(1, PERMANENT, UploadSettings(max_retries=5, parked_retry_s=600.0))
    assert plan.parked and plan.delay_s == 600.0


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_client_error("AccessDenied"), PERMANENT),
        (_client_error("NoSuchBucket"), PERMANENT),
        (_client_error("InvalidAccessKeyId"), PERMANENT),
        (_client_error("SignatureDoesNotMatch"), PERMANENT),
        (_client_error("SlowDown"), TRANSIENT),
        (_client_error("InternalError"), TRANSIENT),
        (IngestRejected(400, "bad"), PERMANENT),
        (IngestRejected(401, "no key"), PERMANENT),
        (IngestRejected(403, "forbidden"), PERMANENT),
        (IngestRejected(404, "no route"), PERMANENT),
        (IngestRejected(408, "timeout"), TRANSIENT),
        (IngestRejected(409, "no base record; send a keyframe"), TRANSIENT),
        (IngestRejected(429, "throttled"), TRANSIENT),
        (IngestRejected(500, "oops"), TRANSIENT),
        (IngestRejected(503, "busy"), TRANSIENT),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), TRANSIENT),
        (NoCredentialsError(), PERMANENT),
        (SnapshotUnavailable("gone"), PERMANENT),
        (ConnectionResetError("reset"), TRANSIENT),
        (TimeoutError(), TRANSIENT),
    ],
)
def test_errors_are_classified_permanent_or_transient(error, kind):
    assert classify(error) == kind
