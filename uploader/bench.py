"""Upload benchmark: the 63 PKLot frames as four cameras, batched deltas against one full JSON per snapshot.

Run as `.venv/bin/python -m uploader.bench` (or `parkmon bench upload`). It starts a local SeaweedFS
and the local ingest receiver (which runs the ingest function), builds a device database from the
frames, runs the upload stage, and prints request counts, metadata bytes on the wire, whether the
cloud's rebuilt state equals the device's at every keyframe and record, and throughput with 1 and N
workers. By default the device state is what parkmon's detect stage decides on the frames (the
frames go through detect, then upload); with --labels it is made from the PKLot XML labels instead
(one vehicle box per occupied space), which measures sync alone, without the detector.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from shared.config import Settings, load_settings
from shared.db import open_database
from shared.logging import configure_logging
from shared.pklot import LabelledSpace, read_pklot_spaces
from testbed.receiver import Receiver
from testbed.seaweed import SeaweedServer
from uploader.accounting import read_byte_totals
from uploader.bench_detect import (
    DEFAULT_MODEL,
    detected_results,
    label_agreement,
    run_detect_stage,
    seed_captured,
)
from uploader.delta import zone_states
from uploader.main import run
from uploader.payload import iso_utc
from uploader.replay import Frame, camera_configs, frames, insert_snapshot

BENCH_KEY = "parkmon-bench"
S3_KEY = "bench"
CAR_CLASS_ID = 2
DETECTOR = "detector"
LABELS = "labels"


def _box(contour: list[list[float]]) -> list[float]:
    """The axis-aligned box around a space's contour."""
    xs, ys = [point[0] for point in contour], [point[1] for point in contour]
    return [round(min(xs), 1), round(min(ys), 1), round(max(xs), 1), round(max(ys), 1)]


def label_result(
    device_id: str, camera_id: str, snapshot_id: int, captured_at: float, image: str,
    spaces: list[LabelledSpace],
) -> dict[str, Any]:
    """A detection result in the contract's shape from PKLot labels (unlabelled spaces count as vacant)."""
    occupied = [space for space in spaces if space.occupied]
    return {
        "device_id": device_id, "camera_id": camera_id, "snapshot_id": snapshot_id,
        "captured_at": captured_at, "image": image, "model": "pklot-labels", "inference_ms": 0.0,
        "frame": {"width": 1280, "height": 720},
        "vehicles": [{"box": _box(space.contour), "confidence": 1.0, "class_id": CAR_CLASS_ID}
                     for space in occupied if space.contour],
        "zones": [{"zone_id": space.space_id, "occupied": bool(space.occupied),
                   "confidence": 1.0 if space.occupied is not None else 0.0} for space in spaces],
        "occupied": len(occupied), "spaces": len(spaces),
    }


