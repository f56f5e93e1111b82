"""Importing parking zones drawn with other tools, and rendering them as parking_zones YAML."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.pklot import PklotError, read_pklot_spaces
from shared.zones import Zone, ZoneError, check_unique_ids, zone_polygon

ZONE_FORMATS = ("pklot", "ultralytics", "mask")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class ZoneImportError(ValueError):
    """A zone file that cannot be imported; the message names the file and, where known, the zone."""


@dataclass(frozen=True)
class DrawnSize:
    """The frame size a zone file's coordinates are in, and the image it was read from."""

    width: int
    height: int
    image: Path


def _plain_number(value: float) -> int | float:
    """Whole-pixel coordinates as ints, so the YAML reads like hand-written zones."""
    return int(value) if math.isfinite(value) and float(value).is_integer() else float(value)


def _zone_id(raw_id: str) -> int | str:
    """A numeric id as an int (PKLot numbers its spaces), anything else as given."""
    return int(raw_id) if raw_id.strip().isdigit() else raw_id.strip()


def _zone_entry(raw_id: str, points: list[list[float]]) -> dict[str, Any]:
    """One parking_zones entry for a space id and its polygon."""
    zone_id = _zone_id(raw_id)
    return {
        "id": zone_id,
        "space_id": zone_id,
        "name": f"P{zone_id}",
        "coordinates": [[_plain_number(x), _plain_number(y)] for x, y in points],
    }


def _read_pklot(path: Path) -> list[dict[str, Any]]:
    """Spaces of a PKLot XML file, ids as in the file."""
    try:
        spaces = read_pklot_spaces(path)
    except PklotError as error:
        raise ZoneImportError(str(error)) from error
    return [_zone_entry(space.space_id, space.contour) for space in spaces]


def _is_pair(point: Any) -> bool:
    """Whether a JSON value looks like one [x, y] point."""
    return isinstance(point, list) and len(point) == 2


def _read_ultralytics(path: Path) -> list[dict[str, Any]]:
    """Zones of an Ultralytics parking JSON file (`[{"points": [[x, y], ...]}, ...]`), numbered from 1."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ZoneImportError(f"{path}: cannot read Ultralytics zone JSON ({error})") from error
    if not isinstance(data, list):
        raise ZoneImportError(f"{path}: expected a list of {{\"points\": [...]}} objects")
    zones = []
    for number, item in enumerate(data, start=1):
        points = item.get("points") if isinstance(item, dict) else None
        if not isinstance(points, list) or not all(_is_pair(point) for point in points):
            raise ZoneImportError(f"{path}: zone {number}: points must be a list of [x, y]")
        zones.append(_zone_entry(str(number), [[float(x), float(y)] for x, y in points]))
    return zones


def _read_mask(path: Path) -> list[dict[str, Any]]:
    """One zone per white blob of a mask image, numbered top to bottom, then left to right."""
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ZoneImportError(f"{path}: not an image OpenCV can read")
    _, binary = cv2.threshold(mask, 127, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outlines = []
    for contour in contours:
        outline = cv2.approxPolyDP(contour, 0.01 * cv2.arcLength(contour, True), True).reshape(-1, 2)
        if len(outline) >= 3:
            outlines.append(outline.tolist())
    outlines.sort(key=lambda points: (min(y for _, y in points), min(x for x, _ in points)))
    return [_zone_entry(str(number), points) for number, points in enumerate(outlines, start=1)]


_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "pklot": _read_pklot,
    "ultralytics": _read_ultralytics,
    "mask": _read_mask,
}


def _validate(path: Path, zones: list[dict[str, Any]]) -> None:
    """Refuse degenerate or self-intersecting polygons and repeated ids, naming the zone."""
    try:
        for entry in zones:
            points = entry["coordinates"]
            if len(points) < 3:
                raise ZoneError(entry["id"], f"needs at least 3 points, has {len(points)}")
            if not all(math.isfinite(value) for point in points for value in point):
                raise ZoneError(entry["id"], "a point has a missing or non-finite coordinate")
            zone_polygon(entry["id"], points)
        check_unique_ids([Zone.model_validate(entry) for entry in zones])
    except ZoneError as error:
        raise ZoneImportError(f"{path}: {error}") from error


def import_zones(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Read a zone file of another tool as parking_zones entries; raise ZoneImportError if unusable."""
    reader = _READERS.get(fmt)
    if reader is None:
        raise ZoneImportError(f"unknown zone format {fmt!r}; use one of {', '.join(ZONE_FORMATS)}")
    path = Path(path)
    zones = reader(path)
    if not zones:
        raise ZoneImportError(f"{path}: no parking spaces found")
    _validate(path, zones)
    return zones


class _FlowList(list):  # type: ignore[type-arg]
    """A list YAML writes on one line: a zone's corner points."""


class _ZoneDumper(yaml.SafeDumper):
    """SafeDumper that writes coordinates inline and indents list items under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        """Indent block sequences like hand-written config files do."""
        return super().increase_indent(flow, False)


def _represent_flow_list(dumper: yaml.SafeDumper, value: _FlowList) -> yaml.SequenceNode:
    """Write a _FlowList inline."""
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_ZoneDumper.add_representer(_FlowList, _represent_flow_list)


def zones_yaml(zones: list[dict[str, Any]], camera: dict[str, Any] | None = None) -> str:
    """Render zones as a `parking_zones:` document (with a `camera:` block if given) load_settings reads."""
    document: dict[str, Any] = {}
    if camera is not None:
        document["camera"] = dict(camera)
    document["parking_zones"] = [
        {**zone, "coordinates": _FlowList(_FlowList(point) for point in zone["coordinates"])}
        for zone in zones
    ]
    return yaml.dump(document, Dumper=_ZoneDumper, sort_keys=False, default_flow_style=False, width=1000)


def _image_beside(path: Path) -> Path | None:
    """The frame a zone file was drawn on: the image of the same name, else the folder's only image."""
    images = sorted(item for item in path.parent.iterdir() if item.suffix.lower() in IMAGE_SUFFIXES)
    same_name = [image for image in images if image.stem == path.stem]
    if same_name:
        return same_name[0]
    return images[0] if len(images) == 1 else None


def drawn_size(path: Path, fmt: str) -> DrawnSize | None:
    """The size of the frame the zones were drawn for: the mask itself, or the image beside the file."""
    import cv2

    path = Path(path)
    image = path if fmt == "mask" else _image_beside(path)
    if image is None:
        return None
    frame = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    if frame is None:
        raise ZoneImportError(f"{image}: not an image OpenCV can read, so its frame size is unknown")
    height, width = frame.shape[:2]
    return DrawnSize(width, height, image)


def zone_file_yaml(path: Path, fmt: str) -> str:
    """What `parkmon zones import` prints: a camera block with the drawn-for frame size, then the zones."""
    path = Path(path)
    zones = import_zones(path, fmt)
    size = drawn_size(path, fmt)
    if size is None:
        header = (
            f"# {len(zones)} zones from {path.name}; no frame image beside it: set camera width and height "
            "to the size these zones were drawn for\n"
        )
        return header + zones_yaml(zones)
    drawn = f"{size.image.name} ({size.width}x{size.height})"
    header = f"# {len(zones)} zones from {path.name}, drawn on {drawn}\n"
    return header + zones_yaml(zones, {"width": size.width, "height": size.height})
