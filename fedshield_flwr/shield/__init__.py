"""CKKS-encrypted, block-pruned LoRA update aggregation for the ``shield`` mode.

The package's names load lazily: reading ``shield.*`` settings does not import TenSEAL.

Scheme (numbers for the default :class:`ShieldParams`): one CKKS data prime of 54 bits in the
ring N=2048 (the smallest ring with 128-bit security for it), scale 2**34, no evaluation keys.
Every ciphertext carries 2048 reals (two per complex slot) and is a *seeded symmetric*
encryption: only ``c0`` (2048 coefficients of 7 bytes) and a 65-byte seed travel, ~7.03 bytes
per value, 1.76x the fp32 adapter when dense. Blocks of 2048 values are pruned together, with
a mask every silo derives from a shared secret and the round, and error feedback keeps what was
not sent. The server adds ``c0`` vectors mod q with numpy and never decrypts; silos decrypt the
sum and divide by the total weight (exact weighted FedAvg over the silos that were summed).

Silo side::

    silo_keyset = SiloKeyset.load("keys/shield-silo.key")
    payload, state = encrypt_update(silo_keyset, update, server_round=t, silo=sid,
                                    weight=n_examples, schedule=schedule, state=state)
    global_state, state = catch_up(silo_keyset, global_state, downlink, state, silo=sid)

Server side::

    server_keyset = ServerKeyset.load("keys/shield-server.key")
    acc = RoundAccumulator(server_keyset, t, schedule=schedule)
    acc.add(payload, silo=sid)          # per reply; PayloadError leaves the sum untouched
    log.append(acc.finalize())          # log = AggregateLog(server_keyset)
    downlink = log.downlink(since_round=silo_base_round)  # from the silo's last reply
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdapterLayout": "layout",
    "AggregateLog": "aggregate",
    "BackendError": "errors",
    "DecryptedAggregate": "rounds",
    "EncryptionPool": "seal_backend",
    "HE_STANDARD_128": "params",
    "KeyMismatchError": "errors",
    "KeysetError": "errors",
    "MAX_RATIO": "pruning",
    "PARALLEL_MIN_VALUES": "rounds",
    "Payload": "payload",
    "PayloadError": "errors",
    "PendingUpload": "rounds",
    "PruneSchedule": "pruning",
    "RoundAccumulator": "aggregate",
    "SERVER_KEY_FILE": "keys",
    "SILO_KEY_FILE": "keys",
    "ServerKeyset": "keys",
    "ShieldError": "errors",
    "ShieldParams": "params",
    "SiloKeyset": "keys",
    "SiloState": "rounds",
    "UpdateError": "errors",
    "apply_aggregate": "rounds",
    "as_array": "payload",
    "block_mask": "pruning",
    "block_tiers": "pruning",
    "catch_up": "rounds",
    "decode_payload": "payload",
    "decode_record": "aggregate",
    "decrypt_aggregate": "rounds",
    "encode_record": "aggregate",
    "encrypt_snapshot": "rounds",
    "encrypt_update": "rounds",
    "generate_keyset": "keys",
    "kept_block_count": "pruning",
    "prune_ratio": "pruning",
    "scatter_blocks": "pruning",
    "split_with_residual": "pruning",
    "with_residual": "rounds",
    "write_keyset_files": "keys",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedshield_flwr.shield' has no attribute '{name}'")
    return getattr(importlib.import_module(f"fedshield_flwr.shield.{_WHERE[name]}"), name)
