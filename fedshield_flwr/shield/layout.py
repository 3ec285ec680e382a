"""Flat-vector view of an adapter state (ordered ``name -> fp32 array``) for encryption."""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedshield_flwr.shield.errors import UpdateError

# LoRA's B factors (PEFT names: ``...lora_B.weight``, ``...lora_embedding_B``): they start at zero
LEAD_TENSOR = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")


@dataclass(frozen=True)
class AdapterLayout:
    """Names and shapes of an adapter state, in order; maps it to and from one flat vector.

    Attributes
    ----------
    names : tuple of str
    shapes : tuple of tuple of int
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> AdapterLayout:
        """Layout of ``state`` in its iteration order (PEFT's order for adapter states)."""
        names = tuple(state.keys())
        shapes = tuple(tuple(int(d) for d in np.shape(state[n])) for n in names)
        return cls(names, shapes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of values of each tensor."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def num_values(self) -> int:
        """Total number of values."""
        return int(sum(self.sizes))

    @property
    def digest(self) -> str:
        """Hex digest of names and shapes; equal on silos that run the same model and LoRA."""
        raw = json.dumps([self.names, self.shapes]).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    @property
    def lead_tensors(self) -> tuple[bool, ...]:
        """Whether each tensor is a LoRA ``B`` factor (the pruning mask sends those first)."""
        return tuple(bool(LEAD_TENSOR.search(n)) for n in self.names)

    def num_blocks(self, block_size: int) -> int:
        """Blocks of ``block_size`` values needed to hold the vector (last one zero-padded)."""
        return -(-self.num_values // block_size)

    def tensor_at(self, index: int) -> str:
        """Name of the tensor that holds flat position ``index``."""
        bounds = np.cumsum(self.sizes)
        return self.names[int(np.searchsorted(bounds, index, side="right"))]

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the tensors of ``state`` into one float64 vector, checking names/shapes."""
        if tuple(state.keys()) != self.names:
            missing = sorted(set(self.names) - set(state))
            extra = sorted(set(state) - set(self.names))
            raise UpdateError(
                f"adapter state does not match the layout (missing {missing[:3]}, unexpected "
                f"{extra[:3]}, or a different order); check that every silo uses the same "
                "model and LoRA configuration"
            )
        out = np.empty(self.num_values, dtype=np.float64)
        pos = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            arr = np.asarray(state[name])
            if arr.shape != shape:
                raise UpdateError(
                    f"tensor '{name}' has shape {arr.shape}, the layout expects {shape}; check "
                    "that every silo uses the same model and LoRA configuration"
                )
            out[pos : pos + size] = arr.reshape(-1)
            pos += size
        return out

    def unflatten(self, vector: np.ndarray, dtype=np.float32) -> OrderedDict[str, np.ndarray]:
        """Split a flat vector (at least ``num_values`` long) back into named tensors."""
        vector = np.asarray(vector).reshape(-1)
        if vector.size < self.num_values:
            raise UpdateError(f"vector of {vector.size} values is shorter than the layout "
                              f"({self.num_values})")
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        pos = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = vector[pos : pos + size].astype(dtype).reshape(shape)
            pos += size
        return out
