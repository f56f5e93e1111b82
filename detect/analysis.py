"""One frame through detector and occupancy rule: the code path both the stage and `parkmon eval` run."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from detect.detector import VehicleDetector
from detect.occupancy import SpaceShape, ZoneDecision, decide_occupancy, zones_region
from detect.tiling import TilePlan, Vehicle
from shared.config import DetectionSettings


@dataclass(frozen=True)
class FrameAnalysis:
    """What one frame showed: the vehicles, each zone's decision and how long it took."""

    width: int
    height: int
    vehicles: list[Vehicle]
    decisions: list[ZoneDecision]
    inference_ms: float

    @property
    def occupied(self) -> int:
        """Zones decided occupied in this frame."""
        return sum(1 for decision in self.decisions if decision.occupied)


def tiling_plan(
    spaces: list[SpaceShape], width: int, height: int, settings: DetectionSettings
) -> TilePlan | None:
    """Tiles around the zones too small for the full-frame pass, magnified so they reach tile_zone_px.

    None when every zone is large enough in the full-frame pass, or tiles would magnify no more than it.
    """
    full_scale = settings.image_size / max(width, height)
    sides = {space.zone_id: math.sqrt(space.polygon.area) for space in spaces}
    small = [space for space in spaces if sides[space.zone_id] * full_scale < settings.tile_zones_below_px]
    if not small:
        return None
    typical_side = statistics.median(sides[space.zone_id] for space in small)
    scale = min(settings.tile_max_scale, settings.tile_zone_px / typical_side)
    region = zones_region(small)
    if region is None or scale <= full_scale:
        return None
    return TilePlan(region, scale)


def analyse_frame(detector: VehicleDetector, image: np.ndarray, spaces: list[SpaceShape]) -> FrameAnalysis:
    """Detect vehicles (tiling only around small zones) and decide every zone."""
    height, width = image.shape[:2]
    started = time.perf_counter()
    vehicles = detector.detect(image, tiling_plan(spaces, width, height, detector.settings))
    decisions = decide_occupancy(spaces, vehicles, detector.settings)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return FrameAnalysis(width, height, vehicles, decisions, round(elapsed_ms, 1))
