"""Adapter tensors on the wire: ``dict[str, np.ndarray]`` <-> Flower ``ArrayRecord``, validated.

Everything that arrives is untrusted. :func:`decode_adapter` checks the names, shapes, dtypes and
finiteness of every tensor against what the receiver expects and raises :class:`PayloadError`
naming the sender and the round, so the caller can drop that reply and go on with the others.
Arrays are numpy ``.npy`` bytes decoded with ``allow_pickle=False`` (Flower's ``Array.numpy``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedshield_flwr.models.lora import AdapterMismatchError, check_adapter_state


class PayloadError(ValueError):
    """A reply could not be accepted; the message names the sender, the round and the remedy."""


def encode_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``state`` (order preserved)."""
    return ArrayRecord(
        # np.ascontiguousarray turns a 0-dim array into shape [1]; keep the shape as it is
        OrderedDict((k, Array(np.ascontiguousarray(v).reshape(np.shape(v))))
                    for k, v in state.items())
    )


def decode_arrays(record: ArrayRecord, who: str) -> "OrderedDict[str, np.ndarray]":
    """Numpy arrays of an ``ArrayRecord``; malformed array bytes raise :class:`PayloadError`."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, arr in record.items():
        try:
            value = arr.numpy()
        except Exception as exc:  # noqa: BLE001 - np.load raises several types on garbage
            raise PayloadError(f"{who}: array '{key}' is not a valid numpy payload ({exc})") from exc
        if tuple(value.shape) != tuple(arr.shape) or str(value.dtype) != arr.dtype:
            raise PayloadError(
                f"{who}: array '{key}' declares {arr.dtype}{list(arr.shape)} but holds "
                f"{value.dtype}{list(value.shape)}"
            )
        out[key] = value
    return out


def decode_adapter(
    record: ArrayRecord, expected: Mapping[str, np.ndarray], who: str
) -> "OrderedDict[str, np.ndarray]":
    """Decode and check an adapter against ``expected`` (names, shapes, dtype, finite)."""
    state = decode_arrays(record, who)
    try:
        check_adapter_state(expected, state, who)
    except AdapterMismatchError as exc:
        raise PayloadError(str(exc)) from exc
    return OrderedDict((k, state[k]) for k in expected)


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: array data, config values, metric entries."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
        elif isinstance(rec, ConfigRecord | MetricRecord):
            for k, v in rec.items():
                total += len(k) + (len(v) if isinstance(v, str | bytes) else 8)
    return total
