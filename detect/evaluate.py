"""`parkmon eval`: score the detect stage's detector and occupancy rule on labelled PKLot frames."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2

from detect.analysis import analyse_frame
from detect.detector import VehicleDetector
from detect.occupancy import scale_zones
from detect.smoothing import Observation, smoothed_state, smoothing_rule
from shared.config import CameraSettings, Settings
from shared.pklot import LabelledSpace, read_pklot_spaces
from shared.zones import Zone

# PKLot names each frame by its local capture time, e.g. 2012-09-13_07_07_50.jpg.
PKLOT_TIME_FORMAT = "%Y-%m-%d_%H_%M_%S"


class EvaluationError(ValueError):
    """A dataset that cannot be scored."""


@dataclass
class Tally:
    """Confusion counts for the label "occupied", and per-frame detection times."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    frame_ms: list[float] = field(default_factory=list)

    def add(self, truth: bool, predicted: bool) -> None:
        """Count one space."""
        if predicted:
            self.tp, self.fp = self.tp + truth, self.fp + (not truth)
        else:
            self.fn, self.tn = self.fn + truth, self.tn + (not truth)

    def merge(self, other: Tally) -> None:
        """Add another tally's counts and times to this one."""
        self.tp, self.fp, self.tn, self.fn = (
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )
        self.frame_ms.extend(other.frame_ms)

    def summary(self) -> dict[str, Any]:
        """Accuracy, precision, recall, F1, confusion counts and time per frame."""
        spaces = self.tp + self.fp + self.tn + self.fn
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report: dict[str, Any] = {
            "spaces": spaces,
            "accuracy": round((self.tp + self.tn) / spaces, 4) if spaces else None,
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "confusion": {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn},
        }
        if self.frame_ms:
            ordered = sorted(self.frame_ms)
            report["frames"] = len(ordered)
            report["median_ms"] = round(statistics.median(ordered), 1)
            report["p95_ms"] = round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 1)
        return report


@dataclass(frozen=True)
class Frame:
    """One labelled frame: image, annotation, camera folder and time-lapse series."""

    image: Path
    xml: Path
    camera: str
    series: str
    captured_at: float


def _capture_time(image: Path) -> float:
    """The frame's capture time from its PKLot name, else the file's modification time."""
    try:
        return datetime.strptime(image.stem, PKLOT_TIME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return image.stat().st_mtime


def find_frames(dataset_dir: Path) -> list[Frame]:
    """Every *.jpg under the folder (symlinks followed) with a sibling .xml, by camera, series and time."""
    frames: list[Frame] = []
    images = [
        Path(folder) / name
        for folder, _, names in os.walk(dataset_dir, followlinks=True)
        for name in names
        if name.lower().endswith(".jpg")
    ]
    for image in sorted(images):
        xml = image.with_suffix(".xml")
        if not xml.is_file():
            continue
        relative = image.relative_to(dataset_dir)
        camera = relative.parts[0] if len(relative.parts) > 1 else Path(dataset_dir).name
        series = str(relative.parent)
        frames.append(Frame(image, xml, camera, series, _capture_time(image)))
    return sorted(frames, key=lambda frame: (frame.camera, frame.series, frame.captured_at, frame.image.name))


def _labelled_camera(frame: Frame, spaces: list[LabelledSpace], width: int, height: int) -> CameraSettings:
    """A camera whose zones are the frame's labelled spaces, drawn at the frame's size."""
    zones = [Zone(id=space.space_id, coordinates=space.contour) for space in spaces]
    return CameraSettings(id=frame.camera, width=width, height=height, parking_zones=zones)


def evaluate_dataset(dataset_dir: Path, settings: Settings, model: str | None = None) -> dict[str, Any]:
    """Per-camera and overall accuracy of the detect stage's code on labelled frames, single and smoothed."""
    frames = find_frames(Path(dataset_dir))
    if not frames:
        raise EvaluationError(f"{dataset_dir}: no *.jpg with a sibling .xml")
    detector = VehicleDetector(settings.detection, settings.data_dir, model=model)
    rule = smoothing_rule(settings.processing)

    single: dict[str, Tally] = defaultdict(Tally)
    smoothed: dict[str, Tally] = defaultdict(Tally)
    histories: dict[tuple[str, str], list[Observation]] = defaultdict(list)
    states: dict[tuple[str, str], bool] = {}
    skipped = 0
    for frame in frames:
        image = cv2.imread(str(frame.image))
        if image is None:
            raise EvaluationError(f"{frame.image}: cannot decode JPEG")
        labelled = [space for space in read_pklot_spaces(frame.xml) if space.occupied is not None]
        skipped += sum(1 for space in read_pklot_spaces(frame.xml) if space.occupied is None)
        height, width = image.shape[:2]
        camera = _labelled_camera(frame, labelled, width, height)
        analysis = analyse_frame(detector, image, scale_zones(camera, width, height))
        single[frame.camera].frame_ms.append(analysis.inference_ms)
        for space, decision in zip(labelled, analysis.decisions, strict=True):
            truth = bool(space.occupied)
            single[frame.camera].add(truth, decision.occupied)
            key = (frame.series, space.space_id)
            histories[key].append(Observation(frame.captured_at, decision.occupied, decision.confidence))
            states[key] = smoothed_state(states.get(key), histories[key][-rule.window - 1:], rule)
            smoothed[frame.camera].add(truth, states[key])

    return {
        "dataset": str(dataset_dir),
        "model": detector.model_name,
        "device": detector.device,
        "overall": _overall(single).summary(),
        "per_camera": {camera: tally.summary() for camera, tally in sorted(single.items())},
        "smoothed": {
            "overall": _overall(smoothed).summary(),
            "per_camera": {camera: tally.summary() for camera, tally in sorted(smoothed.items())},
        },
        "skipped_unlabelled": skipped,
    }


def _overall(tallies: dict[str, Tally]) -> Tally:
    """All cameras' tallies added up."""
    total = Tally()
    for tally in tallies.values():
        total.merge(tally)
    return total


def _row(name: str, single: dict[str, Any], smoothed: dict[str, Any]) -> str:
    """One line of the text report."""
    confusion = single["confusion"]
    return (
        f"{name:<10} {single['spaces']:>6} {single['accuracy']:>8.2%} {single['precision']:>9.2%} "
        f"{single['recall']:>7.2%} {single['f1']:>6.3f} {confusion['tp']:>5} {confusion['fp']:>4} "
        f"{confusion['tn']:>5} {confusion['fn']:>4} {smoothed['accuracy']:>9.2%} "
        f"{single.get('median_ms', 0):>8.0f} {single.get('p95_ms', 0):>7.0f}"
    )


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as a plain-text table, one row per camera and one overall."""
    header = (
        f"{'camera':<10} {'spaces':>6} {'accuracy':>8} {'precision':>9} {'recall':>7} {'f1':>6} "
        f"{'tp':>5} {'fp':>4} {'tn':>5} {'fn':>4} {'smoothed':>9} {'med_ms':>8} {'p95_ms':>7}"
    )
    lines = [f"model {report['model']} on {report['device']}, dataset {report['dataset']}", header]
    for camera, single in report["per_camera"].items():
        lines.append(_row(camera, single, report["smoothed"]["per_camera"][camera]))
    lines.append(_row("overall", report["overall"], report["smoothed"]["overall"]))
    lines.append(f"unlabelled spaces skipped: {report['skipped_unlabelled']}")
    return "\n".join(lines)
