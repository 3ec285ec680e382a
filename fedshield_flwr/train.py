"""The local training loop shared by all modes, and evaluation (loss, perplexity).

One readable PyTorch loop: AdamW on the trainable (LoRA) parameters, a learning rate fixed per
round by a cosine schedule over rounds (FlowerTune's ``cosine_annealing``), gradient accumulation
and clipping, at most ``max_steps`` optimizer steps per round. Seeded: the same seed, round and
silo give the same batches, dropout masks and result on CPU.

Memory: the loss (:func:`token_loss`) computes output-head logits only at labelled (response)
positions and only ``LOSS_CHUNK_TOKENS`` of them at a time, recomputing each chunk in the
backward pass, so a ``batch x length x vocab`` logits tensor (400 MB for 8 x 256 tokens of a
49k vocabulary, and several copies of it in the loss and its gradient) never exists.
``train.gradient-checkpointing`` additionally recomputes each decoder block's activations in the
backward pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fedshield_flwr.config import TrainSettings
from fedshield_flwr.data.templates import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's optimizer steps
    steps: int
    num_examples: int  # examples seen this round (the FedAvg weight)
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # more train metrics (dp-epsilon)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean token loss over response tokens
    perplexity: float
    num_tokens: int
    num_examples: int


def cosine_lr(server_round: int, total_rounds: int, lr_max: float, lr_min: float) -> float:
    """FlowerTune's per-round learning rate: cosine from ``lr_max`` (round 1) toward ``lr_min``."""
    progress = (server_round - 1) / max(total_rounds, 1)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * progress))


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` of ``rows`` into tensors with an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_schedule(n_rows: int, batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """``n_batches`` batches of row indices: seeded epochs of a permutation, wrapping around."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_batches * batch_size:
        order.extend(torch.randperm(n_rows, generator=gen).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


# Causal-LM families whose forward is exactly decoder -> output head -> mean token cross-entropy
# (no logit scaling or soft-capping): for them :func:`token_loss` computes the loss in chunks.
# Any other model goes through its own forward (correct, with the full logits tensor).
CHUNKED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"})
LOSS_CHUNK_TOKENS = 64


def _causal_lm(model):
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross-entropy over labelled tokens, their count)`` for ``batch``.

    Equal to ``model(**batch).loss * count`` (the transformers loss is the mean over labels
    ``!= IGNORE_INDEX`` after the shift) up to float rounding. For
    :data:`CHUNKED_LOSS_MODEL_TYPES` the head runs on labelled positions only, in chunks of
    :data:`LOSS_CHUNK_TOKENS`, each recomputed during backward (see the module docstring).
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:  # nothing to score: skip the forward pass
        return torch.zeros((), device=targets.device), 0
    lm = _causal_lm(model)
    if getattr(lm.config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES:
        return model(**batch).loss * count, count
    hidden = lm.base_model(input_ids=batch["input_ids"],
                           attention_mask=batch.get("attention_mask")).last_hidden_state
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, count, LOSS_CHUNK_TOKENS):
        h, t = hidden[i:i + LOSS_CHUNK_TOKENS], targets[i:i + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled():  # keep no logits for backward: recompute them there
            total = total + checkpoint(_ce_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _ce_sum(h, t, head)
    return total, count


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Switch activation checkpointing of the decoder blocks on or off (transformers models)."""
    lm = _causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        if enabled:
            log.warning("%s does not support gradient checkpointing; training without it",
                        type(lm).__name__)
        return
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x (old names warn)
        on, enable, disable = (lm.is_activation_checkpointing, lm.activation_checkpointing_enable,
                               lm.activation_checkpointing_disable)
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    else:
        on, enable, disable = (lm.is_gradient_checkpointing, lm.gradient_checkpointing_enable,
                               lm.gradient_checkpointing_disable)
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if enabled and not on:
        enable(**kwargs)
    elif not enabled and on:
        disable()


def train_lora(
    model,
    rows: Sequence[dict],
    settings: TrainSettings,
    learning_rate: float,
    pad_id: int,
    seed: int,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``rows`` for one round."""
    if not rows:
        raise ValueError(f"{desc}: no training rows")
    t0 = time.time()
    torch.manual_seed(seed)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=settings.weight_decay)
    accum = settings.gradient_accumulation_steps
    batches = batch_schedule(len(rows), settings.batch_size, settings.max_steps * accum, seed)
    set_gradient_checkpointing(model, settings.gradient_checkpointing)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=settings.max_steps, desc=desc, disable=not settings.progress,
               mininterval=2.0, leave=False)
    for step in range(settings.max_steps):
        step_loss = 0.0
        for micro in range(accum):
            batch = collate([rows[i] for i in batches[step * accum + micro]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            total, count = token_loss(model, batch)
            if count == 0:  # nothing labelled in this micro-batch (e.g. every answer truncated)
                continue
            loss = total / count / accum
            loss.backward()
            step_loss += loss.item()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if on_step:
            on_step(step, step_loss)
    bar.close()
    model.eval()
    return TrainResult(
        loss=float(sum(losses) / len(losses)),
        steps=settings.max_steps,
        num_examples=settings.max_steps * accum * settings.batch_size,
        seconds=time.time() - t0,
    )


@torch.no_grad()
def evaluate(model, rows: Sequence[dict], batch_size: int, pad_id: int) -> EvalResult:
    """Mean next-token loss over response tokens of ``rows``, and its perplexity."""
    if not rows:
        raise ValueError("evaluate: no evaluation rows")
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    # Batches of similar length waste no compute on padding; the mean is order-independent.
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        batch_total, n = token_loss(model, batch)
        if n == 0:
            continue
        total += float(batch_total)
        count += n
    loss = total / max(count, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), num_tokens=count,
                      num_examples=len(rows))
