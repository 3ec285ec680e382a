"""The wire protocol of ``split``'s Flower messages (round control), and each side's reader.

Flower messages carry round control only; activations and gradients go through the relay
(:mod:`.relay`). Server -> silo (train and evaluate): ``config`` with the round, the relay address
(:data:`ADDRESS_KEY`), a bearer token issued to this silo for this round (:data:`TOKEN_KEY`), the
silo name the token is bound to (:data:`SILO_KEY`), the relay's CA certificate when it serves TLS
(:data:`CA_KEY`) and the silo parts' hash (:data:`PARTS_HASH_KEY`); the parts package itself
(:data:`PARTS_RECORD`) only for a silo that lacks it. With ``split.aggregation='fedavg'`` the
global head + tail adapter travels in ``arrays`` (empty until a round produced one), with
``'shield'`` as in :mod:`fedshield_flwr.shield.protocol`, plus the middle adapter
(:data:`MIDDLE_RECORD`) in the final evaluate messages for the silos that export.
Silo -> server: the replies of the aggregation mode, with the relay bytes it moved
(:data:`RELAY_UP_KEY`, :data:`RELAY_DOWN_KEY`) in its metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from fedshield_flwr.protocol import ARRAYS, METRICS, ROUND
from fedshield_flwr.wire import decode_adapter, decode_arrays

ADDRESS_KEY, TOKEN_KEY, SILO_KEY, CA_KEY = "relay-address", "relay-token", "silo-name", "relay-ca"
RELAY_UP_KEY, RELAY_DOWN_KEY = "relay-bytes-up", "relay-bytes-down"  # reply metrics, bytes
MIDDLE_RECORD = "middle"  # ArrayRecord: the middle adapter (final evaluate, shield aggregation)
PARTS_RECORD, PARTS_HASH_KEY = "parts", "parts-hash"  # the silo parts package and its hash


@dataclass(frozen=True)
class RelayTicket:
    """What a silo needs to open its relay stream for one round (read from the message)."""

    address: str
    token: str
    silo: str
    ca_pem: bytes | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], who: str) -> RelayTicket:
        missing = [k for k in (ADDRESS_KEY, TOKEN_KEY, SILO_KEY) if not config.get(k)]
        if missing:
            raise ValueError(
                f"{who}: the server message lacks {', '.join(missing)}; the ServerApp and this "
                "ClientApp must both run strategy.name='split' from the same app version")
        ca = str(config.get(CA_KEY, ""))
        return cls(str(config[ADDRESS_KEY]), str(config[TOKEN_KEY]), str(config[SILO_KEY]),
                   ca.encode() if ca else None)

    def as_config(self) -> dict[str, str]:
        """The config entries that carry this ticket (server side)."""
        out = {ADDRESS_KEY: self.address, TOKEN_KEY: self.token, SILO_KEY: self.silo}
        if self.ca_pem:
            out[CA_KEY] = self.ca_pem.decode()
        return out


def relay_traffic(replies: Iterable[Message], server_round: int) -> dict[str, float]:
    """Relay bytes the silos report for ``server_round`` (server side)."""
    up = down = 0.0
    for msg in replies:
        if msg.has_error():
            continue
        rec = msg.content.metric_records.get(METRICS)
        if rec is None or int(rec.get(ROUND, -1)) != server_round:
            continue
        up += float(rec.get(RELAY_UP_KEY, 0.0))
        down += float(rec.get(RELAY_DOWN_KEY, 0.0))
    return {"relay_bytes_up": up, "relay_bytes_down": down}


def read_global(msg: Message, initial: Mapping[str, np.ndarray], who: str
                ) -> OrderedDict[str, np.ndarray]:
    """fedavg aggregation: the global head + tail adapter of a message, or ``initial`` if empty."""
    record = msg.content.array_records.get(ARRAYS)
    if record is None or len(record) == 0:
        return OrderedDict(initial)  # no aggregate yet: the package's initial adapter
    return decode_adapter(record, initial, f"server message to {who}")


def read_middle(msg: Message, who: str) -> OrderedDict[str, np.ndarray]:
    """The server's middle adapter of a final evaluate message, refused unless finite fp32 LoRA."""
    if MIDDLE_RECORD not in msg.content.array_records:
        raise ValueError(f"{who}: the final evaluate message has no middle adapter to merge; "
                         "run the same app version on server and silos")
    middle = decode_arrays(msg.content.array_records[MIDDLE_RECORD], f"middle adapter, {who}")
    bad = [k for k, v in middle.items()
           if "lora_" not in k or v.dtype != np.float32 or not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{who}: the server's middle adapter has invalid tensors ({bad[:3]}); "
                         "expected finite fp32 LoRA tensors")
    return middle
