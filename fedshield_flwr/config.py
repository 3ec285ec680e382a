"""Typed view of the Flower run config (flat dotted keys, FlowerTune style).

Flower hands every ServerApp/ClientApp a flat ``dict[str, bool|int|float|str]`` whose keys are
the dotted names of ``[tool.flwr.app.config]`` (``model.lora.r``). :func:`RunConfig.from_flat`
turns it into one frozen dataclass, validating as it goes, so the rest of the code never indexes
strings. Unknown keys are kept in ``extra`` so that modes can add their own sections.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("fedavg", "shield", "lpp", "split")


class ConfigError(ValueError):
    """A run config value is missing, of the wrong type or out of range."""


def _get(flat: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    value = flat.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run config key '{key}' must be {kind.__name__}, got {value!r}; "
            f"fix it in pyproject.toml or with --run-config \"{key}=...\""
        )
    return value


def _check(cond: bool, key: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"run config key '{key}' = {value!r} is invalid: {rule}")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # empty = per-architecture default


@dataclass(frozen=True)
class ModelSettings:
    name: str = "embedded:smollm2-135m-instruct"
    quantization: int = 0  # 0, 4 (NF4) or 8 (int8)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class DataSettings:
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


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 42
    learning_rate_max: float = 5e-4
    learning_rate_min: float = 5e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_steps: int = 10
    weight_decay: float = 0.0
    eval_batch_size: int = 16
    progress: bool = True
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory)


@dataclass(frozen=True)
class StrategySettings:
    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    results_dir: str = "results"
    checkpoint_every: int = 1
    resume: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """Build and validate from Flower's flat ``context.run_config``."""
        known: set[str] = set()

        def get(key: str, default: Any, kind: type) -> Any:
            known.add(key)
            return _get(flat, key, default, kind)

        targets = get("model.lora.target-modules", "", str)
        lora = LoraSettings(
            r=get("model.lora.r", 8, int),
            alpha=get("model.lora.alpha", 16, int),
            dropout=get("model.lora.dropout", 0.05, float),
            target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()),
        )
        _check(lora.r >= 1, "model.lora.r", lora.r, "must be >= 1")
        _check(0.0 <= lora.dropout < 1.0, "model.lora.dropout", lora.dropout, "in [0, 1)")
        model = ModelSettings(
            name=get("model.name", ModelSettings.name, str),
            quantization=get("model.quantization", 0, int),
        )
        model = dataclasses.replace(model, lora=lora)
        _check(model.quantization in (0, 4, 8), "model.quantization", model.quantization,
               "use 0 (full precision), 4 (NF4) or 8 (int8)")

        data = DataSettings(
            name=get("data.name", DataSettings.name, str),
            instruction_column=get("data.instruction-column", "instruction", str),
            input_column=get("data.input-column", "input", str),
            response_column=get("data.response-column", "response", str),
            template=get("data.template", "auto", str),
            max_length=get("data.max-length", 128, int),
            partitioner=get("data.partitioner", "iid", str),
            dirichlet_alpha=get("data.dirichlet-alpha", 0.5, float),
            dirichlet_column=get("data.dirichlet-column", "category", str),
            eval_fraction=get("data.eval-fraction", 0.1, float),
            max_eval_examples=get("data.max-eval-examples", 32, int),
        )
        _check(data.template in ("auto", "alpaca", "chat"), "data.template", data.template,
               "use auto, alpaca or chat")
        _check(data.partitioner in ("iid", "dirichlet"), "data.partitioner", data.partitioner,
               "use iid or dirichlet")
        _check(0.0 < data.eval_fraction < 1.0, "data.eval-fraction", data.eval_fraction,
               "must be in (0, 1)")
        _check(data.max_length >= 8, "data.max-length", data.max_length, "must be >= 8")
        _check(data.dirichlet_alpha > 0, "data.dirichlet-alpha", data.dirichlet_alpha, "> 0")

        train = TrainSettings(
            seed=get("train.seed", 42, int),
            learning_rate_max=get("train.learning-rate-max", 5e-4, float),
            learning_rate_min=get("train.learning-rate-min", 5e-5, float),
            batch_size=get("train.batch-size", 8, int),
            gradient_accumulation_steps=get("train.gradient-accumulation-steps", 1, int),
            max_grad_norm=get("train.max-grad-norm", 1.0, float),
            max_steps=get("train.max-steps", 10, int),
            weight_decay=get("train.weight-decay", 0.0, float),
            eval_batch_size=get("train.eval-batch-size", 16, int),
            progress=get("train.progress", True, bool),
            gradient_checkpointing=get("train.gradient-checkpointing", False, bool),
        )
        _check(train.batch_size >= 1, "train.batch-size", train.batch_size, ">= 1")
        _check(train.gradient_accumulation_steps >= 1, "train.gradient-accumulation-steps",
               train.gradient_accumulation_steps, ">= 1")
        _check(train.max_steps >= 1, "train.max-steps", train.max_steps, ">= 1")
        _check(train.learning_rate_max >= train.learning_rate_min >= 0,
               "train.learning-rate-min", train.learning_rate_min,
               "needs 0 <= learning-rate-min <= learning-rate-max")

        strategy = StrategySettings(
            name=get("strategy.name", "fedavg", str),
            fraction_train=get("strategy.fraction-train", 1.0, float),
            fraction_evaluate=get("strategy.fraction-evaluate", 1.0, float),
            min_train_nodes=get("strategy.min-train-nodes", 2, int),
            min_evaluate_nodes=get("strategy.min-evaluate-nodes", 2, int),
            min_available_nodes=get("strategy.min-available-nodes", 2, int),
            round_timeout=get("strategy.round-timeout", 3600.0, float),
        )
        _check(strategy.name in STRATEGIES, "strategy.name", strategy.name,
               f"choose one of {', '.join(STRATEGIES)}")
        _check(0.0 <= strategy.fraction_train <= 1.0, "strategy.fraction-train",
               strategy.fraction_train, "in [0, 1]")

        cfg = cls(
            num_server_rounds=get("num-server-rounds", 3, int),
            strategy=strategy,
            model=model,
            data=data,
            train=train,
            results_dir=get("results.dir", "results", str),
            checkpoint_every=get("checkpoint.every", 1, int),
            resume=get("resume", False, bool),
            extra={k: v for k, v in flat.items() if k not in known},
        )
        _check(cfg.num_server_rounds >= 1, "num-server-rounds", cfg.num_server_rounds, ">= 1")
        _check(cfg.checkpoint_every >= 1, "checkpoint.every", cfg.checkpoint_every, ">= 1")
        return cfg

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
    def from_flat(cls, flat: Mapping[str, Any]) -> "NodeSettings":
        node = cls(
            partition_id=int(flat.get("partition-id", 0)),
            num_partitions=int(flat.get("num-partitions", 1)),
            data_path=str(flat.get("data-path", "")),
            cache_dir=str(flat.get("cache-dir", "")),
        )
        _check(0 <= node.partition_id < max(node.num_partitions, 1), "partition-id",
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


@dataclass(frozen=True)
class ShieldSettings:
    """``shield.*`` keys: pruning schedule and where the keys come from."""

    prune_ratio: float = 0.0  # target fraction of blocks NOT sent each round (0 = dense)
    prune_start_round: int = 1
    prune_ramp_rounds: int = 0  # linear ramp from 0 to prune_ratio over this many rounds
    prune_lead_weight: float = 4.0  # a LoRA-B block is sent this many times as often as another
    flush_final_round: bool = True  # the last round sends every block (residuals included)
    flush_every: int = 0  # also send every block in every k-th round (0 = never)
    local_residual: bool = True  # silos train from global + their own unsent residual
    auto_keys: bool = True  # simulation: silos provision a per-run keyset in the shared cache
    server_key: str = ""  # deployment: path of shield-server.key on the coordinator
    weight_scale: float = 1e-3  # aggregation weight = num-examples * weight_scale (ratios only)
    workers: int = 1  # encryption processes per silo

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "ShieldSettings":
        sec = cfg.section("shield")
        s = cls(
            prune_ratio=float(sec.get("prune-ratio", 0.0)),
            prune_start_round=int(sec.get("prune-start-round", 1)),
            prune_ramp_rounds=int(sec.get("prune-ramp-rounds", 0)),
            prune_lead_weight=float(sec.get("prune-lead-weight", 4.0)),
            flush_final_round=bool(sec.get("flush-final-round", True)),
            flush_every=int(sec.get("flush-every", 0)),
            local_residual=bool(sec.get("local-residual", True)),
            auto_keys=bool(sec.get("auto-keys", True)),
            server_key=str(sec.get("server-key", "")),
            weight_scale=float(sec.get("weight-scale", 1e-3)),
            workers=int(sec.get("workers", 1)),
        )
        _check(0.0 <= s.prune_ratio < 1.0, "shield.prune-ratio", s.prune_ratio,
               "in [0, 1); it is clamped to 0.99")
        _check(s.prune_start_round >= 1, "shield.prune-start-round", s.prune_start_round, ">= 1")
        _check(s.flush_every >= 0, "shield.flush-every", s.flush_every, ">= 0 (0 = never)")
        _check(math.isfinite(s.prune_lead_weight) and s.prune_lead_weight >= 1.0,
               "shield.prune-lead-weight", s.prune_lead_weight, ">= 1 (1 = no priority)")
        _check(s.weight_scale > 0, "shield.weight-scale", s.weight_scale, "> 0")
        return s


LPP_QUANT_TYPES = ("nf4", "fp4", "int8")
LPP_ADAPTER_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class LppSettings:
    """``lpp.*`` keys: how the base and the global adapter are quantized for silos."""

    quant_type: str = "nf4"  # base weights, embeddings and head: nf4 | fp4 | int8
    base_blocksize: int = 32  # values per 4-bit block of the base
    clip_search: bool = True  # per-block MSE-optimal clipping before 4-bit quantization
    adapter_bits: int = 4  # bits per value of the global adapter sent to silos
    adapter_blocksize: int = 64  # values per absmax block of the k-bit adapter
    server_lr: float = 1.0  # fp_adapter += server_lr * (mean(silo adapters) - sent adapter)
    eval_data: str = ""  # server's held-out set: file/dir/hub name; "" = simulated silos' splits
    eval_partitions: int = 3  # with eval_data == "": how many simulated silos to rebuild
    server_eval: bool = True  # measure the IP margin (full vs silo proxy) every round

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "LppSettings":
        sec = cfg.section("lpp")
        s = cls(
            quant_type=str(sec.get("quant-type", "nf4")).lower(),
            base_blocksize=int(sec.get("base-blocksize", 32)),
            clip_search=bool(sec.get("clip-search", True)),
            adapter_bits=int(sec.get("adapter-bits", 4)),
            adapter_blocksize=int(sec.get("adapter-blocksize", 64)),
            server_lr=float(sec.get("server-lr", 1.0)),
            eval_data=str(sec.get("eval-data", "")),
            eval_partitions=int(sec.get("eval-partitions", 3)),
            server_eval=bool(sec.get("server-eval", True)),
        )
        _check(s.quant_type in LPP_QUANT_TYPES, "lpp.quant-type", s.quant_type,
               f"one of {', '.join(LPP_QUANT_TYPES)}")
        _check(s.adapter_bits in LPP_ADAPTER_BITS, "lpp.adapter-bits", s.adapter_bits,
               f"one of {LPP_ADAPTER_BITS}")
        _check(s.adapter_blocksize >= 1, "lpp.adapter-blocksize", s.adapter_blocksize, ">= 1")
        _check(s.base_blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
               "lpp.base-blocksize", s.base_blocksize, "a power of two in [32, 4096]")
        _check(s.server_lr > 0 and math.isfinite(s.server_lr), "lpp.server-lr", s.server_lr,
               "finite and > 0")
        _check(s.eval_partitions >= 1, "lpp.eval-partitions", s.eval_partitions, ">= 1")
        return s
