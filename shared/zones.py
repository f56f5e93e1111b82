"""Parking zones: the marked spaces of one camera and their validation."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from shapely.geometry import Polygon
from shapely.validation import explain_validity


class ZoneError(ValueError):
    """A parking zone that cannot be used, with the zone id in the message."""

    def __init__(self, zone_id: object, reason: str) -> None:
        self.zone_id = zone_id
        self.reason = reason
        super().__init__(f"zone {zone_id}: {reason}")


def _check_coordinates(zone_id: object, coordinates: Any) -> list[list[float]]:
    """Return the coordinates as float pairs or raise ZoneError naming what is wrong."""
    if not isinstance(coordinates, (list, tuple)):
        raise ZoneError(zone_id, "coordinates must be a list of [x, y] points")
    points: list[list[float]] = []
    for index, point in enumerate(coordinates):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ZoneError(zone_id, f"point {index} must be [x, y], got {point!r}")
        pair: list[float] = []
        for value in point:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ZoneError(zone_id, f"point {index} has a non-numeric coordinate {value!r}")
            if not math.isfinite(value):
                raise ZoneError(zone_id, f"point {index} has a non-finite coordinate {value!r}")
            pair.append(float(value))
        points.append(pair)
    if len(points) < 3:
        raise ZoneError(zone_id, f"needs at least 3 points, has {len(points)}")
    return points


def zone_polygon(zone_id: object, points: list[list[float]]) -> Polygon:
    """Build the zone's polygon, refusing zero-area and self-intersecting shapes."""
    polygon = Polygon(points)
    # Collinear or repeated points read as self-intersecting to GEOS; name them for what they are.
    if polygon.convex_hull.area <= 0.0:
        raise ZoneError(zone_id, "polygon has zero area")
    validity = "Valid Geometry" if polygon.is_valid else explain_validity(polygon)
    if validity.startswith("Self-intersection"):
        raise ZoneError(zone_id, f"polygon intersects itself ({validity})")
    if polygon.area <= 0.0:
        raise ZoneError(zone_id, "polygon has zero area")
    if not polygon.is_valid:
        raise ZoneError(zone_id, f"polygon is not valid ({validity})")
    return polygon


class Zone(BaseModel):
    """One marked parking space as a polygon in frame pixels."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="Zone id, unique within the camera.")
    space_id: int | str | None = Field(default=None, description="Operator's space number.")
    name: str | None = Field(default=None, description="Label painted on the space, e.g. A1.")
    description: str | None = None
    coordinates: list[list[float]] = Field(description="Polygon corners [[x, y], ...] in pixels.")
    detection_difficulty: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _validate_raw(cls, data: Any) -> Any:
        """Check id and coordinates before field parsing so errors name the zone."""
        if not isinstance(data, dict):
            raise ValueError(f"a zone must be a mapping, got {data!r}")
        zone_id = data.get("id")
        if zone_id is None or (isinstance(zone_id, str) and not zone_id.strip()):
            raise ZoneError(data.get("name") or "?", "missing id")
        if isinstance(zone_id, bool) or not isinstance(zone_id, (int, str)):
            raise ZoneError(zone_id, "id must be a number or a string")
        points = _check_coordinates(zone_id, data.get("coordinates"))
        zone_polygon(zone_id, points)
        return {**data, "id": str(zone_id), "coordinates": points}

    @property
    def polygon(self) -> Polygon:
        """The zone as a shapely polygon."""
        return Polygon(self.coordinates)


def check_unique_ids(zones: list[Zone]) -> None:
    """Raise ZoneError on the first zone id used twice."""
    seen: set[str] = set()
    for zone in zones:
        if zone.id in seen:
            raise ZoneError(zone.id, "duplicate zone id")
        seen.add(zone.id)
