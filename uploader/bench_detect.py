"""Detector mode of the upload benchmark: the device state comes from parkmon's own detect stage.

The frames are written as capture leaves them (snapshot rows with DETECT jobs), then
`parkmon run detect --once` runs as its own process, exactly as in the pipeline: VehicleDetector and
detect.analysis decide every zone, and the stage writes the detection results and the UPLOAD jobs.
The upload stage's process never imports torch or ultralytics; only that detect process does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.db import immediate, open_database
from shared.jobs import DETECT, enqueue
from shared.pklot import read_pklot_spaces
from uploader.replay import REPO_DIR, Frame, SeededSnapshot, insert_snapshot

DEFAULT_MODEL = REPO_DIR.parent / "shared" / "models" / "yolov8n-coco.pt"
_STDERR_TAIL_CHARS = 2000


class BenchDetectError(RuntimeError):
    """The detect stage could not produce a result for every frame."""


def seed_captured(data_dir: Path, device_id: str, replay: list[Frame]) -> list[SeededSnapshot]:
    """Snapshot rows and their DETECT jobs, each frame in one transaction as capture writes it."""
    connection = open_database(data_dir / "parkmon.db")
    seeded = []
    try:
        for frame in replay:
            with immediate(connection):
                snapshot = insert_snapshot(connection, data_dir, device_id, frame)
                enqueue(connection, DETECT, snapshot.snapshot_id)
            seeded.append(snapshot)
    finally:
        connection.close()
    return seeded


def run_detect_stage(settings: Settings) -> float:
    """`parkmon run detect --once` as its own process, offline, YOLO settings under data_dir; seconds."""
    environment = {
        **os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(settings.data_dir / "ultralytics"),
    }
    command = [sys.executable, "-m", "shared.cli", "--config", str(settings.config_path), "run", "detect",
               "--once"]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO_DIR, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise BenchDetectError(
            f"detect stage exited {finished.returncode}: {finished.stderr[-_STDERR_TAIL_CHARS:]}"
        )
    return seconds


def detected_results(settings: Settings, seeded: list[SeededSnapshot]) -> list[dict[str, Any]]:
    """The detect stage's result JSON of each seeded snapshot, in replay order."""
    connection = open_database(settings.database_path)
    try:
        rows = {
            row["snapshot_id"]: json.loads(row["result_json"])
            for row in connection.execute("SELECT snapshot_id, result_json FROM detections")
        }
        missing = [snapshot.snapshot_id for snapshot in seeded if snapshot.snapshot_id not in rows]
        if missing:
            errors = connection.execute(
                "SELECT DISTINCT last_error FROM jobs WHERE stage = ? AND state != 'done'", (DETECT,)
            ).fetchall()
            raise BenchDetectError(
                f"no detection for snapshots {missing}: {[row['last_error'] for row in errors]}"
            )
    finally:
        connection.close()
    return [rows[snapshot.snapshot_id] for snapshot in seeded]


def label_agreement(replay: list[Frame], results: list[dict[str, Any]]) -> tuple[int, int]:
    """Labelled spaces whose detected state equals the PKLot label, and labelled spaces in all."""
    agreed = labelled = 0
    for frame, result in zip(replay, results, strict=True):
        decided = {str(zone["zone_id"]): bool(zone["occupied"]) for zone in result["zones"]}
        for space in read_pklot_spaces(frame.jpeg.with_suffix(".xml")):
            if space.occupied is None:
                continue
            labelled += 1
            agreed += int(decided.get(space.space_id) == space.occupied)
    return agreed, labelled
