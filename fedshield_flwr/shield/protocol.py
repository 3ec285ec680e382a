"""The wire protocol of ``shield``: what its messages carry, and how each side builds and reads it.

Server -> silo (train and evaluate): ``config`` with the round, :data:`KEYS_TAG` (which keyset),
on train :data:`PRUNE_RATIO` (this round's public ratio), on evaluate :data:`FINAL_ROUND` and, in
simulation, :data:`EXPORT_DIR`; and :data:`DOWNLINK`, the encrypted aggregates the silo has not
applied yet (uint8 arrays ``record-00000``, ... in order). Silo -> server: on train
:data:`PAYLOAD` (one uint8 array, the CKKS payload of its pruned update); on both, its metrics
with :data:`GLOBAL_ROUND`, the round of the global adapter it holds. No plaintext tensor ever
crosses the wire in either direction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedshield_flwr.protocol import CONFIG, config_of
from fedshield_flwr.shield.errors import PayloadError
from fedshield_flwr.shield.payload import as_array

DOWNLINK = "downlink"  # ArrayRecord of encrypted aggregates (server -> silo)
PAYLOAD = "payload"  # ArrayRecord with one array "payload": a silo's encrypted update
KEYS_TAG = "keys-tag"  # config: tag of the run's keyset (simulation provisions one per run)
PRUNE_RATIO = "prune-ratio"  # config (train): the round's public pruning ratio
FINAL_ROUND = "final-round"  # config (evaluate): silos that export do so now
EXPORT_DIR = "export-dir"  # config (simulation) or node config (deployment): where to export
GLOBAL_ROUND = "global-round"  # reply metrics: round of the global adapter the silo holds
MAX_SILOS = "max-silos"  # config: silos a round sums; sizes a keyset provisioned in simulation
NODE_KEY_FILE = "shield-key"  # node config: path of the silo's shield-silo.key


def downlink_record(records: list[bytes]) -> ArrayRecord:
    """Encrypted aggregates as an ``ArrayRecord`` of uint8 arrays, in order (server side)."""
    return ArrayRecord(OrderedDict(
        (f"record-{i:05d}", Array(as_array(r))) for i, r in enumerate(records)))


def server_message(node: int, downlink: ArrayRecord, config: Mapping[str, Any],
                   message_type: str) -> Message:
    """The message to silo ``node``: the aggregates it lacks and the round's config.

    ``downlink``: those aggregates' :func:`downlink_record`, which the messages of every silo
    that lacks the same ones share.
    """
    content = RecordDict({DOWNLINK: downlink, CONFIG: ConfigRecord(dict(config))})
    return Message(content=content, message_type=message_type, dst_node_id=node)


def read_downlink(msg: Message) -> list[np.ndarray]:
    """The encrypted aggregates of a server message, in order (silo side)."""
    if DOWNLINK not in msg.content.array_records:
        return []
    return [a.numpy() for a in msg.content[DOWNLINK].values()]


def keys_tag(msg: Message) -> str:
    """The keyset tag a server message names (silo side)."""
    return str(config_of(msg).get(KEYS_TAG, ""))


def keys_max_silos(msg: Message) -> int:
    """How many silos per round the server asks a simulated keyset to hold (0: the default)."""
    return int(config_of(msg).get(MAX_SILOS, 0))


def payload_record(payload: bytes) -> ArrayRecord:
    """A silo's encrypted update as it travels (silo side)."""
    return ArrayRecord(OrderedDict([(PAYLOAD, Array(np.frombuffer(payload, np.uint8)))]))


def payload_bytes(msg: Message) -> bytes:
    """The single encrypted payload of a train reply (raises ``PayloadError`` naming the silo)."""
    node = msg.metadata.src_node_id
    rec = msg.content.array_records.get(PAYLOAD)
    if rec is None or PAYLOAD not in rec:
        raise PayloadError(f"silo node {node} sent no '{PAYLOAD}' array")
    arr = rec[PAYLOAD]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise PayloadError(f"silo node {node} sent a payload of {arr.dtype}{list(arr.shape)}; "
                           "expected a 1-D uint8 array")
    try:
        return arr.numpy().tobytes()
    except Exception as exc:  # noqa: BLE001
        raise PayloadError(f"silo node {node} sent undecodable payload bytes ({exc})") from exc


def export_target(msg: Message, node_config: Mapping[str, Any], partition_id: int) -> str:
    """Where this silo exports the final adapter, or "" (silo side).

    A deployed site sets ``export-dir`` in its node config; in simulation the server names a
    directory for silo 0. Only the final round's evaluate message triggers the export.
    """
    if not bool(config_of(msg).get(FINAL_ROUND, False)):
        return ""
    return str(node_config.get(EXPORT_DIR, "")) or (
        str(config_of(msg).get(EXPORT_DIR, "")) if partition_id == 0 else "")
