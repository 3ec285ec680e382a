"""Tensor frames of the split relay: encode packed activations, decode and validate what arrives.

A frame is raw little-endian bytes with a dtype/shape header (``relay.proto``: ``Tensor``,
``Activation``); nothing is ever unpickled. Every frame that arrives over the network is untrusted:
:func:`decode_activation` checks the dtype against a whitelist, the shape against the byte length,
the hidden size against the model, the sequence lengths against the token count and the model's
context, the total size against ``max_frame_bytes``, and rejects NaN/Inf, raising
:class:`FrameError` with a message that names the sender, the step and the remedy.

Wire dtypes (``split.activation-dtype``)
----------------------------------------
``fp32``  float32 values, no scale; bit-exact.
``fp16``  float16 values of ``x / s`` with one float32 scale ``s = absmax / 2**14`` per frame, so
          small gradients do not underflow and large activations do not overflow.
``int8``  int8 values of ``round(127 * x / absmax_row)`` with one float32 scale per token row
          (per-row absmax quantization).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedshield_flwr.split.relay import relay_pb2 as pb

# Wire dtype names (proto ``Tensor.dtype``) -> numpy dtype; anything else is refused.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
}
# Config names (``split.activation-dtype``) -> wire dtype of the values.
ACTIVATION_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
FP16_TARGET_MAX = 2.0**14  # fp16 frames are scaled so that |x|max maps here (fp16 max 65504)
DEFAULT_MAX_FRAME_BYTES = 64 * 2**20
MAX_SEQUENCES_PER_FRAME = 4096


class FrameError(ValueError):
    """A frame is malformed, oversized or inconsistent; the message names sender, step, remedy."""


@dataclass(frozen=True)
class FrameLimits:
    """What a decoder accepts.

    Parameters
    ----------
    hidden_size : int
        Required second dimension of the values (the model's hidden size).
    max_frame_bytes : int
        Upper bound on the bytes of values plus scales of one frame.
    max_sequence_length : int
        Longest sequence accepted (the model's context, e.g. ``max_position_embeddings``).
    """

    hidden_size: int
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_sequence_length: int = 1 << 20


def _tensor(arr: np.ndarray, dtype: str) -> pb.Tensor:
    arr = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[dtype])
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=arr.tobytes())


def encode_activation(
    x: torch.Tensor, lengths: Sequence[int], dtype: str = "fp32"
) -> pb.Activation:
    """Encode packed rows ``x`` ([tokens, hidden]) with their sequence ``lengths``.

    Parameters
    ----------
    x : torch.Tensor
        Packed activations or gradients, ``[sum(lengths), hidden]``, any float dtype.
    lengths : sequence of int
        Tokens per sequence, in packing order.
    dtype : {"fp32", "fp16", "int8"}
        Wire dtype (see module docstring).

    Returns
    -------
    relay_pb2.Activation
    """
    if dtype not in ACTIVATION_DTYPES:
        raise FrameError(
            f"activation dtype '{dtype}' is not supported; set split.activation-dtype to one of "
            f"{', '.join(ACTIVATION_DTYPES)}"
        )
    if x.dim() != 2 or x.shape[0] != sum(int(n) for n in lengths):
        raise FrameError(
            f"packed tensor has shape {tuple(x.shape)} but lengths sum to {sum(lengths)}; "
            "pack the real tokens of every sequence back to back"
        )
    a = x.detach().to(torch.float32).cpu()
    msg = pb.Activation(lengths=[int(n) for n in lengths])
    if dtype == "fp32":
        msg.values.CopyFrom(_tensor(a.numpy(), "float32"))
    elif dtype == "fp16":
        absmax = float(a.abs().max()) if a.numel() else 0.0
        scale = absmax / FP16_TARGET_MAX if absmax > 0 else 1.0
        msg.values.CopyFrom(_tensor((a / scale).to(torch.float16).numpy(), "float16"))
        msg.scale.CopyFrom(_tensor(np.array([scale], dtype=np.float32), "float32"))
    else:
        absmax = a.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.round(a / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        msg.values.CopyFrom(_tensor(q.numpy(), "int8"))
        msg.scale.CopyFrom(_tensor(scale.numpy(), "float32"))
    return msg


def _array(t: pb.Tensor, what: str, who: str) -> np.ndarray:
    if t.dtype not in WIRE_DTYPES:
        raise FrameError(
            f"{who}: {what} has dtype '{t.dtype[:32]}', which the relay does not accept "
            f"(allowed: {', '.join(WIRE_DTYPES)}); check split.activation-dtype and the library "
            "version of that party"
        )
    dt = WIRE_DTYPES[t.dtype]
    shape = tuple(int(s) for s in t.shape)
    if len(shape) > 2 or any(s > 1 << 40 for s in shape):
        raise FrameError(f"{who}: {what} has an implausible shape {shape[:4]}; frame refused")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.data) != count * dt.itemsize:
        raise FrameError(
            f"{who}: {what} header says {t.dtype}{list(shape)} = {count * dt.itemsize} bytes but "
            f"the frame carries {len(t.data)} bytes; the frame is corrupt or was built by an "
            "incompatible encoder"
        )
    return np.frombuffer(t.data, dtype=dt).reshape(shape)


def frame_nbytes(msg: pb.Activation) -> int:
    """Bytes of tensor payload (values plus scales) in ``msg``."""
    return len(msg.values.data) + (len(msg.scale.data) if msg.HasField("scale") else 0)


def decode_activation(
    msg: pb.Activation,
    limits: FrameLimits,
    who: str,
    expect_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Validate and decode an :class:`Activation` into float32 packed rows and lengths.

    Parameters
    ----------
    msg : relay_pb2.Activation
        The frame as received.
    limits : FrameLimits
        Hidden size, frame size and sequence length bounds.
    who : str
        Sender and step for error messages, e.g. ``"silo 'hospital-2' step 7 forward"``.
    expect_lengths : sequence of int, optional
        Required lengths (a gradient must match the activation it answers).

    Returns
    -------
    (torch.Tensor, list of int)
        ``[tokens, hidden]`` float32 tensor (a private copy) and the sequence lengths.

    Raises
    ------
    FrameError
        On any inconsistency; the message names ``who`` and what to fix.
    """
    if not msg.HasField("values"):
        raise FrameError(f"{who}: frame has no values tensor; frame refused")
    size = frame_nbytes(msg)
    if size > limits.max_frame_bytes:
        raise FrameError(
            f"{who}: frame of {size} bytes exceeds the relay limit of {limits.max_frame_bytes} "
            "bytes; use smaller batches or max-length, a smaller split.activation-dtype, or raise "
            "split.max-frame-mb on the server"
        )
    lengths = [int(n) for n in msg.lengths]
    if not lengths or len(lengths) > MAX_SEQUENCES_PER_FRAME:
        raise FrameError(
            f"{who}: frame has {len(lengths)} sequences; 1 to {MAX_SEQUENCES_PER_FRAME} allowed"
        )
    if min(lengths) < 1 or max(lengths) > limits.max_sequence_length:
        raise FrameError(
            f"{who}: sequence lengths must be in [1, {limits.max_sequence_length}] (the model "
            f"context), got min {min(lengths)} max {max(lengths)}; truncate with data.max-length"
        )
    if expect_lengths is not None and lengths != [int(n) for n in expect_lengths]:
        raise FrameError(
            f"{who}: lengths {lengths[:8]} do not match the {len(expect_lengths)} sequences of "
            "the forward pass this frame answers; send the gradient of that exact batch"
        )
    values = _array(msg.values, "values", who)
    tokens = sum(lengths)
    if values.shape != (tokens, limits.hidden_size):
        raise FrameError(
            f"{who}: values have shape {list(values.shape)}, expected [{tokens}, "
            f"{limits.hidden_size}] (sum of lengths x hidden size); check that both parties use "
            "the same model"
        )
    dtype = msg.values.dtype
    if dtype == "float32":
        if msg.HasField("scale"):
            raise FrameError(f"{who}: float32 frames carry no scale; frame refused")
        out = values.astype(np.float32, copy=True)
    else:
        if not msg.HasField("scale") or msg.scale.dtype != "float32":
            raise FrameError(f"{who}: a {dtype} frame needs a float32 scale tensor; frame refused")
        scale = _array(msg.scale, "scale", who)
        rows = 1 if dtype == "float16" else tokens
        if scale.shape != (rows,):
            raise FrameError(
                f"{who}: {dtype} scale has shape {list(scale.shape)}, expected [{rows}]; "
                "frame refused"
            )
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise FrameError(f"{who}: scale contains negative, NaN or Inf values; frame refused")
        if dtype == "float16":
            out = values.astype(np.float32) * scale[0]
        else:
            out = values.astype(np.float32) * scale[:, None]
    if not np.all(np.isfinite(out)):
        raise FrameError(
            f"{who}: values contain NaN or Inf; the sender's training diverged (lower the "
            "learning rate) or fp16 overflowed (use split.activation-dtype=fp32)"
        )
    return torch.from_numpy(out), lengths
