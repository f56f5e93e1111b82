"""`parkmon eval` as a command on a real PKLot camera folder: accuracy floor, report shape, skipped spaces."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from detect.evaluate import EvaluationError, evaluate_dataset, find_frames, format_report
from shared.config import Settings, load_settings

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"
PKLOT_DIR = SHARED_DIR / "data" / "pklot"
MODEL_PATH = SHARED_DIR / "models" / "yolov8n-coco.pt"
# Measured 99.42 % (514 of 517 spaces) with the default settings and yolov8n; a margin for CPU kernels.
UFPR05_ACCURACY_FLOOR = 0.985


def _settings(tmp_path: Path) -> Settings:
    """Default settings with the test model."""
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"detection": {"model": str(MODEL_PATH)}}))
    return load_settings(config, data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UFPR05's rainy series copied under a camera folder, plus a frame without its XML."""
    root = tmp_path_factory.mktemp("dataset")
    shutil.copytree(PKLOT_DIR / "UFPR05" / "Rainy", root / "UFPR05" / "Rainy")
    shutil.copyfile(PKLOT_DIR / "UFPR04" / "Cloudy" / "2013-01-16_11_50_07.jpg", root / "UFPR04-no-xml.jpg")
    return root


@pytest.fixture(scope="module")
def report(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`parkmon eval DIR --json` run once for the module as a subprocess; its stdout parsed as JSON."""
    assert MODEL_PATH.is_file(), f"model missing at {MODEL_PATH}"
    work = tmp_path_factory.mktemp("eval")
    config = work / "eval.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(work / "data"), "log_level": "INFO"}))
    result = subprocess.run(
        [str(REPO_DIR / ".venv/bin/python"), "-m", "shared.cli", "eval", str(dataset), "--json",
         "--model", str(MODEL_PATH), "--config", str(config)],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert '"event": "detector_loaded"' in result.stderr
    return json.loads(result.stdout)


def test_ufpr05_accuracy_stays_above_the_measured_floor(report: dict[str, Any]) -> None:
    camera = report["per_camera"]["UFPR05"]

    assert report["model"] == "yolov8n-coco.pt"
    assert camera["accuracy"] >= UFPR05_ACCURACY_FLOOR
    assert camera["spaces"] == 13 * 40 - 3
    assert camera["precision"] >= 0.98 and camera["recall"] >= 0.97
    assert camera["frames"] == 13


def test_the_report_has_overall_per_camera_and_smoothed_figures(report: dict[str, Any]) -> None:
    assert set(report["per_camera"]) == {"UFPR05"}
    assert report["overall"]["spaces"] == report["per_camera"]["UFPR05"]["spaces"]
    confusion = report["overall"]["confusion"]
    assert sum(confusion.values()) == report["overall"]["spaces"]
    overall = report["overall"]
    assert overall["accuracy"] == round((confusion["tp"] + confusion["tn"]) / overall["spaces"], 4)
    assert overall["median_ms"] > 0 and overall["p95_ms"] >= overall["median_ms"]
    smoothed = report["smoothed"]["per_camera"]["UFPR05"]
    assert smoothed["accuracy"] >= report["per_camera"]["UFPR05"]["accuracy"]
    json.dumps(report)


def test_spaces_without_a_label_are_skipped_and_counted(report: dict[str, Any]) -> None:
    assert report["skipped_unlabelled"] == 3


def test_the_text_report_names_each_camera_and_the_overall_row(report: dict[str, Any]) -> None:
    text = format_report(report)

    assert "UFPR05" in text and "overall" in text and "yolov8n-coco.pt" in text
    assert f"{report['overall']['accuracy']:.2%}" in text


def test_frames_are_found_by_camera_folder_in_time_order(dataset: Path) -> None:
    frames = find_frames(dataset)

    assert {frame.camera for frame in frames} == {"UFPR05"}
    assert [frame.captured_at for frame in frames] == sorted(frame.captured_at for frame in frames)
    assert frames[0].image.name == "2013-03-19_06_30_00.jpg"


def test_a_folder_without_labelled_frames_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="no \\*.jpg with a sibling .xml"):
        evaluate_dataset(tmp_path, _settings(tmp_path))
