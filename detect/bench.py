"""`python -m detect.bench`: parkmon's tiled detector against SAHI and a bare YOLO call, on the same frames.

All three methods see each frame in turn (the order rotates from frame to frame), so a busy machine
slows them alike. parkmon and SAHI are scored with the same occupancy rule (detect.occupancy) on their
boxes; the bare call is the time reference for one full-frame `predict` at the model's default size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detect.analysis import analyse_frame, tiling_plan
from detect.detector import VehicleDetector, prepare_ultralytics
from detect.evaluate import Frame, Tally, find_frames
from detect.occupancy import SpaceShape, decide_occupancy, scale_zones
from detect.tiling import Vehicle, cut_by_frame
from shared.config import CameraSettings, DetectionSettings
from shared.logging import configure_logging
from shared.pklot import LabelledSpace, read_pklot_spaces
from shared.zones import Zone

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_DATASET = SHARED_DIR / "data" / "pklot"
DEFAULT_MODEL = SHARED_DIR / "models" / "yolov8n-coco.pt"
METHODS = ("parkmon", "sahi", "ultralytics")
LABELS = {
    "parkmon": "parkmon tiled (full frame + zone tiles)",
    "sahi": "SAHI sliced + full-frame pass",
    "ultralytics": "bare model.predict, full frame (reference)",
}
# SAHI's greedy merge, matched on intersection over the smaller box, ignoring classes.
SAHI_POSTPROCESS = {"postprocess_type": "GREEDYNMM", "postprocess_match_metric": "IOS",
                    "postprocess_match_threshold": 0.5, "postprocess_class_agnostic": True}


@dataclass(frozen=True)
class BenchFrame:
    """One labelled frame, decoded, with its spaces as zones in frame pixels."""

    frame: Frame
    image: np.ndarray
    rgb: np.ndarray
    labels: list[LabelledSpace]
    spaces: list[SpaceShape]


def load_frame(frame: Frame) -> BenchFrame:
    """Decode a frame and turn its labelled spaces into zones drawn at its own size."""
    image = cv2.imread(str(frame.image))
    if image is None:
        raise ValueError(f"{frame.image}: cannot decode JPEG")
    height, width = image.shape[:2]
    labels = [space for space in read_pklot_spaces(frame.xml) if space.occupied is not None]
    zones = [Zone(id=space.space_id, coordinates=space.contour) for space in labels]
    camera = CameraSettings(id=frame.camera, width=width, height=height, parking_zones=zones)
    rgb = np.ascontiguousarray(image[:, :, ::-1])  # SAHI takes RGB arrays
    return BenchFrame(frame, image, rgb, labels, scale_zones(camera, width, height))


def pick_frames(frames: list[Frame], limit: int | None) -> list[Frame]:
    """At most `limit` frames, taken from each camera series in turn so every series keeps some."""
    if limit is None or limit >= len(frames):
        return frames
    series: dict[str, list[Frame]] = {}
    for frame in frames:
        series.setdefault(frame.series, []).append(frame)
    picked: list[Frame] = []
    for rank in range(max(len(group) for group in series.values())):
        picked.extend(group[rank] for group in series.values() if rank < len(group))
    return picked[:limit]


def slice_px(settings: DetectionSettings, bench_frame: BenchFrame) -> int:
    """SAHI's slice side in frame px: what its default input size magnifies as much as parkmon's tiles."""
    height, width = bench_frame.image.shape[:2]
    plan = tiling_plan(bench_frame.spaces, width, height, settings)
    if plan is None:
        return max(width, height)
    return round(settings.image_size / plan.scale)


def vehicles_from_boxes(
    rows: list[tuple[float, float, float, float, float, int]], classes: list[int], width: int, height: int
) -> list[Vehicle]:
    """Boxes (x1, y1, x2, y2, confidence, class) of the vehicle classes as Vehicles in frame px."""
    return [
        Vehicle((x1, y1, x2, y2), confidence, class_id, cut_by_frame((x1, y1, x2, y2), width, height))
        for x1, y1, x2, y2, confidence, class_id in rows
        if class_id in classes
    ]


class Methods:
    """The three ways to find vehicles, each loaded once; each returns the frame's vehicles."""

    def __init__(self, settings: DetectionSettings, data_dir: Path) -> None:
        prepare_ultralytics(data_dir)
        from sahi import AutoDetectionModel
        from ultralytics import YOLO

        self.settings = settings
        self.detector = VehicleDetector(settings, data_dir)
        self.sahi_model = AutoDetectionModel.from_pretrained(
            model_type="ultralytics", model_path=str(Path(settings.model).resolve()),
            confidence_threshold=settings.confidence, device=self.detector.device,
        )
        self.bare_model = YOLO(str(settings.model), task="detect")
        self.excluded = [index for index in self.bare_model.names if index not in settings.classes]

    def parkmon(self, frame: BenchFrame) -> list[Vehicle]:
        """parkmon's detector exactly as the detect stage and `parkmon eval` call it."""
        return analyse_frame(self.detector, frame.image, frame.spaces).vehicles

    def sahi(self, frame: BenchFrame) -> list[Vehicle]:
        """SAHI's standard sliced prediction, with its full-frame pass, merged class-agnostically."""
        from sahi.predict import get_sliced_prediction

        height, width = frame.image.shape[:2]
        side = slice_px(self.settings, frame)
        result = get_sliced_prediction(
            frame.rgb,
            self.sahi_model,
            slice_height=side, slice_width=side,
            overlap_height_ratio=self.settings.tile_overlap, overlap_width_ratio=self.settings.tile_overlap,
            perform_standard_pred=True, exclude_classes_by_id=self.excluded, verbose=0,
            **SAHI_POSTPROCESS,
        )
        rows = [
            (*item.bbox.to_xyxy(), float(item.score.value), int(item.category.id))
            for item in result.object_prediction_list
        ]
        return vehicles_from_boxes(rows, self.settings.classes, width, height)

    def ultralytics(self, frame: BenchFrame) -> list[Vehicle]:
        """One full-frame predict at the model's default size and confidence."""
        height, width = frame.image.shape[:2]
        [result] = self.bare_model.predict(frame.image, device=self.detector.device, verbose=False)
        boxes = result.boxes
        rows = [
            (*xyxy, float(confidence), int(class_id))
            for xyxy, confidence, class_id in zip(
                boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True
            )
        ]
        return vehicles_from_boxes(rows, self.settings.classes, width, height)


