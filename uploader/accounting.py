"""Bytes the upload stage delivered, before and after compression, per destination."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

IMAGES = "images"
METADATA = "metadata"
INGEST = "ingest"
DESTINATIONS = (IMAGES, METADATA, INGEST)


@dataclass
class ByteTally:
    """Requests and bytes per destination for one round, added to the totals when the round is recorded."""

    requests: Counter[str] = field(default_factory=Counter)
    raw_bytes: Counter[str] = field(default_factory=Counter)
    wire_bytes: Counter[str] = field(default_factory=Counter)

    def add(self, destination: str, raw_bytes: int, wire_bytes: int) -> None:
        """Count one delivered request: its size before and after compression."""
        self.requests[destination] += 1
        self.raw_bytes[destination] += raw_bytes
        self.wire_bytes[destination] += wire_bytes

    def merge(self, other: ByteTally) -> None:
        """Add another tally into this one."""
        self.requests.update(other.requests)
        self.raw_bytes.update(other.raw_bytes)
        self.wire_bytes.update(other.wire_bytes)


def record_bytes(connection: sqlite3.Connection, tally: ByteTally) -> None:
    """Add a tally to the stored totals; call inside the transaction that completes the jobs."""
    now = time.time()
    for destination in sorted(tally.requests):
        connection.execute(
            """INSERT INTO upload_bytes (destination, requests, raw_bytes, wire_bytes, updated_at)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (destination) DO UPDATE SET requests = requests + excluded.requests,
                   raw_bytes = raw_bytes + excluded.raw_bytes, wire_bytes = wire_bytes + excluded.wire_bytes,
                   updated_at = excluded.updated_at""",
            (destination, tally.requests[destination], tally.raw_bytes[destination],
             tally.wire_bytes[destination], now),
        )


def read_byte_totals(connection: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Delivered requests, raw_bytes and wire_bytes per destination (every destination present)."""
    totals: dict[str, dict[str, Any]] = {
        destination: {"requests": 0, "raw_bytes": 0, "wire_bytes": 0} for destination in DESTINATIONS
    }
    try:
        rows = connection.execute("SELECT destination, requests, raw_bytes, wire_bytes FROM upload_bytes")
    except sqlite3.OperationalError:
        return totals
    for row in rows:
        totals[row["destination"]] = {
            "requests": row["requests"], "raw_bytes": row["raw_bytes"], "wire_bytes": row["wire_bytes"],
        }
    return totals
