"""Every mode in a real ``flwr run`` simulation on a non-Llama family (1 round, 2 silos).

Together the four runs cover four families beyond Llama (the per-family unit tests of split and
lpp are in tests/split/test_architectures.py and tests/lpp/test_architectures.py); these are the
failures a new user met: lpp on Gemma (a 0-dim buffer) and split on GPT-NeoX / Gemma (refused).
"""

from __future__ import annotations

import json

import pytest

from tests.harness.localsim import LocalSimulationSuperLink

pytestmark = pytest.mark.slow

TINY = ("train.max-steps=2 train.batch-size=4 train.progress=false data.max-eval-examples=8 "
        "data.max-length=64 num-server-rounds=1")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = LocalSimulationSuperLink(tmp_path_factory.mktemp("flwr-home")).start()
    yield link
    link.stop()


@pytest.mark.parametrize("mode,family", [
    ("split", "gemma"), ("lpp", "gemma2"), ("shield", "gpt_neox"), ("fedavg", "phi3"),
])
def test_a_mode_completes_a_round_on_a_non_llama_family(superlink, tmp_path, mode, family):
    out = superlink.flwr_run(f"{TINY} model.name='tiny:{family}' strategy.name='{mode}' "
                             f"results.dir='{tmp_path}'", num_supernodes=2, checked=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    doc = json.loads(((tmp_path / "latest").resolve() / "metrics.json").read_text())
    assert doc["status"] == "completed", doc.get("error")
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["eval_loss"] > 0 and rounds[1].get("failures", 0) == 0
