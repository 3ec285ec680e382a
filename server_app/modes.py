"""Per-mode server setup: initial state, strategy, checkpoint/restore, export.

A :class:`ServerMode` is the small amount of mode-specific glue the ServerApp needs; the round
logic itself lives in ``strategies/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedshield_flwr.config import RunConfig, ShieldSettings
from fedshield_flwr.models import export_adapter, resolve_model_path
from fedshield_flwr.silo import initial_adapter
from fedshield_flwr.wire import decode_arrays, encode_arrays
from strategies.fedavg import LoraFedAvg
from strategies.shield import ShieldStrategy


def strategy_kwargs(cfg: RunConfig) -> dict[str, Any]:
    s = cfg.strategy
    return dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes,
        min_available_nodes=s.min_available_nodes,
    )


class ServerMode:
    """fedavg: the server holds the global adapter in plaintext."""

    server_evaluate: Callable[[int, ArrayRecord], dict[str, Any]] | None = None

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.template = initial_adapter(cfg)
        self.strategy = LoraFedAvg(self.template, **strategy_kwargs(cfg))

    def initial_arrays(self) -> ArrayRecord:
        return encode_arrays(self.template)

    def checkpoint(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        return dict(decode_arrays(arrays, "server checkpoint"))

    def restore(self, state: dict[str, np.ndarray]) -> ArrayRecord:
        missing = set(self.template) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. "
                             f"{sorted(missing)[0]}); was it written with other model settings?")
        return encode_arrays({k: state[k] for k in self.template})

    def train_config(self) -> ConfigRecord:
        return ConfigRecord({})

    def evaluate_config(self) -> ConfigRecord:
        return ConfigRecord({})

    def export(self, arrays: ArrayRecord, run_dir: Path) -> Path | None:
        from transformers import AutoConfig

        path = resolve_model_path(self.cfg.model.name)
        model_type = AutoConfig.from_pretrained(path).model_type
        state = decode_arrays(arrays, "final adapter")
        return export_adapter(run_dir / "adapter", state, model_type, self.cfg.model.lora, path)


class ShieldMode(ServerMode):
    """shield: the server never holds the model or a plaintext update, only ciphertexts.

    It does not load the base model either: every silo starts from the same seeded LoRA
    initialization, and the silos export the final adapter.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        from client_app.shield import schedule_of
        from fedshield_flwr.crypto.provision import server_keyset

        self.cfg = cfg
        self.run_dir = run_dir
        sh = ShieldSettings.from_config(cfg)
        tag = run_dir.name
        evaluate_extra: dict[str, Any] = {"keys-tag": tag}
        if sh.auto_keys:  # simulation: silo 0 writes the adapter into this run's results
            evaluate_extra["export-dir"] = str(run_dir / "adapter")
        self.strategy = ShieldStrategy(
            lambda: server_keyset(sh.server_key, sh.auto_keys, tag),
            schedule_of(sh, cfg.num_server_rounds), cfg.num_server_rounds,
            train_extra={"keys-tag": tag},
            evaluate_extra=evaluate_extra, **strategy_kwargs(cfg))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def checkpoint(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        log = self.strategy.log
        blob = log.to_bytes() if log is not None else b""
        return {"aggregate-log": np.frombuffer(blob, dtype=np.uint8).copy()}

    def restore(self, state: dict[str, np.ndarray]) -> ArrayRecord:
        blob = state.get("aggregate-log")
        if blob is None:
            raise ValueError("checkpoint has no 'aggregate-log'; was it written by shield?")
        if blob.size:
            self.strategy.restore(blob.tobytes())
        return ArrayRecord()

    def export(self, arrays: ArrayRecord, run_dir: Path) -> Path | None:
        return None  # the silos decrypt and export; the server cannot


from .lpp_mode import LppMode  # noqa: E402  (lpp_mode subclasses ServerMode)
from .split_mode import SplitMode  # noqa: E402  (split_mode subclasses ServerMode)

MODES: dict[str, type[ServerMode]] = {"fedavg": ServerMode, "shield": ShieldMode, "lpp": LppMode,
                                      "split": SplitMode}


def build_mode(cfg: RunConfig, run_dir: Path) -> ServerMode:
    if cfg.strategy.name not in MODES:
        raise ValueError(f"strategy.name='{cfg.strategy.name}' is not available in this build; "
                         f"available: {', '.join(sorted(MODES))}")
    return MODES[cfg.strategy.name](cfg, run_dir)
