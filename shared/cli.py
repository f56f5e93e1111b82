"""The `parkmon` command: run a stage, check a config, inspect the queue, import zones."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from shared.config import ConfigError, Settings, config_path_from_environment, load_settings

STAGE_MODULES = {
    "capture": "capture.main",
    "detect": "detect.main",
    "upload": "uploader.main",
    "api": "api.main",
}


def _settings_or_exit(config: str | None) -> Settings:
    """Load the config or print its one-line error and exit 2."""
    try:
        return load_settings(config)
    except ConfigError as error:
        print(f"parkmon: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_summary(settings: Settings) -> str:
    """A short human summary of a validated config."""
    lines = [
        f"config:   {settings.config_path}",
        f"device:   {settings.device_id}",
        f"data dir: {settings.data_dir}",
        f"cameras:  {len(settings.cameras)}",
    ]
    for camera in settings.cameras:
        lines.append(
            f"  {camera.id}: {len(camera.parking_zones)} zones, {camera.width}x{camera.height}, "
            f"source {camera.source}"
        )
    lines += [
        f"model:    {settings.detection.model}",
        f"buckets:  data={settings.aws.data_bucket} metadata={settings.aws.metadata_bucket}"
        + (f" at {settings.aws.s3_endpoint_url}" if settings.aws.s3_endpoint_url else ""),
        f"endpoint: {settings.aws.api_endpoint or '(none: results are not POSTed)'}",
        f"api:      http://{settings.api.host}:{settings.api.port}",
    ]
    return "\n".join(lines)


def command_config_check(args: argparse.Namespace) -> int:
    """Validate a config without starting anything."""
    settings = _settings_or_exit(args.file or args.config)
    print(_config_summary(settings))
    model = Path(settings.detection.model).expanduser()
    if not model.is_file():
        print(f"parkmon: {settings.config_path}: detection model: weights not found at {model.resolve()}",
              file=sys.stderr)
        return 2
    print("ok")
    return 0


def _stop_before_start(signum: int, frame: FrameType | None) -> None:
    """Leave with exit code 0: nothing was claimed yet, so nothing is lost."""
    raise SystemExit(0)


def command_run(args: argparse.Namespace) -> int:
    """Run one stage in this process, or all four under a supervisor."""
    settings = _settings_or_exit(args.config)
    if args.stage == "all":
        from shared.supervise import run_all

        return run_all(settings, config_path_from_environment(args.config), once=args.once)

    from shared.logging import configure_logging

    configure_logging(settings.log_level, process=args.stage)
    # SIGTERM while the stage is still importing (torch takes seconds) is a clean stop too.
    signal.signal(signal.SIGTERM, _stop_before_start)
    module = importlib.import_module(STAGE_MODULES[args.stage])
    return int(module.run(settings, once=args.once) or 0)


def command_status(args: argparse.Namespace) -> int:
    """Print what the database holds: snapshots, queue, uploads."""
    from shared.status import format_status, status_report

    settings = _settings_or_exit(args.config)
    report = status_report(settings)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_status(report))
    return 0


def command_zones_import(args: argparse.Namespace) -> int:
    """Print parking_zones YAML, with the frame size they were drawn for, from another tool's file."""
    from shared.zone_import import ZoneImportError, zone_file_yaml

    try:
        text = zone_file_yaml(Path(args.file), args.format)
    except (ZoneImportError, ValueError, OSError) as error:
        print(f"parkmon: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def command_eval(args: argparse.Namespace) -> int:
    """Score the detector against labelled PKLot frames."""
    from detect.detector import DetectorError
    from detect.evaluate import EvaluationError, evaluate_dataset, format_report
    from shared.logging import configure_logging
    from shared.pklot import PklotError

    settings = _settings_or_exit(args.config)
    configure_logging(settings.log_level, process="eval")
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        print(f"parkmon: {dataset}: not a folder", file=sys.stderr)
        return 2
    try:
        report = evaluate_dataset(dataset, settings, model=args.model)
    except (DetectorError, EvaluationError, PklotError) as error:
        print(f"parkmon: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """Replay a folder of frames through all four stages against local servers."""
    from shared.logging import configure_logging
    from testbed.demo import run_demo

    configure_logging("WARNING", process="demo")
    return run_demo(Path(args.source), Path(args.model), frames_limit=args.frames)


def command_bench(args: argparse.Namespace) -> int:
    """Run a benchmark: detect (vs SAHI and a bare predict) or upload (vs a naive uploader)."""
    if args.bench_command == "detect":
        from detect.bench import main as bench_main
    else:
        from uploader.bench import main as bench_main
    return int(bench_main(args.bench_args) or 0)


def command_launchd(args: argparse.Namespace) -> int:
    """Write one LaunchAgent plist per stage."""
    from shared.launchd import write_launch_agents

    settings = _settings_or_exit(args.config)
    config_path = config_path_from_environment(args.config).resolve()
    for path in write_launch_agents(settings, config_path, Path(args.out), Path(args.python)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every parkmon command."""
    config_help = "YAML config (default: $PARKMON_CONFIG or config/mvp.yaml)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)

    parser = argparse.ArgumentParser(prog="parkmon", description=__doc__)
    parser.add_argument("--config", default=None, help=config_help)
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="work with the config file", parents=[common])
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config and summarise it", parents=[common])
    check.add_argument("file", nargs="?", help="config file to check")
    check.set_defaults(handler=command_config_check)

    run = commands.add_parser("run", help="run a stage", parents=[common])
    run.add_argument("stage", choices=[*STAGE_MODULES, "all"])
    run.add_argument("--once", action="store_true", help="replay sources once / drain the queue, then exit")
    run.set_defaults(handler=command_run)

    status = commands.add_parser("status", help="show snapshots, queue and uploads", parents=[common])
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=command_status)

    zones = commands.add_parser("zones", help="work with parking zones", parents=[common])
    zone_commands = zones.add_subparsers(dest="zones_command", required=True)
    zone_import = zone_commands.add_parser("import", help="print parking_zones YAML from a zone file")
    zone_import.add_argument("file")
    zone_import.add_argument("--format", required=True, choices=["pklot", "ultralytics", "mask"])
    zone_import.set_defaults(handler=command_zones_import)

    evaluate = commands.add_parser(
        "eval", help="measure occupancy accuracy on labelled frames", parents=[common]
    )
    evaluate.add_argument("dataset", help="folder of PKLot frames (*.jpg with sibling .xml)")
    evaluate.add_argument("--model", help="weights to evaluate (default: the config's model)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=command_eval)

    demo = commands.add_parser("demo", help="replay frames through the pipeline against local servers")
    demo.add_argument("--source", default="../shared/data/pklot/PUCPR/Sunny", help="folder of frames")
    demo.add_argument("--model", default="../shared/models/yolov8n-coco.pt", help="YOLO weights")
    demo.add_argument("--frames", type=int, default=None, help="replay only the first N frames")
    demo.set_defaults(handler=command_demo)

    bench = commands.add_parser("bench", help="benchmarks that print figures and ratios")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_detect = bench_commands.add_parser(
        "detect", help="parkmon's tiled detector vs SAHI vs a bare predict", add_help=False
    )
    bench_detect.set_defaults(handler=command_bench, passes_arguments_on=True)
    bench_upload = bench_commands.add_parser(
        "upload", help="wire bytes and requests vs a naive one-JSON-per-snapshot uploader", add_help=False
    )
    bench_upload.set_defaults(handler=command_bench, passes_arguments_on=True)

    launchd = commands.add_parser("launchd", help="write LaunchAgent plists for the Mac", parents=[common])
    launchd.add_argument("--out", default=str(Path.home() / "Library" / "LaunchAgents"))
    launchd.add_argument("--python", default=sys.executable, help="the venv's python, absolute")
    launchd.set_defaults(handler=command_launchd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `parkmon` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passes_arguments_on", False):
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
