"""The detector benchmark: one run scores parkmon, SAHI and a bare predict on the same PKLot frames."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from detect.analysis import tiling_plan
from detect.bench import METHODS, format_benchmark, load_frame, pick_frames, slice_px
from detect.evaluate import find_frames
from shared.config import DetectionSettings

REPO_DIR = Path(__file__).resolve().parents[1]
PKLOT_DIR = REPO_DIR.parent / "shared" / "data" / "pklot"
MODEL_PATH = REPO_DIR.parent / "shared" / "models" / "yolov8n-coco.pt"
SERIES = 4
# A far camera whose small cars need tiles and a near one, each series' first frame; --limit 2 drops the last.
FRAMES = ["PUCPR/Sunny/2012-09-13_07_54_51", "UFPR04/Cloudy/2013-01-16_11_50_07",
          "PUCPR/Sunny/2012-09-13_08_10_38"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m detect.bench --limit 2 --json` on one frame of each of two series, as a subprocess."""
    assert MODEL_PATH.is_file(), f"model missing at {MODEL_PATH}"
    dataset = tmp_path_factory.mktemp("bench")
    for frame in FRAMES:
        (dataset / frame).parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".jpg", ".xml"):
            shutil.copyfile(PKLOT_DIR / f"{frame}{suffix}", dataset / f"{frame}{suffix}")
    result = subprocess.run(
        [str(REPO_DIR / ".venv/bin/python"), "-m", "detect.bench", "--dataset", str(dataset),
         "--model", str(MODEL_PATH), "--limit", "2", "--json"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_all_three_methods_are_scored_on_the_same_spaces(report: dict[str, Any]) -> None:
    methods = report["methods"]

    assert set(methods) == set(METHODS)
    assert report["frames"] == 2 and report["cameras"] == ["PUCPR", "UFPR04"]
    assert {methods[name]["spaces"] for name in METHODS} == {100 + 28}
    assert all(methods[name]["frames"] == 2 for name in METHODS)
    assert methods["parkmon"]["accuracy"] >= 0.97 and methods["sahi"]["accuracy"] >= 0.95
    # Without tiles the far PUCPR cars go unseen: the bare call is a time reference, not a rival.
    assert methods["ultralytics"]["recall"] < methods["parkmon"]["recall"]


def test_the_report_states_the_ratios_and_how_the_methods_were_run(report: dict[str, Any]) -> None:
    parkmon, sahi = report["methods"]["parkmon"], report["methods"]["sahi"]

    assert report["speedup_vs_sahi"] == round(sahi["median_ms"] / parkmon["median_ms"], 2)
    assert report["accuracy_gain_vs_sahi"] == round(parkmon["accuracy"] - sahi["accuracy"], 4)
    assert report["order"].startswith("interleaved")
    assert report["slicing"]["PUCPR"]["parkmon_tiles"] < report["slicing"]["PUCPR"]["sahi_slices"]
    text = format_benchmark(report)
    assert "interleaved" in text and "parkmon speed-up vs SAHI" in text and "goal" in text


def test_a_limit_takes_frames_from_every_series_in_turn() -> None:
    frames = find_frames(PKLOT_DIR)

    picked = pick_frames(frames, 6)

    assert len(picked) == 6
    assert len({frame.series for frame in picked[:SERIES]}) == SERIES
    assert pick_frames(frames, None) == frames


def test_sahi_slices_are_magnified_as_much_as_parkmon_tiles() -> None:
    settings = DetectionSettings(model=str(MODEL_PATH))
    frame = load_frame(find_frames(PKLOT_DIR / "PUCPR")[0])
    plan = tiling_plan(frame.spaces, 1280, 720, settings)
    assert plan is not None

    side = slice_px(settings, frame)

    assert settings.image_size / side == pytest.approx(plan.scale, rel=0.01)
