"""Tests of fedshield_flwr.shield; small helpers shared by the test modules."""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict

import numpy as np

# A small LoRA-like adapter: 3 tensors, 27,648 values = 14 blocks of 2048 (last one partial).
SHAPES = OrderedDict(
    [
        ("layers.0.q_proj.lora_A.weight", (16, 576)),
        ("layers.0.q_proj.lora_B.weight", (576, 16)),
        ("layers.0.v_proj.lora_A.weight", (16, 576)),
    ]
)


def make_update(seed: int, scale: float = 1e-2, shapes=SHAPES) -> OrderedDict[str, np.ndarray]:
    """A random fp32 adapter update with standard deviation ``scale``."""
    rng = np.random.default_rng(seed)
    return OrderedDict(
        (name, (rng.standard_normal(shape) * scale).astype(np.float32))
        for name, shape in shapes.items()
    )


def flat(state) -> np.ndarray:
    """Concatenate a state dict into a float64 vector."""
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in state.values()])


def reframe(payload: bytes, body: bytes | None = None, **changes) -> bytes:
    """Rebuild a shield payload with header fields changed and/or another body, with a fresh
    digest: what a misconfigured (not a damaged) sender would produce."""
    (hlen,) = struct.unpack(">I", payload[8:12])
    header = json.loads(payload[12 : 12 + hlen])
    header.update(changes)
    body = payload[12 + hlen : -32] if body is None else body
    raw = json.dumps(header).encode()
    frame = payload[:8] + struct.pack(">I", len(raw)) + raw + body
    return frame + hashlib.sha256(frame).digest()


def body_of(payload: bytes) -> bytes:
    """The body section of a shield payload."""
    (hlen,) = struct.unpack(">I", payload[8:12])
    return payload[12 + hlen : -32]
