"""The ``shield.*`` run config section and the public pruning schedule it defines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedshield_flwr.config import Section, check
from fedshield_flwr.shield.pruning import PruneSchedule


@dataclass(frozen=True)
class ShieldSettings(Section):
    """``shield.*`` keys: pruning schedule and where the keys come from."""

    prefix: ClassVar[str] = "shield"
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

    def validate(self) -> None:
        check(0.0 <= self.prune_ratio < 1.0, "shield.prune-ratio", self.prune_ratio,
              "in [0, 1); it is clamped to 0.99")
        check(self.prune_start_round >= 1, "shield.prune-start-round", self.prune_start_round,
              ">= 1")
        check(self.flush_every >= 0, "shield.flush-every", self.flush_every, ">= 0 (0 = never)")
        check(math.isfinite(self.prune_lead_weight) and self.prune_lead_weight >= 1.0,
              "shield.prune-lead-weight", self.prune_lead_weight, ">= 1 (1 = no priority)")
        check(self.weight_scale > 0, "shield.weight-scale", self.weight_scale, "> 0")

    def schedule(self, num_rounds: int) -> PruneSchedule:
        """The public pruning schedule every silo and the server derive from the run config."""
        return PruneSchedule(target=self.prune_ratio, start_round=self.prune_start_round,
                             ramp_rounds=self.prune_ramp_rounds,
                             lead_weight=self.prune_lead_weight,
                             flush_round=num_rounds if self.flush_final_round else 0,
                             flush_every=self.flush_every)
