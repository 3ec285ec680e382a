"""Client-level differential privacy (``dp.level = 'client'``): clip each silo's update, add
Gaussian noise to the aggregate, account the federation's epsilon over rounds.

The mechanism is DP-FedAvg's (McMahan et al., arXiv 1710.06963), Flower's fixed-clipping one:

* every silo's update ``u_i = reply_i - start`` is clipped to L2 norm ``C = dp.max-grad-norm``
  (Flower's :func:`compute_clip_model_update` / :func:`clip_inputs_inplace`);
* the aggregate is the *unweighted* sum of the clipped updates over ``n``, the number of silos
  sampled for the round, plus ``N(0, (sigma * C / n)^2)`` per value
  (:func:`compute_stdv`, :func:`add_gaussian_noise_inplace`). The fixed denominator ``n`` keeps
  the sensitivity at ``C / n`` when a sampled silo drops (Flower's FedAvg divides by the replies
  received, which raises it to ``C / (n - dropped)``); a num-examples weighted mean would let one
  large silo move the aggregate by up to ``C``, so client level averages uniformly.
* ``shield`` (:func:`distributed_privatizer`): each silo clips its pruned vector and adds its
  share ``N(0, sigma^2 C^2 / n)`` *before* encryption; the decrypted sum of ``k`` silos carries
  ``N(0, k/n * sigma^2 C^2)``, i.e. the full noise when all ``n`` answer and a documented
  shortfall (effective multiplier ``sigma * sqrt(k / n)``, accounted as such) when some drop.

Accounting (:class:`FederationAccountant`): one sampled Gaussian mechanism per round with
``q = sampled / available silos`` (``strategy.fraction-train``), Opacus's RDP accountant, at
``delta = dp.delta`` or ``1 / silos``. The noise multiplier is ``dp.noise-multiplier`` or, when
that is 0, the one that spends ``dp.epsilon`` over ``num-server-rounds`` rounds.

Why not Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrappers directly:
docs/dp.md ("Client level") lists the reasons; this module reuses their helpers instead.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
)
from opacus.accountants import RDPAccountant

from fedshield_flwr.config import DpSettings
from fedshield_flwr.dp.accounting import noise_multiplier_for

log = logging.getLogger("fedshield.server")

DP_EPSILON = "dp_epsilon"  # round metrics key (shared with record level)
DP_EPSILON_NEXT = "dp_epsilon_next"  # after one more round: read by dp.stop-at-budget
DP_DELTA = "dp_delta"
DP_NOISE = "dp_noise_multiplier"  # the round's effective noise multiplier
# train-message config entries (server -> silo) for client level
CLIPPING_NORM = KEY_CLIPPING_NORM  # Flower's key: fixedclipping_mod reads it
NOISE_MULTIPLIER = "dp.client-noise-multiplier"
SAMPLED_SILOS = "dp.sampled-silos"


@dataclass(frozen=True)
class ClientDpPlan:
    """The run's client-level mechanism, fixed at the first training round."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    sample_rate: float
    rounds: int

    @classmethod
    def from_settings(cls, dp: DpSettings, rounds: int, num_silos: int,
                      num_sampled: int) -> ClientDpPlan:
        if num_silos < 1 or not 1 <= num_sampled <= num_silos:
            raise ValueError(f"server: client-level DP needs 1 <= sampled silos <= silos "
                             f"(got {num_sampled} of {num_silos}); check strategy.fraction-train "
                             "and strategy.min-train-nodes")
        delta = dp.delta if dp.delta > 0 else 1.0 / num_silos
        if delta >= 1:
            raise ValueError(f"server: dp.delta defaults to 1/silos, which is {delta} for "
                             f"{num_silos} silo(s); set dp.delta < 1 explicitly")
        q = num_sampled / num_silos
        sigma = dp.noise_multiplier
        if sigma <= 0:
            sigma = noise_multiplier_for(dp.epsilon, delta, q, rounds)
        return cls(float(sigma), float(dp.max_grad_norm), float(delta), float(q), int(rounds))


@dataclass
class FederationAccountant:
    """Federation epsilon after each round: Opacus RDP over one (sigma_r, q) event per round."""

    delta: float
    history: list[tuple[float, float]] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.history.append((float(noise_multiplier), float(sample_rate)))

    def epsilon(self) -> float:
        if not self.history:
            return 0.0
        if any(s <= 0 for s, _ in self.history):
            return math.inf
        runs: list[tuple[float, float, int]] = []  # consecutive equal rounds as one entry
        for s, q in self.history:
            if runs and runs[-1][:2] == (s, q):
                runs[-1] = (s, q, runs[-1][2] + 1)
            else:
                runs.append((s, q, 1))
        acc = RDPAccountant()
        acc.history = runs
        return float(acc.get_epsilon(self.delta))


