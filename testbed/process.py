"""Child processes of the local stand-in servers: free ports, readiness, stopping by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free ports on 127.0.0.1, all held open until chosen."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether anything answers HTTP at `url`, whatever the status code."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a child's log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    timeout_s: float,
    what: str,
    log_path: Path,
    poll_s: float = 0.1,
) -> None:
    """Poll `ready` until it holds; raise RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_tail(log_path)}")
        if ready():
            return
        time.sleep(poll_s)
    raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the child's process group, wait `grace_s`, then SIGKILL it and reap the child."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


class LocalServer(ABC):
    """A server process the tests and the demo start and stop: usable as a context manager."""

    @abstractmethod
    def start(self) -> Self:
        """Start the process and wait until it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the process by PID."""

    def close(self) -> None:
        """Stop the process and remove what it left behind."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
