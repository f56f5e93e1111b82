"""Settings: the earlier design's YAML, environment overrides, cameras, and refused configurations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import LEGACY_ENVIRONMENT, ConfigError, Settings, load_settings
from shared.db import DatabaseSettingsError, connect

DATA_DIR = Path(__file__).resolve().parent / "data"
EARLIER_MVP = DATA_DIR / "earlier_mvp.yaml"
DESIGN = Path(__file__).resolve().parents[1].parent / "shared" / "design" / "earlier-design.md"

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No override from the machine running the tests leaks into a test."""
    for name in [*LEGACY_ENVIRONMENT, *(key for key in os.environ if key.startswith("PARKMON_"))]:
        monkeypatch.delenv(name, raising=False)


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    """Write a config document and return its path."""
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dump as {"a.b.0.c": leaf}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def test_the_test_copy_is_the_earlier_design_block_verbatim():
    design = DESIGN.read_text(encoding="utf-8")
    block = EARLIER_MVP.read_text(encoding="utf-8")

    assert block.startswith("# config/mvp.yaml - Parking zone definitions\n")
    assert f"```yaml\n{block}```" in design


def test_earlier_mvp_yaml_loads_unchanged_as_one_camera_cam0(tmp_path):
    settings = load_settings(EARLIER_MVP, data_dir=tmp_path)

    assert [camera.id for camera in settings.cameras] == ["cam0"]
    camera = settings.camera("cam0")
    assert (camera.width, camera.height, camera.fps, camera.source) == (1280, 720, 30, "0")
    assert [zone.id for zone in camera.parking_zones] == ["1", "2", "8"]
    assert [zone.name for zone in camera.parking_zones] == ["A1", "A2", "B1"]
    assert [zone.space_id for zone in camera.parking_zones] == [1, 2, 8]
    assert camera.parking_zones[2].coordinates == [[100, 450], [300, 450], [300, 650], [100, 650]]
    assert camera.parking_zones[2].detection_difficulty == "hard"
    assert camera.parking_zones[0].polygon.area == 200 * 200
    assert (settings.detection.model, settings.detection.confidence) == ("models/yolov11m.pt", 0.5)
    assert settings.detection.classes == [2, 3, 5, 7]
    assert settings.processing.snapshot_interval == 5
    assert settings.processing.temporal_smoothing is True and settings.processing.smoothing_window == 3
    assert (settings.api.host, settings.api.port, settings.api.enable_cors) == ("0.0.0.0", 9091, True)
    assert (settings.upload.enabled, settings.upload.batch_size, settings.upload.interval) == (True, 10, 60)
    assert settings.upload.compression is True
    assert settings.data_dir == tmp_path.resolve()
    assert settings.database_path == tmp_path.resolve() / "parkmon.db"
    assert settings.config_path == EARLIER_MVP


