"""Server mode of ``fedavg``: the server holds the global adapter in plaintext."""

from __future__ import annotations

from pathlib import Path

from fedshield_flwr.config import RunConfig
from fedshield_flwr.dp.client import from_config as client_dp
from fedshield_flwr.optimizers import ServerOptimizer
from fedshield_flwr.silo import initial_adapter
from server_app.base import ServerMode
from strategies.fedavg import LoraFedAvg


class FedAvgMode(ServerMode):
    """fedavg: every party derives the same seeded initial adapter; the server averages
    (and steps the average with ``strategy.optimizer``)."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.template = initial_adapter(cfg)
        self.strategy = LoraFedAvg(self.template, ServerOptimizer.from_settings(cfg.strategy),
                                   client_dp=client_dp(cfg.dp, cfg.num_server_rounds),
                                   **cfg.strategy.flower_kwargs())
