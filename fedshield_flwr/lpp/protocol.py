"""The wire protocol of ``lpp``: what its messages carry, and how each side builds and reads it.

Server -> silo (train and evaluate): ``config`` with the round and :data:`HASH_KEY` (content hash
of the quantized base the silo must train on), :data:`ADAPTER_RECORD` (the k-bit global adapter)
and, only for a silo that lacks it, :data:`BASE_RECORD` (the base package; see
:mod:`fedshield_flwr.packages.protocol` for the query that decides). Silo -> server: the replies
of ``fedavg`` (:mod:`fedshield_flwr.protocol`): its adapter in ``arrays`` and its metrics.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedshield_flwr.lpp.adapter import (
    QuantizedAdapter,
    adapter_from_arrays,
    adapter_to_arrays,
    dequantize_adapter,
)
from fedshield_flwr.packages.protocol import announced_hash, attached_package
from fedshield_flwr.protocol import CONFIG, ROUND
from fedshield_flwr.wire import PayloadError, decode_arrays, encode_arrays

BASE_RECORD = "base"  # ArrayRecord of the quantized base (first delivery only)
ADAPTER_RECORD = "adapter"  # ArrayRecord of the k-bit global adapter
HASH_KEY = "base-hash"  # ConfigRecord key: content hash of the base the silo must use


def server_message(template: Message, adapter: ArrayRecord, config: ConfigRecord,
                   server_round: int) -> Message:
    """The message for ``template``'s silo: the k-bit adapter and the round (server side)."""
    config[ROUND] = server_round
    return Message(content=RecordDict({ADAPTER_RECORD: adapter, CONFIG: config}),
                   message_type=template.metadata.message_type,
                   dst_node_id=template.metadata.dst_node_id)


def adapter_record(qa: QuantizedAdapter) -> ArrayRecord:
    """The k-bit global adapter as it travels (server side)."""
    return encode_arrays(adapter_to_arrays(qa))


def read_base(msg: Message, who: str) -> tuple[str, OrderedDict[str, np.ndarray] | None]:
    """The announced base hash and, if attached, the base package arrays (silo side)."""
    return announced_hash(msg, who, HASH_KEY), attached_package(msg, BASE_RECORD, who)


def read_adapter(msg: Message, who: str) -> OrderedDict[str, np.ndarray]:
    """The de-quantized k-bit global adapter of a server message (silo side)."""
    if ADAPTER_RECORD not in msg.content.array_records:
        raise PayloadError(f"{who} carries no '{ADAPTER_RECORD}' (k-bit global adapter)")
    qa = adapter_from_arrays(decode_arrays(msg.content[ADAPTER_RECORD], who), who)
    return dequantize_adapter(qa)
