"""fedavg, lpp and shield: membership inference by a curious server holding one silo's update.

The server knows the global adapter ``g`` it sent and receives the silo's update ``u``. Its score
for a candidate row is ``loss(g) - loss(g + u)``: rows the silo trained on got cheaper (the
reference-model attack of Carlini et al. 2022 with the global model as the reference; for
federated updates see Nasr et al. 2019, "Comprehensive Privacy Analysis of Deep Learning",
active/passive server). AUC over the silo's training rows of that round vs its held-out rows.

shield: the server holds only ciphertexts, block ids, weights and sizes
(:class:`fedshield_flwr.shield.payload.Payload` after its own validation). The same attack
needs an update to plug in; the best the server can build is :func:`server_view_update` (the
``c0`` polynomials read as if they were plaintext, rescaled to a plausible norm), and it can only
guess. A silo that colludes with the server decrypts the single-silo sum the server hands it
(:func:`colluding_silo_update`), and the attack is back to the fedavg number.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from fedshield_flwr.audit.membership import auc, row_losses


def add_states(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
               scale: float = 1.0) -> OrderedDict[str, np.ndarray]:
    """``a + scale * b``, name by name."""
    return OrderedDict((k, (np.asarray(a[k], np.float32) + scale * np.asarray(b[k], np.float32))
                        .astype(np.float32)) for k in a)


def update_scores(model, tokenizer, global_state, update, rows, *, max_length: int):
    """``loss(global) - loss(global + update)`` per row; leaves ``model`` at ``global``."""
    from fedshield_flwr.models.lora import set_adapter_state

    set_adapter_state(model, global_state)
    before = row_losses(model, tokenizer, rows, max_length=max_length)
    set_adapter_state(model, add_states(global_state, update))
    after = row_losses(model, tokenizer, rows, max_length=max_length)
    set_adapter_state(model, global_state)
    return before - after


def update_auc(model, tokenizer, global_state, update, members, nonmembers, *,
               max_length: int) -> float:
    """AUC of the server's update attack on ``members`` (trained on) vs ``nonmembers``."""
    return auc(update_scores(model, tokenizer, global_state, update, members,
                             max_length=max_length),
               update_scores(model, tokenizer, global_state, update, nonmembers,
                             max_length=max_length))


def shield_upload(update: Mapping[str, np.ndarray], *, weight: float = 1.0, server_round: int = 1,
                  silo: str = "0", keyset=None):
    """A real shield upload of ``update`` and what the server holds after validating it.

    Returns
    -------
    (silo_keyset, server_keyset, upload_bytes, payload, aggregate)
        ``payload``: the update as :class:`RoundAccumulator.add` decoded it; ``aggregate``: the
        accumulator's single-silo sum (what the server sends back to silos).
    """
    from fedshield_flwr.shield.aggregate import RoundAccumulator
    from fedshield_flwr.shield.keys import generate_keyset
    from fedshield_flwr.shield.rounds import encrypt_update

    silo_ks, server_ks = keyset or generate_keyset()
    data, _ = encrypt_update(silo_ks, update, server_round=server_round, silo=silo, weight=weight)
    acc = RoundAccumulator(server_ks, server_round)
    payload = acc.add(data, silo)
    return silo_ks, server_ks, data, payload, acc.finalize()


def server_view_update(payload, layout_state: Mapping[str, np.ndarray], modulus: int,
                       target_norm: float) -> OrderedDict[str, np.ndarray]:
    """The shield server's best stand-in for the update: ``c0`` read as plaintext.

    ``c0 = -a*s + Delta*m + e`` with ``a`` uniform, so without ``s`` its centred residues carry no
    information about ``m``. They are laid over the adapter's values and scaled to
    ``target_norm`` (generously, the true update norm) so the attack runs as it would on fedavg.
    """
    from fedshield_flwr.shield.layout import AdapterLayout

    layout = AdapterLayout.from_state(layout_state)
    c0 = np.asarray(payload.c0, dtype=np.uint64).ravel()[: layout.num_values]
    half = np.uint64(modulus // 2)
    centred = np.where(c0 > half, -(np.uint64(modulus) - c0).astype(np.float64),
                       c0.astype(np.float64))
    if centred.size < layout.num_values:
        centred = np.resize(centred, layout.num_values)
    vec = centred * (target_norm / max(np.linalg.norm(centred), 1e-30))
    return layout.unflatten(vec)


def colluding_silo_update(silo_keyset, aggregate, layout_state: Mapping[str, np.ndarray]
                          ) -> OrderedDict[str, np.ndarray]:
    """The update a colluding silo decrypts from the server's single-silo aggregate."""
    from fedshield_flwr.shield.layout import AdapterLayout
    from fedshield_flwr.shield.rounds import decrypt_aggregate

    dec = decrypt_aggregate(silo_keyset, aggregate)
    return AdapterLayout.from_state(layout_state).unflatten(dec.values)


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum())
                             for v in state.values())))


def trained_rows(n_rows: int, batch_size: int, steps: int, seed: int) -> list[int]:
    """Indices of the rows :func:`fedshield_flwr.train.train_lora` draws with this seed."""
    from fedshield_flwr.train import batch_schedule

    return sorted({i for b in batch_schedule(n_rows, batch_size, steps, seed) for i in b})


def pick(rows: Sequence, idx: Sequence[int]) -> list:
    return [rows[i] for i in idx]
