"""lpp k-bit global adapter: code books, real bit packing, error bounds, wire validation, and the
server's validation and update rule."""

from __future__ import annotations

import math
from collections import OrderedDict

import bitsandbytes.functional as bnbf
import numpy as np
import pytest

from fedshield_flwr.lpp.adapter import (
    ADAPTER_MANIFEST_KEY,
    SUPPORTED_BITS,
    AdapterQuantError,
    AdapterQuantSpec,
    adapter_from_arrays,
    adapter_quantization_error,
    adapter_to_arrays,
    codebook_half_gap,
    dequantize_adapter,
    dequantize_tensor,
    lpp_server_update,
    max_abs_error_bound,
    normal_float_codebook,
    pack_bits,
    prepare_global_adapter,
    quantize_adapter,
    quantize_tensor,
    unpack_bits,
    validate_silo_adapter,
)
from fedshield_flwr.models.lora import AdapterMismatchError

# relative L2 error ceilings per bits on normal and uniform data (measured ~0.55/0.19/0.09/0.016
# on normal, ~0.38/0.16/0.09/0.025 on uniform)
REL_L2_MAX = {2: 0.6, 3: 0.22, 4: 0.11, 8: 0.03}


def _adapter(seed: int = 0) -> OrderedDict:
    rng = np.random.default_rng(seed)
    return OrderedDict([
        ("base_model.model.layers.0.q_proj.lora_A.weight",
         rng.uniform(-0.1, 0.1, (8, 100)).astype(np.float32)),  # kaiming-uniform-like
        ("base_model.model.layers.0.q_proj.lora_B.weight",
         rng.normal(0, 0.01, (100, 8)).astype(np.float32)),
        ("base_model.model.layers.0.v_proj.lora_B.weight", np.zeros((37, 8), np.float32)),
    ])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codebook_has_2_pow_bits_sorted_levels_with_exact_zero_and_ends(bits):
    cb = normal_float_codebook(bits)
    assert cb.shape == (2**bits,) and cb.dtype == np.float32
    assert np.all(np.diff(cb) > 0)
    assert cb[0] == -1 and cb[-1] == 1 and 0.0 in cb


def test_4bit_codebook_is_bitsandbytes_nf4():
    np.testing.assert_allclose(normal_float_codebook(4),
                               bnbf.get_4bit_type("nf4", device="cpu").numpy(), atol=1e-6)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_unpack_round_trip_uses_exactly_ceil_bits_bytes(bits, count):
    codes = np.random.default_rng(count).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)


def test_3bit_packs_8_values_into_3_bytes():
    packed = pack_bits(np.arange(8), 3)
    assert packed.size == 3
    # 000 001 010 011 100 101 110 111 -> 00000101 00111001 01110111
    assert packed.tolist() == [0b00000101, 0b00111001, 0b01110111]


def test_code_too_large_for_bits_is_refused():
    with pytest.raises(AdapterQuantError, match="does not fit"):
        pack_bits(np.array([4]), 2)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_error_within_bound_per_bits(bits, dist):
    rng = np.random.default_rng(bits)
    x = (rng.normal(0, 0.02, (64, 130)) if dist == "normal"
         else rng.uniform(-0.1, 0.1, (64, 130))).astype(np.float32)
    q = quantize_tensor(x, bits, blocksize=64)
    err = np.abs(dequantize_tensor(q) - x)
    assert np.all(err <= max_abs_error_bound(q))
    assert err.max() <= np.abs(x).max() * codebook_half_gap(bits) * (1 + 1e-6)
    assert np.linalg.norm(dequantize_tensor(q) - x) / np.linalg.norm(x) < REL_L2_MAX[bits]


def test_error_shrinks_as_bits_grow_and_payload_is_real():
    state = _adapter()
    n = sum(v.size for v in state.values())
    errs = {b: adapter_quantization_error(state, AdapterQuantSpec(b, 64)) for b in SUPPORTED_BITS}
    assert [errs[b]["rel_l2"] for b in SUPPORTED_BITS] == sorted(
        (errs[b]["rel_l2"] for b in SUPPORTED_BITS), reverse=True)
    for b, e in errs.items():
        assert e["bound_ok"] == 1.0
        expected = sum(math.ceil(v.size * b / 8) + 4 * math.ceil(v.size / 64)
                       for v in state.values())
        assert e["bytes"] == expected
        assert b < e["bits_per_value"] < b + 0.7
    assert errs[4]["bytes"] < 0.15 * 4 * n  # vs fp32


def test_zero_tensor_survives_exactly():
    qa = quantize_adapter(_adapter(), AdapterQuantSpec(2))
    out = dequantize_adapter(qa)
    assert np.array_equal(out["base_model.model.layers.0.v_proj.lora_B.weight"],
                          np.zeros((37, 8), np.float32))


