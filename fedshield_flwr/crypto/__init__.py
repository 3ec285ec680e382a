"""CKKS-encrypted, block-pruned LoRA update aggregation for the ``shield`` mode.

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

from .errors import (
    BackendError,
    KeyMismatchError,
    KeysetError,
    PayloadError,
    ShieldError,
    UpdateError,
)
from .keys import (
    SERVER_KEY_FILE,
    SILO_KEY_FILE,
    ServerKeyset,
    SiloKeyset,
    generate_keyset,
    write_keyset_files,
)
from .layout import AdapterLayout
from .params import HE_STANDARD_128, ShieldParams
from .payload import Payload, as_array, decode_payload
from .protocol import (
    PARALLEL_MIN_VALUES,
    AggregateLog,
    DecryptedAggregate,
    PendingUpload,
    RoundAccumulator,
    SiloState,
    apply_aggregate,
    catch_up,
    decode_record,
    decrypt_aggregate,
    encode_record,
    encrypt_snapshot,
    encrypt_update,
    with_residual,
)
from .pruning import (
    MAX_RATIO,
    PruneSchedule,
    block_mask,
    block_tiers,
    kept_block_count,
    prune_ratio,
    scatter_blocks,
    split_with_residual,
)
from .seal_backend import EncryptionPool

__all__ = [
    "HE_STANDARD_128",
    "MAX_RATIO",
    "PARALLEL_MIN_VALUES",
    "SERVER_KEY_FILE",
    "SILO_KEY_FILE",
    "AdapterLayout",
    "AggregateLog",
    "BackendError",
    "DecryptedAggregate",
    "EncryptionPool",
    "KeyMismatchError",
    "KeysetError",
    "Payload",
    "PayloadError",
    "PendingUpload",
    "PruneSchedule",
    "RoundAccumulator",
    "ServerKeyset",
    "ShieldError",
    "ShieldParams",
    "SiloKeyset",
    "SiloState",
    "UpdateError",
    "apply_aggregate",
    "as_array",
    "block_mask",
    "block_tiers",
    "catch_up",
    "decode_payload",
    "decode_record",
    "decrypt_aggregate",
    "encode_record",
    "encrypt_snapshot",
    "encrypt_update",
    "generate_keyset",
    "kept_block_count",
    "prune_ratio",
    "scatter_blocks",
    "split_with_residual",
    "with_residual",
    "write_keyset_files",
]
