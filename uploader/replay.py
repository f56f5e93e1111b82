"""The 63 PKLot frames replayed as four cameras: the frames, their zones, and their snapshot rows."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.pklot import read_pklot_spaces

REPO_DIR = Path(__file__).resolve().parents[1]
PKLOT_DIR = REPO_DIR.parent / "shared" / "data" / "pklot"
SERIES = {"pucpr-sunny": "PUCPR/Sunny", "pucpr-rainy": "PUCPR/Rainy", "ufpr04": "UFPR04/Cloudy",
          "ufpr05": "UFPR05/Rainy"}
FRAME_WIDTH_PX = 1280
FRAME_HEIGHT_PX = 720


@dataclass(frozen=True)
class Frame:
    """One PKLot frame replayed as a snapshot of one camera."""

    camera_id: str
    jpeg: Path
    captured_at: float


@dataclass(frozen=True)
class SeededSnapshot:
    """A snapshot row written for a frame: its id and its JPEG's file name."""

    snapshot_id: int
    name: str


def frames(pklot_dir: Path = PKLOT_DIR) -> list[Frame]:
    """Every frame of the four series, interleaved the way four cameras running side by side would be."""
    series = {
        camera_id: sorted((pklot_dir / relative).glob("*.jpg")) for camera_id, relative in SERIES.items()
    }
    replay: list[Frame] = []
    for index in range(max(len(paths) for paths in series.values())):
        for camera_id, paths in series.items():
            if index < len(paths):
                stamp = datetime.strptime(paths[index].stem, "%Y-%m-%d_%H_%M_%S").replace(tzinfo=UTC)
                replay.append(Frame(camera_id, paths[index], stamp.timestamp()))
    return replay


def camera_configs(pklot_dir: Path = PKLOT_DIR) -> list[dict[str, Any]]:
    """The `cameras:` config of the four cameras, each with its series' spaces as parking zones.

    The zones come from the series' first XML file, as `parkmon zones import` would make them; every
    frame of a series has the same spaces.
    """
    cameras = []
    for camera_id, relative in SERIES.items():
        first = sorted((pklot_dir / relative).glob("*.xml"))[0]
        zones = [{"id": space.space_id, "coordinates": space.contour} for space in read_pklot_spaces(first)]
        cameras.append({
            "id": camera_id, "source": str(pklot_dir / relative), "width": FRAME_WIDTH_PX,
            "height": FRAME_HEIGHT_PX, "parking_zones": zones,
        })
    return cameras


def insert_snapshot(
    connection: sqlite3.Connection, data_dir: Path, device_id: str, frame: Frame
) -> SeededSnapshot:
    """The frame's snapshot row, as capture writes it, with the JPEG linked in at the contract's path."""
    moment = datetime.fromtimestamp(frame.captured_at, UTC)
    name = f"{device_id}_{frame.camera_id}_{moment.strftime('%Y%m%dT%H%M%S_%f')}Z.jpg"
    relative = f"snapshots/{moment.strftime('%Y/%m/%d')}/{name}"
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(frame.jpeg, data_dir / relative)
    snapshot_id = connection.execute(
        """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height,
               source_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (device_id, frame.camera_id, frame.captured_at, relative, frame.jpeg.stat().st_size,
         FRAME_WIDTH_PX, FRAME_HEIGHT_PX, frame.jpeg.name),
    ).lastrowid
    assert snapshot_id is not None
    return SeededSnapshot(snapshot_id, name)
