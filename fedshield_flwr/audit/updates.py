"""fedavg, lpp and shield: membership inference by a curious server holding one silo's update.

The server knows the global adapter ``g`` it sent and receives the silo's update ``u``. The plain
score for a candidate row is ``loss(g) - loss(g + u)``: rows the silo trained on got cheaper (the
reference-model attack of Carlini et al. 2022 with the global model as the reference; for
federated updates see Nasr et al. 2019, "Comprehensive Privacy Analysis of Deep Learning",
active/passive server). AUC over the silo's training rows of that round vs rows it did not train
on (:func:`candidate_rows`).

Most of a one-round update is the task itself (the chat style every row of the domain shares), so
the plain score mostly ranks rows by how typical they are. :class:`UpdateAttack` (the default
everywhere) removes that part and amplifies the rest:

- **shadow update**: the server runs the same local round (same config, from the same ``g``) on
  public text of its own; ``u_shadow`` is the task direction without the silo's rows
  (difficulty calibration with a shadow model, Shokri et al. 2017 "Membership Inference Attacks
  Against Machine Learning Models", Watson et al. 2022 "On the Importance of Difficulty
  Calibration in Membership Inference Attacks");
- **extrapolation**: the target is ``g + alpha * (u - u_shadow)``, ``alpha > 1`` (the
  member-specific part of the update, scaled up; cf. model extrapolation/"task arithmetic",
  Ilharco et al. 2023, here used as an attack amplifier);
- **log ratio**: the score is ``log loss(g) - log loss(target)``, the row's relative loss drop
  (the perplexity-ratio calibration of Carlini et al. 2021, "Extracting Training Data from Large
  Language Models", with ``g`` as the reference model).

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
from dataclasses import dataclass, field

import numpy as np

from fedshield_flwr.audit.membership import auc, row_losses


def add_states(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
               scale: float = 1.0) -> OrderedDict[str, np.ndarray]:
    """``a + scale * b``, name by name."""
    return OrderedDict((k, (np.asarray(a[k], np.float32) + scale * np.asarray(b[k], np.float32))
                        .astype(np.float32)) for k in a)


@dataclass(frozen=True)
class UpdateAttack:
    """How the server scores a candidate row against one update.

    Parameters
    ----------
    alpha : float
        Extrapolation: the target adapter is ``g + alpha * (u - shadow)``.
    log_ratio : bool
        Score ``log loss(g) - log loss(target)`` instead of ``loss(g) - loss(target)``.
    shadow : mapping or None
        The server's own update from the same round on public rows (``None``: not subtracted).

    ``UpdateAttack(alpha=1, log_ratio=False)`` is the plain ``loss(g) - loss(g + u)`` attack.
    """

    alpha: float = 1.0
    log_ratio: bool = False
    shadow: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def target(self, global_state, update) -> OrderedDict[str, np.ndarray]:
        step = update if self.shadow is None else OrderedDict(
            (k, np.asarray(update[k], np.float32) - np.asarray(self.shadow[k], np.float32))
            for k in update)
        return add_states(global_state, step, self.alpha)


PLAIN = UpdateAttack()
# chosen on a calibration half of the demo's candidate rows (docs/privacy.md)
STRONG_ALPHA = 4.0


def strong_attack(shadow: Mapping[str, np.ndarray] | None) -> UpdateAttack:
    """The default attack: shadow-calibrated, extrapolated by 4, log-ratio score."""
    return UpdateAttack(alpha=STRONG_ALPHA, log_ratio=True, shadow=shadow)


def update_scores(model, tokenizer, global_state, update, rows, *, max_length: int,
                  attack: UpdateAttack = PLAIN, before: np.ndarray | None = None) -> np.ndarray:
    """The server's score per row (higher: more likely trained on); leaves ``model`` at ``g``.

    ``before``: the rows' losses under ``global_state`` if already computed (they do not depend
    on the update, so one pass serves every update attacked with the same rows).
    """
    from fedshield_flwr.models.lora import set_adapter_state

    set_adapter_state(model, global_state)
    if before is None:
        before = row_losses(model, tokenizer, rows, max_length=max_length)
    set_adapter_state(model, attack.target(global_state, update))
    after = row_losses(model, tokenizer, rows, max_length=max_length)
    set_adapter_state(model, global_state)
    if attack.log_ratio:
        tiny = 1e-12
        return np.log(np.maximum(before, tiny)) - np.log(np.maximum(after, tiny))
    return before - after


def update_auc(model, tokenizer, global_state, update, members, nonmembers, *,
               max_length: int, attack: UpdateAttack = PLAIN, before=None) -> float:
    """AUC of the server's update attack on ``members`` (trained on) vs ``nonmembers``.

    ``before``: optional ``(member_losses, nonmember_losses)`` under ``global_state``.
    """
    bm, bn = before if before is not None else (None, None)
    return auc(update_scores(model, tokenizer, global_state, update, members,
                             max_length=max_length, attack=attack, before=bm),
               update_scores(model, tokenizer, global_state, update, nonmembers,
                             max_length=max_length, attack=attack, before=bn))


def row_key(row: Mapping) -> tuple:
    """A row's content (instruction, input, response): two rows with one key are one row."""
    return (row.get("instruction", ""), row.get("input", "") or "", row.get("response", ""))


def candidate_rows(silo_train: Sequence[Mapping], member_idx: Sequence[int],
                   held_out: Sequence[Mapping], *, limit: int | None = None
                   ) -> tuple[list, list, int]:
    """Distinct members and non-members of one round: ``(members, nonmembers, n_held_out)``.

    Members: the rows at ``member_idx``, one per distinct content. Non-members: the held-out rows,
    then the silo's rows the round did not draw, each only if its content is not a member's (a
    corpus that repeats rows, as chatterbot does, would otherwise score a member's twin as a
    non-member) and once; up to ``limit`` (default: as many as members). ``n_held_out`` of them
    are held-out rows.
    """
    seen: set = set()
    members = []
    for i in sorted(member_idx):
        k = row_key(silo_train[i])
        if k not in seen:
            seen.add(k)
            members.append(silo_train[i])
    limit = len(members) if limit is None else limit
    drawn = set(member_idx)
    nonmembers, n_held = [], 0
    pool = [(True, r) for r in held_out]
    pool += [(False, silo_train[i]) for i in range(len(silo_train)) if i not in drawn]
    for is_held, r in pool:
        if len(nonmembers) >= limit:
            break
        k = row_key(r)
        if k in seen:
            continue
        seen.add(k)
        nonmembers.append(r)
        n_held += is_held
    return members, nonmembers, n_held


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
