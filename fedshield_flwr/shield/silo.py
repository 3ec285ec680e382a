"""The silo side of ``shield``: catch up on the encrypted aggregates, encrypt the pruned update.

What a silo keeps between messages lives in Flower's ``context.state`` (on the silo only, a
``RecordDict``): the global adapter it has rebuilt, its round, the error-feedback residual of
what pruning held back, and the state of the server optimizer (``strategy.optimizer``) that
every silo steps on the decrypted aggregates. The server never sees any of it; a silo that
lost it (a new process, a resumed run) rebuilds all of it by replaying the encrypted log. These steps are shared by ``shield`` and by ``split`` when it aggregates
its silo-side adapters with ``shield``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedshield_flwr.optimizers import ServerOptimizer
from fedshield_flwr.shield.keys import SiloKeyset
from fedshield_flwr.shield.protocol import NODE_KEY_FILE
from fedshield_flwr.shield.provision import silo_keyset
from fedshield_flwr.shield.rounds import SiloState, catch_up, encrypt_update, with_residual
from fedshield_flwr.shield.settings import ShieldSettings
from fedshield_flwr.wire import decode_arrays, encode_arrays

# records of context.state
STATE_KEY, GLOBAL_KEY, OPTIMIZER_KEY = "shield.state", "shield.global", "shield.optimizer"


def load_keyset(node_config: Mapping[str, Any], settings: ShieldSettings, tag: str,
                max_silos: int = 0) -> SiloKeyset:
    """This silo's keyset: its ``shield-key`` file, or the run's simulated one (``tag``, sized
    for ``max_silos`` updates per round)."""
    return silo_keyset(str(node_config.get(NODE_KEY_FILE, "")), settings.auto_keys, tag,
                       max_silos)


def restore(store: RecordDict, initial: Mapping[str, np.ndarray]
            ) -> tuple[OrderedDict[str, np.ndarray], SiloState]:
    """The global adapter and shield state this silo kept (``initial`` and a fresh state first)."""
    arrays = store.array_records
    if STATE_KEY not in arrays:
        return OrderedDict(initial), SiloState()
    state = SiloState.from_arrays({k: v.numpy() for k, v in arrays[STATE_KEY].items()})
    return OrderedDict(decode_arrays(arrays[GLOBAL_KEY], "silo state")), state


def save(store: RecordDict, global_adapter: Mapping[str, np.ndarray], state: SiloState,
         optimizer: ServerOptimizer | None = None) -> None:
    """Keep the global adapter, shield state and optimizer state for this silo's next message."""
    store[STATE_KEY] = ArrayRecord(OrderedDict(
        (k, Array(np.ascontiguousarray(v))) for k, v in state.to_arrays().items()))
    store[GLOBAL_KEY] = encode_arrays(global_adapter)
    if optimizer is not None and optimizer.active:
        store[OPTIMIZER_KEY] = encode_arrays(optimizer.state())


def caught_up(store: RecordDict, keyset: SiloKeyset, initial: Mapping[str, np.ndarray],
              downlink: list[np.ndarray], silo: str, optimizer: ServerOptimizer | None = None
              ) -> tuple[OrderedDict[str, np.ndarray], SiloState]:
    """The global adapter after decrypting and applying ``downlink`` onto what ``store`` holds.

    ``optimizer`` (fresh, as built from the run config) gets the state ``store`` kept for it
    and is stepped once per newly applied aggregate.
    """
    global_adapter, state = restore(store, initial)
    if optimizer is not None and optimizer.active:
        kept = store.array_records.get(OPTIMIZER_KEY)
        if kept is not None and state.global_round > 0:
            optimizer.load_state(decode_arrays(kept, "silo optimizer state"), list(initial))
    return catch_up(keyset, global_adapter, downlink, state, silo=silo, optimizer=optimizer)


def training_start(global_adapter: Mapping[str, np.ndarray], state: SiloState,
                   settings: ShieldSettings) -> OrderedDict[str, np.ndarray]:
    """Where local training starts: the global adapter, plus this silo's unsent residual."""
    if settings.local_residual:
        return with_residual(global_adapter, state)
    return OrderedDict(global_adapter)


def encrypt_progress(keyset: SiloKeyset, start: Mapping[str, np.ndarray],
                     local: Mapping[str, np.ndarray], *, server_round: int, silo: str,
                     num_examples: int, settings: ShieldSettings, num_rounds: int,
                     state: SiloState, dp: Mapping[str, Any] | None = None
                     ) -> tuple[bytes, SiloState]:
    """The encrypted pruned payload of ``local - start`` (new progress only) and the new state.

    With client-level DP (``dp``: the train config the server sent, carrying the clipping norm,
    noise multiplier and number of silos sampled) the vector clipped to the norm is the pruned
    one actually sent this round (this round's blocks of residual + new progress), its noise
    share is added before encryption, and every silo weighs ``shield.weight-scale`` alone (a
    uniform mean: num-examples weights would let one silo move it by more than ``C / n``).
    """
    update = OrderedDict((k, local[k] - start[k]) for k in start)
    workers = settings.workers if settings.workers > 0 else (os.cpu_count() or 1)
    privatize, weight = None, num_examples * settings.weight_scale
    if dp is not None:
        from fedshield_flwr.dp.client import privatizer_from_config

        privatize, weight = privatizer_from_config(dp, silo, server_round), settings.weight_scale
    return encrypt_update(keyset, update, server_round=server_round, silo=silo, weight=weight,
                          schedule=settings.schedule(num_rounds), state=state, workers=workers,
                          privatize=privatize)
