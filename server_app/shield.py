"""Server mode of ``shield``: the server never holds the model or a plaintext update.

It does not load the base model either: every silo starts from the same seeded LoRA
initialization, and the silos export the final adapter. Its checkpoint is the encrypted
aggregate log (ciphertexts only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedshield_flwr.config import RunConfig
from fedshield_flwr.dp.client import from_config as client_dp
from fedshield_flwr.shield.protocol import EXPORT_DIR, KEYS_TAG
from fedshield_flwr.shield.settings import ShieldSettings
from server_app.base import ServerMode
from strategies.shield import ShieldStrategy

LOG_KEY = "aggregate-log"  # checkpoint entry: the encrypted aggregate log


def shield_strategy_args(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The keyword arguments of :class:`ShieldStrategy` (and split's) for this run."""
    from fedshield_flwr.shield.provision import server_keyset

    sh = ShieldSettings.from_config(cfg)
    tag = run_dir.name
    evaluate_extra: dict[str, Any] = {KEYS_TAG: tag}
    if sh.auto_keys:  # simulation: silo 0 writes the adapter into this run's results
        evaluate_extra[EXPORT_DIR] = str(run_dir / "adapter")
    return dict(keyset_loader=lambda: server_keyset(sh.server_key, sh.auto_keys, tag),
                schedule=sh.schedule(cfg.num_server_rounds),
                num_rounds=cfg.num_server_rounds, train_extra={KEYS_TAG: tag},
                evaluate_extra=evaluate_extra, **cfg.strategy.flower_kwargs())


def log_checkpoint(strategy: ShieldStrategy) -> dict[str, np.ndarray]:
    """The encrypted aggregate log as a checkpoint entry."""
    blob = strategy.log.to_bytes() if strategy.log is not None else b""
    return {LOG_KEY: np.frombuffer(blob, dtype=np.uint8).copy()}


def restore_log(strategy: ShieldStrategy, state: dict[str, np.ndarray], remedy: str) -> None:
    """Reload the encrypted aggregate log from a checkpoint (``remedy`` if it has none)."""
    blob = state.get(LOG_KEY)
    if blob is None:
        raise ValueError(f"checkpoint has no '{LOG_KEY}'; {remedy}")
    if blob.size:
        strategy.restore(blob.tobytes())


class ShieldMode(ServerMode):
    """shield: the server only adds ciphertexts and keeps the encrypted log."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.strategy = ShieldStrategy(
            **shield_strategy_args(cfg, run_dir),
            client_dp=client_dp(cfg.dp, cfg.num_server_rounds, distributed=True))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def checkpoint(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        return log_checkpoint(self.strategy)

    def restore(self, state: dict[str, np.ndarray]) -> ArrayRecord:
        restore_log(self.strategy, state, "was it written by shield?")
        return ArrayRecord()

    def export(self, arrays: ArrayRecord, run_dir: Path) -> Path | None:
        return None  # the silos decrypt and export; the server cannot
