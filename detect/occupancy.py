"""The occupancy rule: which spaces the detected vehicles stand in, one space per vehicle at most."""

from __future__ import annotations

from dataclasses import dataclass

from shapely import STRtree
from shapely.geometry import Polygon
from shapely.geometry import box as rectangle

from detect.tiling import Box, Vehicle
from shared.config import CameraSettings, DetectionSettings

# Frames and zone drawings whose width/height ratios differ by more than this are different views.
ASPECT_TOLERANCE = 0.01


class ZoneScaleError(ValueError):
    """The frame cannot be mapped onto the size the camera's zones were drawn for."""


@dataclass(frozen=True)
class SpaceShape:
    """One zone's polygon in the pixels of the frame being analysed."""

    zone_id: str
    polygon: Polygon


@dataclass(frozen=True)
class ZoneDecision:
    """Whether one zone is occupied in one frame, and how sure the rule is."""

    zone_id: str
    occupied: bool
    confidence: float


def scale_zones(camera: CameraSettings, frame_width: int, frame_height: int) -> list[SpaceShape]:
    """The camera's zones in frame pixels, scaled from the size they were drawn for."""
    drawn_ratio = camera.width / camera.height
    frame_ratio = frame_width / frame_height
    if abs(frame_ratio - drawn_ratio) > ASPECT_TOLERANCE * drawn_ratio:
        raise ZoneScaleError(
            f"camera {camera.id!r}: frame is {frame_width}x{frame_height} but its zones were drawn for "
            f"{camera.width}x{camera.height}; the aspect ratios differ, so the zones cannot be scaled"
        )
    sx = frame_width / camera.width
    sy = frame_height / camera.height
    return [
        SpaceShape(zone.id, Polygon([(x * sx, y * sy) for x, y in zone.coordinates]))
        for zone in camera.parking_zones
    ]


def zones_region(spaces: list[SpaceShape]) -> Box | None:
    """The box around all zones, widened by half the largest zone so vehicles at its rim fit whole."""
    if not spaces:
        return None
    bounds = [space.polygon.bounds for space in spaces]
    margin = 0.5 * max(max(b[2] - b[0], b[3] - b[1]) for b in bounds)
    return (
        min(b[0] for b in bounds) - margin,
        min(b[1] for b in bounds) - margin,
        max(b[2] for b in bounds) + margin,
        max(b[3] for b in bounds) + margin,
    )


def ground_area(vehicle: Vehicle, ground_fraction: float) -> Polygon:
    """The bottom part of a vehicle's box: where its wheels meet the ground in an elevated view."""
    x1, y1, x2, y2 = vehicle.box
    return rectangle(x1, y2 - ground_fraction * (y2 - y1), x2, y2)


def overlap_score(vehicle: Vehicle, space: SpaceShape, settings: DetectionSettings) -> float:
    """How much of the space (or of the vehicle's ground area, if smaller) the vehicle covers, 0..1.

    A box cut by the frame edge shows only part of its vehicle, so only its cover of the space counts;
    a box covering less than min_space_cover of the space (a stray small box) scores nothing.
    """
    return _score(ground_area(vehicle, settings.ground_fraction), vehicle.clipped, space, settings)


def _score(ground: Polygon, clipped: bool, space: SpaceShape, settings: DetectionSettings) -> float:
    """overlap_score for an already built ground area."""
    shared = ground.intersection(space.polygon).area
    space_cover = shared / space.polygon.area
    if shared <= 0.0 or space_cover < settings.min_space_cover:
        return 0.0
    if clipped:
        return space_cover
    return shared / min(space.polygon.area, ground.area)


def _candidate_pairs(
    spaces: list[SpaceShape], vehicles: list[Vehicle], settings: DetectionSettings
) -> list[tuple[float, int, int]]:
    """(score, vehicle index, space index) for every vehicle and space that overlap, best first."""
    tree = STRtree([space.polygon for space in spaces])
    pairs: list[tuple[float, int, int]] = []
    for vehicle_index, vehicle in enumerate(vehicles):
        ground = ground_area(vehicle, settings.ground_fraction)
        for space_index in tree.query(ground):
            score = _score(ground, vehicle.clipped, spaces[int(space_index)], settings)
            if score > 0.0:
                pairs.append((score, vehicle_index, int(space_index)))
    pairs.sort(key=lambda pair: pair[0], reverse=True)
    return pairs


def _evidence(vehicle: Vehicle, score: float, threshold: float) -> float:
    """Belief, 0..1, that this vehicle fills this space: its confidence times how clearly it covers it."""
    return vehicle.confidence * min(1.0, score / (2.0 * threshold))


def decide_occupancy(
    spaces: list[SpaceShape], vehicles: list[Vehicle], settings: DetectionSettings
) -> list[ZoneDecision]:
    """Each zone occupied or free: vehicles and spaces matched greedily one-to-one by overlap."""
    threshold = settings.occupied_overlap
    pairs = _candidate_pairs(spaces, vehicles, settings) if spaces else []

    matched: dict[int, float] = {}
    doubt = [0.0] * len(spaces)
    used_vehicles: set[int] = set()
    for score, vehicle_index, space_index in pairs:
        evidence = _evidence(vehicles[vehicle_index], score, threshold)
        taken = vehicle_index in used_vehicles or space_index in matched
        if score < threshold or taken:
            doubt[space_index] = max(doubt[space_index], evidence if score >= threshold else evidence / 2)
            continue
        matched[space_index] = evidence
        used_vehicles.add(vehicle_index)

    # Confidence that the decision is right, 0.5 (a coin toss) to 1: evidence for or against a vehicle.
    decisions: list[ZoneDecision] = []
    for space_index, space in enumerate(spaces):
        if space_index in matched:
            decisions.append(ZoneDecision(space.zone_id, True, round(0.5 + 0.5 * matched[space_index], 4)))
        else:
            decisions.append(ZoneDecision(space.zone_id, False, round(1.0 - 0.5 * doubt[space_index], 4)))
    return decisions
