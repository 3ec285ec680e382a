"""Split, leakage through gradients: predict a silo's target tokens from what the server gets.

In a training step the silo returns the gradient of its loss with respect to the middle output
(``mid.grad`` in :meth:`SiloTrainer.train_step`). At a labelled position ``t`` it is
``J_t^T W^T (softmax(z_t) - onehot(y_{t+1})) / N``: the output embedding of the next target token,
seen through the public tail. This is the label-leakage attack on split learning of Li et al.
(2022, "Label Leakage and Protection in Two-party Split Learning") generalized from binary labels
to a vocabulary: the server simulates a silo on public text with the public base (its own
middle, learning rate 0), records the gradients it would receive, and fits a
:class:`~fedshield_flwr.audit.inversion.RidgeInversion` from unit-normalized gradient rows to
output embeddings.

:class:`RecordingLink` is the curious server: it relays every call to the real middle unchanged
and keeps a copy of what the silo sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedshield_flwr.data.templates import IGNORE_INDEX


@dataclass
class RecordingLink:
    """A :class:`MiddleLink` that forwards to ``inner`` and records what the silo sends."""

    inner: object
    forwards: list[np.ndarray] = field(default_factory=list)
    gradients: list[np.ndarray] = field(default_factory=list)

    def forward(self, step, x, lengths, train):
        self.forwards.append(x.detach().float().numpy().copy())
        return self.inner.forward(step, x, lengths, train)

    def backward(self, step, grad):
        self.gradients.append(grad.detach().float().numpy().copy())
        return self.inner.backward(step, grad)

    def generate(self, session, x, lengths, start):
        return self.inner.generate(session, x, lengths, start)

    def end_session(self, session):
        self.inner.end_session(session)


@dataclass
class GradientRows:
    """Gradient rows the server received at labelled positions, with the target token of each."""

    features: np.ndarray  # [N, H]
    targets: np.ndarray  # [N]


def next_token_targets(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Packed ``[tokens]`` next-token label of each real position (``IGNORE_INDEX`` if none)."""
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    return nxt[batch["attention_mask"].bool()].numpy()


def record_training(trainer, link: RecordingLink, batches: Sequence[dict]) -> GradientRows:
    """Run ``trainer.train_step`` on ``batches``; the labelled gradient rows ``link`` recorded."""
    feats, targets = [], []
    for b in batches:
        link.gradients.clear()
        trainer.train_step(b["input_ids"], b["attention_mask"], b["labels"])
        g = link.gradients[-1]
        t = next_token_targets(b)
        keep = t != IGNORE_INDEX
        feats.append(g[keep])
        targets.append(t[keep])
    return GradientRows(np.concatenate(feats), np.concatenate(targets))
