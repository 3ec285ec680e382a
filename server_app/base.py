"""What every server mode gives the ServerApp: initial state, strategy, checkpoint, export.

A server mode is the small amount of mode-specific glue the ServerApp needs; the round logic
lives in ``strategies/`` and the math in the mode's package. The defaults here serve modes whose
server holds a plaintext adapter (fedavg, lpp, split with fedavg aggregation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedshield_flwr.config import RunConfig
from fedshield_flwr.models import export_adapter, public_model_name, resolve_model_path
from fedshield_flwr.wire import decode_arrays, encode_arrays


class ServerMode:
    """Base of the server modes; ``strategy`` and ``template`` are set by the subclass."""

    server_evaluate: Callable[[int, ArrayRecord], dict[str, Any]] | None = None
    template: dict[str, np.ndarray]

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir

    def initial_arrays(self) -> ArrayRecord:
        return encode_arrays(self.template)

    def checkpoint(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The global adapter, plus the server optimizer's state under ``optimizer/``."""
        state = dict(decode_arrays(arrays, "server checkpoint"))
        optimizer = getattr(self.strategy, "optimizer", None)
        if optimizer is not None:
            state.update(optimizer.state())
        return state

    def restore(self, state: dict[str, np.ndarray]) -> ArrayRecord:
        missing = set(self.template) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. "
                             f"{sorted(missing)[0]}); was it written with other model settings?")
        optimizer = getattr(self.strategy, "optimizer", None)
        if optimizer is not None:
            optimizer.load_state(state, list(self.template))
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
        return export_adapter(run_dir / "adapter", state, model_type, self.cfg.model.lora,
                              public_model_name(self.cfg.model.name))