def clip_update(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[OrderedDict[str, np.ndarray], float]:
    """``reference + clip(state - reference, C)`` in float64 (reference's key order) and the
    update's norm before clipping."""
    keys = list(reference)
    ref = [np.asarray(reference[k], np.float64) for k in keys]
    params = [np.asarray(state[k], np.float64).copy() for k in keys]
    norm = get_norm([p - r for p, r in zip(params, ref)])
    if norm > 0:  # Flower's helper divides by the norm
        compute_clip_model_update(param1=params, param2=ref, clipping_norm=clipping_norm)
    return OrderedDict(zip(keys, params)), norm


def clipped_delta(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  clipping_norm: float) -> OrderedDict[str, np.ndarray]:
    """``clip(state - reference, C)`` in float64: what one silo adds to the private sum."""
    clipped, _ = clip_update(state, reference, clipping_norm)
    return OrderedDict((k, clipped[k] - np.asarray(reference[k], np.float64)) for k in reference)


def noised_mean(delta_sum: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                plan: ClientDpPlan, num_sampled: int) -> OrderedDict[str, np.ndarray]:
    """``reference + delta_sum / n + N(0, (sigma C / n)^2)`` (reference's dtypes).

    ``delta_sum`` is the sum of :func:`clipped_delta` over the replies (streamed: the server
    folds each reply into it as it arrives); ``n = num_sampled`` (the silos asked), not the
    number of replies: see the module docstring.
    """
    keys = list(reference)
    mean = [np.asarray(delta_sum[k], np.float64) / num_sampled for k in keys]
    add_gaussian_noise_inplace(mean, compute_stdv(plan.noise_multiplier, plan.clipping_norm,
                                                  num_sampled))
    return OrderedDict((k, (np.asarray(reference[k], np.float64) + m).astype(
        np.asarray(reference[k]).dtype)) for k, m in zip(keys, mean))


def private_mean(states: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray],
                 plan: ClientDpPlan, num_sampled: int) -> OrderedDict[str, np.ndarray]:
    """``reference + sum_i clip(u_i) / n + N(0, (sigma C / n)^2)`` (float32, reference's dtypes).

    ``n = num_sampled`` (the silos asked), not ``len(states)``: see the module docstring.
    """
    total = OrderedDict((k, np.zeros(np.shape(reference[k]), np.float64)) for k in reference)
    for state in states:
        for k, d in clipped_delta(state, reference, plan.clipping_norm).items():
            total[k] += d
    return noised_mean(total, reference, plan, num_sampled)


