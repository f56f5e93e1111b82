"""The status API answers from a real SQLite database filled by SQL, through Starlette's TestClient."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from shared.config import Settings, load_settings
from shared.db import open_database

CONFIG = """
device_id: lot-7
processing:
  snapshot_interval: 5
api:
  enable_cors: {cors}
retention:
  min_free_bytes: 0
cameras:
  - id: cam0
    parking_zones:
      - {{id: 1, name: A1, coordinates: [[100, 200], [300, 200], [300, 400], [100, 400]]}}
      - {{id: 2, name: A2, coordinates: [[320, 200], [520, 200], [520, 400], [320, 400]]}}
      - {{id: 8, name: B1, coordinates: [[100, 450], [300, 450], [300, 650], [100, 650]]}}
  - id: cam1
    parking_zones:
      - {{id: n1, coordinates: [[0, 0], [50, 0], [50, 50], [0, 50]]}}
"""


def make_settings(tmp_path: Path, cors: bool = False) -> Settings:
    """Settings for a two-camera device whose data lives in tmp_path."""
    config_path = tmp_path / "parkmon.yaml"
    config_path.write_text(CONFIG.format(cors="true" if cors else "false"))
    return load_settings(config_path, data_dir=tmp_path / "data")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A device without CORS."""
    return make_settings(tmp_path)


@pytest.fixture
def db(settings: Settings) -> sqlite3.Connection:
    """A writable connection to the device's freshly created database."""
    connection = open_database(settings.database_path)
    yield connection
    connection.close()


@pytest.fixture
def client(settings: Settings, db: sqlite3.Connection) -> TestClient:
    """The API over the same database."""
    return TestClient(create_app(settings))


def add_snapshot(db: sqlite3.Connection, camera_id: str = "cam0", captured_at: float = 1000.0) -> int:
    """Insert a snapshot row and return its id."""
    cursor = db.execute(
        """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height)
           VALUES ('lot-7', ?, ?, ?, 1000, 1280, 720)""",
        (camera_id, captured_at, f"snapshots/{camera_id}_{captured_at}.jpg"),
    )
    return int(cursor.lastrowid)


