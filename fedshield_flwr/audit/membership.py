"""Membership inference from per-row losses: is a candidate row in a silo's training data?

Scores follow the loss-threshold attack of Yeom et al. (2018, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting", score = -loss) and the reference-model attack of
Carlini et al. (2022, "Membership Inference Attacks From First Principles"; with one reference
model this is the calibrated "LiRA-offline"-style difference of Watson et al. 2022, score =
reference loss - target loss). The curious-server attack on one silo's update is the same
difference with the global model as the reference and global + update as the target.

The loss of a row is the mean next-token cross-entropy over its response tokens, with the
project's own template and tokenization (:func:`fedshield_flwr.data.templates.tokenize_example`),
so a candidate is scored exactly as the silo trained on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedshield_flwr.data.templates import IGNORE_INDEX, resolve_template, tokenize_example


def tokenized_rows(rows: Sequence[dict[str, Any]], tokenizer, *, max_length: int,
                   template: str = "auto") -> list[dict]:
    """``rows`` as ``{"input_ids", "labels"}`` dicts; rows that already have ``input_ids`` pass."""
    resolved = resolve_template(template, tokenizer)
    return [r if "input_ids" in r else tokenize_example(r, tokenizer, resolved, max_length)
            for r in rows]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


@torch.no_grad()
def row_losses(model, tokenizer, rows: Sequence[dict[str, Any]], *, max_length: int,
               batch_size: int = 8, template: str = "auto") -> np.ndarray:
    """Per-row mean next-token loss over the response tokens of ``rows``.

    Parameters
    ----------
    model
        A causal LM (transformers or PEFT-wrapped), on any device.
    tokenizer
        The model's tokenizer.
    rows
        Instruction rows (``instruction``, optional ``input``, ``response``) or rows already
        tokenized by the project (``input_ids``, ``labels``).
    max_length
        Truncation length, as ``data.max-length``.
    batch_size
        Rows per forward pass.
    template
        ``data.template`` (``auto`` | ``alpaca`` | ``chat``).

    Returns
    -------
    numpy.ndarray
        Shape ``(len(rows),)``, float64; ``nan`` for a row with no response token left.
    """
    from fedshield_flwr.train import collate

    toks = tokenized_rows(rows, tokenizer, max_length=max_length, template=template)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    out = np.full(len(toks), np.nan, dtype=np.float64)
    pad_id = _pad_id(tokenizer)
    try:
        for start in range(0, len(toks), batch_size):
            chunk = toks[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
            sums = (ce * keep).sum(dim=1)
            counts = keep.sum(dim=1)
            for j in range(len(chunk)):
                if int(counts[j]) > 0:
                    out[start + j] = float(sums[j] / counts[j])
    finally:
        model.train(was_training)
    return out


def chance_band(n_members: int, n_nonmembers: int, z: float = 1.96) -> float:
    """Half-width of the interval that holds a chance attack's AUC (95% for ``z`` = 1.96).

    Under the null (scores independent of membership) the Mann-Whitney AUC has mean 0.5 and
    variance ``(m + n + 1) / (12 m n)``: with 45 rows a side an attack at chance lands anywhere in
    0.5 +- 0.12, so one AUC on that many rows cannot tell 0.55 from chance.
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError("chance_band: needs at least one member and one non-member")
    return float(z * math.sqrt((n_members + n_nonmembers + 1) / (12.0 * n_members * n_nonmembers)))


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of ``member_scores`` against ``nonmember_scores`` (members expected higher).

    The Mann-Whitney U statistic over all pairs, ties counting one half; ``nan`` scores are
    dropped. 0.5 is chance, 1.0 a perfect attack.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    m, n = m[~np.isnan(m)], n[~np.isnan(n)]
    if m.size == 0 or n.size == 0:
        raise ValueError("auc: needs at least one member and one non-member score")
    both = np.concatenate([m, n])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # average ranks over ties (1-based)
    i = 0
    while i < both.size:
        j = i
        while j + 1 < both.size and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def loss_threshold_auc(model, tokenizer, members, nonmembers, *, max_length: int) -> float:
    """AUC of the loss-threshold attack (score = -loss) on ``members`` vs ``nonmembers``."""
    lm = row_losses(model, tokenizer, members, max_length=max_length)
    ln = row_losses(model, tokenizer, nonmembers, max_length=max_length)
    return auc(-lm, -ln)


def reference_auc(model, reference_model, tokenizer, members, nonmembers, *,
                  max_length: int) -> float:
    """AUC of the reference-model attack (score = reference loss - target loss).

    ``reference_model`` did not see the members (the public base, or the global model before a
    silo's update); it calibrates away how hard each row is on its own.
    """
    sm = (row_losses(reference_model, tokenizer, members, max_length=max_length)
          - row_losses(model, tokenizer, members, max_length=max_length))
    sn = (row_losses(reference_model, tokenizer, nonmembers, max_length=max_length)
          - row_losses(model, tokenizer, nonmembers, max_length=max_length))
    return auc(sm, sn)
