"""Sliced inference geometry: tiles over the watched region, clipped fragments, class-agnostic merging."""

from __future__ import annotations

import math
from dataclasses import dataclass

Box = tuple[float, float, float, float]

# A box edge this close to a tile edge that lies inside the frame is cut off by the tile.
EDGE_TOLERANCE_PX = 2.0


@dataclass(frozen=True)
class Vehicle:
    """One detected vehicle in frame pixels; `clipped` when the frame edge cuts it off."""

    box: Box
    confidence: float
    class_id: int
    clipped: bool = False


@dataclass(frozen=True)
class TilePlan:
    """Where to slice the frame and how much to magnify the tiles (model px per frame px)."""

    region: Box
    scale: float


@dataclass(frozen=True)
class Tile:
    """One crop of the frame fed to the model, in frame pixels."""

    x1: int
    y1: int
    x2: int
    y2: int


def _spans(low: int, high: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """About `size`-long windows covering [low, high), neighbours sharing `overlap` of a window.

    The count is rounded, not raised, so a region slightly longer than one tile gets one slightly
    longer tile (seen at a little less magnification) instead of a second, mostly redundant one.
    """
    span = high - low
    shared = size * overlap
    count = max(1, round((span - shared) / (size - shared)))
    length = (span + (count - 1) * shared) / count
    return [
        (low + round(index * (length - shared)), low + round(index * (length - shared) + length))
        for index in range(count)
    ]


def tile_grid(region: Box, frame_width: int, frame_height: int, tile_size: int, overlap: float) -> list[Tile]:
    """Equal-sized tiles of about `tile_size` px covering `region` (clamped to the frame)."""
    x1 = max(0, math.floor(region[0]))
    y1 = max(0, math.floor(region[1]))
    x2 = min(frame_width, math.ceil(region[2]))
    y2 = min(frame_height, math.ceil(region[3]))
    if x2 <= x1 or y2 <= y1:
        return []
    return [
        Tile(left, top, right, bottom)
        for top, bottom in _spans(y1, y2, tile_size, overlap)
        for left, right in _spans(x1, x2, tile_size, overlap)
    ]


def cut_by_tile(box: Box, tile: Tile, frame_width: int, frame_height: int) -> bool:
    """Whether a tile edge inside the frame cuts this box, making it a fragment of a vehicle."""
    return (
        (tile.x1 > 0 and box[0] - tile.x1 < EDGE_TOLERANCE_PX)
        or (tile.y1 > 0 and box[1] - tile.y1 < EDGE_TOLERANCE_PX)
        or (tile.x2 < frame_width and tile.x2 - box[2] < EDGE_TOLERANCE_PX)
        or (tile.y2 < frame_height and tile.y2 - box[3] < EDGE_TOLERANCE_PX)
    )


def cut_by_frame(box: Box, frame_width: int, frame_height: int) -> bool:
    """Whether the frame edge cuts this box, so its true extent is unknown."""
    return (
        box[0] < EDGE_TOLERANCE_PX
        or box[1] < EDGE_TOLERANCE_PX
        or frame_width - box[2] < EDGE_TOLERANCE_PX
        or frame_height - box[3] < EDGE_TOLERANCE_PX
    )


def _overlaps(a: Box, b: Box) -> tuple[float, float]:
    """Intersection over union and intersection over the smaller box."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0, 0.0
    inter = width * height
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def merge_vehicles(vehicles: list[Vehicle], iou: float, containment: float) -> list[Vehicle]:
    """Class-agnostic NMS: keep the most confident box; drop others that overlap or sit inside it."""
    kept: list[Vehicle] = []
    for vehicle in sorted(vehicles, key=lambda item: item.confidence, reverse=True):
        duplicate = False
        for other in kept:
            union_ratio, smaller_ratio = _overlaps(vehicle.box, other.box)
            if union_ratio >= iou or smaller_ratio >= containment:
                duplicate = True
                break
        if not duplicate:
            kept.append(vehicle)
    return kept
