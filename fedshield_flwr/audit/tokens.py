"""Which token positions of a tokenized row are the silo's content (not the prompt template).

Recovering a chat template's fixed system prompt says nothing about a silo's data, so every
token-recovery rate is reported over content positions: the instruction's tokens and the
response's (labelled) tokens, special tokens excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedshield_flwr.data.templates import IGNORE_INDEX


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
    n, m = len(seq), len(sub)
    for i in range(n - m + 1):
        if list(seq[i:i + m]) == list(sub):
            return i
    return -1


def content_mask(row: dict[str, Any], tok_row: dict, tokenizer) -> np.ndarray:
    """Boolean mask over ``tok_row["input_ids"]``: True where the token is the row's content."""
    ids = list(tok_row["input_ids"])
    mask = np.array([lab != IGNORE_INDEX for lab in tok_row["labels"]], dtype=bool)
    text = row.get("instruction", "") if isinstance(row, dict) else ""
    if text:
        sub = tokenizer(text, add_special_tokens=False)["input_ids"]
        at = _find(ids, sub) if sub else -1
        if at >= 0:
            mask[at:at + len(sub)] = True
    special = set(tokenizer.all_special_ids or [])
    mask &= np.array([t not in special for t in ids], dtype=bool)
    return mask


def recovery(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of positions (``mask``: only those) where ``pred == truth``."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if mask is not None:
        pred, truth = pred[mask], truth[mask]
    if truth.size == 0:
        raise ValueError("token recovery over zero positions")
    return float((pred == truth).mean())
