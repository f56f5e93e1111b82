"""Prometheus metrics read from the database at scrape time."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from shared.config import Settings
from shared.status import read_heartbeats, read_queue, read_zones_occupied, reading
from uploader.accounting import read_byte_totals

__all__ = ["CONTENT_TYPE_LATEST", "DatabaseCollector", "metrics_registry", "render_metrics"]


def _count_by_camera(connection: sqlite3.Connection, table: str, settings: Settings) -> dict[str, int]:
    """Rows of a table per camera_id; configured cameras with no rows count zero."""
    counts = {camera.id: 0 for camera in settings.cameras}
    rows = connection.execute(f"SELECT camera_id, count(*) AS n FROM {table} GROUP BY camera_id ORDER BY 1")
    counts.update({row["camera_id"]: row["n"] for row in rows})
    return counts


def _read_sample(connection: sqlite3.Connection, settings: Settings, now: float) -> dict[str, Any]:
    """Everything one scrape reports, read in the caller's single read transaction."""
    oldest = connection.execute("SELECT stage, oldest_created_at FROM queue_backlog ORDER BY stage")
    return {
        "snapshots": _count_by_camera(connection, "snapshots", settings),
        "detections": _count_by_camera(connection, "detections", settings),
        "uploads": connection.execute("SELECT count(*) FROM uploads").fetchone()[0],
        "upload_bytes": read_byte_totals(connection),
        "zone_events": _count_by_camera(connection, "zone_events", settings),
        "jobs": read_queue(connection),
        "oldest_waiting_s": {row["stage"]: max(0.0, now - row["oldest_created_at"]) for row in oldest},
        "zones_occupied": read_zones_occupied(connection, settings),
        "heartbeats": read_heartbeats(connection, now),
    }


def _camera_family(
    family: CounterMetricFamily | GaugeMetricFamily, values: dict[str, int | float]
) -> CounterMetricFamily | GaugeMetricFamily:
    """Fill a family labelled by camera_id."""
    for camera_id, value in values.items():
        family.add_metric([camera_id], value)
    return family


class DatabaseCollector(Collector):
    """Reads counts and ages from the shared database each time Prometheus scrapes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        """Yield one family per metric; only parkmon_database_up when the database cannot be read."""
        now = time.time()
        try:
            with reading(self.settings) as connection:
                sample = _read_sample(connection, self.settings, now)
        except sqlite3.Error:
            yield GaugeMetricFamily("parkmon_database_up", "1 when the database could be read.", value=0)
            return

        yield GaugeMetricFamily("parkmon_database_up", "1 when the database could be read.", value=1)
        yield _camera_family(
            CounterMetricFamily("parkmon_snapshots", "Snapshots stored.", labels=["camera_id"]),
            sample["snapshots"],
        )
        yield _camera_family(
            CounterMetricFamily("parkmon_detections", "Snapshots detected.", labels=["camera_id"]),
            sample["detections"],
        )
        yield _camera_family(
            CounterMetricFamily("parkmon_zone_events", "Zone occupancy changes.", labels=["camera_id"]),
            sample["zone_events"],
        )
        yield CounterMetricFamily("parkmon_uploads", "Snapshots uploaded.", value=sample["uploads"])

        jobs = GaugeMetricFamily("parkmon_jobs", "Jobs per stage and state.", labels=["stage", "state"])
        for stage, states in sample["jobs"].items():
            for state, count in states.items():
                jobs.add_metric([stage, state], count)
        yield jobs

        oldest = GaugeMetricFamily(
            "parkmon_oldest_waiting_job_age_seconds", "Age of the oldest unfinished job.", labels=["stage"]
        )
        for stage, age_s in sample["oldest_waiting_s"].items():
            oldest.add_metric([stage], age_s)
        yield oldest

        yield _camera_family(
            GaugeMetricFamily("parkmon_zones_occupied", "Zones currently occupied.", labels=["camera_id"]),
            sample["zones_occupied"],
        )
        yield _camera_family(
            GaugeMetricFamily("parkmon_zones_configured", "Zones configured.", labels=["camera_id"]),
            {camera.id: len(camera.parking_zones) for camera in self.settings.cameras},
        )

        upload_bytes = CounterMetricFamily(
            "parkmon_upload_bytes",
            "Bytes delivered per destination, before (raw) and after (wire) compression.",
            labels=["destination", "kind"],
        )
        upload_requests = CounterMetricFamily(
            "parkmon_upload_requests", "Requests delivered per destination.", labels=["destination"]
        )
        for destination, totals in sample["upload_bytes"].items():
            upload_bytes.add_metric([destination, "raw"], totals["raw_bytes"])
            upload_bytes.add_metric([destination, "wire"], totals["wire_bytes"])
            upload_requests.add_metric([destination], totals["requests"])
        yield upload_bytes
        yield upload_requests

        ages = GaugeMetricFamily(
            "parkmon_heartbeat_age_seconds", "Seconds since the process last beat.", labels=["process"]
        )
        for process, heartbeat in sample["heartbeats"].items():
            ages.add_metric([process], heartbeat["beat_age_s"])
        yield ages


def metrics_registry(settings: Settings) -> CollectorRegistry:
    """A registry holding only the database collector (no client-process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of a registry."""
    return generate_latest(registry)
