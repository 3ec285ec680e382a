"""The IP margin of ``lpp``: what the server holds (full base + fp adapter) vs what a silo holds.

The margin is the quality gap, on the same held-out rows, between the owner's model and the best
model a silo can build from what it receives (quantized base + k-bit adapter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.data import cached_silo_data
from fedshield_flwr.lpp.settings import ADAPTER_BITS, LppSettings
from fedshield_flwr.models import cache_root


@dataclass(frozen=True)
class LossReport:
    """Token-weighted causal-LM loss over some batches."""

    loss: float
    perplexity: float
    tokens: int


@dataclass(frozen=True)
class IPMargin:
    """Quality of full base + full adapter (``full``) vs quantized base + k-bit adapter (``silo``).

    ``loss_gap = silo.loss - full.loss`` (nats per token) and ``perplexity_ratio`` = silo / full
    perplexity: the margin the server keeps over what any silo can reproduce.
    """

    full: LossReport
    silo: LossReport
    loss_gap: float = field(init=False)
    perplexity_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_gap", self.silo.loss - self.full.loss)
        object.__setattr__(self, "perplexity_ratio", self.silo.perplexity / self.full.perplexity)

    def as_dict(self) -> dict[str, float]:
        return {"loss_full": self.full.loss, "loss_silo": self.silo.loss,
                "perplexity_full": self.full.perplexity, "perplexity_silo": self.silo.perplexity,
                "loss_gap": self.loss_gap, "perplexity_ratio": self.perplexity_ratio,
                "tokens": self.full.tokens}


@torch.no_grad()
def evaluate_lm_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> LossReport:
    """Mean next-token cross-entropy over every label that is not ``-100``.

    Parameters
    ----------
    model : causal LM (plain, quantized or PEFT-wrapped)
        Called as ``model(input_ids=..., attention_mask=...)``; must return ``.logits``.
    batches : iterable of mappings
        Each with ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` and optional
        ``labels`` ``[B, T]`` (default: ``input_ids`` with padding masked out). Labels are
        un-shifted, as HF models take them.
    """
    from fedshield_flwr.train import (
        token_loss,  # the silos' loss code (chunked head, labelled tokens only)
    )

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
            if labels is None:
                labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
            with torch.no_grad():
                batch_total, n = token_loss(
                    model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
            total += float(batch_total)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_lm_loss: the batches hold no label tokens")
    loss = total / count
    return LossReport(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count)


def ip_margin(
    full_model: nn.Module, silo_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> IPMargin:
    """Evaluate both models on the same batches (``batches`` is iterated twice: pass a list).

    ``full_model`` is the server's full-precision base with the full-precision global adapter
    loaded; ``silo_model`` is :func:`build_model_from_package` with the de-quantized k-bit
    adapter (:func:`fedshield_flwr.lpp.adapter.dequantize_adapter`) loaded.
    """
    batches = list(batches)
    return IPMargin(full=evaluate_lm_loss(full_model, batches),
                    silo=evaluate_lm_loss(silo_model, batches))


def margin_warning(server_round: int, loss_gap: float, min_margin: float) -> str | None:
    """The owner's warning when a silo's proxy is within ``min_margin`` nats of the full model.

    ``None`` when the margin holds (or ``min_margin`` is 0). The remedies are the knobs that
    widen it: a coarser base (``lpp.clip-search=false``, a larger ``lpp.base-blocksize``) or
    fewer adapter bits.
    """
    if min_margin <= 0 or loss_gap >= min_margin:
        return None
    return (f"[round {server_round}] lpp IP margin {loss_gap:+.4f} nats is below "
            f"lpp.min-ip-margin={min_margin:g}: a silo's proxy (quantized base + k-bit adapter) "
            f"is almost as good as the owner's model; widen it with "
            f"lpp.margin-action='lower-adapter-bits', lpp.clip-search=false, a larger "
            f"lpp.base-blocksize or a smaller lpp.adapter-bits, or lower the threshold")


def next_adapter_bits(bits: int, loss_gap: float, min_margin: float,
                      choices: tuple[int, ...] = ADAPTER_BITS) -> int:
    """The adapter bits for the next round under ``lpp.margin-action='lower-adapter-bits'``.

    One step down the supported widths (8 -> 4 -> 3 -> 2) while the margin is below
    ``min_margin``; ``bits`` unchanged when it holds, or when ``bits`` is already the lowest.
    Bits are never raised again within a run: what a silo was sent cannot be taken back.
    """
    if min_margin <= 0 or loss_gap >= min_margin:
        return bits
    lower = [b for b in choices if b < bits]
    return max(lower) if lower else bits


def owner_rows(cfg: RunConfig, source: str, tokenizer, limit: int | None = None) -> list[dict]:
    """The tokenized rows of a file, directory or hub data set the coordinator holds.

    Read with the run's ``data.*`` columns, template and length; the first ``limit`` rows
    (all with ``None``).
    """
    from fedshield_flwr.data.load import ColumnMap, load_instruction_dataset
    from fedshield_flwr.data.partition import tokenize_rows

    d = cfg.data
    ds = load_instruction_dataset(
        source, ColumnMap(d.instruction_column, d.input_column, d.response_column))
    if limit is not None:
        ds = ds.select(range(min(len(ds), limit)))
    return tokenize_rows(ds, tokenizer, d)


def server_eval_rows(cfg: RunConfig, s: LppSettings, tokenizer, model_path: str) -> list[dict]:
    """Tokenized held-out rows the server evaluates on every round.

    ``lpp.eval-data`` names a file, directory or hub dataset the coordinator holds (all of it is
    used, capped at ``4 * data.max-eval-examples`` rows). Empty (simulation): the union of the
    held-out splits of ``lpp.eval-partitions`` simulated silos, the rows their own evaluation
    uses, which none of them trains on.
    """
    from fedshield_flwr.data import load_silo_data

    cache = cache_root() / "silo-data"
    if s.eval_data:
        return owner_rows(cfg, s.eval_data, tokenizer, 4 * cfg.data.max_eval_examples)
    rows: list[dict] = []
    for i in range(s.eval_partitions):
        node = NodeSettings(i, s.eval_partitions)
        silo = cached_silo_data(cfg.data, node, tokenizer, cfg.train.seed, model_path, cache,
                                lambda node=node: load_silo_data(cfg.data, node, tokenizer,
                                                                 cfg.train.seed))
        rows.extend(silo.eval)
    return rows
