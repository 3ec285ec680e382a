"""A real deployment on loopback: TLS, SuperNode authentication, resume after crashes, dropout.

``flower-superlink`` (HTTPS, ``--enable-supernode-auth``, ``--database``) and three
``flower-supernode`` processes with registered keys, ClientApps in ``subprocess`` isolation (one
fresh process per message), ``flwr run . <connection> --stream`` from the CLI with its own
``FLWR_HOME``. Every process is started and stopped by PID (see ``fedshield_flwr/deploy.py``).

The mode is a parameter: add an entry to ``MODES`` (its extra run config and node config) when a
mode is ready for deployment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from fedshield_flwr.deploy import LoopbackDeployment

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class ModeSetup:
    run_config: str = ""      # extra --run-config of the mode
    node_config: str = ""     # extra --node-config of every site


MODES = {"fedavg": ModeSetup()}
SITES = 3
TINY = ("model.name='tiny:llama' train.max-steps=2 train.batch-size=4 train.progress=false "
        "data.max-eval-examples=8 data.max-length=64 num-server-rounds=2 ")
NO_EVAL = "strategy.fraction-evaluate=0.0 "


@pytest.fixture(scope="module", params=sorted(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def deployment(mode, tmp_path_factory):
    setup = MODES[mode]
    configs = [f"partition-id={i} num-partitions={SITES} {setup.node_config}".strip()
               for i in range(SITES)]
    dep = LoopbackDeployment(tmp_path_factory.mktemp(f"deploy-{mode}"), num_sites=SITES,
                             node_configs=configs)
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()
    assert dep.running_pids() == [], "a deployment process outlived the test"


def _cfg(mode: str, results: Path, extra: str = "") -> str:
    return (f"{TINY}strategy.name='{mode}' {MODES[mode].run_config} "
            f"results.dir='{results}' {extra}")


def _metrics(results: Path) -> list[dict]:
    path = results / "latest" / "metrics.json"
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _checkpoint(results: Path, rnd: int) -> bool:
    return (results / "latest" / "checkpoints" / f"round-{rnd:04d}.safetensors").exists()


def _adapter(results: Path) -> dict[str, np.ndarray]:
    return load_file(str((results / "latest").resolve() / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"tensor {k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(deployment, mode, tmp_path_factory):
    """An uninterrupted 2-round run: the baseline the resumed runs must match bit for bit.

    Federated evaluation is off here (it never changes the adapter; the resumed run of
    test_resume_after_the_serverapp_is_killed... exercises it), to keep the suite short.
    """
    results = tmp_path_factory.mktemp(f"ref-{mode}")
    out = deployment.run(_cfg(mode, results, NO_EVAL + "strategy.min-available-nodes=3"),
                         timeout=900)
    return out, results


def test_rounds_run_over_tls_with_registered_supernodes(deployment, reference):
    out, results = reference
    assert out.run_id is not None, out.output[-3000:]
    assert "[round 2/2]" in out.output, out.output[-3000:]
    rounds = _metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["replies"] == SITES and r["failures"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and np.isfinite(r["train_loss"])
    assert (results / "latest" / "adapter" / "adapter_model.safetensors").exists()
    # Every site is the node its key was registered as; the SuperLink speaks HTTPS only.
    status = deployment.node_status()
    assert {s.node_id for s in deployment.sites} == set(status)
    assert set(status.values()) == {"online"}
    assert "Uvicorn running on https://" in deployment.superlink.log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{deployment.address}/health", timeout=5).raise_for_status()


def test_an_unregistered_supernode_is_rejected(deployment):
    site = deployment.unregistered_site()
    mp = deployment.start_site(site, extra_args=["--max-retries", "0"])
    code = mp.wait(120)
    assert code is not None and code != 0, "an unregistered SuperNode must not stay connected"
    assert "Failed to activate SuperNode" in mp.log.read_text()
    assert "No SuperNode found with the given public key" in deployment.superlink.log.read_text()
    assert set(deployment.node_status()) == {s.node_id for s in deployment.sites}


def test_resume_after_a_serverapp_crash_then_a_superlink_crash_matches_the_uninterrupted_run(
        deployment, reference, mode, tmp_path):
    cfg = _cfg(mode, tmp_path, NO_EVAL + "strategy.min-available-nodes=3")

    # 1. The ServerApp dies right after round 1 (its checkpoint is on disk).
    crashed = deployment.run(cfg, until=lambda _: _checkpoint(tmp_path, 1))
    apps = deployment.serverapp_processes()
    assert apps, "the ServerApp was not running after round 1"
    for p in apps:
        p.kill()
    deployment.kill_tree(crashed.process)  # the `flwr run --stream` log streamer
    deployment.stop_run(crashed.run_id)
    assert not _checkpoint(tmp_path, 2)

    # 2. The resumed run starts round 2; then the whole SuperLink dies (SuperLink, SuperExec and
    #    ServerApp, SIGKILL) with its messages in flight, and restarts on the same --database.
    resumed = deployment.run(cfg + " resume=true",
                             until=lambda mp: "configure_train" in mp.log.read_text())
    assert "resuming run" in resumed.output and "after round 1" in resumed.output, \
        resumed.output[-3000:]
    deployment.kill_superlink()
    deployment.kill_tree(resumed.process)
    assert not _checkpoint(tmp_path, 2)
    deployment.start_superlink()
    # The registrations survived in the database; the SuperNodes reconnect by themselves.
    assert set(deployment.node_status()) == {s.node_id for s in deployment.sites}
    assert all(s.process.alive() for s in deployment.sites)

    # 3. Resume again, with federated evaluation on: it must not change what is trained.
    final = deployment.run(cfg.replace(NO_EVAL, "") + " resume=true")
    assert "after round 1" in final.output and "[round 2/2]" in final.output, \
        final.output[-3000:]
    rounds = _metrics(tmp_path)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["replies"] == SITES and rounds[-1]["failures"] == 0
    assert rounds[-1]["eval_loss"] is not None and np.isfinite(rounds[-1]["eval_loss"])
    _assert_same_adapter(_adapter(reference[1]), _adapter(tmp_path))


def test_a_supernode_killed_mid_round_is_dropped_then_rejoins_and_catches_up(
        deployment, mode, tmp_path):
    victim = deployment.sites[2]
    cfg = _cfg(mode, tmp_path, NO_EVAL + "strategy.min-available-nodes=2 "
               "strategy.min-train-nodes=2 strategy.round-timeout=300.0").replace(
        "num-server-rounds=2", "num-server-rounds=3")
    state = {"killed_at": None, "rejoined_as": None}

    def step(_streamer) -> bool:
        if state["killed_at"] is None and deployment.clientapp_processes(victim.index):
            deployment.kill_site(victim.index)  # mid-round: its ClientApp is training
            state["killed_at"] = time.time()
        elif state["killed_at"] and state["rejoined_as"] is None and len(_metrics(tmp_path)) >= 2:
            deployment.start_site(victim)  # round 1 is over: the site comes back
            state["rejoined_as"] = deployment.wait_site_online(victim)
        return False

    out = deployment.run(cfg, until=step)
    assert state["killed_at"] is not None and state["rejoined_as"] == victim.node_id
    rounds = {r["round"]: r for r in _metrics(tmp_path)}
    assert sorted(rounds) == [0, 1, 2, 3], out.output[-3000:]
    # Round 1 completes with the two others, without waiting for strategy.round-timeout: the
    # SuperLink answers for the dead node once its heartbeats stop (2 x 30 s).
    assert rounds[1]["replies"] == 2 and rounds[1]["failures"] == 1
    assert rounds[1]["seconds"] < 300
    assert f"silo node {victim.node_id} failed train in round 1" in out.output
    # Round 2 does not even ask the dead node; round 3 includes it again with the new adapter.
    assert rounds[2]["replies"] == 2 and rounds[2]["failures"] == 0
    assert rounds[3]["replies"] == 3 and rounds[3]["failures"] == 0
    assert "Sampled 2 nodes (out of 2)" in out.output and "Sampled 3 nodes (out of 3)" in out.output
