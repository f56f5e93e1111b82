"""`parkmon bench upload`: device state from the detect stage by default, from the labels with --labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
CAMERAS = 4


def bench(*arguments: str) -> dict[str, Any]:
    """`python -m uploader.bench --json ...` as a subprocess; its figures."""
    finished = subprocess.run(
        [sys.executable, "-m", "uploader.bench", "--json", *arguments],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def assert_synced(figures: dict[str, Any], frames: int) -> None:
    """Every record reached the cloud, which rebuilt the device's state at each of them."""
    assert figures["snapshots"] == figures["records"] == figures["received"] == frames
    assert figures["rebuilt_equal"] == frames
    assert figures["keyframes_equal"] == figures["keyframes"] >= CAMERAS
    assert figures["batched"]["requests"] == 1 < figures["naive"]["requests"] == frames
    assert 0 < figures["batched"]["bytes"] < figures["naive"]["bytes"]
    assert {outcome["snapshots"] for outcome in figures["throughput"].values()} == {frames}
    assert set(figures["throughput"]) == {"1", "5"}


@pytest.mark.usefixtures("model_path")
def test_by_default_the_device_state_is_what_the_detect_stage_decided():
    figures = bench("--limit", "4")

    source = figures["source"]
    assert (source["mode"], source["model"]) == ("detector", "yolov8n-coco.pt")
    agreement = source["label_agreement"]
    assert agreement["labelled"] == 100 + 100 + 28 + 40
    assert agreement["agreed"] >= 0.95 * agreement["labelled"]
    assert_synced(figures, 4)


def test_with_labels_the_device_state_is_made_from_the_pklot_labels():
    figures = bench("--labels", "--limit", "4")

    assert figures["source"] == {"mode": "labels", "model": "pklot-labels"}
    assert figures["occupied"] == figures["vehicles"]
    assert_synced(figures, 4)


def test_the_report_says_which_mode_made_the_device_state():
    from uploader.bench import report

    figures = {
        "snapshots": 4, "cameras": 4, "batch_size": 10, "vehicles": 9, "occupied": 7,
        "naive": {"requests": 4, "bytes": 20_000}, "batched": {"requests": 1, "bytes": 500, "raw_bytes": 900},
        "records": 4, "received": 4, "rebuilt_equal": 4, "keyframes": 4, "keyframes_equal": 4,
        "s3_metadata": {"wire_bytes": 1, "raw_bytes": 2}, "s3_images": {"wire_bytes": 3},
        "throughput": {1: {"seconds": 1.0, "snapshots": 4}},
    }
    detector = {"mode": "detector", "model": "yolov8n-coco.pt", "detect_seconds": 3.2,
                "label_agreement": {"agreed": 267, "labelled": 268}}

    lines = report({**figures, "source": detector}).splitlines()
    assert lines[0].startswith("mode: detector")
    assert "yolov8n-coco.pt" in lines[0] and "99.63 % of 268 labelled spaces" in lines[0]
    assert "2.50 % of naive" in report({**figures, "source": detector})
    assert report({**figures, "source": {"mode": "labels"}}).startswith("mode: labels")


def test_the_benchmark_process_never_imports_torch_or_ultralytics():
    check = "import sys, uploader.bench; print(sorted({'torch', 'ultralytics'} & set(sys.modules)))"
    finished = subprocess.run([sys.executable, "-c", check], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"
