"""Shared test set-up: an isolated model cache, offline hubs, Flower task identity helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One model cache per test session (tiny models are built once, the GGUF converted once),
    # unless the caller points FEDSHIELD_CACHE somewhere on purpose.
    if "FEDSHIELD_CACHE" not in os.environ:
        os.environ["FEDSHIELD_CACHE"] = tempfile.mkdtemp(prefix="fedshield-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["FEDSHIELD_CACHE"])


@pytest.fixture
def flower_identity():
    """Set the task identity Flower sets inside a real ServerApp/ClientApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield TaskIdentity
