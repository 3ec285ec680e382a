"""End to end: one fedavg round with dp.level='client' in a real Flower simulation."""

from __future__ import annotations

import json

import pytest

from fedshield_flwr.dp.accounting import epsilon_after
from tests.harness.localsim import LocalSimulationSuperLink

pytestmark = pytest.mark.slow

TINY = ("model.name='tiny:llama' train.max-steps=2 train.batch-size=4 train.progress=false "
        "data.max-eval-examples=8 data.max-length=64")


def test_fedavg_client_level_round_reports_the_federation_epsilon(tmp_path):
    link = LocalSimulationSuperLink(tmp_path / "flwr-home").start()
    try:
        out = link.flwr_run(f"{TINY} num-server-rounds=1 results.dir='{tmp_path / 'r'}' "
                            "dp.level='client' dp.noise-multiplier=1.0 dp.max-grad-norm=0.05 "
                            "dp.delta=0.01", num_supernodes=2)
    finally:
        link.stop()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    doc = json.loads(((tmp_path / "r" / "latest") / "metrics.json").read_text())
    assert doc["status"] == "completed", doc.get("error")
    last = doc["rounds"][-1]
    # both silos answered through Flower's fixedclipping_mod (a layout mismatch is an error reply)
    assert last["round"] == 1 and last["replies"] == 2 and last["failures"] == 0
    assert last["dp_epsilon"] == pytest.approx(epsilon_after(1.0, 0.01, 1.0, 1), rel=1e-6)
    assert last["dp_noise_multiplier"] == 1.0 and last["dp_delta"] == 0.01