def seed_device(
    data_dir: Path, device_id: str, replay: list[Frame], detected: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Write snapshots (JPEGs linked in), detection results and UPLOAD jobs; return the results.

    The results are made from the PKLot labels, or with `detected` (one per frame) are those results
    carried over to this device's snapshots.
    """
    connection = open_database(data_dir / "parkmon.db")
    results = []
    for index, frame in enumerate(replay):
        snapshot = insert_snapshot(connection, data_dir, device_id, frame)
        if detected is None:
            spaces = read_pklot_spaces(frame.jpeg.with_suffix(".xml"))
            result = label_result(
                device_id, frame.camera_id, snapshot.snapshot_id, frame.captured_at, snapshot.name, spaces
            )
        else:
            result = {**detected[index], "device_id": device_id, "snapshot_id": snapshot.snapshot_id,
                      "image": snapshot.name}
        now = time.time()
        connection.execute(
            """INSERT INTO detections (snapshot_id, device_id, camera_id, detected_at, model, inference_ms,
                   vehicles, spaces, occupied, result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (snapshot.snapshot_id, device_id, frame.camera_id, now, result["model"], result["inference_ms"],
             len(result["vehicles"]), result["spaces"], result["occupied"], json.dumps(result)),
        )
        connection.execute(
            """INSERT INTO jobs (stage, snapshot_id, available_at, created_at, updated_at)
               VALUES ('upload', ?, ?, ?, ?)""",
            (snapshot.snapshot_id, now, now, now),
        )
        results.append(result)
    connection.close()
    return results


def naive_body(result: dict[str, Any], device_id: str) -> bytes:
    """What the earlier design POSTed per snapshot: the full result, uncompressed, one request each."""
    stem = Path(result["image"]).stem
    payload = {
        "device_id": device_id, "camera_id": result["camera_id"], "timestamp": iso_utc(result["captured_at"]),
        "idempotency_key": f"{device_id}/{result['camera_id']}/{stem}", "detection_results": result,
        "upload_timestamp": iso_utc(time.time()),
    }
    return json.dumps(payload).encode("utf-8")


def device_settings(
    work_dir: Path, s3: SeaweedServer, receiver: Receiver, device_id: str, upload: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Settings:
    """A device config pointing at the local servers (`extra`: more top-level sections)."""
    config = {
        "device_id": device_id, "data_dir": str(work_dir / device_id), "log_level": "WARNING",
        "upload": upload,
        "aws": {
            "region": "us-east-1", "data_bucket": s3.data_bucket, "metadata_bucket": s3.metadata_bucket,
            "s3_endpoint_url": s3.endpoint_url, "api_endpoint": receiver.url, "api_key": receiver.api_key,
        },
        **(extra or {}),
    }
    path = work_dir / f"{device_id}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_settings(path)


def states_match(receiver: Receiver, results: list[dict[str, Any]], device_id: str) -> dict[str, int]:
    """How many records, and how many keyframes, the cloud rebuilt equal to the device's state."""
    device = {
        f"{device_id}/{result['camera_id']}/{Path(result['image']).stem}": zone_states(result)
        for result in results
    }
    received = [record for record in receiver.received() if record["device_id"] == device_id]
    equal = [device.get(record["idempotency_key"]) == record["zones"] for record in received]
    keyframes = [record["kind"] == "keyframe" for record in received]
    return {
        "records": len(device), "received": len(received), "rebuilt_equal": sum(equal),
        "keyframes": sum(keyframes),
        "keyframes_equal": sum(1 for same, key in zip(equal, keyframes, strict=True) if same and key),
    }


def timed_run(settings: Settings) -> float:
    """Seconds the upload stage takes to drain its queue."""
    started = time.perf_counter()
    run(settings, once=True)
    return time.perf_counter() - started


def _uploaded(settings: Settings) -> int:
    """Snapshots the run recorded as uploaded."""
    connection = sqlite3.connect(settings.database_path)
    try:
        return int(connection.execute("SELECT count(*) FROM uploads").fetchone()[0])
    finally:
        connection.close()


def _sync_device(
    work_dir: Path, s3: SeaweedServer, receiver: Receiver, replay: list[Frame], upload: dict[str, Any],
    mode: str, model: Path,
) -> tuple[Settings, list[dict[str, Any]], dict[str, Any]]:
    """The device whose uploads are measured, its frames detected (or labelled) and queued for upload."""
    device_id = "bench-sync"
    if mode == LABELS:
        settings = device_settings(work_dir, s3, receiver, device_id, upload)
        results = seed_device(settings.data_dir, device_id, replay)
        return settings, results, {"mode": LABELS, "model": "pklot-labels"}
    extra = {"cameras": camera_configs(), "detection": {"model": str(model)}}
    settings = device_settings(work_dir, s3, receiver, device_id, upload, extra)
    seeded = seed_captured(settings.data_dir, device_id, replay)
    detect_seconds = run_detect_stage(settings)
    results = detected_results(settings, seeded)
    agreed, labelled = label_agreement(replay, results)
    return settings, results, {
        "mode": DETECTOR, "model": ", ".join(sorted({result["model"] for result in results})),
        "detect_seconds": detect_seconds,
        "label_agreement": {"agreed": agreed, "labelled": labelled},
    }


def benchmark(work_dir: Path, batch_size: int, workers: int, mode: str = DETECTOR,
              model: Path = DEFAULT_MODEL, limit: int | None = None) -> dict[str, Any]:
    """Run the wire-size and throughput measurements (on the first `limit` frames); return the figures."""
    replay = frames()[:limit]
    os.environ.update({"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY,
                       "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    cameras = len({frame.camera_id for frame in replay})
    figures: dict[str, Any] = {"snapshots": len(replay), "cameras": cameras, "batch_size": batch_size}
    with SeaweedServer(work_dir / "s3", access_key=S3_KEY, secret_key=S3_KEY) as s3, \
            Receiver(work_dir / "receiver" / "received.db", BENCH_KEY) as receiver:
        s3.create_buckets()
        upload = {"batch_size": batch_size, "max_concurrent": workers}
        settings, results, source = _sync_device(work_dir, s3, receiver, replay, upload, mode, model)
        figures["source"] = source
        run(settings, once=True)
        connection = sqlite3.connect(settings.database_path)
        connection.row_factory = sqlite3.Row
        totals = read_byte_totals(connection)
        connection.close()
        naive = [naive_body(result, settings.device_id) for result in results]
        figures.update({
            "naive": {"requests": len(naive), "bytes": sum(len(body) for body in naive)},
            "batched": {"requests": receiver.requests()["requests"], "bytes": totals["ingest"]["wire_bytes"],
                        "raw_bytes": totals["ingest"]["raw_bytes"]},
            "s3_metadata": totals["metadata"], "s3_images": totals["images"],
            "occupied": sum(result["occupied"] for result in results),
            "vehicles": sum(len(result["vehicles"]) for result in results),
            **states_match(receiver, results, settings.device_id),
        })
        throughput = {}
        for count in sorted({1, workers}):
            device_id = f"bench-workers-{count}"
            settings = device_settings(work_dir, s3, receiver, device_id,
                                       {"batch_size": batch_size, "max_concurrent": count})
            seed_device(settings.data_dir, device_id, replay, results if mode == DETECTOR else None)
            seconds = timed_run(settings)
            throughput[count] = {"seconds": seconds, "snapshots": _uploaded(settings)}
        figures["throughput"] = throughput
    return figures


def _source_line(figures: dict[str, Any]) -> str:
    """Which mode made the device state, and what it was."""
    source = figures["source"]
    if source["mode"] == LABELS:
        return ("mode: labels -- device state = PKLot XML labels, one vehicle box per occupied space "
                "(sync is measured, not detection)")
    agreement = source["label_agreement"]
    share = 100 * agreement["agreed"] / agreement["labelled"]
    return (
        f"mode: detector -- device state = parkmon's detect stage (`parkmon run detect --once`, "
        f"VehicleDetector + detect.analysis, {source['model']}): {figures['snapshots']} frames in "
        f"{source['detect_seconds']:.1f} s; agrees with the PKLot labels on {share:.2f} % of "
        f"{agreement['labelled']:,} labelled spaces"
    )


def report(figures: dict[str, Any]) -> str:
    """The figures as lines for a terminal."""
    naive, batched = figures["naive"], figures["batched"]
    ratio = batched["bytes"] / naive["bytes"]
    lines = [
        _source_line(figures),
        f"replay: {figures['snapshots']} PKLot frames as {figures['cameras']} cameras, batch_size "
        f"{figures['batch_size']}; {figures['vehicles']:,} vehicles, {figures['occupied']:,} occupied "
        f"spaces over all frames",
        f"naive  (one uncompressed full JSON POST per snapshot): {naive['requests']} requests, "
        f"{naive['bytes']:,} B",
        f"parkmon (gzip batches of keyframes + deltas):          {batched['requests']} requests, "
        f"{batched['bytes']:,} B on the wire ({batched['raw_bytes']:,} B before gzip)",
        f"metadata bytes ratio: {100 * ratio:.2f} % of naive; "
        f"requests {batched['requests']}/{naive['requests']}",
        f"cloud rebuilt state equal to the device's: {figures['rebuilt_equal']}/{figures['records']} records "
        f"({figures['received']} received), {figures['keyframes_equal']}/{figures['keyframes']} keyframes",
        f"S3 metadata JSON (per snapshot, gzip): {figures['s3_metadata']['wire_bytes']:,} B "
        f"({figures['s3_metadata']['raw_bytes']:,} B raw); images {figures['s3_images']['wire_bytes']:,} B",
    ]
    for workers, outcome in figures["throughput"].items():
        rate = outcome["snapshots"] / outcome["seconds"]
        lines.append(
            f"throughput to local SeaweedFS + receiver, {workers} worker(s): "
            f"{outcome['snapshots']} snapshots in {outcome['seconds']:.2f} s = {rate:.1f} snapshots/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m uploader.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=10, help="upload.batch_size (MAX_BATCH_SIZE)")
    parser.add_argument(
        "--workers", type=int, default=5, help="upload.max_concurrent (MAX_CONCURRENT_UPLOADS)"
    )
    parser.add_argument(
        "--labels", action="store_true",
        help="device state from the PKLot XML labels instead of the detect stage (sync alone)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="detector weights (detector mode)")
    parser.add_argument("--limit", type=int, default=None,
                        help="replay only the first N frames (interleaved across the cameras)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    configure_logging("WARNING", "upload")
    mode = LABELS if args.labels else DETECTOR
    if mode == DETECTOR and not args.model.is_file():
        parser.error(f"--model: weights not found at {args.model}")
    work_dir = Path(tempfile.mkdtemp(prefix="parkmon-bench-"))
    try:
        figures = benchmark(work_dir, args.batch_size, args.workers, mode, args.model.resolve(), args.limit)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
