"""The vehicle detector: loads YOLO weights once and finds vehicles with a full-frame and a tiled pass."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from detect.tiling import Tile, TilePlan, Vehicle, cut_by_frame, cut_by_tile, merge_vehicles, tile_grid
from shared.config import DetectionSettings
from shared.logging import get_logger

log = get_logger(__name__)

# YOLO input sizes must be multiples of the network's largest stride.
STRIDE_PX = 32


class DetectorError(RuntimeError):
    """The detector cannot be loaded or run as configured."""


def prepare_ultralytics(data_dir: Path) -> None:
    """Keep ultralytics offline, quiet, and its settings under the data dir; call before importing it."""
    config_dir = Path(data_dir) / "ultralytics"
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("YOLO_VERBOSE", "False")


def choose_device(requested: str) -> str:
    """The torch device to run on: the one asked for, or for auto MPS, else CUDA, else CPU."""
    import torch

    requested = requested.lower()
    if requested == "auto":
        if torch.backends.mps.is_available():
            return "mps"
        if torch.cuda.is_available():
            return "cuda:0"
        return "cpu"
    if requested == "cuda":
        return "cuda:0"
    return requested


def _available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class VehicleDetector:
    """YOLO weights loaded once; `detect` returns the vehicles in one BGR frame."""

    def __init__(self, settings: DetectionSettings, data_dir: Path, model: str | None = None) -> None:
        self.settings = settings
        self.model_path = Path(model or settings.model)
        if not self.model_path.is_file():
            raise DetectorError(f"detection.model: weights not found at {self.model_path}")
        prepare_ultralytics(data_dir)
        import torch
        from ultralytics import YOLO

        self.device = choose_device(settings.device)
        if self.device == "cpu":
            # ultralytics pins OMP_NUM_THREADS=1 on import; inference wants every core.
            torch.set_num_threads(_available_cores())
        try:
            self.model: Any = YOLO(str(self.model_path), task="detect")
        except Exception as error:
            raise DetectorError(f"detection.model: cannot load {self.model_path} ({error})") from error
        self._predict([np.zeros((64, 64, 3), dtype=np.uint8)], self.settings.image_size)
        log.info("detector_loaded", model=str(self.model_path), device=self.device)

    @property
    def model_name(self) -> str:
        """The weights file name, as recorded with each detection."""
        return self.model_path.name

    def _predict(self, images: list[np.ndarray], image_size: int) -> list[Any]:
        """One batched model call over same-sized images."""
        return self.model.predict(
            images,
            imgsz=image_size,
            conf=self.settings.confidence,
            classes=self.settings.classes,
            agnostic_nms=True,
            device=self.device,
            verbose=False,
        )

    def tiles(self, image: np.ndarray, plan: TilePlan | None) -> list[Tile]:
        """The tiles to slice the planned region into; none without a plan or when tiling is off."""
        height, width = image.shape[:2]
        if plan is None or self.settings.tile_size <= 0:
            return []
        tile_frame_px = max(STRIDE_PX, round(self.settings.tile_size / plan.scale))
        return tile_grid(plan.region, width, height, tile_frame_px, self.settings.tile_overlap)

    def detect(self, image: np.ndarray, plan: TilePlan | None = None) -> list[Vehicle]:
        """Vehicles in a BGR frame: a full-frame pass merged with one batched pass over the planned tiles."""
        height, width = image.shape[:2]
        found = self._collect(self._predict([image], self.settings.image_size)[0], None, width, height)
        tiles = self.tiles(image, plan)
        if plan is not None and tiles:
            crops = [np.ascontiguousarray(image[tile.y1:tile.y2, tile.x1:tile.x2]) for tile in tiles]
            longest = max(tiles[0].x2 - tiles[0].x1, tiles[0].y2 - tiles[0].y1)
            input_px = STRIDE_PX * math.ceil(longest * plan.scale / STRIDE_PX)
            for tile, result in zip(tiles, self._predict(crops, input_px), strict=True):
                found.extend(self._collect(result, tile, width, height))
        return merge_vehicles(found, self.settings.merge_iou, self.settings.merge_containment)

    def _collect(self, result: Any, tile: Tile | None, width: int, height: int) -> list[Vehicle]:
        """Vehicles of one model result in frame pixels, without fragments cut by a tile edge."""
        dx, dy = (tile.x1, tile.y1) if tile else (0, 0)
        boxes = result.boxes
        vehicles: list[Vehicle] = []
        for xyxy, confidence, class_id in zip(
            boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True
        ):
            box = (xyxy[0] + dx, xyxy[1] + dy, xyxy[2] + dx, xyxy[3] + dy)
            if tile is not None and cut_by_tile(box, tile, width, height):
                continue
            vehicles.append(Vehicle(box, float(confidence), int(class_id), cut_by_frame(box, width, height)))
        return vehicles
