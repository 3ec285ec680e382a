"""What a silo holds between messages: tokenizer, base model + LoRA, its own data.

In simulation one ClientApp process serves many messages (and several silos), so the runtime is
cached per process (:func:`cached_runtime`, one model at a time, the one cache of every mode) and
per (model, LoRA, data, node) settings; the adapter weights are replaced on every message. In deployment Flower starts a fresh process per message, so the first call pays
for loading the base model from the on-disk cache (seconds, see ``models/load.py``); the silo's
tokenized rows come from their own on-disk cache (``data/silo_cache.py``), and such a process
skips importing bitsandbytes when nothing is quantized (:func:`skip_unused_bitsandbytes`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.data import SiloData, cached_silo_data
from fedshield_flwr.generation import GenerationResult, generation_metrics
from fedshield_flwr.models import (
    apply_lora,
    cache_root,
    default_device,
    get_adapter_state,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    set_adapter_state,
)
from fedshield_flwr.modes import get_mode
from fedshield_flwr.train import EvalResult, TrainResult, cosine_lr, evaluate, train_lora

log = logging.getLogger(__name__)


@dataclass
class SiloRuntime:
    """A loaded LoRA model and tokenizer; data is attached per node."""

    model: object
    tokenizer: object
    model_path: str
    load_seconds: float
    initial: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)  # seeded G_0
    data: dict[tuple, SiloData] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def adapter_state(self) -> "OrderedDict[str, np.ndarray]":
        return get_adapter_state(self.model)

    def set_adapter(self, state: Mapping[str, np.ndarray]) -> None:
        set_adapter_state(self.model, state)

    def silo_data(self, cfg: RunConfig, node: NodeSettings) -> SiloData:
        key = (cfg.data, node.partition_id, node.num_partitions, node.data_path, cfg.train.seed)
        if key not in self.data:
            def build() -> SiloData:
                from fedshield_flwr.data import (
                    load_silo_data,  # imports `datasets`: only on a cache miss
                )

                return load_silo_data(cfg.data, node, self.tokenizer, cfg.train.seed)

            cache = cache_root(node.cache_dir or None) / "silo-data"
            self.data[key] = cached_silo_data(cfg.data, node, self.tokenizer, cfg.train.seed,
                                              self.model_path, cache, build)
            log.info("silo data: %s -> %d train / %d eval rows", self.data[key].source,
                     len(self.data[key].train), len(self.data[key].eval))
        return self.data[key]


_RUNTIME: dict[tuple, Any] = {}  # at most one entry: one model per process
# Deployment starts one of these per message (ClientApp) or per run (ServerApp).
ONE_SHOT_APP_PROCESSES = ("flwr-clientapp", "flwr-serverapp")


def skip_unused_bitsandbytes(cfg: RunConfig) -> bool:
    """In a one-shot ``flwr-clientapp``/``flwr-serverapp`` process, keep bitsandbytes out.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes compiles its kernels
    with ``torch.compile`` at import: ~2 s of every deployed message's start-up for nothing when
    the model is full precision. Only done in such a process (one message or run, one config)
    before peft is imported, never in simulation or tests, where one process serves many
    configurations. Returns whether bitsandbytes is now hidden.
    """
    if (cfg.model.quantization == 0 and not get_mode(cfg.strategy.name).needs_bitsandbytes
            and sys.argv and sys.argv[0].endswith(ONE_SHOT_APP_PROCESSES)
            and "peft" not in sys.modules and "bitsandbytes" not in sys.modules):
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import -> ImportError
        return True
    return False


def cached_runtime(key: tuple, build: Callable[[], Any]) -> Any:
    """What ``build()`` returns, cached in this process under ``key``; one entry at a time.

    Every mode's silo keeps its model here (the plain base + LoRA, lpp's rebuilt quantized base,
    split's silo parts): a different key frees the previous model before building the next.
    """
    if key not in _RUNTIME:
        _RUNTIME.clear()
        _RUNTIME[key] = build()
    return _RUNTIME[key]


def clear_runtimes() -> None:
    """Forget the cached model (tests that need a fresh build)."""
    _RUNTIME.clear()


def get_runtime(cfg: RunConfig, node: NodeSettings | None = None) -> SiloRuntime:
    """The cached runtime for this process and these model settings (built on first use).

    The LoRA initialization is seeded with ``train.seed`` so every party that builds the
    runtime holds the same initial adapter.
    """
    cache_dir = node.cache_dir if node and node.cache_dir else None

    def build() -> SiloRuntime:
        t0 = time.time()
        skip_unused_bitsandbytes(cfg)
        path = resolve_model_path(cfg.model.name, cache_dir)
        tok = load_tokenizer(cfg.model.name, cache_dir)
        base = load_base_model(cfg.model.name, cfg.model.quantization, cache_dir,
                               device=default_device(), dtype=cfg.model.dtype)
        model = apply_lora(base, cfg.model.lora, seed=cfg.train.seed, base_path=path)
        rt = SiloRuntime(model, tok, path, time.time() - t0, initial=get_adapter_state(model))
        log.info("loaded %s (+LoRA r=%d) in %.1f s", cfg.model.name, cfg.model.lora.r,
                 rt.load_seconds)
        return rt

    return cached_runtime(("base", cfg.model, cfg.train.seed, cache_dir), build)


def initial_adapter(cfg: RunConfig) -> "OrderedDict[str, np.ndarray]":
    """The seeded initial LoRA adapter that every party derives identically."""
    from fedshield_flwr.models.lora import apply_lora as _apply

    skip_unused_bitsandbytes(cfg)
    base = load_base_model(cfg.model.name, 0)
    return get_adapter_state(_apply(base, cfg.model.lora, seed=cfg.train.seed))


def train_round(
    rt: SiloRuntime, cfg: RunConfig, node: NodeSettings, server_round: int,
    global_adapter: Mapping[str, np.ndarray],
) -> TrainResult:
    """Load the global adapter, train on this silo's data for one round."""
    rt.set_adapter(global_adapter)
    data = rt.silo_data(cfg, node)
    lr = cosine_lr(server_round, cfg.num_server_rounds, cfg.train.learning_rate_max,
                   cfg.train.learning_rate_min)
    # Seed depends on round and silo: silos draw different batches, reruns draw the same.
    seed = cfg.train.seed + 1000 * server_round + node.partition_id
    if cfg.dp.level == "record":
        return record_dp_round(rt.model, data.train, cfg, lr, rt.pad_id, seed, server_round,
                               f"silo {node.partition_id} round {server_round}")
    return train_lora(rt.model, data.train, cfg.train, lr, rt.pad_id, seed,
                      desc=f"silo {node.partition_id} round {server_round}")


