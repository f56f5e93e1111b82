"""LaunchAgent plists: one per stage, so launchd keeps each stage alive on the Mac."""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

from shared.config import Settings

STAGES = ("capture", "detect", "upload", "api")
LABEL_PREFIX = "com.parkmon"


def launch_agent(stage: str, settings: Settings, config_path: Path, python: Path, workdir: Path) -> dict[str, Any]:
    """The plist content for one stage, all paths absolute."""
    logs_dir = settings.data_dir / "logs"
    return {
        "Label": f"{LABEL_PREFIX}.{stage}",
        "ProgramArguments": [str(python), "-m", "shared.cli", "--config", str(config_path), "run", stage],
        "WorkingDirectory": str(workdir),
        "EnvironmentVariables": {
            "PARKMON_DATA_DIR": str(settings.data_dir),
            "PYTHONUNBUFFERED": "1",
        },
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 10,
        "ProcessType": "Interactive" if stage == "detect" else "Background",
        "StandardOutPath": str(logs_dir / f"{stage}.out.log"),
        "StandardErrorPath": str(logs_dir / f"{stage}.log"),
    }


def write_launch_agents(
    settings: Settings, config_path: Path, out_dir: Path, python: Path, workdir: Path | None = None
) -> list[Path]:
    """Write com.parkmon.<stage>.plist for the four stages into out_dir."""
    if not python.is_absolute():
        raise ValueError(f"--python must be an absolute path, got {python}")
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = workdir or Path(__file__).resolve().parents[1]
    written: list[Path] = []
    for stage in STAGES:
        path = out_dir / f"{LABEL_PREFIX}.{stage}.plist"
        content = launch_agent(stage, settings, config_path.resolve(), python, workdir)
        path.write_bytes(plistlib.dumps(content, sort_keys=False))
        written.append(path)
    return written