class ClientDp:
    """Server side of client-level DP for one run: plan, per-round bookkeeping, accounting.

    A strategy calls :meth:`begin_round` from ``configure_train`` (with the messages it sends and
    the silos available), :meth:`config_entries` for what the silos need, and
    :meth:`end_round` after aggregating (with the number of silos summed) for the metrics.
    """

    def __init__(self, settings: DpSettings, rounds: int, distributed: bool = False) -> None:
        self.settings = settings
        self.rounds = rounds
        self.distributed = distributed  # shield: noise added by the silos
        self.plan: ClientDpPlan | None = None
        self.accountant: FederationAccountant | None = None
        self.sampled: dict[int, int] = {}

    def begin_round(self, server_round: int, num_sampled: int, num_available: int) -> None:
        if self.plan is None:
            self.plan = ClientDpPlan.from_settings(self.settings, self.rounds, num_available,
                                                   max(num_sampled, 1))
            self.accountant = FederationAccountant(self.plan.delta)
            # a resumed run: the rounds already done, accounted at full participation
            for _ in range(1, server_round):
                self.accountant.step(self.plan.noise_multiplier, self.plan.sample_rate)
            p = self.plan
            log.info("dp (client level): clip %.4g, noise multiplier %.4f, q=%.3f, delta=%.3g, "
                     "%d rounds%s", p.clipping_norm, p.noise_multiplier, p.sample_rate, p.delta,
                     p.rounds, " (noise shares added by the silos)" if self.distributed else "")
        self.sampled[server_round] = num_sampled

    def config_entries(self, server_round: int) -> dict[str, float | int]:
        assert self.plan is not None, "begin_round did not run"
        return {CLIPPING_NORM: self.plan.clipping_norm,
                NOISE_MULTIPLIER: self.plan.noise_multiplier,
                SAMPLED_SILOS: int(self.sampled[server_round])}

    def clip(self, state: Mapping[str, np.ndarray],
             reference: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """One reply's clipped update (float64), to fold into a running sum."""
        assert self.plan is not None, "begin_round did not run"
        return clipped_delta(state, reference, self.plan.clipping_norm)

    def aggregate_sum(self, server_round: int, delta_sum: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """Central DP from a streamed sum of :meth:`clip` results: the noised uniform mean."""
        assert self.plan is not None, "begin_round did not run"
        return noised_mean(delta_sum, reference, self.plan, self.sampled[server_round])

    def end_round(self, server_round: int, num_summed: int) -> dict[str, float]:
        """Account the round's release; the round metrics (``dp_epsilon`` ...)."""
        assert self.plan is not None and self.accountant is not None
        n = self.sampled.pop(server_round, num_summed) or 1
        sigma = self.plan.noise_multiplier
        if self.distributed and num_summed < n:
            sigma *= math.sqrt(num_summed / n)  # the dropped silos' noise shares are missing
            log.warning("dp (client level) round %d: %d of %d sampled silos were summed, so the "
                        "aggregate carries %d/%d of the planned noise variance (effective noise "
                        "multiplier %.4f, accounted)", server_round, num_summed, n, num_summed,
                        n, sigma)
        self.accountant.step(sigma, self.plan.sample_rate)
        return {DP_EPSILON: self.accountant.epsilon(), DP_DELTA: self.plan.delta,
                DP_NOISE: sigma, DP_EPSILON_NEXT: self.next_round_epsilon()}

    def next_round_epsilon(self) -> float:
        """The federation epsilon after one more round as planned (for ``dp.stop-at-budget``)."""
        assert self.plan is not None and self.accountant is not None
        ahead = FederationAccountant(self.plan.delta, list(self.accountant.history))
        ahead.step(self.plan.noise_multiplier, self.plan.sample_rate)
        return ahead.epsilon()


def from_config(settings: DpSettings, rounds: int, distributed: bool = False) -> ClientDp | None:
    """A :class:`ClientDp` when ``dp.level == 'client'``, else None."""
    return ClientDp(settings, rounds, distributed) if settings.level == "client" else None


# ---- silo side of shield (distributed DP) ---------------------------------------------------

def noise_share(shape: tuple[int, ...], noise_multiplier: float, clipping_norm: float,
                num_sampled: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One silo's share ``N(0, sigma^2 C^2 / n)`` of the aggregate's noise (float64)."""
    rng = rng if rng is not None else np.random.default_rng()  # fresh OS entropy
    std = noise_multiplier * clipping_norm / math.sqrt(num_sampled)
    return rng.normal(0.0, std, size=shape)


def distributed_privatizer(clipping_norm: float, noise_multiplier: float, num_sampled: int,
                           rng: np.random.Generator | None = None
                           ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """For :func:`~fedshield_flwr.shield.rounds.encrypt_update`: ``sent -> (clipped, clipped +
    noise share)``; the first is kept in the silo's state, the second is encrypted."""
    if clipping_norm <= 0 or noise_multiplier < 0 or num_sampled < 1:
        raise ValueError(f"silo: client-level DP needs a clipping norm > 0, a noise multiplier "
                         f">= 0 and >= 1 sampled silo (the server sent {clipping_norm}, "
                         f"{noise_multiplier}, {num_sampled}); run the same version everywhere")

    def privatize(sent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clipped = [np.array(sent, dtype=np.float64, copy=True)]
        if get_norm(clipped) > 0:  # Flower's helper divides by the norm
            clip_inputs_inplace(clipped, clipping_norm)
        noisy = clipped[0] + noise_share(clipped[0].shape, noise_multiplier, clipping_norm,
                                         num_sampled, rng)
        return clipped[0], noisy

    return privatize


def privatizer_from_config(config: Mapping[str, object], silo: str, server_round: int
                           ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The silo's :func:`distributed_privatizer` from the train config the server sent."""
    missing = [k for k in (CLIPPING_NORM, NOISE_MULTIPLIER, SAMPLED_SILOS) if k not in config]
    if missing:
        raise ValueError(f"silo {silo} round {server_round}: dp.level='client' but the server's "
                         f"train message lacks {missing}; run the same fedshield-flwr version on "
                         "the server and every silo")
    return distributed_privatizer(float(config[CLIPPING_NORM]),  # type: ignore[arg-type]
                                  float(config[NOISE_MULTIPLIER]),  # type: ignore[arg-type]
                                  int(config[SAMPLED_SILOS]))  # type: ignore[call-overload]