ENVIRONMENT_CASES = [
    ("AWS_REGION", "eu-central-1", "aws.region", "eu-central-1"),
    ("S3_DATA_BUCKET", "lot-images", "aws.data_bucket", "lot-images"),
    ("S3_METADATA_BUCKET", "lot-metadata", "aws.metadata_bucket", "lot-metadata"),
    ("API_GATEWAY_ENDPOINT", "https://ingest.example/prod", "aws.api_endpoint", "https://ingest.example/prod"),
    ("PARKING_MONITOR_PORT", "9999", "api.port", 9999),
    ("CAMERA_SOURCE", "rtsp://10.0.0.5/stream1", "cameras.0.source", "rtsp://10.0.0.5/stream1"),
    ("LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
    ("MAX_BATCH_SIZE", "25", "upload.batch_size", 25),
    ("UPLOAD_INTERVAL", "12.5", "upload.interval", 12.5),
    ("MAX_RETRIES", "9", "upload.max_retries", 9),
    ("SNAPSHOT_INTERVAL", "2.5", "processing.snapshot_interval", 2.5),
    ("CONFIDENCE_THRESHOLD", "0.35", "detection.confidence", 0.35),
    ("MAX_CONCURRENT_UPLOADS", "4", "upload.max_concurrent", 4),
    ("PARKMON_DATA_DIR", "/srv/parkmon/data", "data_dir", "/srv/parkmon/data"),
    ("DEVICE_ID", "lot-42", "device_id", "lot-42"),
    ("S3_ENDPOINT_URL", "http://127.0.0.1:8333", "aws.s3_endpoint_url", "http://127.0.0.1:8333"),
    ("API_GATEWAY_KEY", "s3cr3t", "aws.api_key", "**********"),
    ("PARKMON_API__PORT", "9100", "api.port", 9100),
]


@pytest.mark.parametrize(("name", "value", "field", "expected"), ENVIRONMENT_CASES)
def test_environment_override_lands_in_its_field_and_nowhere_else(monkeypatch, name, value, field, expected):
    before = flatten(load_settings(EARLIER_MVP).model_dump(mode="json"))
    monkeypatch.setenv(name, value)

    after = flatten(load_settings(EARLIER_MVP).model_dump(mode="json"))

    changed = {key for key in after if after[key] != before.get(key)}
    assert changed == {field}
    assert after[field] == expected


def test_api_key_from_the_environment_is_kept_secret(monkeypatch):
    monkeypatch.setenv("API_GATEWAY_KEY", "s3cr3t")

    settings = load_settings(EARLIER_MVP)

    assert settings.aws.api_key is not None
    assert settings.aws.api_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(settings)


def test_a_bad_environment_value_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setenv("PARKING_MONITOR_PORT", "ninety")

    with pytest.raises(ConfigError) as refused:
        load_settings(EARLIER_MVP)

    assert str(refused.value).startswith("environment PARKING_MONITOR_PORT='ninety': api port: ")


def test_multi_camera_file_keeps_each_cameras_zones(tmp_path):
    path = write_yaml(tmp_path / "lot.yaml", {
        "device_id": "lot-2",
        "cameras": [
            {"id": "north", "source": "rtsp://north", "width": 640, "height": 360,
             "parking_zones": [{"id": "n1", "coordinates": SQUARE}, {"id": "n2", "coordinates": SQUARE}]},
            {"id": "south", "source": "../shared/data/pklot/PUCPR/Sunny",
             "parking_zones": [{"id": 1, "coordinates": SQUARE}]},
        ],
    })

    settings = load_settings(path, data_dir=tmp_path)

    assert [camera.id for camera in settings.cameras] == ["north", "south"]
    assert [zone.id for zone in settings.camera("north").parking_zones] == ["n1", "n2"]
    assert (settings.camera("north").width, settings.camera("north").height) == (640, 360)
    assert settings.camera("south").source == "../shared/data/pklot/PUCPR/Sunny"
    assert [zone.id for zone in settings.camera("south").parking_zones] == ["1"]
    with pytest.raises(KeyError):
        settings.camera("east")


def test_camera_source_override_is_refused_for_several_cameras(tmp_path, monkeypatch):
    path = write_yaml(tmp_path / "lot.yaml", {"cameras": [{"id": "a"}, {"id": "b"}]})
    monkeypatch.setenv("CAMERA_SOURCE", "0")

    with pytest.raises(ConfigError, match="CAMERA_SOURCE applies to a single camera"):
        load_settings(path)


def test_duplicate_camera_ids_are_refused(tmp_path):
    path = write_yaml(tmp_path / "lot.yaml", {"cameras": [{"id": "a"}, {"id": "a"}]})

    with pytest.raises(ConfigError, match="duplicate camera id 'a'"):
        load_settings(path)


BAD_ZONES = [
    pytest.param({"id": "b7", "coordinates": [[0, 0], [10, 0]]}, "b7", "needs at least 3 points, has 2",
                 id="fewer-than-3-points"),
    pytest.param({"id": "b7", "coordinates": [[0, 0], [5, 5], [10, 10]]}, "b7", "polygon has zero area",
                 id="zero-area-collinear"),
    pytest.param({"id": "b7", "coordinates": [[3, 3], [3, 3], [3, 3], [3, 3]]}, "b7", "polygon has zero area",
                 id="zero-area-one-point"),
    pytest.param({"id": "b7", "coordinates": [[0, 0], [10, 10], [10, 0], [0, 10]]}, "b7",
                 "polygon intersects itself", id="self-intersecting"),
    pytest.param({"id": "b7", "coordinates": [[0, 0], ["ten", 0], [10, 10]]}, "b7",
                 "point 1 has a non-numeric coordinate 'ten'", id="non-numeric-coordinate"),
    pytest.param({"id": "a1", "coordinates": SQUARE}, "a1", "duplicate zone id", id="duplicate-id"),
    pytest.param({"name": "B2", "coordinates": SQUARE}, "B2", "missing id", id="missing-id"),
]


@pytest.mark.parametrize(("bad_zone", "zone_label", "reason"), BAD_ZONES)
def test_bad_zone_is_refused_naming_file_camera_zone_and_reason(tmp_path, bad_zone, zone_label, reason):
    path = write_yaml(tmp_path / "lot.yaml", {
        "cameras": [
            {"id": "north", "parking_zones": [{"id": "n1", "coordinates": SQUARE}]},
            {"id": "south", "parking_zones": [{"id": "a1", "coordinates": SQUARE}, bad_zone]},
        ],
    })

    with pytest.raises(ConfigError) as refused:
        load_settings(path)

    assert str(refused.value).startswith(f"{path}: camera 'south': zone {zone_label}: {reason}")


def test_bad_zone_in_the_earlier_layout_names_camera_cam0(tmp_path):
    path = tmp_path / "mvp.yaml"
    path.write_text("parking_zones:\n  - id: 3\n    coordinates: [[0, 0], [1, 1]]\n")

    with pytest.raises(ConfigError) as refused:
        load_settings(path)

    assert str(refused.value) == f"{path}: camera 'cam0': zone 3: needs at least 3 points, has 2"


@pytest.mark.parametrize("written", ["OFF", "'OFF'", "off"])
def test_database_synchronous_off_is_refused(tmp_path, written):
    path = tmp_path / "lot.yaml"
    path.write_text(f"database:\n  synchronous: {written}\n")

    with pytest.raises(ConfigError) as refused:
        load_settings(path)

    assert str(refused.value).startswith(f"{path}: database synchronous: ")
    with pytest.raises(DatabaseSettingsError, match="refused"):
        connect(tmp_path / "x.db", synchronous="OFF")


def test_parkmon_config_environment_variable_picks_the_file(tmp_path, monkeypatch):
    chosen = write_yaml(tmp_path / "chosen.yaml", {"device_id": "from-env-file", "cameras": [{"id": "gate"}]})
    other = write_yaml(tmp_path / "other.yaml", {"device_id": "from-argument"})
    monkeypatch.setenv("PARKMON_CONFIG", str(chosen))

    from_environment = load_settings()
    from_argument = load_settings(other)

    assert from_environment.config_path == chosen
    assert (from_environment.device_id, from_environment.cameras[0].id) == ("from-env-file", "gate")
    assert from_argument.device_id == "from-argument"


def test_unknown_keys_and_unreadable_files_are_refused_naming_the_file(tmp_path):
    typo = write_yaml(tmp_path / "typo.yaml", {"upload": {"batch_sise": 3}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("cameras: [\n")

    with pytest.raises(ConfigError, match=r"typo\.yaml: upload batch_sise: "):
        load_settings(typo)
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read config"):
        load_settings(tmp_path / "missing.yaml")


def test_settings_defaults_without_a_file_section(tmp_path):
    settings = load_settings(write_yaml(tmp_path / "empty.yaml", {}), data_dir=tmp_path)

    assert isinstance(settings, Settings)
    assert [camera.id for camera in settings.cameras] == ["cam0"]
    assert settings.database.synchronous == "FULL"
    assert settings.api.port == 9091
