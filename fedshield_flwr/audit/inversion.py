"""Split, curious server with the public base: recover a silo's tokens from its head outputs.

The server receives, for every token of every sequence, the head output row the silo sends
(after :func:`fedshield_flwr.split.noise.privatize_head_output`). Whoever holds the public base
model also holds the embeddings and head blocks, so it can:

- **white-box nearest neighbour** (:func:`nearest_neighbour_attack`): run every vocabulary token
  through the public embeddings and head blocks (after the template's first token, so that no
  attention-sink position is used) and decode each received row as the candidate whose head output
  is closest in cosine. This follows the "vocabulary matching" inversions of split-learning
  activations (Pasquini et al. 2021, "Unleashing the Tiger"; He et al. 2019, "Model Inversion
  Attacks against Collaborative Inference", white-box setting).
- **learned inversion** (:class:`RidgeInversion`): collect head outputs for public text of its own,
  with the same noise mechanism the run config states, fit a ridge-regression map from head output
  to token embedding and decode by nearest embedding (He et al. 2019, black-box "inverse network";
  the linear map of the issue's measurement). Training on noisy rows makes it noise-aware.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedshield_flwr.split.noise import privatize_head_output
from fedshield_flwr.split.packing import batch_lengths, pack


@dataclass(frozen=True)
class NoiseSpec:
    """The head-output mechanism of a run: ``split.noise-sigma``, ``clip-norm``, ``noise-multiplier``."""

    sigma: float = 0.0
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0

    def apply(self, h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return privatize_head_output(h, self.sigma, self.clip_norm, self.noise_multiplier,
                                     generator)


@dataclass
class HeadRows:
    """Packed rows the server receives, with the true token and content flag of each."""

    features: np.ndarray  # [N, H] float32
    tokens: np.ndarray  # [N] int64
    content: np.ndarray  # [N] bool


@torch.no_grad()
def head_rows(silo, tok_rows: Sequence[dict], masks: Sequence[np.ndarray], pad_id: int,
              noise: NoiseSpec = NoiseSpec(), seed: int = 0, batch_size: int = 16) -> HeadRows:
    """What the server receives from ``silo`` (a :class:`SplitSilo`) for ``tok_rows``.

    The rows go through the silo's own ``head_forward``, ``pack`` and the run's noise, exactly
    as :meth:`SiloTrainer.train_step` sends them.
    """
    from fedshield_flwr.train import collate

    gen = torch.Generator().manual_seed(seed)
    silo.peft_model.eval()
    feats, toks, cont = [], [], []
    for i in range(0, len(tok_rows), batch_size):
        chunk = tok_rows[i:i + batch_size]
        b = collate(chunk, pad_id)
        lengths = batch_lengths(b["attention_mask"], "audit")
        h = pack(silo.head_forward(b["input_ids"], b["attention_mask"]), lengths)
        feats.append(noise.apply(h, gen).float().numpy())
        toks.append(pack(b["input_ids"][..., None], lengths)[:, 0].numpy())
        cont.extend(masks[i:i + batch_size])
    return HeadRows(np.concatenate(feats), np.concatenate(toks),
                    np.concatenate([np.asarray(m, dtype=bool) for m in cont]))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_rows(queries: np.ndarray, keys: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Index of the key of largest cosine similarity, for each query row."""
    k = torch.from_numpy(_unit(keys.astype(np.float32)))
    out = []
    for i in range(0, len(queries), chunk):
        q = torch.from_numpy(_unit(queries[i:i + chunk].astype(np.float32)))
        out.append((q @ k.T).argmax(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class RidgeInversion:
    """Ridge map from received rows to target vectors, decoded by nearest target (cosine).

    Parameters
    ----------
    targets : np.ndarray
        ``[V, D]``: the vector of each candidate token (input embeddings for head outputs,
        output embeddings for gradients).
    lam : float
        Ridge penalty relative to the mean feature variance.
    normalize : bool
        Unit-normalize each feature row first (gradients: their scale is the batch's token count).
    """

    def __init__(self, targets: np.ndarray, lam: float = 1e-2, normalize: bool = False):
        self.targets = np.asarray(targets, dtype=np.float32)
        self.lam, self.normalize = lam, normalize

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return _unit(x) if self.normalize else x

    def fit(self, features: np.ndarray, tokens: np.ndarray) -> RidgeInversion:
        x = self._prep(features)
        self.mean_ = x.mean(axis=0)
        self.std_ = x.std(axis=0) + 1e-6
        z = (x - self.mean_) / self.std_
        y = self.targets[np.asarray(tokens)].astype(np.float64)
        self.ymean_ = y.mean(axis=0)
        a = z.T @ z + self.lam * len(z) * np.eye(z.shape[1])
        self.w_ = np.linalg.solve(a, z.T @ (y - self.ymean_))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (self._prep(features) - self.mean_) / self.std_
        return nearest_rows((z @ self.w_ + self.ymean_).astype(np.float32), self.targets)


@torch.no_grad()
def candidate_head_outputs(silo, prefix_token: int, vocab_size: int,
                           batch_size: int = 2048) -> np.ndarray:
    """``[V, H]``: the head output of each token ``v`` at position 1 after ``prefix_token``."""
    silo.peft_model.eval()
    out = []
    for start in range(0, vocab_size, batch_size):
        v = torch.arange(start, min(start + batch_size, vocab_size))
        ids = torch.stack([torch.full_like(v, prefix_token), v], dim=1)
        h = silo.head_forward(ids, torch.ones_like(ids))
        out.append(h[:, 1].float().numpy())
    return np.concatenate(out)


def nearest_neighbour_attack(rows: HeadRows, dictionary: np.ndarray) -> np.ndarray:
    """Decode every received row as the candidate token with the closest head output."""
    centre = dictionary.mean(axis=0, keepdims=True)
    return nearest_rows(rows.features - centre, dictionary - centre)


def naive_embedding_attack(rows: HeadRows, embeddings: np.ndarray) -> np.ndarray:
    """Baseline without any learning: nearest input embedding to the received row itself."""
    return nearest_rows(rows.features, embeddings)
