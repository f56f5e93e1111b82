"""The api stage as a real process: served by uvicorn over HTTP, stopped by SIGTERM, free of torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared.db import open_database

REPO_DIR = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

SERVE = """
import sys
from shared.config import load_settings
from shared.logging import configure_logging
from api.main import run
configure_logging("INFO", "api")
sys.exit(run(load_settings(sys.argv[1])))
"""

IMPORTS_ONLY = """
import json, sys
from starlette.testclient import TestClient
from shared.config import load_settings
from api.app import create_app
import api.main, shared.status
client = TestClient(create_app(load_settings(sys.argv[1])))
codes = [client.get(path).status_code for path in ("/health", "/zones", "/changes", "/queue", "/metrics")]
heavy = sorted(name for name in ("torch", "ultralytics", "torchvision") if name in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(tmp_path: Path, port: int) -> Path:
    """A config file for an API on `port` with its data in tmp_path."""
    config_path = tmp_path / "parkmon.yaml"
    config_path.write_text(
        f"device_id: lot-9\ndata_dir: {tmp_path / 'data'}\napi:\n  host: 127.0.0.1\n  port: {port}\n"
    )
    return config_path


def get_json(url: str) -> tuple[int, dict]:
    """GET a JSON document; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_server(process: subprocess.Popen, url: str, deadline_s: float = 30.0) -> tuple[int, dict]:
    """Poll until the server answers, failing if the process exits first."""
    give_up_at = time.monotonic() + deadline_s
    while True:
        assert process.poll() is None, f"api exited early with {process.returncode}"
        try:
            return get_json(url)
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < give_up_at, "api did not start listening"
            time.sleep(0.1)


def test_api_process_serves_health_over_http_and_stops_on_sigterm(tmp_path):
    port = free_port()
    config_path = write_config(tmp_path, port)
    process = subprocess.Popen(
        [PYTHON, "-c", SERVE, str(config_path)], cwd=REPO_DIR, stderr=subprocess.PIPE, text=True
    )
    try:
        status, before = wait_for_server(process, f"http://127.0.0.1:{port}/health")
        writer = open_database(tmp_path / "data" / "parkmon.db")
        now = time.time()
        for process_name in ("capture", "detect", "upload"):
            writer.execute(
                "INSERT INTO heartbeats VALUES (?, ?, ?, ?, 'running', NULL)", (process_name, 7, now, now)
            )
        writer.close()
        status_after, after = get_json(f"http://127.0.0.1:{port}/health")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate()
            raise

    assert (status, before["status"]) == (503, "unhealthy")
    assert (status_after, after["status"], after["device_id"]) == (200, "healthy", "lot-9")
    assert process.returncode == 0
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    started = [event for event in events if event["event"] == "api_started"]
    assert len(started) == 1
    assert (started[0]["host"], started[0]["port"], started[0]["process"]) == ("127.0.0.1", port, "api")
    assert "api_stopped" in [event["event"] for event in events]


def test_api_process_does_not_import_torch_or_ultralytics(tmp_path):
    config_path = write_config(tmp_path, free_port())

    result = subprocess.run(
        [PYTHON, "-c", IMPORTS_ONLY, str(config_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [503, 200, 200, 200, 200]
    assert report["heavy"] == []
