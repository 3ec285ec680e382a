"""Typed view of the Flower run config (flat dotted keys, FlowerTune style).

Flower hands every ServerApp/ClientApp a flat ``dict[str, bool|int|float|str]`` whose keys are
the dotted names of ``[tool.flwr.app.config]`` (``model.lora.r``). A :class:`Section` is a frozen
dataclass whose fields *are* the keys of one section (``max_steps`` <-> ``train.max-steps``) and
whose field defaults are the only defaults in the code; ``pyproject.toml`` states the same values
for Flower (a test keeps the two equal). :func:`RunConfig.from_flat` builds the core sections,
checks every key against the sections it knows (the core ones here and each mode's, from
:mod:`fedshield_flwr.modes`) and refuses an unknown key, naming the nearest valid one.

A mode's own section (``shield.*``, ``lpp.*``, ``split.*``) is a :class:`Section` in that mode's
package; the mode reads it with ``Settings.from_config(cfg)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A run config value is missing, of the wrong type or out of range."""


def _convert(key: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` (int <-> float where exact; comma lists for tuples), or an error."""
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        kind = str  # fall through to the error below
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(
            f"run config key '{key}' must be {kind.__name__}, got {value!r}; "
            f"fix it in pyproject.toml or with --run-config \"{key}=...\""
        )
    return value


def check(cond: bool, key: str, value: Any, rule: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"run config key '{key}' = {value!r} is invalid: {rule}")


def unknown_key_error(key: str, known: list[str]) -> ConfigError:
    """The error for a key no section defines, naming the nearest valid key."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown run config key '{key}'{hint} (the keys are listed in "
                       "[tool.flwr.app.config] of pyproject.toml and in docs/configuration.md)")


class Section:
    """Base of a config section: a frozen dataclass whose fields are the section's keys.

    ``prefix`` is the section name (``"train"``); a field ``max_steps`` is the key
    ``train.max-steps``. A field whose type is another :class:`Section` is a nested section
    (``model.lora.*``). Subclasses validate their values in :meth:`validate`.
    """

    prefix: ClassVar[str] = ""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.prefix}.{name.replace('_', '-')}" if cls.prefix else name.replace("_", "-")

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def keys(cls) -> list[str]:
        """Every dotted key of this section (nested sections included)."""
        out: list[str] = []
        for f, kind in cls._fields():
            if isinstance(kind, type) and issubclass(kind, Section):
                out.extend(kind.keys())
            else:
                out.append(cls.key(f.name))
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{dotted key: default}``, as ``pyproject.toml`` must state them."""
        out: dict[str, Any] = {}
        for f, kind in cls._fields():
            if isinstance(kind, type) and issubclass(kind, Section):
                out.update(kind.defaults())
                continue
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[cls.key(f.name)] = ",".join(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]):
        """Build and validate from flat dotted keys; keys of other sections are ignored here."""
        kwargs: dict[str, Any] = {}
        for f, kind in cls._fields():
            if isinstance(kind, type) and issubclass(kind, Section):
                kwargs[f.name] = kind.from_flat(flat)
            elif cls.key(f.name) in flat:
                kwargs[f.name] = _convert(cls.key(f.name), flat[cls.key(f.name)], kind)
        for key in flat:
            if key.startswith(cls.prefix + ".") and key not in cls.keys() and cls._owns(key):
                raise unknown_key_error(key, cls.keys())
        obj = cls(**kwargs)
        obj.validate()
        return obj

    @classmethod
    def _owns(cls, key: str) -> bool:
        """Whether ``key`` belongs to this section and not to a nested one."""
        nested = [k.prefix for _, k in cls._fields()
                  if isinstance(k, type) and issubclass(k, Section)]
        return not any(key.startswith(p + ".") for p in nested)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]):
        """Build from keys without the section prefix (``{"head-layers": 2}``)."""
        return cls.from_flat({cls.key(k.replace("-", "_")): v for k, v in section.items()})

    @classmethod
    def from_config(cls, cfg: RunConfig):
        """Build from the keys of a :class:`RunConfig` (a mode's section lives in ``extra``)."""
        return cls.from_flat(cfg.extra)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of an out-of-range value."""


@dataclass(frozen=True)
class LoraSettings(Section):
    prefix: ClassVar[str] = "model.lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # empty = per-architecture default

    def validate(self) -> None:
        check(self.r >= 1, "model.lora.r", self.r, "must be >= 1")
        check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class ModelSettings(Section):
    prefix: ClassVar[str] = "model"
    name: str = "embedded:smollm2-135m-instruct"
    quantization: int = 0  # 0, 4 (NF4) or 8 (int8)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16; models/device.py
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        check(self.quantization in (0, 4, 8), "model.quantization", self.quantization,
              "use 0 (full precision), 4 (NF4) or 8 (int8)")
        check(self.dtype in ("auto", "fp32", "bf16"), "model.dtype", self.dtype,
              "use auto (bf16 on a CUDA GPU, fp32 on the CPU), fp32 or bf16")


@dataclass(frozen=True)
class DataSettings(Section):
    prefix: ClassVar[str] = "data"
    name: str = "embedded:chatterbot-english"
    instruction_column: str = "instruction"
    input_column: str = "input"
    response_column: str = "response"
    template: str = "auto"  # auto | alpaca | chat
    max_length: int = 128
    partitioner: str = "iid"  # iid | dirichlet
    dirichlet_alpha: float = 0.5
    dirichlet_column: str = "category"
    eval_fraction: float = 0.1
    max_eval_examples: int = 32

    def validate(self) -> None:
        check(self.template in ("auto", "alpaca", "chat"), "data.template", self.template,
              "use auto, alpaca or chat")
        check(self.partitioner in ("iid", "dirichlet"), "data.partitioner", self.partitioner,
              "use iid or dirichlet")
        check(0.0 < self.eval_fraction < 1.0, "data.eval-fraction", self.eval_fraction,
              "must be in (0, 1)")
        check(self.max_length >= 8, "data.max-length", self.max_length, "must be >= 8")
        check(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "> 0")


@dataclass(frozen=True)
class TrainSettings(Section):
    prefix: ClassVar[str] = "train"
    seed: int = 42
    learning_rate_max: float = 5e-4
    learning_rate_min: float = 5e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_steps: int = 8
    weight_decay: float = 0.0
    eval_batch_size: int = 16
    progress: bool = True
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory)

    def validate(self) -> None:
        check(self.batch_size >= 1, "train.batch-size", self.batch_size, ">= 1")
        check(self.gradient_accumulation_steps >= 1, "train.gradient-accumulation-steps",
              self.gradient_accumulation_steps, ">= 1")
        check(self.max_steps >= 1, "train.max-steps", self.max_steps, ">= 1")
        check(self.learning_rate_max >= self.learning_rate_min >= 0,
              "train.learning-rate-min", self.learning_rate_min,
              "needs 0 <= learning-rate-min <= learning-rate-max")


# strategy.optimizer: Flower's server optimizers (fedshield_flwr/optimizers.py maps them to classes)
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class StrategySettings(Section):
    prefix: ClassVar[str] = "strategy"
    name: str = "fedavg"  # a mode of fedshield_flwr.modes.MODES
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    # Server optimizer (fedshield_flwr/optimizers.py, Flower's classes; shield runs it on the
    # silos): names and defaults of their constructors; server-learning-rate 0 = the chosen class's own default.
    optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi | fedadagrad
    server_learning_rate: float = 0.0
    server_momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def validate(self) -> None:
        from fedshield_flwr.modes import MODES  # the registry imports this module

        check(self.name in MODES, "strategy.name", self.name,
              f"choose one of {', '.join(MODES)}")
        check(0.0 <= self.fraction_train <= 1.0, "strategy.fraction-train",
              self.fraction_train, "in [0, 1]")
        check(self.optimizer in SERVER_OPTIMIZERS, "strategy.optimizer", self.optimizer,
              f"choose one of {', '.join(SERVER_OPTIMIZERS)}")
        # shield applies it on the silos (every silo steps the decrypted mean identically)
        check(self.optimizer == "fedavg" or self.name != "split", "strategy.optimizer",
              self.optimizer, "strategy.name=split supports only fedavg: split's server "
              "optimizer is not wired yet (silo parts are averaged by plain FedAvg)")
        check(self.server_learning_rate >= 0, "strategy.server-learning-rate",
              self.server_learning_rate, ">= 0 (0 = the Flower class's default)")
        check(self.server_momentum >= 0, "strategy.server-momentum", self.server_momentum, ">= 0")
        check(0.0 <= self.beta_1 < 1.0, "strategy.beta-1", self.beta_1, "in [0, 1)")
        check(0.0 <= self.beta_2 < 1.0, "strategy.beta-2", self.beta_2, "in [0, 1)")
        check(self.tau > 0, "strategy.tau", self.tau, "> 0")

    def flower_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``flwr.serverapp.strategy.FedAvg`` these settings give."""
        return dict(fraction_train=self.fraction_train, fraction_evaluate=self.fraction_evaluate,
                    min_train_nodes=self.min_train_nodes,
                    min_evaluate_nodes=self.min_evaluate_nodes,
                    min_available_nodes=self.min_available_nodes)


@dataclass(frozen=True)
class TrackingSettings(Section):
    """Where each round's metrics go besides ``results/`` (:mod:`fedshield_flwr.tracking`)."""

    prefix: ClassVar[str] = "tracking"
    backend: str = "none"  # none | tensorboard | mlflow
    uri: str = ""  # tensorboard: a log root; mlflow: a tracking URI ("" = under the run's results)
    experiment: str = "fedshield"  # the MLflow experiment

    def validate(self) -> None:
        check(self.backend in ("none", "tensorboard", "mlflow"), "tracking.backend",
              self.backend, "use none, tensorboard or mlflow")
        check(bool(self.experiment.strip()), "tracking.experiment", self.experiment,
              "name an MLflow experiment")


@dataclass(frozen=True)
class EvalSettings(Section):
    """Generation metrics of the silos' evaluation (:mod:`fedshield_flwr.generation`)."""

    prefix: ClassVar[str] = "eval"
    generate: bool = False  # greedy answers to held-out prompts: exact match and ROUGE-L
    max_new_tokens: int = 48
    max_examples: int = 16  # held-out prompts answered per silo and evaluation

    def validate(self) -> None:
        check(self.max_new_tokens > 0, "eval.max-new-tokens", self.max_new_tokens, "> 0")
        check(self.max_examples > 0, "eval.max-examples", self.max_examples, "> 0")


@dataclass(frozen=True)
class DpSettings(Section):
    """Differential privacy of what the silos release (:mod:`fedshield_flwr.dp`).

    ``record``: DP-SGD at every silo (each site protects its own rows). ``client``: each silo's
    whole update is clipped and noised (many-silo federations). Give a target ``epsilon`` (the
    noise multiplier is computed for the planned rounds) or a ``noise_multiplier`` directly.
    """

    prefix: ClassVar[str] = "dp"
    level: str = "none"  # none | record | client
    epsilon: float = 0.0  # target epsilon over the whole run (0 = unset: give noise-multiplier)
    noise_multiplier: float = 0.0  # noise std / clipping norm (0 = computed from epsilon)
    max_grad_norm: float = 1.0  # per-sample (record) or per-update (client) clipping norm
    delta: float = 0.0  # 0 = 1 / records (record level) or 1 / silos (client level)
    stop_at_budget: bool = False  # end the run before the round that would pass epsilon

    def validate(self) -> None:
        check(self.level in ("none", "record", "client"), "dp.level", self.level,
              "use none, record or client")
        check(self.epsilon >= 0, "dp.epsilon", self.epsilon,
              "a privacy budget must be > 0 (0 leaves it unset)")
        check(self.noise_multiplier >= 0, "dp.noise-multiplier", self.noise_multiplier, ">= 0")
        check(self.max_grad_norm > 0, "dp.max-grad-norm", self.max_grad_norm, "> 0")
        check(0 <= self.delta < 1, "dp.delta", self.delta,
              "must be in (0, 1), typically below 1/records (0 = that default)")
        if self.level != "none":
            check(self.epsilon > 0 or self.noise_multiplier > 0, "dp.epsilon", self.epsilon,
                  f"dp.level={self.level!r} needs a target dp.epsilon > 0 or a "
                  "dp.noise-multiplier > 0")
        check(not self.stop_at_budget or self.epsilon > 0, "dp.stop-at-budget",
              self.stop_at_budget, "needs a budget: set dp.epsilon > 0")

    @property
    def enabled(self) -> bool:
        return self.level != "none"


# Keys outside any section: (key, field of RunConfig, type, default).
_TOP_LEVEL: tuple[tuple[str, str, type, Any], ...] = (
    ("num-server-rounds", "num_server_rounds", int, 3),
    ("results.dir", "results_dir", str, "results"),
    ("checkpoint.every", "checkpoint_every", int, 1),
    ("resume", "resume", bool, False),
    ("resume-from", "resume_from", str, "latest"),
)
_CORE_SECTIONS: tuple[type[Section], ...] = (StrategySettings, ModelSettings, DataSettings,
                                             TrainSettings, TrackingSettings, EvalSettings,
                                             DpSettings)


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    dp: DpSettings = field(default_factory=DpSettings)
    results_dir: str = "results"
    checkpoint_every: int = 1
    resume: bool = False
    resume_from: str = "latest"  # the results run id to resume (a folder of results.dir)
    extra: Mapping[str, Any] = field(default_factory=dict)  # mode sections

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build and validate from Flower's flat ``context.run_config``.

        Every key must belong to a section (core or a mode's); mode sections are validated here
        too, so a typo such as ``shield.prune-ration`` fails whichever mode runs.
        """
        from fedshield_flwr.modes import mode_sections  # the registry imports this module

        known = [k for s in _CORE_SECTIONS for k in s.keys()]
        known += [k for k, *_ in _TOP_LEVEL]
        mode_keys = [k for s in mode_sections() for k in s.keys()]
        for key in flat:
            if key not in known and key not in mode_keys:
                raise unknown_key_error(key, known + mode_keys)
        for section in mode_sections():
            section.from_flat(flat)  # validate now: a bad value fails before any round
        top = {name: _convert(key, flat.get(key, default), kind)
               for key, name, kind, default in _TOP_LEVEL}
        cfg = cls(strategy=StrategySettings.from_flat(flat), model=ModelSettings.from_flat(flat),
                  data=DataSettings.from_flat(flat), train=TrainSettings.from_flat(flat),
                  tracking=TrackingSettings.from_flat(flat), eval=EvalSettings.from_flat(flat),
                  dp=DpSettings.from_flat(flat), extra={k: v for k, v in flat.items() if k not in known},
                  **top)
        check(cfg.num_server_rounds >= 1, "num-server-rounds", cfg.num_server_rounds, ">= 1")
        check(cfg.checkpoint_every >= 1, "checkpoint.every", cfg.checkpoint_every, ">= 1")
        check(not (cfg.dp.level == "client" and cfg.strategy.name == "split"), "dp.level",
              cfg.dp.level, "split cannot honour client-level DP (the server trains the middle "
              "of the network on every silo's activations); use dp.level='record' for the "
              "silo-side adapters")
        check(not (cfg.dp.level == "record" and cfg.strategy.name == "split"), "dp.level",
              cfg.dp.level, "record-level DP is not wired into split's silo-side adapters yet "
              "(the relay's training loop); use fedavg, shield or lpp")
        return cfg

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Every key with its default, core and mode sections (what pyproject.toml states)."""
        from fedshield_flwr.modes import mode_sections

        out = {key: default for key, _, _, default in _TOP_LEVEL}
        for section in (*_CORE_SECTIONS, *mode_sections()):
            out.update(section.defaults())
        return out

    def section(self, prefix: str) -> dict[str, Any]:
        """Keys of ``extra`` under ``prefix.`` with the prefix stripped (for mode sections)."""
        p = prefix.rstrip(".") + "."
        return {k[len(p):]: v for k, v in self.extra.items() if k.startswith(p)}


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode says about itself through ``--node-config``.

    In simulation Flower sets ``partition-id`` and ``num-partitions``; in deployment a site sets
    ``data-path`` (its own local data, never partitioned) and optionally ``cache-dir``.
    """

    partition_id: int = 0
    num_partitions: int = 1
    data_path: str = ""
    cache_dir: str = ""

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> NodeSettings:
        node = cls(
            partition_id=int(flat.get("partition-id", 0)),
            num_partitions=int(flat.get("num-partitions", 1)),
            data_path=str(flat.get("data-path", "")),
            cache_dir=str(flat.get("cache-dir", "")),
        )
        check(0 <= node.partition_id < max(node.num_partitions, 1), "partition-id",
              node.partition_id, f"must be in [0, num-partitions={node.num_partitions})")
        return node


def default_flat_config(pyproject: str | None = None) -> dict[str, Any]:
    """The app's default run config, flattened exactly as Flower flattens it.

    Reads ``[tool.flwr.app.config]`` from the project's ``pyproject.toml`` (next to the package
    in a checkout and inside an installed Flower app).
    """
    from pathlib import Path

    import tomllib
    from flwr.common.config import flatten_dict

    path = Path(pyproject) if pyproject else Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():
        raise ConfigError(f"no pyproject.toml at {path} to read the default run config from")
    doc = tomllib.loads(path.read_text())
    return dict(flatten_dict(doc["tool"]["flwr"]["app"]["config"]))
