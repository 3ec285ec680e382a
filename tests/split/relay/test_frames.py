"""Relay frames: raw-bytes tensor codec and the validation of every untrusted frame."""

from __future__ import annotations

import pytest
import torch

from fedshield_flwr.split.relay import relay_pb2 as pb
from fedshield_flwr.split.relay.frames import (
    FrameError,
    FrameLimits,
    decode_activation,
    encode_activation,
)

LIMITS = FrameLimits(hidden_size=8, max_frame_bytes=4096, max_sequence_length=64)
WHO = "silo 'a' step 3 forward"


def _x(rows=5, seed=0):
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed)) * 3


def test_fp32_roundtrip_is_bit_exact_and_carries_lengths_without_padding():
    x = _x()
    msg = encode_activation(x, [2, 3], "fp32")
    assert len(msg.values.data) == 5 * 8 * 4 and not msg.HasField("scale")
    y, lens = decode_activation(msg, LIMITS, WHO)
    assert torch.equal(x, y) and lens == [2, 3]


def test_fp16_and_int8_roundtrips_stay_within_their_quantization_error():
    x = _x()
    y16, _ = decode_activation(encode_activation(x, [5], "fp16"), LIMITS, WHO)
    assert float((x - y16).abs().max()) <= 1e-3 * float(x.abs().max())
    m8 = encode_activation(x, [5], "int8")
    assert len(m8.values.data) == 40 and len(m8.scale.data) == 20  # 1 byte/value + fp32 per row
    y8, _ = decode_activation(m8, LIMITS, WHO)
    row_max = x.abs().amax(1, keepdim=True)
    assert bool(((x - y8).abs() <= row_max / 254 + 1e-6).all())
    tiny = x * 1e-9  # gradients this small must not underflow in fp16
    back, _ = decode_activation(encode_activation(tiny, [5], "fp16"), LIMITS, WHO)
    assert float((tiny - back).abs().max()) <= 1e-3 * float(tiny.abs().max())


def _bad(mutate) -> str:
    msg = encode_activation(_x(), [2, 3], "int8")
    mutate(msg)
    with pytest.raises(FrameError) as err:
        decode_activation(msg, LIMITS, WHO)
    assert WHO in str(err.value)
    return str(err.value)


def test_malformed_headers_are_refused_with_errors_naming_the_sender():
    assert "not accept" in _bad(lambda m: setattr(m.values, "dtype", "float64"))
    assert "carries 39 bytes" in _bad(lambda m: setattr(m.values, "data", m.values.data[:-1]))

    def wrong_shape(m):
        m.values.shape[:] = [8, 5]

    assert "expected [5, 8]" in _bad(wrong_shape)

    def wrong_lengths(m):
        m.lengths[:] = [2, 2]

    assert "expected [4, 8]" in _bad(wrong_lengths)

    def no_scale(m):
        m.ClearField("scale")

    assert "needs a float32 scale" in _bad(no_scale)

    def zero_length(m):
        m.lengths[:] = [0, 5]

    assert "sequence lengths" in _bad(zero_length)


def test_oversized_nonfinite_and_mismatched_frames_are_refused():
    big = encode_activation(torch.zeros(200, 8), [200], "fp32")  # 6400 bytes > 4096
    with pytest.raises(FrameError, match="exceeds the relay limit of 4096 bytes"):
        decode_activation(big, LIMITS, WHO)
    x = _x()
    x[1, 2] = float("nan")
    with pytest.raises(FrameError, match="NaN or Inf"):
        decode_activation(encode_activation(x, [5], "fp32"), LIMITS, WHO)
    with pytest.raises(FrameError, match="do not match"):
        decode_activation(
            encode_activation(_x(), [2, 3], "fp32"), LIMITS, WHO, expect_lengths=[3, 2]
        )
    too_long = encode_activation(torch.zeros(65, 8), [65], "fp16")
    with pytest.raises(FrameError, match="model context"):
        decode_activation(too_long, LIMITS, WHO)
    raw = pb.Activation(lengths=[1])
    with pytest.raises(FrameError, match="no values"):
        decode_activation(raw, LIMITS, WHO)
