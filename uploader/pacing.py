"""The upload bandwidth cap: requests wait so bytes sent average at most max_bytes_per_s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class BandwidthCap:
    """Paces sends so that, averaged since the first one, bytes per second stay at the cap.

    Each send books the link for bytes / rate seconds after the previous booking; the caller waits
    until its booking starts. With no cap every send goes at once.
    """

    def __init__(
        self,
        max_bytes_per_s: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.max_bytes_per_s = max_bytes_per_s
        self._clock = clock
        self._sleep = sleep
        self._free_at = 0.0
        self.waited_s = 0.0

    async def reserve(self, size_bytes: int) -> None:
        """Wait until `size_bytes` may be sent without going over the cap."""
        if self.max_bytes_per_s is None or size_bytes <= 0:
            return
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + size_bytes / self.max_bytes_per_s
        if start > now:
            self.waited_s += start - now
            await self._sleep(start - now)
