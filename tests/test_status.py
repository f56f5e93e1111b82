"""`parkmon status`: counts read from the real database, zeros before it exists."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared.config import Settings, load_settings
from shared.db import open_database
from shared.status import format_status, status_report

CONFIG = """
device_id: lot-3
cameras:
  - id: north
    parking_zones:
      - {id: a, coordinates: [[0, 0], [10, 0], [10, 10], [0, 10]]}
      - {id: b, coordinates: [[20, 0], [30, 0], [30, 10], [20, 10]]}
  - id: south
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A two-camera device with its data in tmp_path."""
    config_path = tmp_path / "parkmon.yaml"
    config_path.write_text(CONFIG)
    return load_settings(config_path, data_dir=tmp_path / "data")


def fill(settings: Settings) -> None:
    """Two snapshots, their jobs, a detection, an upload, an occupied zone and one heartbeat."""
    db = open_database(settings.database_path)
    for n in (1, 2):
        db.execute(
            """INSERT INTO snapshots (id, device_id, camera_id, captured_at, path, bytes, width, height)
               VALUES (?, 'lot-3', 'north', ?, ?, 10, 1280, 720)""",
            (n, 1000.0 + n, f"snapshots/{n}.jpg"),
        )
    db.execute("UPDATE snapshots SET deleted_at = 5000 WHERE id = 1")
    db.execute(
        """INSERT INTO jobs (stage, snapshot_id, state, available_at, created_at, updated_at)
           VALUES ('detect', 1, 'done', 0, 0, 0), ('detect', 2, 'pending', 0, 0, 0),
                  ('upload', 1, 'failed', 0, 0, 0)"""
    )
    db.execute(
        """INSERT INTO detections VALUES (1, 'lot-3', 'north', 1001, 'yolo', 12.5, 1, 2, 1, '{}')"""
    )
    db.execute("INSERT INTO uploads VALUES (1, 'i', 'm', 10, 2, 1, 1002)")
    db.execute(
        """INSERT INTO zone_state VALUES ('lot-3', 'north', 'a', 1, 0.9, 1001, 1001, 1),
                                         ('lot-3', 'north', 'b', 0, 0.8, 1001, 1001, 1)"""
    )
    beat_at = time.time() - 3
    db.execute("INSERT INTO heartbeats VALUES ('detect', 55, ?, ?, 'running', 'idle')", (beat_at, beat_at))
    db.close()


def test_status_of_a_device_without_a_database_is_all_zeros(settings):
    report = status_report(settings)

    assert not settings.database_path.exists()
    assert report["device_id"] == "lot-3"
    assert (report["snapshots"], report["detections"], report["uploaded"]) == (0, 0, 0)
    assert report["queue"]["detect"] == {"pending": 0, "leased": 0, "done": 0, "failed": 0}
    assert report["zones_occupied"] == {"north": 0, "south": 0}
    assert report["processes"] == {"capture": None, "detect": None, "upload": None}


def test_status_counts_what_the_database_holds(settings):
    fill(settings)

    report = status_report(settings)

    assert report["snapshots"] == 2
    assert report["snapshots_kept"] == 1
    assert report["detections"] == 1
    assert report["uploaded"] == 1
    assert report["queue"]["detect"] == {"pending": 1, "leased": 0, "done": 1, "failed": 0}
    assert report["queue"]["upload"]["failed"] == 1
    assert report["zones_occupied"] == {"north": 1, "south": 0}
    assert report["processes"]["capture"] is None
    assert report["processes"]["detect"]["pid"] == 55
    assert 3.0 <= report["processes"]["detect"]["beat_age_s"] < 60.0
    assert json.loads(json.dumps(report)) == report


def test_status_does_not_write_to_the_database(settings):
    fill(settings)
    before = settings.database_path.read_bytes()

    status_report(settings)

    assert settings.database_path.read_bytes() == before


def test_format_status_names_every_count(settings):
    fill(settings)

    text = format_status(status_report(settings))

    lines = text.splitlines()
    assert lines[0].startswith("device lot-3")
    assert "snapshots 2 (1 kept)   detections 1   uploaded 1" in lines
    assert "  detect   pending 1  leased 0  done 1  failed 0" in lines
    assert "  north    1 of 2" in lines
    assert "  capture  never seen" in lines
    assert any(line.startswith("  detect   beat ") and "pid 55, running (idle)" in line for line in lines)


def test_status_and_metrics_report_upload_bytes_per_destination(settings):
    from starlette.testclient import TestClient

    from api.app import create_app
    from shared.db import immediate
    from uploader.accounting import ByteTally, record_bytes

    db = open_database(settings.database_path)
    for _ in range(2):
        tally = ByteTally()
        tally.add("ingest", raw_bytes=1000, wire_bytes=250)
        tally.add("images", raw_bytes=300_000, wire_bytes=300_000)
        with immediate(db):
            record_bytes(db, tally)
    db.close()

    report = status_report(settings)
    assert report["upload_bytes"]["ingest"] == {"requests": 2, "raw_bytes": 2000, "wire_bytes": 500}
    assert report["upload_bytes"]["images"]["wire_bytes"] == 600_000
    assert report["upload_bytes"]["metadata"] == {"requests": 0, "raw_bytes": 0, "wire_bytes": 0}

    metrics = TestClient(create_app(settings)).get("/metrics").text
    assert 'parkmon_upload_bytes_total{destination="ingest",kind="raw"} 2000.0' in metrics
    assert 'parkmon_upload_bytes_total{destination="ingest",kind="wire"} 500.0' in metrics
    assert 'parkmon_upload_requests_total{destination="images"} 2.0' in metrics
