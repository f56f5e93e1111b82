"""When a failed upload is tried again: capped exponential backoff with jitter, then parking."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.config import UploadSettings
from uploader.errors import PERMANENT


@dataclass(frozen=True)
class RetryPlan:
    """How a failed job goes back to the queue."""

    delay_s: float
    parked: bool


def backoff_delay_s(attempts: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before the next try after `attempts` failures: base doubling to cap, jittered to 50-100%."""
    exponent = max(0, attempts - 1)
    ceiling = cap_s if exponent >= 64 else min(cap_s, base_s * 2.0**exponent)
    return ceiling * (rng or random).uniform(0.5, 1.0)


def plan_retry(
    attempts: int, error_kind: str, settings: UploadSettings, rng: random.Random | None = None
) -> RetryPlan:
    """Park permanent errors and jobs past max_retries (retried every parked_retry_s); else back off."""
    if error_kind == PERMANENT or attempts >= settings.max_retries:
        return RetryPlan(delay_s=settings.parked_retry_s, parked=True)
    delay_s = backoff_delay_s(attempts, settings.retry_base_s, settings.retry_cap_s, rng)
    return RetryPlan(delay_s=delay_s, parked=False)