def test_quantizing_nan_is_refused():
    with pytest.raises(AdapterQuantError, match="NaN"):
        quantize_tensor(np.array([1.0, np.nan], np.float32), 4)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_wire_round_trip_is_exact(bits):
    qa = quantize_adapter(_adapter(), AdapterQuantSpec(bits, 32))
    arrays = adapter_to_arrays(qa)
    assert all(v.dtype in (np.uint8, np.float32) for v in arrays.values())
    back = adapter_from_arrays(arrays, who="server in round 1")
    assert back.spec == qa.spec
    for k, v in dequantize_adapter(qa).items():
        np.testing.assert_array_equal(dequantize_adapter(back)[k], v)


def test_wire_adapter_survives_flower_array_record():
    from flwr.app import Array, ArrayRecord

    qa = quantize_adapter(_adapter(), AdapterQuantSpec(3))
    record = ArrayRecord({k: Array(v) for k, v in adapter_to_arrays(qa).items()})
    back = adapter_from_arrays({k: a.numpy() for k, a in record.items()})
    assert back.nbytes == qa.nbytes


def test_malformed_wire_adapter_is_refused_naming_sender():
    arrays = adapter_to_arrays(quantize_adapter(_adapter(), AdapterQuantSpec(3)))
    key = "base_model.model.layers.0.q_proj.lora_A.weight"
    cases = {
        "codes must be": {f"{key}:codes": arrays[f"{key}:codes"][:-1]},
        "absmax must be": {f"{key}:absmax": arrays[f"{key}:absmax"].astype(np.float64)},
        "NaN": {f"{key}:absmax": np.full_like(arrays[f"{key}:absmax"], np.nan)},
        "unexpected or missing": {"extra": np.zeros(1, np.uint8)},
        "unreadable manifest": {ADAPTER_MANIFEST_KEY: np.frombuffer(b"[1,2", np.uint8)},
    }
    for match, change in cases.items():
        with pytest.raises(AdapterQuantError, match=f"server in round 5.*{match}"):
            adapter_from_arrays(dict(arrays, **change), who="server in round 5")


def test_unsupported_bits_refused():
    with pytest.raises(AdapterQuantError, match="bits"):
        AdapterQuantSpec(bits=5)


@pytest.mark.parametrize("change, match", [
    (lambda s, k: s.update({k: np.zeros((3, 3), np.float32)}), "shape"),
    (lambda s, k: s.update({k: s[k].astype(np.float64)}), "dtype"),
    (lambda s, k: s[k].__setitem__((0, 0), np.nan), "NaN or Inf"),
    (lambda s, k: s[k].__setitem__((0, 0), np.inf), "NaN or Inf"),
    (lambda s, k: s.pop(k), "names differ"),
])
def test_bad_silo_adapter_refused_naming_silo_and_round(change, match):
    ref = _adapter()
    bad = OrderedDict((k, v.copy()) for k, v in ref.items())
    change(bad, next(iter(bad)))
    with pytest.raises(AdapterMismatchError, match=f"silo 3 in round 7.*{match}"):
        validate_silo_adapter(ref, bad, silo=3, server_round=7)
    validate_silo_adapter(ref, ref, silo=3, server_round=7)


def test_update_rule_is_weighted_mean_minus_sent_scaled_by_server_lr():
    fp = OrderedDict(a=np.array([1.0, 2.0], np.float32))
    sent = OrderedDict(a=np.array([0.9, 2.1], np.float32))
    silos = [OrderedDict(a=np.array([1.9, 2.1], np.float32)),
             OrderedDict(a=np.array([0.9, 5.1], np.float32))]
    out = lpp_server_update(fp, sent, silos, weights=[3, 1], server_lr=0.5)
    # mean = [1.65, 2.85]; delta = [0.75, 0.75]; fp + 0.5 * delta
    np.testing.assert_allclose(out["a"], [1.375, 2.375], rtol=1e-6)
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(fp["a"], [1.0, 2.0])  # inputs untouched


def test_silos_that_do_not_move_leave_fp_adapter_unchanged():
    # quantization error of what was sent must not leak into the full-precision adapter
    fp = _adapter(1)
    sent_q, sent = prepare_global_adapter(fp, AdapterQuantSpec(2))
    assert sent_q.spec.bits == 2
    out = lpp_server_update(fp, sent, [sent, sent], weights=[1, 5], server_lr=1.0)
    for k in fp:
        np.testing.assert_allclose(out[k], fp[k], atol=1e-7)


def test_update_with_lossless_transport_and_lr_1_is_fedavg():
    fp = _adapter(1)
    silos = [_adapter(2), _adapter(3)]
    out = lpp_server_update(fp, fp, silos, weights=[1, 1])
    for k in fp:
        np.testing.assert_allclose(out[k], (silos[0][k] + silos[1][k]) / 2, atol=1e-7)


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [1, float("nan")], [1]])
def test_update_refuses_bad_weights(weights):
    fp = _adapter()
    with pytest.raises(ValueError):
        lpp_server_update(fp, fp, [fp, fp], weights=weights)