def _timed(find: Callable[[BenchFrame], list[Vehicle]], frame: BenchFrame) -> tuple[list[Vehicle], float]:
    """The method's vehicles and its wall time in ms."""
    started = time.perf_counter()
    vehicles = find(frame)
    return vehicles, (time.perf_counter() - started) * 1000.0


def _score(tally: Tally, frame: BenchFrame, vehicles: list[Vehicle], settings: DetectionSettings) -> None:
    """Count each labelled space's decision by the shared occupancy rule."""
    decisions = decide_occupancy(frame.spaces, vehicles, settings)
    for label, decision in zip(frame.labels, decisions, strict=True):
        tally.add(bool(label.occupied), decision.occupied)


def _p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank, as `parkmon eval` reports it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def run_benchmark(
    dataset_dir: Path, model: Path, limit: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Time and score the three methods frame by frame on a folder of PKLot frames."""
    frames = pick_frames(find_frames(Path(dataset_dir)), limit)
    if not frames:
        raise ValueError(f"{dataset_dir}: no *.jpg with a sibling .xml")
    if not Path(model).is_file():
        raise ValueError(f"model not found at {model}")
    settings = DetectionSettings(model=str(model), device=device)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="parkmon-bench-") as data_dir:
        methods = Methods(settings, Path(data_dir))
        finders = {name: getattr(methods, name) for name in METHODS}
        first = load_frame(frames[0])
        for find in finders.values():
            find(first)  # warm-up, not counted

        tallies = {name: Tally() for name in METHODS}
        per_camera: dict[str, dict[str, Tally]] = {name: {} for name in METHODS}
        for index, frame in enumerate(frames):
            bench_frame = load_frame(frame)
            order = METHODS[index % len(METHODS):] + METHODS[:index % len(METHODS)]
            for name in order:
                vehicles, elapsed_ms = _timed(finders[name], bench_frame)
                tallies[name].frame_ms.append(round(elapsed_ms, 1))
                _score(tallies[name], bench_frame, vehicles, settings)
                _score(per_camera[name].setdefault(frame.camera, Tally()), bench_frame, vehicles, settings)
        device_used = methods.detector.device
        slicing = {frame.camera: _slicing(methods, load_frame(frame)) for frame in frames}
    return _report(dataset_dir, model, device_used, frames, tallies, per_camera, slicing, load_before)


def _slicing(methods: Methods, frame: BenchFrame) -> dict[str, int]:
    """How parkmon tiles and SAHI slices one camera's frame: tile/slice counts and SAHI's slice side."""
    from sahi.slicing import get_slice_bboxes

    height, width = frame.image.shape[:2]
    overlap = methods.settings.tile_overlap
    side = slice_px(methods.settings, frame)
    plan = tiling_plan(frame.spaces, width, height, methods.settings)
    return {
        "parkmon_tiles": len(methods.detector.tiles(frame.image, plan)),
        "sahi_slice_px": side,
        "sahi_slices": len(get_slice_bboxes(height, width, side, side, False, overlap, overlap)),
        "overlap_pct": round(100 * overlap),
    }


def _report(
    dataset_dir: Path, model: Path, device: str, frames: list[Frame], tallies: dict[str, Tally],
    per_camera: dict[str, dict[str, Tally]], slicing: dict[str, dict[str, int]], load_before: float,
) -> dict[str, Any]:
    """The benchmark's figures as one JSON-ready document."""
    methods: dict[str, Any] = {}
    for name in METHODS:
        summary = tallies[name].summary()
        summary["p95_ms"] = round(_p95(tallies[name].frame_ms), 1)
        summary["label"] = LABELS[name]
        summary["per_camera_accuracy"] = {
            camera: tally.summary()["accuracy"] for camera, tally in sorted(per_camera[name].items())
        }
        methods[name] = summary
    parkmon, sahi = methods["parkmon"], methods["sahi"]
    speedup = sahi["median_ms"] / parkmon["median_ms"]
    accuracy_gain = parkmon["accuracy"] - sahi["accuracy"]
    return {
        "dataset": str(dataset_dir),
        "model": Path(model).name,
        "device": device,
        "frames": len(frames),
        "cameras": sorted({frame.camera for frame in frames}),
        "order": "interleaved: each frame runs all three methods, in an order rotating per frame",
        "timing": "wall time of each method's call per decoded frame; parkmon's includes its occupancy rule",
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "slicing": slicing,
        "sahi_settings": {"perform_standard_pred": True, **SAHI_POSTPROCESS},
        "methods": methods,
        "speedup_vs_sahi": round(speedup, 2),
        "p95_speedup_vs_sahi": round(sahi["p95_ms"] / parkmon["p95_ms"], 2),
        "accuracy_gain_vs_sahi": round(accuracy_gain, 4),
        "parkmon_vs_reference": round(parkmon["median_ms"] / methods["ultralytics"]["median_ms"], 2),
        "meets_goal": accuracy_gain >= 0.0 and speedup >= 2.0,
    }


def format_benchmark(report: dict[str, Any]) -> str:
    """The benchmark as a plain-text table with the ratios under it."""
    lines = [
        f"{report['frames']} frames ({', '.join(report['cameras'])}) from {report['dataset']}; "
        f"model {report['model']} on {report['device']}, {report['cpu_cores']} cores, "
        f"load {report['load_average_1m']['before']} -> {report['load_average_1m']['after']}",
        f"methods run {report['order']}, so machine load affects them alike",
        f"time is the {report['timing']}",
        "both run the model once on the full frame, plus on tiles (parkmon: around small zones only) or "
        "slices (SAHI: the whole frame, sized to the same magnification); SAHI merges GREEDYNMM/IOS 0.5 "
        "class-agnostic; both are scored by parkmon's occupancy rule",
    ]
    for camera, plan in report["slicing"].items():
        lines.append(
            f"  {camera:<8} parkmon 1 + {plan['parkmon_tiles']} tiles; SAHI 1 + {plan['sahi_slices']} slices "
            f"of {plan['sahi_slice_px']} px, {plan['overlap_pct']} % overlap"
        )
    lines += [
        "",
        f"{'method':<44} {'med_ms':>7} {'p95_ms':>7} {'accuracy':>8} {'precision':>9} {'recall':>7}",
    ]
    for name in METHODS:
        method = report["methods"][name]
        lines.append(
            f"{method['label']:<44} {method['median_ms']:>7.0f} {method['p95_ms']:>7.0f} "
            f"{method['accuracy']:>8.2%} {method['precision']:>9.2%} {method['recall']:>7.2%}"
        )
    lines.append("")
    for name in METHODS:
        cameras = report["methods"][name]["per_camera_accuracy"]
        lines.append(f"{name:<12} per camera: " + ", ".join(f"{c} {a:.2%}" for c, a in cameras.items()))
    lines += [
        "",
        f"parkmon speed-up vs SAHI: {report['speedup_vs_sahi']:.2f}x median, "
        f"{report['p95_speedup_vs_sahi']:.2f}x p95",
        f"parkmon accuracy minus SAHI's: {report['accuracy_gain_vs_sahi'] * 100:+.2f} points",
        f"parkmon time / bare predict: {report['parkmon_vs_reference']:.2f}x",
        f"goal (at least as accurate, at least 2x faster than SAHI): "
        f"{'met' if report['meets_goal'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the benchmark command."""
    parser = argparse.ArgumentParser(prog="python -m detect.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="folder of PKLot frames")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="YOLO weights all three methods use")
    parser.add_argument("--limit", type=int, default=None, help="only N frames, spread over the cameras")
    parser.add_argument("--device", default="cpu", help="torch device (SAHI runs on the same)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table or JSON on stdout (logs go to stderr)."""
    args = build_parser().parse_args(argv)
    configure_logging("WARNING", process="bench")
    if args.limit is not None and args.limit < 1:
        print("detect.bench: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(Path(args.dataset), Path(args.model), args.limit, args.device)
    except ValueError as error:
        print(f"detect.bench: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_benchmark(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
