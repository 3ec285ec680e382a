"""split's head-output mechanism: clipping bounds each row, the epsilon follows the curve."""

import math

import pytest
import torch

from fedshield_flwr.config import ConfigError
from fedshield_flwr.split.noise import (
    clip_rows,
    gaussian_delta,
    gaussian_epsilon,
    privatize_head_output,
)
from fedshield_flwr.split.settings import SplitSettings


def test_clip_rows_bounds_every_row_norm_and_keeps_short_rows():
    h = torch.randn(50, 16) * torch.linspace(0.01, 10, 50)[:, None]
    c = clip_rows(h, 1.0)
    assert float(c.norm(dim=1).max()) <= 1.0 + 1e-5
    short = h.norm(dim=1) < 1.0
    assert torch.allclose(c[short], h[short])


def test_privatize_is_identity_when_off_and_noise_has_the_stated_std():
    h = torch.randn(4000, 32)
    assert privatize_head_output(h) is h
    gen = torch.Generator().manual_seed(0)
    out = privatize_head_output(h, clip_norm=0.5, noise_multiplier=2.0, generator=gen)
    resid = out - clip_rows(h, 0.5)
    assert float(resid.std()) == pytest.approx(1.0, rel=0.03)  # z * C


def test_gaussian_epsilon_inverts_delta_and_falls_with_more_noise():
    eps = [gaussian_epsilon(z, 1e-5) for z in (0.5, 1, 2, 4, 8)]
    assert eps == sorted(eps, reverse=True)
    assert gaussian_delta(2.0, eps[2]) == pytest.approx(1e-5, rel=1e-3)
    # classical bound sigma = 2 sqrt(2 ln(1.25/delta)) / eps is looser than the analytic one
    assert eps[4] < 2 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 8
    assert gaussian_epsilon(0.0, 1e-5) == math.inf


def test_noise_multiplier_without_clip_norm_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="split.noise-multiplier"):
        SplitSettings.from_flat({"split.noise-multiplier": 1.0})
    s = SplitSettings.from_flat({"split.clip-norm": 1.0, "split.noise-multiplier": 2.0})
    assert s.token_epsilon() == pytest.approx(gaussian_epsilon(2.0, 1e-5))


def test_every_split_start_warns_that_the_server_holds_the_head_with_the_setting():
    from fedshield_flwr.split.noise import exposure_warning

    msg = exposure_warning(SplitSettings.from_flat({"split.clip-norm": 45.0,
                                                    "split.noise-multiplier": 2.0}))
    assert "server holds the base model" in msg and "noise-multiplier=2" in msg
    assert "docs/privacy.md" in exposure_warning(SplitSettings())


def test_gaussian_epsilon_stays_finite_for_tiny_noise_multipliers():
    eps = gaussian_epsilon(0.02, 1e-5)
    assert 100 < eps < math.inf
