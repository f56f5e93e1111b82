"""`parkmon run all`: four separate processes, a dead one restarted, all stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from shared.db import connect
from shared.zone_import import import_zones

MAX_RESIDENT_BYTES = 150 * 1024 * 1024


def _stage_processes(supervisor_pid: int) -> dict[str, psutil.Process]:
    """The stage processes under `parkmon run all`, by stage name."""
    stages: dict[str, psutil.Process] = {}
    for child in psutil.Process(supervisor_pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "run" in command and command[-1] in ("capture", "detect", "upload", "api"):
            stages[command[-1]] = child
    return stages


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(condition, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("condition not reached in time")


def _heartbeat_pid(database: Path, process: str) -> int | None:
    if not database.exists():
        return None
    connection = connect(database, read_only=True)
    try:
        row = connection.execute("SELECT pid FROM heartbeats WHERE process = ?", (process,)).fetchone()
    except Exception:
        row = None
    connection.close()
    return None if row is None else int(row["pid"])


def test_run_all_restarts_a_killed_stage_and_keeps_the_small_stages_small(tmp_path, pklot_dir, model_path):
    folder = pklot_dir / "UFPR04" / "Cloudy"
    config = {
        "device_id": "lot-9",
        "data_dir": str(tmp_path / "data"),
        "cameras": [{"id": "ufpr04", "source": str(folder),
                     "parking_zones": import_zones(sorted(folder.glob("*.xml"))[0], "pklot")}],
        "detection": {"model": str(model_path)},
        "processing": {"snapshot_interval": 2},
        "api": {"host": "127.0.0.1", "port": _free_port()},
        "upload": {"enabled": False},
        "retention": {"min_free_bytes": 0},
    }
    config_path = tmp_path / "device.yaml"
    config_path.write_text(yaml.safe_dump(config))
    database = tmp_path / "data" / "parkmon.db"
    environment = {**os.environ, "YOLO_OFFLINE": "1"}
    run_all = subprocess.Popen([sys.executable, "-m", "shared.cli", "--config", str(config_path), "run", "all"],
                               env=environment)
    try:
        stages = _wait_for(lambda: (found := _stage_processes(run_all.pid)) and len(found) == 4 and found)
        assert len({process.pid for process in stages.values()}) == 4, "each stage is its own process"

        first_pid = _wait_for(lambda: _heartbeat_pid(database, "capture"))
        assert first_pid == stages["capture"].pid
        time.sleep(3)
        for stage in ("capture", "upload", "api"):
            process = stages[stage]
            resident = process.memory_info().rss
            print(f"{stage} resident {resident / 2**20:.0f} MiB")
            assert resident < MAX_RESIDENT_BYTES, f"{stage} uses {resident} B"
            mapped = {Path(region.path).name for region in process.memory_maps() if region.path}
            assert not any(name.startswith("libtorch") for name in mapped), f"{stage} loaded torch"

        os.kill(first_pid, signal.SIGKILL)
        new_pid = _wait_for(lambda: (pid := _heartbeat_pid(database, "capture")) not in (None, first_pid) and pid)
        assert new_pid == _stage_processes(run_all.pid)["capture"].pid
    finally:
        run_all.send_signal(signal.SIGTERM)
        assert run_all.wait(timeout=60) == 0
    assert not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                   for process in stages.values()), "every stage stopped with run all"
