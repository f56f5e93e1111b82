"""Fixtures for the cloud side: a real SeaweedFS S3 server and the ingest receiver stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.receiver import Receiver
from testbed.seaweed import SeaweedServer

# The key pair the shared S3 server checks signatures against; tests sign with it via the
# environment (s3_credentials), so a wrong key fails there exactly as on AWS.
S3_ACCESS_KEY = "test"
S3_SECRET_KEY = "test"
RECEIVER_API_KEY = "parkmon-test-key"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session with buckets parkmon-data and parkmon-metadata."""
    server = SeaweedServer(
        tmp_path_factory.mktemp("seaweed"), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY
    )
    with server:
        server.create_buckets([server.data_bucket, server.metadata_bucket])
        yield server


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedServer, tmp_path: Path) -> None:
    """Point boto's default credential chain at the S3 server's key pair, and nowhere else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A fresh ingest receiver process for one test, its store under tmp_path."""
    with Receiver(tmp_path / "receiver" / "received.db", RECEIVER_API_KEY) as running:
        yield running
