"""`parkmon run all`: the four stages as separate processes under supervisord.

On the Mac each stage is its own LaunchAgent with KeepAlive. Elsewhere (and for local runs)
supervisord plays that part: it restarts a stage that dies and stops them all together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.config import Settings
from shared.logging import configure_logging, get_logger

STAGES = ("capture", "detect", "upload", "api")

log = get_logger(__name__)


def _program_block(stage: str, command: str, logs_dir: Path, exits_when_done: bool) -> str:
    """One [program:x] section; a stage that finishes on purpose (exit 0) is not restarted.

    A service stage that dies within startsecs of starting is restarted with a growing delay (as
    launchd's ThrottleInterval does) instead of at once, so a stage that cannot start (a missing
    model, say) does not spin the CPU; a replay that may finish within seconds counts as started.
    """
    autorestart = "unexpected" if exits_when_done else "true"
    startsecs = 0 if exits_when_done else 5
    return f"""
[program:{stage}]
command={command}
autostart=true
autorestart={autorestart}
exitcodes=0
startsecs={startsecs}
startretries=1000
stopsignal=TERM
stopwaitsecs=15
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={logs_dir / f"{stage}.log"}
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=5
"""


def write_supervisor_config(settings: Settings, config_path: Path, once: bool) -> Path:
    """Write supervisord.conf for this device under the data dir and return its path."""
    run_dir = settings.data_dir / "supervisor"
    logs_dir = settings.data_dir / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    python = Path(sys.executable)
    socket_path = run_dir / "supervisor.sock"

    sections = [
        f"""[supervisord]
nodaemon=true
logfile={run_dir / "supervisord.log"}
pidfile={run_dir / "supervisord.pid"}
childlogdir={logs_dir}
loglevel=info
silent=true

[unix_http_server]
file={socket_path}
chmod=0700

[supervisorctl]
serverurl=unix://{socket_path}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
"""
    ]
    for stage in STAGES:
        once_flag = " --once" if once and stage == "capture" else ""
        command = f"{python} -m shared.cli --config {config_path.resolve()} run {stage}{once_flag}"
        sections.append(_program_block(stage, command, logs_dir, exits_when_done=bool(once_flag)))

    path = run_dir / "supervisord.conf"
    path.write_text("".join(sections), encoding="utf-8")
    return path


def _supervisord_executable() -> str:
    """supervisord from the same environment as this Python."""
    candidate = Path(sys.executable).with_name("supervisord")
    return str(candidate) if candidate.exists() else "supervisord"


def run_all(settings: Settings, config_path: Path, once: bool = False) -> int:
    """Run the four stages under supervisord until SIGTERM or Ctrl-C, then stop them all."""
    configure_logging(settings.log_level, process="supervisor")
    conf = write_supervisor_config(settings, config_path, once)
    environment = {**os.environ, "PARKMON_DATA_DIR": str(settings.data_dir)}
    supervisor = subprocess.Popen([_supervisord_executable(), "-c", str(conf)], env=environment)
    log.info("stages_started", supervisor_pid=supervisor.pid, config=str(conf),
             logs=str(settings.data_dir / "logs"))

    def forward(signum: int, frame: object) -> None:
        supervisor.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = supervisor.wait()
    log.info("stages_stopped", supervisor_exit=code)
    return 0 if code in (0, -signal.SIGTERM) else code