def add_job(
    db: sqlite3.Connection,
    stage: str,
    snapshot_id: int,
    state: str = "pending",
    created_at: float | None = None,
    last_error: str | None = None,
    attempts: int = 0,
) -> int:
    """Insert a job row in a given state and return its id."""
    created_at = time.time() if created_at is None else created_at
    cursor = db.execute(
        """INSERT INTO jobs (stage, snapshot_id, state, attempts, available_at, last_error,
                             created_at, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (stage, snapshot_id, state, attempts, created_at + 900, last_error, created_at, created_at),
    )
    return int(cursor.lastrowid)


def add_heartbeat(
    db: sqlite3.Connection, process: str, age_s: float = 1.0, status: str = "running", pid: int = 4242
) -> None:
    """Insert or replace a process heartbeat that is `age_s` old."""
    beat_at = time.time() - age_s
    db.execute(
        """INSERT OR REPLACE INTO heartbeats (process, pid, started_at, beat_at, status, detail)
           VALUES (?, ?, ?, ?, ?, ?)""",
        (process, pid, beat_at - 60, beat_at, status, f"{process} detail"),
    )


def all_beating(db: sqlite3.Connection) -> None:
    """Every stage beat a second ago."""
    for offset, process in enumerate(("capture", "detect", "upload")):
        add_heartbeat(db, process, pid=100 + offset)


def set_zone(db: sqlite3.Connection, camera_id: str, zone_id: str, occupied: bool, since: float) -> None:
    """Insert a zone_state row."""
    db.execute(
        """INSERT INTO zone_state (device_id, camera_id, zone_id, occupied, confidence, since,
                                   updated_at, snapshot_id)
           VALUES ('lot-7', ?, ?, ?, 0.875, ?, ?, 1)""",
        (camera_id, zone_id, int(occupied), since, since + 10),
    )


def add_event(db: sqlite3.Connection, zone_id: str, event: str, at: float, snapshot_id: int) -> None:
    """Insert a zone_events row for cam0."""
    db.execute(
        """INSERT INTO zone_events (device_id, camera_id, zone_id, event, at, confidence, snapshot_id)
           VALUES ('lot-7', 'cam0', ?, ?, ?, 0.75, ?)""",
        (zone_id, event, at, snapshot_id),
    )


def test_health_is_healthy_when_every_stage_beats_and_nothing_is_parked(client, db):
    all_beating(db)
    snapshot_id = add_snapshot(db)
    add_job(db, "detect", snapshot_id, state="done")

    response = client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["reasons"] == []
    assert body["device_id"] == "lot-7"
    assert body["processes"]["detect"]["pid"] == 101
    assert body["processes"]["detect"]["state"] == "ok"
    assert body["processes"]["detect"]["detail"] == "detect detail"
    assert 1.0 <= body["processes"]["capture"]["beat_age_s"] < 15.0
    assert body["queue"]["depth"] == {"detect": 0, "upload": 0}
    assert body["queue"]["jobs"]["detect"]["done"] == 1


def test_health_is_degraded_when_free_disk_space_is_below_the_retention_floor(client, db, settings):
    all_beating(db)
    settings.retention.min_free_bytes = 10**18

    body = client.get("/health").json()

    assert body["status"] == "degraded"
    assert body["disk"]["min_free_bytes"] == 10**18
    assert 0 < body["disk"]["free_bytes"] < 10**18
    assert any(reason.startswith("free disk space") for reason in body["reasons"])


def test_health_is_degraded_when_a_heartbeat_is_stale(client, db):
    all_beating(db)
    add_heartbeat(db, "detect", age_s=100)

    body = client.get("/health").json()

    assert body["status"] == "degraded"
    assert body["processes"]["detect"]["state"] == "stale"
    assert body["processes"]["capture"]["state"] == "ok"
    assert any(reason.startswith("detect heartbeat is 100 s old (limit 15 s)") for reason in body["reasons"])


def test_health_is_degraded_when_a_stage_reports_it_is_stalled(client, db):
    all_beating(db)
    add_heartbeat(db, "capture", status="stalled")

    body = client.get("/health").json()

    assert body["status"] == "degraded"
    assert body["processes"]["capture"]["state"] == "stalled"
    assert body["reasons"] == ["capture reports stalled: capture detail"]


def test_health_is_degraded_when_an_upload_job_is_parked(client, db):
    all_beating(db)
    snapshot_id = add_snapshot(db)
    add_job(db, "upload", snapshot_id, state="failed", last_error="HTTP 503 from ingest", attempts=4)

    response = client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["uploads"]["parked"] == 1
    assert body["reasons"] == [
        "1 upload job(s) parked after repeated failures (last error: HTTP 503 from ingest)"
    ]


def test_health_is_degraded_when_uploads_are_retrying(client, db):
    all_beating(db)
    snapshot_id = add_snapshot(db)
    add_job(db, "upload", snapshot_id, state="pending", last_error="timeout", attempts=2)

    body = client.get("/health").json()

    assert body["status"] == "degraded"
    assert body["uploads"]["retrying"] == 1
    assert "1 upload job(s) retrying after errors (last error: timeout)" in body["reasons"]


def test_health_is_degraded_when_the_detect_backlog_is_old(client, db):
    all_beating(db)
    for offset in range(3):
        add_job(db, "detect", add_snapshot(db, captured_at=1000.0 + offset), created_at=time.time() - 600)

    body = client.get("/health").json()

    assert body["status"] == "degraded"
    assert body["queue"]["depth"]["detect"] == 3
    assert body["queue"]["oldest_waiting_s"]["detect"] >= 600
    assert any(reason.startswith("detect backlog: 3 job(s) waiting, oldest 60") for reason in body["reasons"])


def test_health_needs_no_upload_stage_when_uploads_are_disabled(tmp_path):
    base = make_settings(tmp_path)
    settings = load_settings(base.config_path, data_dir=base.data_dir, upload={"enabled": False})
    client = TestClient(create_app(settings))
    db = open_database(settings.database_path)
    add_heartbeat(db, "capture")
    add_heartbeat(db, "detect")
    add_job(db, "upload", add_snapshot(db), created_at=time.time() - 3600)
    db.close()

    body = client.get("/health").json()

    assert body["status"] == "healthy", body["reasons"]
    assert set(body["processes"]) == {"capture", "detect"}
    assert body["queue"]["depth"]["upload"] == 1


def test_health_is_unhealthy_when_no_process_has_ever_beaten(client, db):
    response = client.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["reasons"] == ["no process has ever sent a heartbeat (capture, detect, upload)"]


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_health_is_unhealthy_when_the_database_cannot_be_read(settings, damage):
    client = TestClient(create_app(settings))
    settings.database_path.unlink()
    if damage == "garbage":
        settings.database_path.write_bytes(b"this is not an SQLite database" * 100)

    response = client.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["reasons"][0].startswith("database cannot be read: ")
    assert client.get("/queue").status_code == 503


def test_zones_show_state_and_configured_zones_not_yet_seen(client, db):
    set_zone(db, "cam0", "1", occupied=True, since=1_796_000_000.5)
    set_zone(db, "cam0", "2", occupied=False, since=1_796_000_100.0)
    set_zone(db, "cam0", "99", occupied=True, since=1_796_000_200.0)

    body = client.get("/zones").json()

    zones = {(zone["camera_id"], zone["zone_id"]): zone for zone in body["zones"]}
    assert list(zones) == [("cam0", "1"), ("cam0", "2"), ("cam0", "8"), ("cam0", "99"), ("cam1", "n1")]
    occupied = zones["cam0", "1"]
    assert (occupied["occupied"], occupied["confidence"], occupied["name"]) == (True, 0.875, "A1")
    assert occupied["since"] == 1_796_000_000.5
    assert occupied["since_iso"] == "2026-11-30T00:53:20.500Z"
    assert zones["cam0", "2"]["occupied"] is False
    assert zones["cam0", "8"]["occupied"] is None and zones["cam0", "8"]["since"] is None
    assert zones["cam0", "99"]["configured"] is False
    assert zones["cam1", "n1"]["occupied"] is None
    assert body["cameras"] == [
        {"camera_id": "cam0", "spaces": 4, "occupied": 2, "vacant": 1, "unknown": 1},
        {"camera_id": "cam1", "spaces": 1, "occupied": 0, "vacant": 0, "unknown": 1},
    ]


def test_zones_filter_by_camera_and_refuse_an_unknown_one(client, db):
    set_zone(db, "cam0", "1", occupied=True, since=1000.0)

    only_cam1 = client.get("/zones", params={"camera_id": "cam1"}).json()
    unknown = client.get("/zones", params={"camera_id": "nowhere"})

    assert [zone["camera_id"] for zone in only_cam1["zones"]] == ["cam1"]
    assert [camera["camera_id"] for camera in only_cam1["cameras"]] == ["cam1"]
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "unknown camera_id 'nowhere'"}


def test_changes_returns_events_after_since_in_order(client, db):
    snapshots = [add_snapshot(db, captured_at=at) for at in (100.0, 200.0, 300.0)]
    add_event(db, "1", "occupied", 100.0, snapshots[0])
    add_event(db, "2", "occupied", 200.0, snapshots[1])
    add_event(db, "1", "vacated", 200.0, snapshots[1])
    add_event(db, "8", "occupied", 300.0, snapshots[2])

    after_150 = client.get("/changes", params={"since": "150"}).json()
    after_300 = client.get("/changes", params={"since": 300}).json()

    assert [(e["zone_id"], e["event"], e["at"]) for e in after_150["events"]] == [
        ("2", "occupied", 200.0),
        ("1", "vacated", 200.0),
        ("8", "occupied", 300.0),
    ]
    assert after_150["events"][1]["occupied"] is False
    assert after_150["next_since"] == 300.0
    assert after_150["truncated"] is False
    assert after_300["events"] == [] and after_300["next_since"] == 300.0


def test_changes_limit_never_splits_events_of_one_moment(client, db):
    snapshots = [add_snapshot(db, captured_at=at) for at in (100.0, 200.0, 300.0)]
    add_event(db, "1", "occupied", 100.0, snapshots[0])
    add_event(db, "2", "occupied", 200.0, snapshots[1])
    add_event(db, "8", "occupied", 200.0, snapshots[1])
    add_event(db, "1", "vacated", 300.0, snapshots[2])

    first = client.get("/changes", params={"since": 0, "limit": 2}).json()
    second = client.get("/changes", params={"since": first["next_since"], "limit": 2}).json()

    assert [e["at"] for e in first["events"]] == [100.0]
    assert first["truncated"] is True
    assert [e["zone_id"] for e in second["events"]] == ["2", "8"]
    assert second["next_since"] == 200.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"since": "yesterday"}, "since must be a unix timestamp in seconds, got 'yesterday'"),
        ({"since": "nan"}, "since must be a finite number, got 'nan'"),
        ({"since": "0", "limit": "many"}, "limit must be an integer, got 'many'"),
        ({"since": "0", "limit": "0"}, "limit must be between 1 and 10000, got 0"),
    ],
)
def test_changes_refuses_bad_parameters_with_400(client, params, message):
    response = client.get("/changes", params=params)

    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_queue_counts_jobs_and_lists_parked_ones(client, db):
    snapshots = [add_snapshot(db, captured_at=1000.0 + n) for n in range(4)]
    add_job(db, "detect", snapshots[0], state="done")
    add_job(db, "detect", snapshots[1], state="done")
    add_job(db, "detect", snapshots[2], state="pending", created_at=time.time() - 50)
    add_job(db, "detect", snapshots[3], state="leased")
    add_job(db, "upload", snapshots[0], state="done")
    parked_id = add_job(db, "upload", snapshots[1], state="failed", last_error="403 Forbidden", attempts=3)

    body = client.get("/queue").json()

    assert body["stages"]["detect"] == {"pending": 1, "leased": 1, "done": 2, "failed": 0}
    assert body["stages"]["upload"] == {"pending": 0, "leased": 0, "done": 1, "failed": 1}
    assert body["waiting"]["detect"]["jobs"] == 2
    assert body["waiting"]["detect"]["oldest_age_s"] >= 50
    assert body["waiting"]["upload"]["jobs"] == 1
    assert [(job["job_id"], job["stage"], job["attempts"], job["last_error"]) for job in body["parked"]] == [
        (parked_id, "upload", 3, "403 Forbidden")
    ]


def test_metrics_expose_counts_read_at_scrape_time(client, db):
    all_beating(db)
    snapshots = [add_snapshot(db, captured_at=1000.0 + n) for n in range(3)]
    add_snapshot(db, camera_id="cam1")
    add_job(db, "detect", snapshots[0], state="done")
    add_job(db, "detect", snapshots[1], state="pending")
    add_job(db, "upload", snapshots[0], state="failed", last_error="boom")
    db.execute(
        """INSERT INTO uploads (snapshot_id, image_key, metadata_key, image_bytes, metadata_bytes,
                                posted, uploaded_at) VALUES (?, 'i', 'm', 1, 1, 1, 1)""",
        (snapshots[0],),
    )
    set_zone(db, "cam0", "1", occupied=True, since=1000.0)
    set_zone(db, "cam0", "2", occupied=True, since=1000.0)
    set_zone(db, "cam0", "8", occupied=False, since=1000.0)

    first = client.get("/metrics")
    add_snapshot(db, captured_at=2000.0)
    second = client.get("/metrics").text

    assert first.headers["content-type"].startswith("text/plain")
    lines = first.text.splitlines()
    for expected in [
        "parkmon_database_up 1.0",
        'parkmon_snapshots_total{camera_id="cam0"} 3.0',
        'parkmon_snapshots_total{camera_id="cam1"} 1.0',
        'parkmon_jobs{stage="detect",state="done"} 1.0',
        'parkmon_jobs{stage="detect",state="pending"} 1.0',
        'parkmon_jobs{stage="upload",state="failed"} 1.0',
        'parkmon_jobs{stage="upload",state="leased"} 0.0',
        "parkmon_uploads_total 1.0",
        'parkmon_zones_occupied{camera_id="cam0"} 2.0',
        'parkmon_zones_occupied{camera_id="cam1"} 0.0',
        'parkmon_zones_configured{camera_id="cam0"} 3.0',
    ]:
        assert expected in lines
    ages = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("parkmon_heartbeat_age_seconds{")
    }
    assert set(ages) == {"capture", "detect", "upload"}
    assert all(1.0 <= age < 15.0 for age in ages.values())
    assert 'parkmon_snapshots_total{camera_id="cam0"} 4.0' in second.splitlines()


def test_metrics_report_database_down_instead_of_failing(settings):
    client = TestClient(create_app(settings))
    settings.database_path.unlink()

    response = client.get("/metrics")

    assert response.status_code == 200
    assert "parkmon_database_up 0.0" in response.text.splitlines()


@pytest.mark.parametrize("enabled", [True, False])
def test_cors_header_only_when_enabled(tmp_path, enabled):
    client = TestClient(create_app(make_settings(tmp_path, cors=enabled)))

    response = client.get("/zones", headers={"Origin": "http://dashboard.local"})

    assert response.status_code == 200
    assert (response.headers.get("access-control-allow-origin") == "*") is enabled


def test_large_responses_are_gzipped(client, db):
    all_beating(db)

    response = client.get("/metrics", headers={"Accept-Encoding": "gzip"})

    assert response.headers["content-encoding"] == "gzip"
    assert "parkmon_database_up 1.0" in response.text


def test_fresh_device_gets_a_schema_and_empty_answers(settings):
    assert not settings.database_path.exists()

    client = TestClient(create_app(settings))

    assert settings.database_path.exists()
    upload_counts = client.get("/queue").json()["stages"]["upload"]
    assert upload_counts == {"pending": 0, "leased": 0, "done": 0, "failed": 0}
    assert client.get("/changes").json()["events"] == []