def record_dp_round(model, rows, cfg: RunConfig, lr: float, pad_id: int, seed: int,
                    server_round: int, desc: str) -> TrainResult:
    """``dp.level='record'``: one round of DP-SGD; the result carries the spent epsilon."""
    from dataclasses import replace

    from fedshield_flwr.dp.record import dp_train_lora, plan_record_dp

    plan = plan_record_dp(cfg.dp, cfg.train, len(rows), cfg.num_server_rounds, who=desc)
    result = dp_train_lora(model, rows, cfg.train, lr, pad_id, seed, plan, desc=desc)
    metrics = plan.metrics(server_round)
    log.info("%s: record-level DP epsilon %.3f spent (delta %.2g), %.3f after one more round",
             desc, metrics["dp-epsilon"], plan.delta, metrics["dp-epsilon-next"])
    return replace(result, extra={**result.extra, **metrics})


def evaluate_round(
    rt: SiloRuntime, cfg: RunConfig, node: NodeSettings, adapter: Mapping[str, np.ndarray]
) -> EvalResult:
    rt.set_adapter(adapter)
    data = rt.silo_data(cfg, node)
    return evaluate(rt.model, data.eval, cfg.train.eval_batch_size, rt.pad_id)


def generate_round(
    rt: SiloRuntime, cfg: RunConfig, node: NodeSettings, desc: str = "generate"
) -> GenerationResult | None:
    """With ``eval.generate``: exact match and ROUGE-L of greedy answers to the held-out prompts.

    Call after :func:`evaluate_round` (the adapter to evaluate is loaded); None when off.
    """
    if not cfg.eval.generate:
        return None
    data = rt.silo_data(cfg, node)
    result = generation_metrics(rt.model, rt.tokenizer, data.eval, cfg.eval.max_new_tokens,
                                cfg.eval.max_examples, cfg.train.eval_batch_size,
                                cfg.train.progress, desc=f"silo {node.partition_id} {desc}")
    log.info("silo %d: exact match %.3f, ROUGE-L %.3f over %d generated answers (%.1f s)",
             node.partition_id, result.exact_match, result.rouge_l, result.num_generated,
             result.seconds)
    return result
