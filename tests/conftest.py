"""Shared test set-up: an isolated model cache, offline hubs, Flower task identity helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One model cache per test session (tiny models are built once, the GGUF converted once),
    # unless the caller points FEDSHIELD_CACHE somewhere on purpose.
    # Under pytest-xdist each worker gets a cache of its own inside the controller's, so that two
    # workers never build the same model into one directory at once.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and os.environ.get("FEDSHIELD_TEST_CACHE_OWNED") == os.environ.get("FEDSHIELD_CACHE"):
        os.environ["FEDSHIELD_CACHE"] = str(Path(os.environ["FEDSHIELD_CACHE"]) / worker)
        os.environ["FEDSHIELD_TEST_CACHE_OWNED"] = os.environ["FEDSHIELD_CACHE"]
    elif "FEDSHIELD_CACHE" not in os.environ:
        os.environ["FEDSHIELD_CACHE"] = tempfile.mkdtemp(prefix="fedshield-test-cache-")
        os.environ["FEDSHIELD_TEST_CACHE_OWNED"] = os.environ["FEDSHIELD_CACHE"]
        config._fedshield_own_cache = os.environ["FEDSHIELD_CACHE"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"


def pytest_unconfigure(config):
    # The session cache holds ~0.5 GB of built models and packages: remove it if we made it.
    own = getattr(config, "_fedshield_own_cache", None)
    if own:
        shutil.rmtree(own, ignore_errors=True)
        os.environ.pop("FEDSHIELD_CACHE", None)
        os.environ.pop("FEDSHIELD_TEST_CACHE_OWNED", None)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["FEDSHIELD_CACHE"])


@pytest.fixture
def flower_identity():
    """Set the task identity Flower sets inside a real ServerApp/ClientApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield TaskIdentity
