"""The real detector on real PKLot frames: accuracy against the XML, tiling, scaled zones, device choice."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.analysis import FrameAnalysis, analyse_frame
from detect.detector import DetectorError, VehicleDetector, choose_device
from detect.occupancy import ZoneScaleError, scale_zones
from shared.config import CameraSettings, DetectionSettings
from shared.pklot import LabelledSpace, read_pklot_spaces
from shared.zones import Zone

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
PKLOT_DIR = SHARED_DIR / "data" / "pklot"
MODEL_PATH = SHARED_DIR / "models" / "yolov8n-coco.pt"
UFPR04_FRAME = PKLOT_DIR / "UFPR04" / "Cloudy" / "2013-01-16_11_50_07.jpg"
PUCPR_FRAME = PKLOT_DIR / "PUCPR" / "Sunny" / "2012-09-13_07_54_51.jpg"


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> VehicleDetector:
    """The small COCO model, loaded once for this module."""
    assert MODEL_PATH.is_file(), f"model missing at {MODEL_PATH}"
    return VehicleDetector(DetectionSettings(model=str(MODEL_PATH)), tmp_path_factory.mktemp("data"))


def labelled(frame: Path) -> tuple[CameraSettings, list[LabelledSpace]]:
    """The frame's labelled spaces as a camera drawn at 1280x720."""
    spaces = [space for space in read_pklot_spaces(frame.with_suffix(".xml")) if space.occupied is not None]
    zones = [Zone(id=space.space_id, coordinates=space.contour) for space in spaces]
    return CameraSettings(id="cam", width=1280, height=720, parking_zones=zones), spaces


def accuracy(analysis: FrameAnalysis, spaces: list[LabelledSpace]) -> float:
    """Share of spaces whose decision matches the label."""
    right = sum(d.occupied == s.occupied for d, s in zip(analysis.decisions, spaces, strict=True))
    return right / len(spaces)


def test_ufpr04_frame_reaches_ninety_percent_per_space(detector: VehicleDetector) -> None:
    camera, spaces = labelled(UFPR04_FRAME)
    image = cv2.imread(str(UFPR04_FRAME))

    analysis = analyse_frame(detector, image, scale_zones(camera, 1280, 720))

    assert accuracy(analysis, spaces) >= 0.96
    assert analysis.occupied == sum(1 for space in spaces if space.occupied) == 10
    assert all(vehicle.class_id in (2, 3, 5, 7) for vehicle in analysis.vehicles)
    assert all(0.0 <= decision.confidence <= 1.0 for decision in analysis.decisions)


def test_zones_drawn_at_1280x720_give_the_same_occupancy_on_a_640x360_frame(
    detector: VehicleDetector,
) -> None:
    camera, spaces = labelled(PUCPR_FRAME)
    image = cv2.imread(str(PUCPR_FRAME))
    small = cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA)

    full = analyse_frame(detector, image, scale_zones(camera, 1280, 720))
    half = analyse_frame(detector, small, scale_zones(camera, 640, 360))

    assert (half.width, half.height) == (640, 360)
    assert abs(half.occupied - full.occupied) <= 2
    pairs = zip(full.decisions, half.decisions, strict=True)
    changed = [at_full.zone_id for at_full, at_half in pairs if at_full.occupied != at_half.occupied]
    assert len(changed) <= 2, changed
    assert accuracy(half, spaces) >= 0.97


def test_a_4_3_frame_for_zones_drawn_at_16_9_is_refused_naming_the_camera() -> None:
    camera, _ = labelled(PUCPR_FRAME)
    camera = camera.model_copy(update={"id": "pucpr-east"})
    frame = cv2.resize(cv2.imread(str(PUCPR_FRAME)), (640, 480), interpolation=cv2.INTER_AREA)
    height, width = frame.shape[:2]

    with pytest.raises(ZoneScaleError, match=r"camera 'pucpr-east': frame is 640x480 .* drawn for 1280x720"):
        scale_zones(camera, width, height)


def test_tiles_find_the_small_far_cars_the_full_frame_pass_misses(
    detector: VehicleDetector, tmp_path: Path
) -> None:
    camera, spaces = labelled(PUCPR_FRAME)
    image = cv2.imread(str(PUCPR_FRAME))
    zones = scale_zones(camera, 1280, 720)
    untiled = VehicleDetector(
        DetectionSettings(model=str(MODEL_PATH), tile_size=0), tmp_path
    )

    tiled_accuracy = accuracy(analyse_frame(detector, image, zones), spaces)
    untiled_accuracy = accuracy(analyse_frame(untiled, image, zones), spaces)

    assert tiled_accuracy >= 0.97
    assert untiled_accuracy < 0.85
    assert tiled_accuracy - untiled_accuracy > 0.1


def test_no_zones_means_no_tiles_and_an_empty_frame_has_no_vehicles(detector: VehicleDetector) -> None:
    blank = np.full((720, 1280, 3), 127, dtype=np.uint8)

    assert detector.detect(blank, None) == []
    assert analyse_frame(detector, blank, []).decisions == []


def test_missing_weights_are_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="weights not found at .*nowhere.pt"):
        VehicleDetector(DetectionSettings(model=str(tmp_path / "nowhere.pt")), tmp_path)


def test_auto_device_falls_back_to_cpu_here_and_explicit_devices_pass_through() -> None:
    import torch

    expected = "cpu"
    if torch.backends.mps.is_available():
        expected = "mps"
    elif torch.cuda.is_available():
        expected = "cuda:0"
    assert choose_device("auto") == expected
    assert choose_device("cpu") == "cpu"
    assert choose_device("cuda") == "cuda:0"


def test_ultralytics_settings_stay_under_the_data_dir(detector: VehicleDetector, tmp_path: Path) -> None:
    import os

    assert os.environ["YOLO_OFFLINE"] == "1"
    assert Path(os.environ["YOLO_CONFIG_DIR"]).name == "ultralytics"
