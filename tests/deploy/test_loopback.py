"""A real deployment on loopback: every mode, TLS, SuperNode authentication, resume, dropout.

``flower-superlink`` (HTTPS, ``--enable-supernode-auth``, ``--database``) and two
``flower-supernode`` processes with registered keys, ClientApps in ``subprocess`` isolation (one
fresh process per message), ``flwr run . <connection> --stream`` from the CLI with its own
``FLWR_HOME``. Every process is started and stopped by PID (see ``fedshield_flwr/deploy.py``).

One deployment (one SuperLink, two SuperNodes: a third would add a third of every round's
ClientApp work on CI's two cores and no code path) serves the whole module, as one federation
serves many runs: every site's ``--node-config`` carries what any mode needs (its shield keyset,
where it exports), and each mode's run brings its own run config. ``fedavg`` runs two rounds
(the reference of the resume test); every other mode in ``MODES`` runs one round (with federated
evaluation unless its run config turns it off) and its own checks. The crash tests (resume
after a ServerApp and a SuperLink crash, a SuperNode dying mid-round) run ``fedavg`` only:
their machinery is Flower's and the app's checkpointing, the same for every mode, and each
costs minutes here.

A mode becomes part of the deployment test with one line in ``MODES``.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.harness.deploy import LoopbackDeployment, RunOutcome
from tests.harness.localsim import BIN, free_port

pytestmark = pytest.mark.slow

SITES = 2
TINY = ("model.name='tiny:llama' train.max-steps=2 train.batch-size=4 train.progress=false "
        "data.max-eval-examples=8 data.max-length=64 num-server-rounds=2 ")
NO_EVAL = "strategy.fraction-evaluate=0.0 "
ALL_SITES = f"strategy.min-available-nodes={SITES} "
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class OneRound:
    """A finished one-round run of a mode on the deployment, for the mode's own checks."""

    out: RunOutcome
    results: Path    # results.dir of the run (the ServerApp's side)
    facts: dict      # what the run config and node configs were filled in with

    @property
    def run_dir(self) -> Path:
        return (self.results / "latest").resolve()

    def rounds(self) -> list[dict]:
        return _metrics(self.results)

    def checkpoint(self, rnd: int = 1) -> dict[str, np.ndarray]:
        return load_file(str(self.run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors"))

    def site_export(self, index: int) -> Path:
        return Path(self.facts["exports"]) / f"site-{index}"


@dataclass(frozen=True)
class ModeSetup:
    """What a mode needs on top of ``TINY`` in this deployment.

    ``run_config`` and ``node_config`` may name facts of the deployment, filled in with
    ``str.format``: ``{keys}`` (the directory ``fedshield keys init`` wrote), ``{exports}``
    (where sites export adapters) and ``{caches}`` (parent of the sites' caches) in both; ``{site}`` (the site's index) in ``node_config``;
    ``{ca}``, ``{cert}``, ``{key}`` (the deployment's TLS files) and ``{port}`` (a free port the
    test owns, for a listener the ServerApp opens) in ``run_config``. Every site's node config
    holds every mode's ``node_config`` (one deployment serves all modes). ``check(run)`` adds
    the mode's own assertions to the common ones of :func:`test_one_round_of_each_mode...`.
    """

    run_config: str = ""
    node_config: str = ""
    check: Callable[[OneRound], None] | None = None


def _check_shield(run: OneRound) -> None:
    """The ServerApp holds ciphertexts only; every silo decrypts and exports the same adapter."""
    from fedshield_flwr.shield import AggregateLog, ServerKeyset

    ckpt = run.checkpoint(1)
    assert list(ckpt) == ["aggregate-log"] and ckpt["aggregate-log"].dtype == np.uint8
    # The checkpoint is a valid encrypted log under the provisioned keyset (public part only).
    server_key = ServerKeyset.load(Path(run.facts["keys"]) / "shield-server.key")
    assert AggregateLog.from_bytes(server_key, ckpt["aggregate-log"].tobytes()).latest_round == 1
    # No plaintext tensor anywhere in the server's results: no adapter, no float checkpoint.
    assert not (run.run_dir / "adapter").exists()
    for path in run.run_dir.rglob("*.safetensors"):
        assert all(v.dtype == np.uint8 for v in load_file(str(path)).values()), path
    # The ServerApp loaded the provisioned server file (no per-run keys: shield.auto-keys=false).
    assert f"server keyset {server_key.key_id} loaded (public material only)" in run.out.output
    # Each site exported the final global adapter it decrypted; they all hold the same one.
    exports = [load_file(str(run.site_export(i) / ADAPTER_FILE)) for i in range(SITES)]
    first = exports[0]
    assert first and all(k.endswith(".weight") and "lora_" in k for k in first)
    for other in exports[1:]:
        _assert_same_adapter(first, other)
    # LoRA B starts at zero on every silo: non-zero means round 1's aggregate was applied.
    assert any(np.abs(v).max() > 0 for k, v in first.items() if "lora_B" in k)


def _check_split(run: OneRound) -> None:
    """The middle trained through the relay (TLS, the test's port); head + tail were averaged."""
    r = run.rounds()[1]
    assert f"silos dial 127.0.0.1:{run.facts['port']} (TLS)" in run.out.output, \
        run.out.output[-3000:]
    assert "split: relay stopped" in run.out.output
    assert r["relay_silo_steps"] == SITES * 2  # every silo x train.max-steps=2, all via the relay
    assert r["relay_rejected_auth"] == 0 and r["relay_rejected_frames"] == 0
    assert r["relay_bytes_up"] > 0 and r["relay_bytes_down"] > 0
    ckpt = run.checkpoint(1)
    silo = {k[len("silo/"):]: v for k, v in ckpt.items() if k.startswith("silo/")}
    middle = {k[len("middle/"):]: v for k, v in ckpt.items() if k.startswith("middle/")}
    assert silo and middle and len(silo) + len(middle) == len(ckpt)
    assert all(np.all(np.isfinite(v)) for v in ckpt.values())
    # The aggregate of the silos' head + tail adapters (B is zero at init: it moved), and the
    # middle adapter the relay trained.
    assert any(np.abs(v).max() > 0 for k, v in silo.items() if "lora_B" in k)
    assert any(np.abs(v).max() > 0 for k, v in middle.items() if "lora_B" in k)
    exported = load_file(str(run.run_dir / "adapter" / ADAPTER_FILE))
    assert exported.keys() == silo.keys() | middle.keys()


def _check_lpp(run: OneRound) -> None:
    """The quantized base went down once per site with round 1; the server kept fp32."""
    from fedshield_flwr.lpp.package import load_or_build_package
    from fedshield_flwr.lpp.settings import LppSettings

    # the ServerApp built it (default lpp.* settings) in the shared test cache
    pkg = load_or_build_package("tiny:llama", LppSettings().base_spec())
    r0, r1 = run.rounds()
    assert r0["bytes_down"] == 0  # no federated evaluation: round 1 is the first contact
    assert r1["bytes_down"] > SITES * pkg.nbytes  # each site received the package once
    assert f"0 of {SITES} asked silos hold base {pkg.content_hash[:12]}" in run.out.output
    for r in (r0, r1):  # the IP margin, measured on the server every round
        assert math.isfinite(r["server_eval_loss"]) and math.isfinite(r["proxy_eval_loss"])
    ckpt = run.checkpoint(1)
    assert ckpt and all(v.dtype == np.float32 for v in ckpt.values())
    assert (run.run_dir / "adapter" / ADAPTER_FILE).exists()


MODES = {
    "fedavg": ModeSetup(),
    "lpp": ModeSetup(run_config=NO_EVAL + "lpp.eval-partitions=2",
                     node_config="cache-dir='{caches}/site-{site}'",  # each site its own disk
                     check=_check_lpp),
    "shield": ModeSetup(
        run_config="shield.auto-keys=false shield.server-key='{keys}/shield-server.key'",
        node_config="shield-key='{keys}/shield-silo.key' export-dir='{exports}/site-{site}'",
        check=_check_shield),
    "split": ModeSetup(  # evaluation through the relay: tests/test_simulation.py (saves ~40 s)
        run_config=NO_EVAL + "split.relay-host='127.0.0.1' split.relay-bind='127.0.0.1' "
                   "split.relay-port={port} split.relay-ca-cert='{ca}' "
                   "split.relay-server-cert='{cert}' split.relay-server-key='{key}'",
        check=_check_split),
}
# fedavg's two-round reference run (test_rounds_run_over_tls...) is its round over the deployment.
ONE_ROUND_MODES = sorted(m for m in MODES if m != "fedavg")


@pytest.fixture(scope="module")
def shield_keys(tmp_path_factory) -> Path:
    """A shield keyset provisioned as an operator does: ``fedshield keys init --out DIR``."""
    out = tmp_path_factory.mktemp("shield-keys")
    done = subprocess.run([str(BIN / "fedshield"), "keys", "init", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "shield-silo.key").exists() and (out / "shield-server.key").exists()
    return out


@pytest.fixture(scope="module")
def facts(shield_keys, tmp_path_factory) -> dict:
    """Deployment facts the modes' configs name (TLS paths are added by ``deployment``)."""
    return {"keys": str(shield_keys), "exports": str(tmp_path_factory.mktemp("site-exports")),
            "caches": str(tmp_path_factory.mktemp("site-caches"))}


@pytest.fixture(scope="module")
def deployment(facts, tmp_path_factory):
    extra = " ".join(m.node_config for m in MODES.values() if m.node_config)
    configs = [f"partition-id={i} num-partitions={SITES} {extra}".format(site=i, **facts).strip()
               for i in range(SITES)]
    dep = LoopbackDeployment(tmp_path_factory.mktemp("deploy"), num_sites=SITES,
                             node_configs=configs)
    try:
        dep.start()
        assert dep.certs is not None
        facts.update(ca=dep.certs.ca_cert, cert=dep.certs.server_cert, key=dep.certs.server_key)
        yield dep
    finally:
        dep.stop()
    assert dep.running_pids() == [], "a deployment process outlived the test"


def _cfg(mode: str, results: Path, extra: str = "", facts: dict | None = None) -> str:
    mode_cfg = MODES[mode].run_config.format(**(facts or {}))
    return f"{TINY}strategy.name='{mode}' {mode_cfg} results.dir='{results}' {extra}"


def _metrics(results: Path) -> list[dict]:
    path = results / "latest" / "metrics.json"
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _checkpoint(results: Path, rnd: int) -> bool:
    return (results / "latest" / "checkpoints" / f"round-{rnd:04d}.safetensors").exists()


def _adapter(results: Path) -> dict[str, np.ndarray]:
    return load_file(str((results / "latest").resolve() / "adapter" / ADAPTER_FILE))


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"tensor {k} differs"


@pytest.fixture(scope="module")
def reference(deployment, tmp_path_factory):
    """An uninterrupted 2-round fedavg run: the baseline the resumed runs must match bit for bit.

    Federated evaluation is off here (it never changes the adapter; the resumed run of
    test_resume_after_the_serverapp_is_killed... exercises it), to keep the suite short.
    """
    results = tmp_path_factory.mktemp("ref-fedavg")
    out = deployment.run(_cfg("fedavg", results, NO_EVAL + ALL_SITES), timeout=900)
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
    assert (results / "latest" / "adapter" / ADAPTER_FILE).exists()
    # Every site is the node its key was registered as; the SuperLink speaks HTTPS only.
    status = deployment.node_status()
    assert {s.node_id for s in deployment.sites} == set(status)
    assert set(status.values()) == {"online"}
    assert "Uvicorn running on https://" in deployment.superlink.log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{deployment.address}/health", timeout=5).raise_for_status()


@pytest.mark.parametrize("mode", ONE_ROUND_MODES)
def test_one_round_of_each_mode_completes_on_the_deployment(deployment, facts, mode, tmp_path):
    run_facts = dict(facts, port=free_port())
    cfg = _cfg(mode, tmp_path, ALL_SITES, run_facts).replace(
        "num-server-rounds=2", "num-server-rounds=1")
    out = deployment.run(cfg, timeout=900)
    assert out.run_id is not None and "[round 1/1]" in out.output, out.output[-3000:]
    rounds = _metrics(tmp_path)
    assert [r["round"] for r in rounds] == [0, 1], out.output[-3000:]
    r = rounds[1]
    assert r["replies"] == SITES and r["failures"] == 0, out.output[-3000:]
    assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
    if NO_EVAL not in cfg:
        assert r["eval_loss"] is not None and math.isfinite(r["eval_loss"])
    assert _checkpoint(tmp_path, 1)
    if MODES[mode].check is not None:
        MODES[mode].check(OneRound(out, tmp_path, run_facts))


def test_an_unregistered_supernode_is_rejected(deployment):
    site = deployment.unregistered_site()
    mp = deployment.start_site(site, extra_args=["--max-retries", "0"])
    code = mp.wait(120)
    assert code is not None and code != 0, "an unregistered SuperNode must not stay connected"
    assert "Failed to activate SuperNode" in mp.log.read_text()
    assert "No SuperNode found with the given public key" in deployment.superlink.log.read_text()
    assert set(deployment.node_status()) == {s.node_id for s in deployment.sites}


def test_resume_after_a_serverapp_crash_then_a_superlink_crash_matches_the_uninterrupted_run(
        deployment, reference, tmp_path):
    cfg = _cfg("fedavg", tmp_path, NO_EVAL + ALL_SITES)

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
        deployment, tmp_path):
    victim = deployment.sites[-1]
    cfg = _cfg("fedavg", tmp_path, NO_EVAL + f"strategy.min-available-nodes={SITES - 1} "
               f"strategy.min-train-nodes={SITES - 1} strategy.round-timeout=300.0").replace(
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
    # Round 1 completes with the others, without waiting for strategy.round-timeout: the
    # SuperLink answers for the dead node once its heartbeats stop (2 x 30 s).
    assert rounds[1]["replies"] == SITES - 1 and rounds[1]["failures"] == 1
    assert rounds[1]["seconds"] < 300
    assert f"silo node {victim.node_id} failed train in round 1" in out.output
    # Round 2 does not even ask the dead node; round 3 includes it again with the new adapter.
    assert rounds[2]["replies"] == SITES - 1 and rounds[2]["failures"] == 0
    assert rounds[3]["replies"] == SITES and rounds[3]["failures"] == 0
    assert (f"Sampled {SITES - 1} nodes (out of {SITES - 1})" in out.output
            and f"Sampled {SITES} nodes (out of {SITES})" in out.output)
