"""The server's part of split learning: the middle blocks, their adapter, generation sessions.

:class:`MiddleServer` runs the middle forward for a batch of concurrent silos (client batching),
keeps what backward needs per pending step, trains the middle LoRA adapter, and holds one KV
cache per (silo, generation session). The relay (:mod:`.relay.server`) calls it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.lora import get_adapter_state, set_adapter_state
from fedshield_flwr.split.arch import (
    Arch,
    SplitError,
    SplitLayout,
    build_peft,
    new_kv_cache,
    run_blocks,
    strip_parts,
)
from fedshield_flwr.split.packing import (
    generation_positions,
    length_buckets,
    pack,
    padding_mask,
    unpack,
)
from fedshield_flwr.split.settings import SplitSettings


@dataclass
class PendingStep:
    """A batched middle forward whose backward is outstanding (graph held by the server)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    lengths: list[list[int]]
    step: int


@dataclass
class _Session:
    cache: Any
    mask: torch.Tensor  # [B, seen] long, left-aligned
    seen: torch.Tensor  # [B] tokens so far
    owner: str


class MiddleServer:
    """The server's middle blocks, their LoRA adapter and optimizer; batched compute for silos.

    Thread safety: every method takes ``self.lock``; the relay calls compute from one thread.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The full LoRA-wrapped model; head/tail blocks, embeddings, norm and LM head are dropped.
    layout : SplitLayout
    learning_rate : float
        AdamW learning rate of the middle adapter (change with :meth:`set_learning_rate`).
    weight_decay : float
    max_grad_norm : float
        Clip the middle adapter's gradient norm per step; 0 disables clipping.
    max_sessions : int
        Generation sessions (KV caches) one owner may hold.
    strip : bool
        Drop the silo-side modules (default).
    """

    def __init__(
        self,
        peft_model,
        layout: SplitLayout,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_sessions: int = 4,
        strip: bool = True,
    ):
        self.peft_model = peft_model
        self.layout = layout
        self._arch = Arch.of(peft_model)
        if strip:
            strip_parts(self._arch, layout, "server")
        self.max_grad_norm = max_grad_norm
        self.max_sessions = max_sessions
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)
        self.lock = threading.RLock()
        self.steps = 0
        self._sessions: dict[tuple[str, str], _Session] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: SplitSettings,
        lora: LoraSettings,
        seed: int = 0,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        quantization: int = 0,
        cache_dir: str | None = None,
    ) -> MiddleServer:
        """Load ``model_name``, add LoRA (seeded) and keep only the middle blocks."""
        peft_model = build_peft(model_name, lora, seed, quantization, cache_dir)
        layout = SplitLayout.for_model(peft_model, settings.head_layers, settings.tail_layers)
        return cls(
            peft_model, layout, learning_rate, weight_decay, max_grad_norm, settings.max_sessions
        )

    # -- adapter / optimizer state ----------------------------------------------------------
    def adapter_state(self):
        """Middle LoRA tensors (PEFT names, fp32 numpy): checkpoint or export them."""
        with self.lock:
            return get_adapter_state(self.peft_model)

    def load_adapter_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the middle adapter (e.g. from a checkpoint); resets the optimizer moments."""
        with self.lock:
            set_adapter_state(self.peft_model, state)
            self.optimizer.state.clear()

    def set_learning_rate(self, lr: float) -> None:
        with self.lock:
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a fresh optimizer per round, like the silos')."""
        with self.lock:
            self.optimizer.state.clear()

    # -- training ---------------------------------------------------------------------------
    def _middle(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
        return run_blocks(self._arch, self.layout.middle, h, mask, pos, cache)

    def forward(
        self, items: Sequence[tuple[torch.Tensor, Sequence[int]]], train: bool, step: int = 0
    ) -> tuple[list[torch.Tensor], PendingStep | None]:
        """Batched middle forward of packed inputs from one or more silos.

        Parameters
        ----------
        items : sequence of (tensor, lengths)
            Packed ``[N_i, H]`` rows and their sequence lengths, one item per silo.
        train : bool
            Keep the graph for :meth:`backward` (else run without gradients).

        Returns
        -------
        (list of torch.Tensor, PendingStep or None)
            Packed outputs (detached) per item, and the pending step when ``train``.
        """
        with self.lock:
            all_lengths = [int(n) for _, lens in items for n in lens]
            inputs = [x.detach().requires_grad_(train) for x, _ in items]
            self.peft_model.train(train)
            with torch.set_grad_enabled(train):
                seqs = torch.cat(inputs).split(all_lengths)
                outs: list[torch.Tensor | None] = [None] * len(seqs)
                for bucket in length_buckets(all_lengths):
                    lens = [all_lengths[i] for i in bucket]
                    width = max(lens)
                    h = unpack(torch.cat([seqs[i] for i in bucket]), lens, width)
                    y = pack(
                        self._middle(h, padding_mask(lens, width), torch.arange(width)[None]), lens
                    )
                    for i, part in zip(bucket, y.split(lens)):
                        outs[i] = part
                out = torch.cat(outs)
                outputs = list(out.split([x.shape[0] for x in inputs]))
            detached = [o.detach() for o in outputs]
            if not train:
                return detached, None
            return detached, PendingStep(inputs, outputs, [list(lens) for _, lens in items], step)

    def backward(
        self, pending: PendingStep, grads: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """Backward of a pending step and one optimizer step of the middle adapter.

        Parameters
        ----------
        pending : PendingStep
        grads : sequence of tensor or None
            Gradient w.r.t. each item's output; ``None`` for a silo dropped from the step (its
            rows then contribute nothing).

        Returns
        -------
        list of tensor or None
            Gradient w.r.t. each item's input (``None`` where dropped). The middle gradient is
            the mean over contributing silos (each silo's loss is a mean over its tokens).
        """
        with self.lock:
            live = [i for i, g in enumerate(grads) if g is not None]
            if not live:
                return [None] * len(grads)
            try:
                torch.autograd.backward(
                    [pending.outputs[i] for i in live], [grads[i] for i in live]
                )
                if len(live) > 1:
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.div_(len(live))
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
            finally:
                self.optimizer.zero_grad(set_to_none=True)
            out = [pending.inputs[i].grad if i in live else None for i in range(len(grads))]
            return [
                g if g is not None else torch.zeros_like(pending.inputs[i]) if i in live else None
                for i, g in enumerate(out)
            ]

    # -- generation -------------------------------------------------------------------------
    def generate(
        self, owner: str, session: str, x: torch.Tensor, lengths: Sequence[int], start: bool
    ) -> torch.Tensor:
        """Middle forward of new tokens of a generation session with a server-side KV cache.

        ``start`` opens the session with left-padded prompts of any ``lengths``; later calls add
        the same number of tokens to every sequence.
        """
        with self.lock:
            key = (owner, session)
            lens = torch.as_tensor([int(n) for n in lengths])
            if start:
                if (
                    key not in self._sessions
                    and sum(1 for o, _ in self._sessions if o == owner) >= self.max_sessions
                ):
                    raise SplitError(
                        f"{owner} holds {self.max_sessions} generation sessions already; end one "
                        "(EndSession) or raise split.max-sessions"
                    )
                sess = _Session(
                    new_kv_cache(self._arch.config),
                    torch.zeros(len(lens), 0, dtype=torch.long),
                    torch.zeros(len(lens), dtype=torch.long),
                    owner,
                )
                self._sessions[key] = sess
            else:
                sess = self._sessions.get(key)
                if sess is None:
                    raise SplitError(
                        f"{owner} has no generation session '{session[:40]}'; "
                        "start it first (start=true)"
                    )
                if len(lens) != len(sess.seen) or len(set(lens.tolist())) != 1:
                    raise SplitError(
                        f"{owner} continued session '{session[:40]}' with lengths "
                        f"{lens.tolist()[:8]}; send the same number of new tokens for each of "
                        f"its {len(sess.seen)} sequences"
                    )
            if int((sess.seen + lens).max()) > self.layout.max_positions:
                raise SplitError(
                    f"{owner} session '{session[:40]}' would exceed the model "
                    f"context of {self.layout.max_positions} tokens"
                )
            new_mask, pos, width = generation_positions(sess.seen, lens, start)
            self.peft_model.eval()
            with torch.no_grad():
                h = unpack(x, lens, width, left=True)
                sess.mask = torch.cat([sess.mask, new_mask], dim=1)
                out = self._middle(h, sess.mask, pos, sess.cache)
            sess.seen = sess.seen + lens
            return pack(out, lens, left=True)

    def end_session(self, owner: str, session: str) -> None:
        with self.lock:
            self._sessions.pop((owner, session), None)

    def end_sessions(self, owner: str) -> int:
        """Free every session of ``owner`` (a disconnected silo); returns how many."""
        with self.lock:
            keys = [k for k in self._sessions if k[0] == owner]
            for k in keys:
                del self._sessions[k]
            return len(keys)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)
