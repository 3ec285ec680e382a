"""Record-level DP in a real Flower simulation: epsilon in metrics.json, the budget stop."""

from __future__ import annotations

import json

import pytest

from tests.harness.localsim import LocalSimulationSuperLink

pytestmark = pytest.mark.slow

TINY = ("model.name='tiny:llama' train.max-steps=3 train.batch-size=4 train.progress=false "
        "data.max-eval-examples=8 data.max-length=64")


def test_fedavg_record_dp_reports_epsilon_and_stops_before_the_round_past_the_budget(
        tmp_path):
    # sigma = 1 on these silos spends epsilon ~0.369 after round 1 and ~0.375 after round 2
    # (3 Poisson steps of q = 4/records each): a budget of 0.372 allows round 1 only.
    link = LocalSimulationSuperLink(tmp_path / "flwr-home").start()
    try:
        out = link.flwr_run(f"{TINY} num-server-rounds=3 results.dir='{tmp_path}/res' "
                            "dp.level='record' dp.noise-multiplier=1.0 dp.epsilon=0.372 "
                            "dp.stop-at-budget=true")
    finally:
        link.stop()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    doc = json.loads((tmp_path / "res" / "latest" / "metrics.json").read_text())
    assert doc["status"] == "completed"
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    one = rounds[1]
    assert 0 < one["dp_epsilon"] <= 0.372 < one["dp_epsilon_next"]
    assert one["dp_epsilon_next"] > one["dp_epsilon"]
    assert f"eps={one['dp_epsilon']:.3f}" in out.stdout
    assert "dp.stop-at-budget: stopping before round 2 of 3" in out.stdout
