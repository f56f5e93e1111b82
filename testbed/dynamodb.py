"""A throw-away DynamoDB-compatible server (moto's server mode) on a loopback port, for cloud tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3

from testbed.process import LOOPBACK, LocalServer, free_ports, http_answers, stop_process_group, wait_until

REGION = "us-east-1"
# moto accepts any key pair; these keep boto's chain from reaching for real credentials.
EMULATOR_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "moto",
    "AWS_SECRET_ACCESS_KEY": "moto",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class DynamoEmulator(LocalServer):
    """`python -m moto.server` on 127.0.0.1, started and stopped by PID."""

    def __init__(self, log_dir: Path | None = None, startup_timeout_s: float = 60.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="parkmon-moto-"))
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """The DynamoDB endpoint, e.g. http://127.0.0.1:PORT."""
        if self.port is None:
            raise RuntimeError("DynamoEmulator is not started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server logs."""
        return self._log_dir / "moto.log"

    def start(self) -> DynamoEmulator:
        """Start the server and wait until it answers HTTP."""
        if self.process is not None:
            raise RuntimeError("DynamoEmulator is already started")
        self.port = free_ports(1)[0]
        self._log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **EMULATOR_ENVIRONMENT}, start_new_session=True,
            )
        try:
            wait_until(
                lambda: http_answers(self.endpoint_url), self.process, self.startup_timeout_s, "moto server",
                self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def resource(self) -> Any:
        """A boto3 DynamoDB resource on the emulator."""
        return boto3.resource(
            "dynamodb", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id="moto", aws_secret_access_key="moto",
        )

    def create_detections_table(self, name: str) -> Any:
        """A table shaped as cloud/template.yaml's DetectionsTable (device_id, timestamp)."""
        table = self.resource().create_table(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": "device_id", "AttributeType": "S"},
                {"AttributeName": "timestamp", "AttributeType": "S"},
            ],
            KeySchema=[
                {"AttributeName": "device_id", "KeyType": "HASH"},
                {"AttributeName": "timestamp", "KeyType": "RANGE"},
            ],
        )
        table.wait_until_exists()
        return table

    def stop(self) -> None:
        """Stop the server's process group by PID and wait for it."""
        if self.process is not None:
            stop_process_group(self.process, grace_s=5.0)
            self.process = None

