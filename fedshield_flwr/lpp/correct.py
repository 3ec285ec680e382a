"""The server's correction step of ``lpp``: the global adapter refitted to the full base.

Silos fit their adapters to the quantized base, so part of what they learn corrects that base's
quantization error, which the full base does not have: FedLPP's update carries that part into
the owner's model, which falls behind ``fedavg`` (issue 18: +6.7% on a math data set). Only the
owner holds the full base, so only the owner can pull the adapter back: after every FedLPP
update it takes ``lpp.correction-steps`` optimizer steps of the fp32 global adapter on the full
base, on rows of its own (``lpp.correction-data``). The next round's silos start from the
corrected adapter (k-bit, as always); what they then hold fits the full base rather than their
own copy, which widens the IP margin instead of narrowing it.

The rows are the owner's alone: the correction never reads a silo's data, and every row that
also stands in the server's evaluation rows is dropped, so the reported eval loss is measured on
rows the correction never saw.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedshield_flwr.config import TrainSettings
from fedshield_flwr.models import get_adapter_state, set_adapter_state
from fedshield_flwr.train import train_lora


class CorrectionDataError(ValueError):
    """The owner's correction rows cannot be used (none left, or they are the eval rows)."""


@dataclass(frozen=True)
class CorrectionResult:
    """The corrected fp32 global adapter and what the correction did."""

    adapter: OrderedDict[str, np.ndarray]
    loss: float  # mean training loss over the correction steps (full base, owner's rows)
    steps: int
    seconds: float


def row_key(row: dict) -> str:
    """A row's identity: the hash of its token ids and labels (what the loss sees)."""
    h = hashlib.sha256(np.asarray(row["input_ids"], dtype=np.int64).tobytes())
    h.update(np.asarray(row["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()


def disjoint_rows(rows: Sequence[dict], held_out: Sequence[dict], source: str) -> list[dict]:
    """``rows`` minus every row that also stands in ``held_out`` (the server's eval rows).

    Raises :class:`CorrectionDataError` naming ``source`` when nothing is left.
    """
    taken = {row_key(r) for r in held_out}
    kept = [r for r in rows if row_key(r) not in taken]
    if not kept:
        raise CorrectionDataError(
            f"server: all {len(rows)} correction rows of lpp.correction-data={source!r} are also "
            f"in the server's evaluation rows; give the owner rows of its own that it does not "
            f"evaluate on, or set lpp.correction-steps=0")
    return kept


def correct_adapter(
    model,
    adapter: OrderedDict[str, np.ndarray],
    rows: Sequence[dict],
    train: TrainSettings,
    steps: int,
    learning_rate: float,
    pad_id: int,
    seed: int,
) -> CorrectionResult:
    """``steps`` optimizer steps of ``adapter`` on ``model``'s full base, on the owner's ``rows``.

    Parameters
    ----------
    model : PEFT model
        The server's full-precision base with LoRA (only the LoRA weights are trainable).
    adapter : dict of str to np.ndarray
        The fp32 global adapter after this round's FedLPP update; not modified.
    rows : sequence of tokenized rows
        The owner's correction rows, disjoint from its evaluation rows (:func:`disjoint_rows`).
    train : TrainSettings
        Batch size, accumulation, clipping and weight decay, the silos' own.
    steps : int
        Optimizer steps (``lpp.correction-steps``); 0 returns ``adapter`` unchanged.
    learning_rate : float
        AdamW step size (the silos' rate of this round).
    pad_id, seed : int
        Padding token id; the seed of the batch order (vary it per round).
    """
    if steps == 0:
        return CorrectionResult(adapter, float("nan"), 0, 0.0)
    set_adapter_state(model, adapter)
    result = train_lora(model, rows, replace(train, max_steps=steps, progress=False),
                        learning_rate, pad_id, seed, desc="lpp correction")
    return CorrectionResult(get_adapter_state(model), result.loss, steps, result.seconds)
