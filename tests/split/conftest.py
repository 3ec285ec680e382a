"""Fixtures of the split tests: tiny models cached in the session's temporary directory."""

import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    old = os.environ.get("FEDSHIELD_CACHE")
    os.environ["FEDSHIELD_CACHE"] = str(tmp_path_factory.getbasetemp() / "fedshield-cache")
    torch.set_num_threads(1)
    yield
    if old is None:
        os.environ.pop("FEDSHIELD_CACHE", None)
    else:
        os.environ["FEDSHIELD_CACHE"] = old
