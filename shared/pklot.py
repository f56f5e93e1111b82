"""Reading PKLot annotation files: spaces, their contours and occupied labels."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabelledSpace:
    """One PKLot space: its id, contour and label (None where the file has none)."""

    space_id: str
    contour: list[list[float]]
    occupied: bool | None


class PklotError(ValueError):
    """A PKLot XML file that cannot be read."""


def read_pklot_spaces(path: Path) -> list[LabelledSpace]:
    """Parse a PKLot XML file, accepting <point> and <Point> and missing labels."""
    try:
        root = ET.fromstring(Path(path).read_bytes())
    except (OSError, ET.ParseError) as error:
        raise PklotError(f"{path}: cannot read PKLot XML ({error})") from error

    spaces: list[LabelledSpace] = []
    for space in root.iter("space"):
        space_id = space.get("id")
        if space_id is None:
            raise PklotError(f"{path}: a <space> has no id attribute")
        contour = space.find("contour")
        points = [] if contour is None else [
            [float(point.get("x", "nan")), float(point.get("y", "nan"))]
            for point in contour
            if point.tag.lower() == "point"
        ]
        label = space.get("occupied")
        occupied = None if label is None or label.strip() == "" else label.strip() == "1"
        spaces.append(LabelledSpace(space_id=space_id, contour=points, occupied=occupied))
    return spaces
