"""split's silo parts package: no middle block travels, the silo rebuilt from it is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedshield_flwr.config import LoraSettings, NodeSettings
from fedshield_flwr.lpp.package import LPP_KIND
from fedshield_flwr.models.load import load_base_model, load_tokenizer
from fedshield_flwr.models.lora import apply_lora, get_adapter_state
from fedshield_flwr.packages.cache import has_cached_package, receive_package
from fedshield_flwr.packages.format import PackageError, package_to_arrays
from fedshield_flwr.packages.model import package_tokenizer
from fedshield_flwr.split.arch import SplitError, SplitLayout
from fedshield_flwr.split.parts import (
    PARAM,
    PARTS_KIND,
    build_parts_package,
    parts_from_arrays,
    silo_from_parts,
)
from fedshield_flwr.split.silo_model import SplitSilo

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _package(name: str, head: int = 1, tail: int = 1):
    """The package as the ServerApp builds it, and the silo the old path built from the model."""
    peft = apply_lora(load_base_model(name), LORA, seed=5)
    layout = SplitLayout.for_model(peft, head, tail)
    reference = SplitSilo(peft, layout)  # full model loaded, middle stripped
    initial = reference.adapter_state()
    pkg = build_parts_package(load_base_model(name), layout, load_tokenizer(name), initial,
                              source=name)
    return pkg, reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_package_holds_no_middle_block_and_the_silo_rebuilt_from_it_is_exact(arch):
    pkg, reference = _package(f"tiny:{arch}", head=1, tail=1)
    layout = pkg.layout
    blocks = "transformer.h" if arch == "gpt2" else "model.layers"
    middle = [f"{blocks}.{i}." for i in layout.middle]
    assert layout.middle and not [k for k in pkg.arrays if any(m in k for m in middle)]
    held = [f"{blocks}.{i}." for i in (*layout.head, *layout.tail)]
    assert all(any(k.startswith(PARAM + h) for k in pkg.arrays) for h in held)
    full = pkg.manifest["num_params_full"]
    sent = sum(int(np.prod(s)) for s in pkg.manifest["params"].values())
    assert 0 < sent < full

    received = parts_from_arrays(package_to_arrays(pkg), pkg.content_hash, who="server")
    silo = silo_from_parts(received, LORA, seed=5)
    assert silo.layout == reference.layout
    want, got = reference.adapter_state(), silo.adapter_state()
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        h = reference.head_forward(ids, mask)
        assert torch.equal(silo.head_forward(ids, mask), h)
        assert torch.equal(silo.tail_forward(h, mask), reference.tail_forward(h, mask))
    with pytest.raises(SplitError, match="does not hold middle block"):
        silo._arch.layers[layout.middle[0]](h)
    assert package_tokenizer(received)("hello world")["input_ids"]


def test_a_tampered_or_malformed_parts_package_is_refused_naming_the_sender():
    pkg, _ = _package("tiny:llama")
    arrays = package_to_arrays(pkg)
    key = next(k for k in arrays if k.startswith(PARAM))
    bad = dict(arrays)
    bad[key] = arrays[key].copy()
    bad[key].reshape(-1)[0] += 1.0
    with pytest.raises(PackageError, match="server in round 1.*tampered"):
        parts_from_arrays(bad, pkg.content_hash, who="server in round 1")
    missing = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(PackageError, match="arrays differ from the manifest"):
        parts_from_arrays(missing, who="server")
    wrong = dict(arrays)
    wrong[key] = arrays[key].astype(np.float16)
    with pytest.raises(PackageError, match=key.replace(".", r"\.")):
        parts_from_arrays(wrong, who="server")
    with pytest.raises(PackageError, match="base model, before apply_lora"):
        build_parts_package(apply_lora(load_base_model("tiny:llama"), LORA), pkg.layout)


def test_silo_caches_the_package_by_hash_and_reloads_it_verified(tmp_path):
    pkg, _ = _package("tiny:llama")
    node = NodeSettings(0, 2, cache_dir=str(tmp_path))
    assert not has_cached_package(node, pkg.content_hash, PARTS_KIND)
    with pytest.raises(PackageError, match="did not send it"):
        receive_package(None, pkg.content_hash, node, "server", PARTS_KIND, parts_from_arrays)
    receive_package(package_to_arrays(pkg), pkg.content_hash, node, "server", PARTS_KIND,
                    parts_from_arrays)
    assert has_cached_package(node, pkg.content_hash, PARTS_KIND)
    assert not has_cached_package(node, pkg.content_hash, LPP_KIND)  # not an lpp base
    again = receive_package(None, pkg.content_hash, node, "server", PARTS_KIND, parts_from_arrays)
    assert again.content_hash == pkg.content_hash
    assert get_adapter_state(silo_from_parts(again, LORA, seed=5).peft_model).keys() == \
        pkg.adapter().keys()
