"""Fixtures of the audit tests: tiny models and the embedded Q/A rows, built in code."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fedshield_flwr.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def qa_rows():
    from fedshield_flwr.data.embedded import chatterbot_pairs

    rows = chatterbot_pairs()
    # distinct rows only: a duplicated row in both sets would be a member and a non-member
    seen, out = set(), []
    for r in rows:
        key = (r["instruction"], r["response"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    import os

    old = os.environ.get("FEDSHIELD_CACHE")
    os.environ["FEDSHIELD_CACHE"] = str(tmp_path_factory.getbasetemp() / "fedshield-cache")
    yield
    if old is None:
        os.environ.pop("FEDSHIELD_CACHE", None)
    else:
        os.environ["FEDSHIELD_CACHE"] = old
