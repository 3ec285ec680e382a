"""Server optimizers (``strategy.optimizer``): Flower's FedOpt family applied to our average.

Where the step runs depends on the mode: the fedavg and lpp strategies step on the server; in
shield the server holds only ciphertexts, so every silo steps the decrypted aggregate itself
(:func:`fedshield_flwr.shield.rounds.catch_up`), in round order, from the same seeded state: every
silo, and a silo that catches up on the whole encrypted log later, reaches the same adapter and
the same optimizer state. That is why this module is library code, not a strategy.

Our strategies validate every reply and compute the exact weighted mean themselves
(:func:`strategies.fedavg.weighted_average`); Flower's ``FedAvgM``, ``FedAdam``, ``FedYogi`` and
``FedAdagrad`` each take the mean that ``FedAvg.aggregate_train`` returns, turn it into a
pseudo-gradient against the current global arrays and step with state they keep on themselves
(``m_t``, ``v_t``, ``momentum_vector``). :class:`ServerOptimizer` runs that code unchanged: it
holds an instance of the Flower class whose parent ``aggregate_train`` (FedAvg's) is replaced by
:class:`_GivenMean`, which returns the mean our strategy already computed. Nothing of the
optimizers' math is written here.

The step's result is cast back to the adapter's dtype (float32): FedAdam's bias-corrected
learning rate is a float64 scalar, and silos refuse a global adapter whose dtype differs from
their own. The optimizer state keeps whatever dtype Flower's update gives it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedshield_flwr.config import StrategySettings

OPTIMIZERS: dict[str, type[FedAvg] | None] = {
    "fedavg": None,  # the weighted mean is the new global adapter
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}
STATE_PREFIX = "optimizer/"


class _GivenMean(FedAvg):
    """Stands in for ``FedAvg.aggregate_train`` below a Flower optimizer: returns ``given``."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.given, None


def _flower_step_class(cls: type[FedAvg]) -> type[FedAvg]:
    # MRO: cls, (FedOpt), _GivenMean, FedAvg: the optimizer's super().aggregate_train() is ours.
    return type(f"{cls.__name__}OnGivenMean", (cls, _GivenMean), {})


def _kwargs(name: str, server_learning_rate: float, server_momentum: float, beta_1: float,
            beta_2: float, tau: float) -> dict[str, float]:
    """The constructor arguments of the Flower class ``name`` (0 learning rate = its default)."""
    if name == "fedavgm":
        out: dict[str, float] = {"server_momentum": server_momentum}
    elif name == "fedadagrad":
        out = {"tau": tau}
    else:
        out = {"beta_1": beta_1, "beta_2": beta_2, "tau": tau}
    if server_learning_rate != 0:
        out["server_learning_rate" if name == "fedavgm" else "eta"] = server_learning_rate
    return out


class ServerOptimizer:
    """One of Flower's server optimizers, fed the mean our strategy computed.

    Parameters
    ----------
    name : str
        A key of :data:`OPTIMIZERS`; ``"fedavg"`` makes :meth:`step` return the mean unchanged.
    server_learning_rate : float
        ``server_learning_rate`` of FedAvgM, ``eta`` of FedAdam/FedYogi/FedAdagrad; 0 means the
        default of that Flower class (1.0, 0.1, 0.01, 0.1).
    server_momentum : float
        FedAvgM's momentum (default 0.0).
    beta_1, beta_2 : float
        FedAdam's and FedYogi's moment decay rates (Flower's defaults 0.9, 0.99); FedAdagrad
        has none.
    tau : float
        Adaptivity of FedAdam/FedYogi/FedAdagrad (default 1e-3).
    """

    def __init__(self, name: str = "fedavg", server_learning_rate: float = 0.0,
                 server_momentum: float = 0.0, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        self.name = name
        cls = OPTIMIZERS[name]
        self.flower = None if cls is None else _flower_step_class(cls)(
            **_kwargs(name, server_learning_rate, server_momentum, beta_1, beta_2, tau))
        self._keys: list[str] = []  # the adapter's tensor names, in order (FedAvgM keeps a list)

    @classmethod
    def from_settings(cls, s: StrategySettings) -> ServerOptimizer:
        """The optimizer of the ``strategy.*`` section."""
        return cls(s.optimizer, s.server_learning_rate, s.server_momentum, s.beta_1, s.beta_2,
                   s.tau)

    @property
    def active(self) -> bool:
        return self.flower is not None

    def step(self, server_round: int, current: Mapping[str, np.ndarray], mean: ArrayRecord
             ) -> ArrayRecord:
        """The new global arrays from ``current`` (sent this round) and the round's ``mean``."""
        if self.flower is None:
            return mean
        self._keys = list(current)
        dtypes = {k: np.asarray(v).dtype for k, v in current.items()}
        arrays = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in current.items()))
        # What Flower's configure_train would have remembered for this round
        if isinstance(self.flower, FedAvgM):
            self.flower.current_arrays = arrays
        else:
            self.flower.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        self.flower.given = mean
        try:
            new, _ = self.flower.aggregate_train(server_round, [])
        finally:
            self.flower.given = None
        return ArrayRecord(OrderedDict(
            (k, Array(np.ascontiguousarray(new[k].numpy().astype(dtypes[k], copy=False))))
            for k in current))

    def step_arrays(self, server_round: int, current: Mapping[str, np.ndarray],
                    mean: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """:meth:`step` on plain numpy dicts (a shield silo's decrypted mean, ``current + mean
        update``); returns ``mean`` itself (as a dict) when no optimizer is set."""
        if self.flower is None:
            return OrderedDict(mean)
        record = ArrayRecord(OrderedDict(
            (k, Array(np.ascontiguousarray(mean[k]))) for k in current))
        return OrderedDict((k, a.numpy()) for k, a in self.step(server_round, current,
                                                                record).items())

    # ---- checkpoint -----------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state tensors, named ``optimizer/<slot>/<adapter tensor>``."""
        out: dict[str, np.ndarray] = {}
        f = self.flower
        if f is None:
            return out
        if isinstance(f, FedAvgM):
            if f.momentum_vector is not None:
                for k, v in zip(self._keys, f.momentum_vector, strict=True):
                    out[f"{STATE_PREFIX}momentum/{k}"] = np.asarray(v)
            return out
        for slot in ("m_t", "v_t"):
            for k, v in (getattr(f, slot) or {}).items():
                out[f"{STATE_PREFIX}{slot}/{k}"] = np.asarray(v)
        return out

    def load_state(self, state: Mapping[str, np.ndarray], keys: list[str]) -> None:
        """Restore :meth:`state` (``keys``: the adapter's tensor names, in order)."""
        f = self.flower
        if f is None:
            return
        self._keys = list(keys)
        slots = ("momentum",) if isinstance(f, FedAvgM) else ("m_t", "v_t")
        for slot in slots:
            names = [f"{STATE_PREFIX}{slot}/{k}" for k in keys]
            present = [n for n in names if n in state]
            if not present:
                continue  # not written yet: the optimizer had taken no step
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))[0]
                raise ValueError(f"checkpoint has part of the {self.name} optimizer's '{slot}' "
                                 f"state (lacks {missing}); was it written with other model "
                                 "settings?")
            if slot == "momentum":
                f.momentum_vector = [np.array(state[n]) for n in names]
            else:
                setattr(f, slot, {k: np.array(state[n]) for k, n in zip(keys, names)})
