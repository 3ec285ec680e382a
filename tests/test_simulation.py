"""End to end: ``flwr run .`` as a local simulation with a tiny model, results and resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedshield_flwr.config import LoraSettings
from tests.harness.localsim import LocalSimulationSuperLink

pytestmark = pytest.mark.slow

TINY = ("model.name='tiny:llama' train.max-steps=3 train.batch-size=4 train.progress=false "
        "data.max-eval-examples=8 data.max-length=64")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = LocalSimulationSuperLink(tmp_path_factory.mktemp("flwr-home")).start()
    yield link
    link.stop()
    assert link.proc.poll() is not None


def _run(superlink, results: Path, extra: str = "", rounds: int = 2):
    out = superlink.flwr_run(f"{TINY} num-server-rounds={rounds} results.dir='{results}' {extra}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def fedavg_run(superlink, tmp_path_factory):
    """One 2-round fedavg run: its results are checked, then copied and resumed."""
    results = tmp_path_factory.mktemp("fedavg")
    return _run(superlink, results), results


def test_fedavg_simulation_writes_complete_results(fedavg_run):
    out, tmp_path = fedavg_run
    assert "[round 2/2]" in out.stdout  # per-round progress on the terminal
    run = (tmp_path / "latest").resolve()
    assert (tmp_path / "latest").is_symlink() and run.parent == tmp_path
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["config"]["model.name"] == "tiny:llama"
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    for r in doc["rounds"]:
        for key in ("round", "train_loss", "eval_loss", "eval_perplexity", "bytes_up",
                    "bytes_down", "seconds"):
            assert key in r
        assert r["eval_loss"] > 0 and r["seconds"] > 0
    assert doc["rounds"][0]["train_loss"] is None
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in doc["rounds"][1:])
    assert (run / "metrics.csv").read_text().startswith("round,train_loss,eval_loss")
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "checkpoints" / "round-0002.safetensors").exists()

    from peft import PeftModel

    from fedshield_flwr.models import load_base_model

    model = PeftModel.from_pretrained(load_base_model("tiny:llama"), str(run / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_resume_continues_from_the_last_checkpoint_identically(superlink, fedavg_run, tmp_path):
    shutil.copytree(fedavg_run[1], tmp_path, symlinks=True, dirs_exist_ok=True)
    run = (tmp_path / "latest").resolve()
    assert run.parent == tmp_path
    adapter = run / "adapter" / "adapter_model.safetensors"
    straight = load_file(str(adapter))  # what the uninterrupted run ended with
    # Simulate a crash right after round 1: drop what round 2 wrote.
    (run / "checkpoints" / "round-0002.safetensors").unlink()
    (run / "checkpoints" / "latest.json").write_text(
        json.dumps({"round": 1, "file": "round-0001.safetensors"}))
    shutil.rmtree(run / "adapter")
    # resume-from names the run (here the one "latest" points to): a declared key, so it
    # passes `flwr run --run-config`, which refuses keys pyproject.toml does not declare
    out = _run(superlink, tmp_path, extra=f"resume=true resume-from='{run.name}'", rounds=2)
    assert "resuming run" in out.stdout
    assert [r["round"] for r in json.loads((run / "metrics.json").read_text())["rounds"]] == [
        0, 1, 2]
    resumed = load_file(str(adapter))
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)


def test_shield_simulation_aggregates_ciphertexts_and_silos_export(superlink, tmp_path):
    # the silos also step FedAdam on every decrypted aggregate (the server cannot)
    out = _run(superlink, tmp_path, extra="strategy.name='shield' shield.prune-ratio=0.5 "
               "strategy.optimizer='fedadam' strategy.server-learning-rate=0.01")
    assert "public material only" in out.stdout
    run = (tmp_path / "latest").resolve()
    doc = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["rounds"][2]["eval_loss"] < doc["rounds"][0]["eval_loss"] + 0.05
    # round 1 prunes; the last round flushes every silo's residual (dense upload)
    assert [r["prune_ratio"] for r in doc["rounds"][1:]] == [0.5, 0.0]
    assert doc["rounds"][2]["bytes_up"] > 1.5 * doc["rounds"][1]["bytes_up"]
    ckpt = load_file(str(run / "checkpoints" / "round-0002.safetensors"))
    assert list(ckpt) == ["aggregate-log"] and ckpt["aggregate-log"].dtype == np.uint8
    from peft import PeftModel

    from fedshield_flwr.models import load_base_model

    PeftModel.from_pretrained(load_base_model("tiny:llama"), str(run / "adapter"))


def test_split_simulation_trains_through_the_relay_and_exports_the_merged_adapter(
        superlink, tmp_path):
    out = _run(superlink, tmp_path, extra="strategy.name='split'")
    assert "split: relay stopped" in out.stdout  # the ServerApp closed its relay
    run = (tmp_path / "latest").resolve()
    doc = json.loads((run / "metrics.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["eval_loss"] > 0 and r["eval_perplexity"] > 1 for r in rounds)
    for r in rounds[1:]:
        assert r["replies"] == 2 and r["failures"] == 0 and r["train_loss"] > 0
        assert r["relay_silo_steps"] == 2 * 3  # 2 silos x train.max-steps=3, all via the relay
        assert r["relay_rejected_auth"] == 0
        # Activations and gradients go through the relay, not through Flower messages.
        assert r["relay_bytes_up"] > 0 and r["relay_bytes_down"] > 0
    # the silo parts (never the middle blocks) go down with round 0's messages to each silo
    # whose cache lacks them (earlier tests of this session may have cached the same package)
    held = re.search(r"round 0: (\d) of 2 asked silos hold silo parts", out.stdout)
    assert held and "silo parts package" in out.stdout
    later = max(r["bytes_down"] for r in rounds[1:])
    if held.group(1) == "2":
        assert rounds[0]["bytes_down"] < later  # nothing but round control went down
    else:
        assert rounds[0]["bytes_down"] > 2 * later
    ckpt = load_file(str(run / "checkpoints" / "round-0002.safetensors"))
    assert {k.split("/")[0] for k in ckpt} == {"silo", "middle"}

    from peft import PeftModel

    from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model

    # The export is one adapter for the unsplit model: head + middle + tail, every block.
    exported = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    full = get_adapter_state(apply_lora(load_base_model("tiny:llama"), LoraSettings(r=8)))
    assert set(exported) == set(full)
    assert exported.keys() == {k.split("/", 1)[1] for k in ckpt}
    model = PeftModel.from_pretrained(load_base_model("tiny:llama"), str(run / "adapter"))
    assert sum("lora_B" in n for n, _ in model.named_parameters()) == sum(
        "lora_B" in k for k in full)


def test_lpp_simulation_delivers_the_base_once_and_tracks_the_ip_margin(superlink, tmp_path):
    out = _run(superlink, tmp_path, extra="strategy.name='lpp' lpp.eval-partitions=2")
    assert "IP margin" in out.stdout
    run = (tmp_path / "latest").resolve()
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # both sides of the IP margin, every round, on the server's rows
        assert np.isfinite(r["server_eval_loss"]) and np.isfinite(r["proxy_eval_loss"])
        assert r["server_eval_tokens"] > 0
    # the first message of the run carried the package; later rounds only k-bit adapters
    assert rounds[0]["bytes_down"] > 2 * rounds[1]["bytes_down"]
    assert rounds[2]["bytes_down"] == rounds[1]["bytes_down"]
    assert (run / "loss.png").stat().st_size > 1000

    from peft import PeftModel

    from fedshield_flwr.models import load_base_model

    # the server exports the full-precision adapter for the full base (it never leaves it)
    model = PeftModel.from_pretrained(load_base_model("tiny:llama"), str(run / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_a_failed_run_exits_non_zero_with_the_error_last_and_says_failed_in_metrics_json(
        superlink, tmp_path):
    """`fedshield run` (what `make demo` runs): flwr 1.42's own `flwr run` exits 0 here."""
    out = superlink.flwr_run(f"{TINY} strategy.name='split' split.head-layers=99 "
                             f"results.dir='{tmp_path}'", checked=True)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()
    assert "finished:failed" in last[-2]
    assert "failed before completing any round: SplitError: split.head-layers=99" in last[-1]
    assert "lower them" in last[-1]
    doc = json.loads(((tmp_path / "latest").resolve() / "metrics.json").read_text())
    assert doc["status"] == "failed" and doc["rounds"] == []
    assert doc["error"] in last[-1]


# A mode on a non-Llama family end to end: split on Gemma (scaled embeddings, tied head), the
# refusal a new user met. The per-family unit tests (tests/split/test_architectures.py,
# tests/lpp/test_architectures.py: lpp's package through Flower for every family, including the
# Gemma 0-dim buffer a new user met) cover the rest in-process; the whole mode x family matrix of
# real `flwr run` rounds is benchmarks/architectures.py (one ~45 s run per cell is too slow here).
ARCH_TINY = ("train.max-steps=2 train.batch-size=4 train.progress=false "
             "data.max-eval-examples=8 data.max-length=64 num-server-rounds=1")


@pytest.mark.parametrize("mode,family", [("split", "gemma")])
def test_a_mode_completes_a_round_on_a_non_llama_family(superlink, tmp_path, mode, family):
    out = superlink.flwr_run(f"{ARCH_TINY} model.name='tiny:{family}' strategy.name='{mode}' "
                             f"results.dir='{tmp_path}'", num_supernodes=2, checked=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    doc = json.loads(((tmp_path / "latest").resolve() / "metrics.json").read_text())
    assert doc["status"] == "completed", doc.get("error")
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["eval_loss"] > 0 and rounds[1].get("failures", 0) == 0
