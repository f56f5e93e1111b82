"""The parkmon command as an operator runs it: exit codes, messages, generated files."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path

import yaml

from shared.config import load_settings
from shared.launchd import write_launch_agents

REPO_DIR = Path(__file__).resolve().parents[1]


def parkmon(*args: str, cwd: Path = REPO_DIR, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the parkmon command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_config_check_summarises_a_good_config(model_path):
    result = parkmon("config", "check", "config/mvp.yaml", env={**os.environ, "PARKMON_MODEL": str(model_path)})
    assert result.returncode == 0, result.stderr
    assert "cam0: 3 zones, 1280x720" in result.stdout
    assert "buckets:  data=parking-monitor-data-production" in result.stdout


def test_config_check_refuses_a_config_whose_model_is_missing(tmp_path):
    result = parkmon("config", "check", "config/mvp.yaml", env={**os.environ, "PARKMON_MODEL": "no/such.pt"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"parkmon: config/mvp.yaml: detection model: weights not found at {REPO_DIR / 'no/such.pt'}"
    )


def test_a_bad_environment_value_is_blamed_on_the_variable_not_the_file():
    result = parkmon("config", "check", "config/mvp.yaml", env={**os.environ, "PARKING_MONITOR_PORT": "abc"})
    assert result.returncode == 2
    assert result.stderr.startswith("parkmon: environment PARKING_MONITOR_PORT='abc': api port:")


def test_config_check_names_file_camera_and_zone_of_a_bad_zone(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({
        "cameras": [{"id": "north", "parking_zones": [
            {"id": 1, "coordinates": [[0, 0], [50, 0], [50, 50]]},
            {"id": 12, "coordinates": [[0, 0], [10, 0], [0, 10], [10, 10]]},
        ]}]
    }))
    result = parkmon("config", "check", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"parkmon: {config}: camera 'north': zone 12: polygon intersects itself (Self-intersection[5 5])"
    )


def test_every_stage_refuses_to_start_with_a_bad_config(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("parking_zones:\n  - {id: 3, coordinates: [[0, 0], [1, 1]]}\n")
    for stage in ("capture", "detect", "upload", "api"):
        result = parkmon("--config", str(config), "run", stage)
        assert result.returncode == 2, stage
        assert "zone 3: needs at least 3 points, has 2" in result.stderr


def test_launch_agents_keep_each_stage_alive_with_absolute_paths(tmp_path):
    settings = load_settings(REPO_DIR / "config" / "mvp.yaml", data_dir=tmp_path / "data")
    python = Path(sys.executable).absolute()
    written = write_launch_agents(settings, REPO_DIR / "config" / "mvp.yaml", tmp_path / "agents", python)
    assert [path.name for path in written] == [
        "com.parkmon.capture.plist", "com.parkmon.detect.plist",
        "com.parkmon.upload.plist", "com.parkmon.api.plist",
    ]
    for path in written:
        agent = plistlib.loads(path.read_bytes())
        stage = agent["Label"].rsplit(".", 1)[1]
        assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
        assert agent["ProgramArguments"][0] == str(python)
        assert agent["ProgramArguments"][-2:] == ["run", stage]
        assert all(Path(value).is_absolute() for value in (
            agent["WorkingDirectory"], agent["StandardErrorPath"], agent["ProgramArguments"][4]
        ))


def test_shipped_launch_agents_match_the_generator(tmp_path):
    home = Path("/Users/parkmon/parkmon")
    settings = load_settings(REPO_DIR / "config" / "mvp.yaml", data_dir=home / "var")
    settings.data_dir = home / "var"
    written = write_launch_agents(settings, home / "config/mvp.yaml", tmp_path, home / ".venv/bin/python", workdir=home)
    for path in written:
        assert path.read_bytes() == (REPO_DIR / "launchd" / path.name).read_bytes()
