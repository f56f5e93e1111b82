"""What a finished detect job writes: the detection row, smoothed zone state, zone events, the upload job."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from detect.analysis import FrameAnalysis
from detect.smoothing import Observation, SmoothingRule, smoothed_state
from shared.jobs import UPLOAD, enqueue


def result_document(snapshot: sqlite3.Row, analysis: FrameAnalysis, model: str) -> dict[str, Any]:
    """The detection result JSON: stored in detections.result_json, uploaded and POSTed as is."""
    return {
        "device_id": snapshot["device_id"],
        "camera_id": snapshot["camera_id"],
        "snapshot_id": snapshot["id"],
        "captured_at": snapshot["captured_at"],
        "image": Path(snapshot["path"]).name,
        "model": model,
        "inference_ms": analysis.inference_ms,
        "frame": {"width": analysis.width, "height": analysis.height},
        "vehicles": [
            {
                "box": [round(value, 1) for value in vehicle.box],
                "confidence": round(vehicle.confidence, 4),
                "class_id": vehicle.class_id,
            }
            for vehicle in analysis.vehicles
        ],
        "zones": [
            {"zone_id": decision.zone_id, "occupied": decision.occupied, "confidence": decision.confidence}
            for decision in analysis.decisions
        ],
        "occupied": analysis.occupied,
        "spaces": len(analysis.decisions),
    }


def _recent_observations(
    connection: sqlite3.Connection, camera_id: str, snapshot_id: int, captured_at: float, limit: int
) -> dict[str, list[Observation]]:
    """Per zone, the camera's frame decisions from earlier snapshots, oldest first."""
    rows = connection.execute(
        """SELECT s.captured_at, d.result_json FROM detections d JOIN snapshots s ON s.id = d.snapshot_id
           WHERE d.camera_id = ? AND d.snapshot_id != ? AND s.captured_at <= ?
           ORDER BY s.captured_at DESC, s.id DESC LIMIT ?""",
        (camera_id, snapshot_id, captured_at, limit),
    ).fetchall()
    history: dict[str, list[Observation]] = {}
    for row in reversed(rows):
        for zone in json.loads(row["result_json"]).get("zones", []):
            observation = Observation(row["captured_at"], bool(zone["occupied"]), float(zone["confidence"]))
            history.setdefault(str(zone["zone_id"]), []).append(observation)
    return history


def _stored_state(connection: sqlite3.Connection, camera_id: str, zone_id: str) -> sqlite3.Row | None:
    """The zone's current state with the capture time of the snapshot it came from."""
    return connection.execute(
        """SELECT z.occupied, z.since, z.snapshot_id, s.captured_at AS captured_at
           FROM zone_state z LEFT JOIN snapshots s ON s.id = z.snapshot_id
           WHERE z.camera_id = ? AND z.zone_id = ?""",
        (camera_id, zone_id),
    ).fetchone()


def update_zones(
    connection: sqlite3.Connection, snapshot: sqlite3.Row, analysis: FrameAnalysis, rule: SmoothingRule
) -> list[tuple[str, str]]:
    """Smooth each zone's state with its recent history; record changes as events. Returns the changes."""
    camera_id = snapshot["camera_id"]
    captured_at = snapshot["captured_at"]
    history = _recent_observations(connection, camera_id, snapshot["id"], captured_at, rule.window)
    now = time.time()
    changes: list[tuple[str, str]] = []
    for decision in analysis.decisions:
        stored = _stored_state(connection, camera_id, decision.zone_id)
        if stored is not None and stored["captured_at"] is not None and stored["captured_at"] > captured_at:
            continue
        current = None if stored is None else bool(stored["occupied"])
        observations = [*history.get(decision.zone_id, []),
                        Observation(captured_at, decision.occupied, decision.confidence)]
        occupied = smoothed_state(current, observations, rule)
        agrees = occupied == decision.occupied
        confidence = decision.confidence if agrees else round(1.0 - decision.confidence, 4)
        changed = current is not None and occupied != current
        since = captured_at if stored is None or changed else stored["since"]
        connection.execute(
            """INSERT INTO zone_state (device_id, camera_id, zone_id, occupied, confidence, since,
                                       updated_at, snapshot_id)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (camera_id, zone_id) DO UPDATE SET device_id = excluded.device_id,
                   occupied = excluded.occupied, confidence = excluded.confidence, since = excluded.since,
                   updated_at = excluded.updated_at, snapshot_id = excluded.snapshot_id""",
            (snapshot["device_id"], camera_id, decision.zone_id, int(occupied), confidence, since, now,
             snapshot["id"]),
        )
        if changed:
            event = "occupied" if occupied else "vacated"
            connection.execute(
                """INSERT INTO zone_events (device_id, camera_id, zone_id, event, at, confidence, snapshot_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (camera_id, zone_id, snapshot_id) DO NOTHING""",
                (snapshot["device_id"], camera_id, decision.zone_id, event, captured_at, confidence,
                 snapshot["id"]),
            )
            changes.append((decision.zone_id, event))
    return changes


def write_detection(
    connection: sqlite3.Connection,
    snapshot: sqlite3.Row,
    analysis: FrameAnalysis,
    document: dict[str, Any],
    rule: SmoothingRule,
) -> list[tuple[str, str]]:
    """All effects of one detect job; call inside the job's completing transaction."""
    connection.execute(
        """INSERT OR REPLACE INTO detections (snapshot_id, device_id, camera_id, detected_at, model,
               inference_ms, vehicles, spaces, occupied, result_json)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (snapshot["id"], snapshot["device_id"], snapshot["camera_id"], time.time(), document["model"],
         analysis.inference_ms, len(analysis.vehicles), document["spaces"], document["occupied"],
         json.dumps(document, separators=(",", ":"))),
    )
    changes = update_zones(connection, snapshot, analysis, rule)
    enqueue(connection, UPLOAD, snapshot["id"])
    return changes
