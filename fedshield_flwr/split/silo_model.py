"""The silo's part of split learning: head + tail of the model and its training loop.

One training step of a silo (:meth:`SiloTrainer.train_step`)::

    head forward (silo) -> middle forward (server) -> tail forward + loss + backward (silo)
        -> middle backward + optimizer step (server) -> head backward + optimizer step (silo)

The middle is reached through a :class:`MiddleLink`: :class:`fedshield_flwr.split.relay.RelayClient`
over gRPC, or :class:`LocalLink` in process (tests, debugging).

Exactness: with noise off, fp32 transfer, no dropout and no gradient clipping, split training
gives the per-step losses of unsplit LoRA training of the same model on the same data and seed.
Gradient clipping is per party (silo: head + tail adapter, server: middle adapter), so it equals the
unsplit global-norm clipping only while clipping is inactive.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.lora import get_adapter_state, set_adapter_state
from fedshield_flwr.split.arch import (
    Arch,
    SplitError,
    SplitLayout,
    build_peft,
    new_kv_cache,
    run_head,
    run_tail,
    strip_parts,
)
from fedshield_flwr.split.middle import MiddleServer, PendingStep
from fedshield_flwr.split.noise import privatize_head_output
from fedshield_flwr.split.packing import (
    batch_lengths,
    generation_positions,
    pack,
    padding_mask,
    unpack,
)
from fedshield_flwr.split.settings import SplitSettings


def _positions(x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """``position_ids``, or ``0..T-1`` for a right-padded batch ``x`` of length ``T``."""
    if position_ids is None:
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
    return position_ids


class SplitSilo:
    """A silo's part of the model: embeddings + head blocks, tail blocks + norm + LM head.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The full LoRA-wrapped model (``apply_lora``); its middle blocks are dropped in place
        unless ``strip=False`` (then they stay, unused: tests compare against them).
    layout : SplitLayout
    strip : bool
        Drop the middle blocks (default; a silo must not hold them).
    """

    def __init__(self, peft_model, layout: SplitLayout, strip: bool = True):
        self.peft_model = peft_model
        self.layout = layout
        self._arch = Arch.of(peft_model)
        if strip:
            strip_parts(self._arch, layout, "silo")

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: SplitSettings,
        lora: LoraSettings,
        seed: int = 0,
        quantization: int = 0,
        cache_dir: str | None = None,
    ) -> SplitSilo:
        """Load ``model_name``, add LoRA (seeded) and keep only the silo's parts."""
        peft_model = build_peft(model_name, lora, seed, quantization, cache_dir)
        layout = SplitLayout.for_model(peft_model, settings.head_layers, settings.tail_layers)
        return cls(peft_model, layout)

    # -- adapters ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def adapter_state(self):
        """Head + tail LoRA tensors (PEFT names, fp32 numpy): what the strategy aggregates."""
        return get_adapter_state(self.peft_model)

    def load_adapter_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load an aggregated head + tail adapter (checked name by name)."""
        set_adapter_state(self.peft_model, state)

    # -- compute ----------------------------------------------------------------------------
    def head_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Embeddings + head blocks on a padded batch: ``[B, T, H]``."""
        position_ids = _positions(input_ids, position_ids)
        return run_head(
            self._arch, self.layout.head, input_ids, attention_mask, position_ids, cache
        )

    def tail_forward(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Tail blocks + final norm + LM head on a padded batch: logits ``[B, T, V]``."""
        position_ids = _positions(h, position_ids)
        return run_tail(self._arch, self.layout.tail, h, attention_mask, position_ids, cache)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own causal-LM loss (shifted, ignore_index -100, mean over tokens)."""
        lm = self._arch.causal_lm
        return lm.loss_function(logits=logits, labels=labels, vocab_size=lm.config.vocab_size)

    def new_cache(self):
        """A KV cache for this silo's blocks (one object; blocks write at their own index)."""
        return new_kv_cache(self._arch.config)


class MiddleLink(Protocol):
    """How a silo reaches the middle blocks (``RelayClient`` over gRPC, ``LocalLink`` in process).

    All tensors are packed ``[tokens, hidden]`` float32 rows.
    """

    def forward(
        self, step: int, x: torch.Tensor, lengths: Sequence[int], train: bool
    ) -> torch.Tensor: ...

    def backward(self, step: int, grad: torch.Tensor) -> torch.Tensor: ...

    def generate(
        self, session: str, x: torch.Tensor, lengths: Sequence[int], start: bool
    ) -> torch.Tensor: ...

    def end_session(self, session: str) -> None: ...


class LocalLink:
    """A :class:`MiddleLink` calling a :class:`MiddleServer` in process (one silo, no batching)."""

    def __init__(self, server: MiddleServer, owner: str = "local"):
        self.server, self.owner = server, owner
        self._pending: PendingStep | None = None

    def forward(self, step, x, lengths, train):
        outs, self._pending = self.server.forward([(x, lengths)], train, step)
        return outs[0]

    def backward(self, step, grad):
        if self._pending is None:
            raise SplitError(f"{self.owner}: backward of step {step} without a training forward")
        pending, self._pending = self._pending, None
        return self.server.backward(pending, [grad])[0]

    def generate(self, session, x, lengths, start):
        return self.server.generate(self.owner, session, x, lengths, start)

    def end_session(self, session):
        self.server.end_session(self.owner, session)


@dataclass
class StepResult:
    """One silo training step: loss and the real tokens it covered."""

    step: int
    loss: float
    tokens: int


@dataclass
class SiloTrainer:
    """A silo's side of split training, evaluation and generation through a :class:`MiddleLink`.

    Parameters
    ----------
    silo : SplitSilo
    link : MiddleLink
    learning_rate : float
        AdamW learning rate of the head + tail adapter.
    weight_decay : float
    max_grad_norm : float
        Clip the head + tail adapter's gradient norm; 0 disables it.
    noise_sigma : float
        Relative Gaussian noise on the head output (see :func:`privatize_head_output`).
    clip_norm, noise_multiplier : float
        Per-token L2 clipping of the head output and calibrated Gaussian noise in units of it
        (``split.clip-norm``, ``split.noise-multiplier``; see :mod:`fedshield_flwr.split.noise`).
    seed : int
        Seeds the noise generator.
    name : str
        The silo's name in error messages.
    """

    silo: SplitSilo
    link: MiddleLink
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    noise_sigma: float = 0.0
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    seed: int = 0
    name: str = "silo"
    step: int = 0
    optimizer: torch.optim.Optimizer = field(init=False)
    _gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(
            self.silo.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        self._gen = torch.Generator().manual_seed(self.seed)

    def _privatize(self, h: torch.Tensor) -> torch.Tensor:
        return privatize_head_output(h, self.noise_sigma, self.clip_norm, self.noise_multiplier,
                                     self._gen)

    def set_learning_rate(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> StepResult:
        """One split training step on a right-padded batch; returns the loss.

        Parameters
        ----------
        input_ids, attention_mask : torch.Tensor
            ``[B, T]``, right padded.
        labels : torch.Tensor, optional
            ``[B, T]``; defaults to ``input_ids``; ignored (-100) wherever the mask is 0.
        """
        silo, step = self.silo, self.step
        lengths = batch_lengths(attention_mask, f"{self.name} step {step}")
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
        silo.peft_model.train()
        h = pack(silo.head_forward(input_ids, attention_mask), lengths)
        sent = self._privatize(h.detach())
        mid = self.link.forward(step, sent, lengths.tolist(), True).requires_grad_(True)
        logits = silo.tail_forward(unpack(mid, lengths, input_ids.shape[1]), attention_mask)
        loss = silo.loss(logits, labels)
        loss.backward()
        grad_h = self.link.backward(step, mid.grad)
        h.backward(grad_h)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(silo.trainable_parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(step, float(loss.detach()), int(lengths.sum()))

    @torch.no_grad()
    def evaluate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> float:
        """Loss of a right-padded batch through the split model, no training."""
        silo = self.silo
        lengths = batch_lengths(attention_mask, f"{self.name} eval")
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
        silo.peft_model.eval()
        h = pack(silo.head_forward(input_ids, attention_mask), lengths)
        h = self._privatize(h)
        mid = self.link.forward(self.step, h, lengths.tolist(), False)
        logits = silo.tail_forward(unpack(mid, lengths, input_ids.shape[1]), attention_mask)
        return float(silo.loss(logits, labels))

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None = None
    ) -> list[list[int]]:
        """Greedy split generation with a KV cache on each party; returns the new tokens.

        Each sequence stops after ``eos_token_id`` (included) or ``max_new_tokens``.
        """
        silo = self.silo
        silo.peft_model.eval()
        session = uuid.uuid4().hex
        cache = silo.new_cache()
        lens = torch.as_tensor([len(p) for p in prompts])
        width = int(lens.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        ids[padding_mask(lens, width, left=True).bool()] = torch.as_tensor(
            [t for p in prompts for t in p], dtype=torch.long
        )
        seen = torch.zeros(len(prompts), dtype=torch.long)
        mask = torch.zeros(len(prompts), 0, dtype=torch.long)
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        try:
            for t in range(max_new_tokens):
                start = t == 0
                new_mask, pos, w = generation_positions(seen, lens, start)
                mask = torch.cat([mask, new_mask], dim=1)
                h = pack(silo.head_forward(ids, mask, pos, cache), lens, left=True)
                h = self._privatize(h)
                mid = self.link.generate(session, h, lens.tolist(), start)
                logits = silo.tail_forward(unpack(mid, lens, w, left=True), mask, pos, cache)
                nxt = logits[:, -1].argmax(-1)
                seen = seen + lens
                for b in range(len(prompts)):
                    if not done[b]:
                        out[b].append(int(nxt[b]))
                        done[b] = eos_token_id is not None and int(nxt[b]) == eos_token_id
                if bool(done.all()):
                    break
                ids, lens = nxt[:, None], torch.ones(len(prompts), dtype=torch.long)
        finally:
            self.link.end_session(session)
        return out


def run_silo_round(trainer: SiloTrainer, batches, max_steps: int | None = None) -> dict[str, float]:
    """Train over ``batches`` (dicts with ``input_ids``, ``attention_mask``, optional ``labels``).

    Returns
    -------
    dict
        ``train_loss`` (mean over steps), ``steps``, ``tokens``: the metrics a reply carries.
    """
    losses: list[float] = []
    tokens = 0
    for i, batch in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        r = trainer.train_step(batch["input_ids"], batch["attention_mask"], batch.get("labels"))
        losses.append(r.loss)
        tokens += r.tokens
    return {
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "steps": float(len(losses)),
        "tokens": float(tokens),
    }
