"""Fixtures shared by the test modules: where the sample data and models are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cloud_fixtures import receiver, s3_credentials, s3_server  # noqa: F401

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"
PKLOT_DIR = SHARED_DIR / "data" / "pklot"
MODEL_PATH = SHARED_DIR / "models" / "yolov8n-coco.pt"

os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture
def pklot_dir() -> Path:
    """The labelled PKLot frames beside the checkout."""
    assert PKLOT_DIR.is_dir(), f"sample data missing at {PKLOT_DIR}"
    return PKLOT_DIR


@pytest.fixture
def model_path() -> Path:
    """The small COCO detector used by tests."""
    assert MODEL_PATH.is_file(), f"model missing at {MODEL_PATH}"
    return MODEL_PATH
