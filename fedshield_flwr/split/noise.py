"""What split adds to a head output before it leaves the silo: clipping and Gaussian noise.

Two mechanisms, applied per token row of the packed ``[tokens, hidden]`` head output:

- **relative noise** (``split.noise-sigma``, FedSEA's calibration): ``h + N(0, (sigma *
  mean|h_row|)^2)``. Its scale follows the data, so it has no differential-privacy meaning.
- **the Gaussian mechanism per token** (``split.clip-norm`` = C, ``split.noise-multiplier`` = z):
  each row is clipped to L2 norm at most C, then ``N(0, (z * C)^2 I)`` is added. Replacing one
  token's row by any other moves it by at most 2C, so one released row is (epsilon, delta)-DP
  with respect to that row (:func:`gaussian_epsilon`, the analytic Gaussian mechanism of Balle and
  Wang 2018). This protects the row, not the sentence: attention mixes earlier tokens into every
  row, and a sequence releases one noisy row per token (see docs/privacy.md).
"""

from __future__ import annotations

import math

import torch


def clip_rows(h: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row of ``h`` down to L2 norm at most ``clip_norm`` (0: unchanged)."""
    if clip_norm <= 0:
        return h
    norms = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return h * (clip_norm / norms).clamp(max=1.0)


def privatize_head_output(
    h: torch.Tensor,
    sigma: float = 0.0,
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The head output as it is sent: clipped + Gaussian per row, then relative noise.

    Parameters
    ----------
    h : torch.Tensor
        Packed head output ``[tokens, hidden]`` (any leading shape; rows are the last dim).
    sigma : float
        ``split.noise-sigma``: relative noise std (times each row's mean ``|h|``); 0 = off.
    clip_norm : float
        ``split.clip-norm``: per-row L2 bound C; 0 = no clipping and no calibrated noise.
    noise_multiplier : float
        ``split.noise-multiplier``: std of the calibrated noise in units of C (needs C > 0).
    generator : torch.Generator, optional
        Seeds the noise.
    """
    if clip_norm > 0:
        h = clip_rows(h, clip_norm)
        if noise_multiplier > 0:
            noise = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
            h = h + noise * (noise_multiplier * clip_norm)
    if sigma > 0:
        scale = h.abs().mean(dim=-1, keepdim=True) * sigma
        noise = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
        h = h + noise * scale
    return h


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(noise_multiplier: float, epsilon: float, sensitivity: float = 2.0) -> float:
    """delta(epsilon) of the Gaussian mechanism, std ``noise_multiplier`` x C, L2 sensitivity
    ``sensitivity`` x C (2: replace one row clipped to C). Balle and Wang (2018), Theorem 8."""
    if noise_multiplier <= 0:
        return 1.0
    mu = sensitivity / noise_multiplier
    tail = _phi(-epsilon / mu - mu / 2)
    # e^eps * tail in log space: e^eps overflows long before the product does
    second = math.exp(min(epsilon + math.log(tail), 700.0)) if tail > 0 else 0.0
    return max(_phi(-epsilon / mu + mu / 2) - second, 0.0)


def gaussian_epsilon(noise_multiplier: float, delta: float, sensitivity: float = 2.0) -> float:
    """The smallest epsilon with ``gaussian_delta(noise_multiplier, epsilon) <= delta``.

    ``inf`` without noise. Bisection on the exact (analytic) privacy curve.
    """
    if noise_multiplier <= 0:
        return math.inf
    if gaussian_delta(noise_multiplier, 0.0, sensitivity) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(noise_multiplier, hi, sensitivity) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        if gaussian_delta(noise_multiplier, mid, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


# Learned-inversion recovery of a silo's content tokens measured by benchmarks/privacy.py on the
# embedded SmolLM2-135M and chatterbot data (benchmarks/results/privacy.json): keyed by
# (head_layers, noise_multiplier) with clip-norm at the median row norm, and by
# (head_layers, "sigma", noise_sigma) for the relative noise; the best of the learned and the
# white-box attack (DP points: clip-norm 45; z < 0.5 from benchmarks/results/privacy_frontier.json).
MEASURED_RECOVERY: dict[tuple, float] = {
    (1, 'sigma', 0.0): 0.913,
    (1, 'sigma', 0.1): 0.907,
    (1, 'sigma', 0.5): 0.913,
    (1, 'sigma', 1.0): 0.905,
    (1, 'sigma', 2.0): 0.891,
    (1, 0.02): 0.813,
    (1, 0.05): 0.808,
    (1, 0.1): 0.696,
    (1, 0.5): 0.032,
    (1, 1.0): 0.022,
    (1, 2.0): 0.014,
    (1, 4.0): 0.016,
    (2, 'sigma', 0.0): 0.843,
    (2, 'sigma', 0.1): 0.839,
    (2, 'sigma', 0.5): 0.706,
    (2, 'sigma', 1.0): 0.563,
    (2, 'sigma', 2.0): 0.558,
    (2, 0.5): 0.032,
    (2, 1.0): 0.022,
    (2, 2.0): 0.016,
    (2, 4.0): 0.014,
    (4, 'sigma', 0.0): 0.744,
    (4, 'sigma', 0.1): 0.738,
    (4, 'sigma', 0.5): 0.625,
    (4, 'sigma', 1.0): 0.562,
    (4, 'sigma', 2.0): 0.538,
    (4, 0.5): 0.026,
    (4, 1.0): 0.016,
    (4, 2.0): 0.016,
    (4, 4.0): 0.014,
}


def exposure_warning(settings) -> str:
    """The start-up warning of every split run: the server holds the base model's head.

    The server loads the whole base to cut its middle and to build the silos' parts, so it
    always holds the embeddings and head blocks and can invert the head outputs it receives.
    The message states the recovery measured at the nearest audited setting.
    """
    head = settings.head_layers
    if settings.noise_multiplier > 0 and settings.clip_norm > 0:
        keys = [k for k in MEASURED_RECOVERY if len(k) == 2 and k[0] == head]
        key = min(keys, key=lambda k: abs(k[1] - settings.noise_multiplier), default=None)
        what = (f"split.clip-norm={settings.clip_norm:g}, split.noise-multiplier="
                f"{settings.noise_multiplier:g} (epsilon {settings.token_epsilon():.2f} per token "
                f"at delta {settings.dp_delta:g})")
    else:
        keys = [k for k in MEASURED_RECOVERY if len(k) == 3 and k[0] == head]
        key = min(keys, key=lambda k: abs(k[2] - settings.noise_sigma), default=None)
        what = f"split.noise-sigma={settings.noise_sigma:g} and no calibrated noise"
    measured = (f"; at the nearest audited setting the best inversion attack recovered "
                f"{100 * MEASURED_RECOVERY[key]:.1f}% of a silo's content tokens on the embedded "
                "SmolLM2-135M" if key is not None else "")
    return (f"split: the server holds the base model, including the embeddings and the "
            f"{head} head block(s) the silos run, and sees every head output with {what}"
            f"{measured}. Run `fedshield audit` on your model and data; see docs/privacy.md")
