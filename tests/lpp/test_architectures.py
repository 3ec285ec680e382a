"""lpp on every common decoder family: the package round trip rebuilds the quantized model."""

from __future__ import annotations

import pytest
import torch

from fedshield_flwr.lpp.package import package_from_arrays
from fedshield_flwr.lpp.quantize import BaseQuantSpec, build_quantized_package
from fedshield_flwr.lpp.rebuild import build_model_from_package
from fedshield_flwr.models.tiny import TINY_ARCHITECTURES, build_tiny_model
from fedshield_flwr.packages.format import package_to_arrays
from fedshield_flwr.wire import decode_arrays, encode_arrays
from tests.lpp.test_quantize import IDS, _fake_quantized


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_package_through_flower_rebuilds_the_quantize_dequantize_reference(arch):
    model = build_tiny_model(arch).eval()
    pkg = build_quantized_package(model, BaseQuantSpec(quant_type="nf4", clip_search=True))
    # through a Flower ArrayRecord, serialized as on the wire (0-dim buffers keep their shape)
    from flwr.app import ArrayRecord

    record = ArrayRecord.deserialize(encode_arrays(package_to_arrays(pkg)).serialize()) \
        if hasattr(ArrayRecord, "deserialize") else encode_arrays(package_to_arrays(pkg))
    received = decode_arrays(record, "server")
    silo = build_model_from_package(package_from_arrays(received, pkg.content_hash))
    ref = _fake_quantized(model, "nf4", True).eval()
    with torch.no_grad():
        got, want = silo(input_ids=IDS).logits, ref(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_zero_dim_buffer_reshaped_to_one_is_accepted_but_a_real_mismatch_refused():
    import numpy as np

    from fedshield_flwr.packages.format import PackageError

    model = build_tiny_model("gemma3_text")
    pkg = build_quantized_package(model)
    arrays = dict(package_to_arrays(pkg))
    zero_dim = [k for k, v in arrays.items() if np.ndim(v) == 0]
    assert zero_dim, "gemma3's embed_scale is a 0-dim buffer"
    reshaped = {**arrays, **{k: np.asarray(arrays[k]).reshape(1) for k in zero_dim}}
    assert package_from_arrays(reshaped, pkg.content_hash).content_hash == pkg.content_hash
    wrong = {**arrays, zero_dim[0]: np.zeros(2, dtype=np.float32)}
    with pytest.raises(PackageError, match="manifest says"):
        package_from_arrays(wrong, pkg.content_hash)
