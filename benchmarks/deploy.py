"""Deployment costs: round time (simulation vs loopback deployment), ClientApp start-up, bytes.

Three measurements, all on this machine, with the tiny model by default:

1. Per-message ClientApp start-up. In deployment Flower starts a fresh ``flwr-clientapp``
   process for every message. Each variant runs in fresh processes, interleaved, ``--repeats``
   times (median reported); seconds are from process launch to "ready to train" plus the
   process's own teardown (what a message pays before and after the handler's real work):

   - ``before``: the ClientApp path without this project's start-up work: bitsandbytes imported
     (peft pulls it in), the silo's rows re-read, re-partitioned and re-tokenized with
     ``datasets`` on every message;
   - ``after``: what a deployed ClientApp does now: rows from the on-disk tokenized-data cache
     (warmed by one unmeasured process), bitsandbytes not imported at full precision;
   - ``floor``: only importing Flower's ClientApp module and loading tokenizer + base model from
     the on-disk cache with ``transformers``: the cost no ClientApp can avoid.

2. Wall seconds per round, tiny model, 3 silos, no federated evaluation: ``flwr run`` as a local
   simulation (one long-lived ClientApp process per silo) and on a loopback deployment
   (SuperLink + 3 SuperNodes with TLS and node authentication, one process per message).

3. Bytes per round per silo: the ServerApp's ``metrics.json`` (payload bytes of the records it
   sends and receives) and the SuperLink's own per-run Fleet API traffic counters
   (``flwr list --run-id ... --format json`` -> ``network-traffic``; inbound = from SuperNodes,
   outbound = to SuperNodes), divided by rounds x silos. The SuperLink reports per run, not per
   silo or round.

    .venv/bin/python benchmarks/deploy.py                     # all, tiny model
    .venv/bin/python benchmarks/deploy.py --startup-models tiny:llama,embedded:smollm2-135m-instruct
    .venv/bin/python benchmarks/deploy.py --skip-rounds --repeats 5

Prints tables and writes benchmarks/results/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.deploy import CONNECTION, LoopbackDeployment  # noqa: E402
from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402

# One process of a start-up variant; prints one JSON line with its phases (seconds).
CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    variant, model, partition, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if variant == "after":
        sys.argv[0] = "/venv/bin/flwr-clientapp"  # what a deployed ClientApp process is
    sys.path.insert(0, ROOT)
    import flwr.clientapp  # noqa: F401  (flwr-clientapp imports it before loading the app)
    t_flwr = time.time()
    if variant == "floor":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from fedshield_flwr.models import resolve_model_path
        path = resolve_model_path(model)
        tok = AutoTokenizer.from_pretrained(path)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        t_import = t_model = time.time()
        t_data = t_model
    else:
        import client_app.app  # noqa: F401
        from fedshield_flwr.config import NodeSettings, RunConfig, default_flat_config
        from fedshield_flwr.silo import get_runtime
        flat = default_flat_config()
        flat.update({"model.name": model, "train.progress": False})
        cfg = RunConfig.from_flat(flat)
        node = NodeSettings(partition, partitions)
        t_import = time.time()
        rt = get_runtime(cfg, node)
        t_model = time.time()
        if variant == "before":
            from fedshield_flwr.data import load_silo_data
            load_silo_data(cfg.data, node, rt.tokenizer, cfg.train.seed)
        else:
            rt.silo_data(cfg, node)
        t_data = time.time()
    bnb = sys.modules.get("bitsandbytes", 0)
    print(json.dumps({"flwr_import": t_flwr - t0, "app_import": t_import - t_flwr,
                      "model_load": t_model - t_import, "data": t_data - t_model,
                      "ready": t_data - t0, "datasets_imported": "datasets" in sys.modules,
                      "bitsandbytes_imported": bnb is not None and bnb != 0}))
""")


def startup_once(variant: str, model: str, env: dict) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + CHILD, variant,
                          model, "0", "3"], env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"start-up probe '{variant}' failed:\n{out.stderr[-3000:]}")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["process_seconds"] = wall
    return doc


def measure_startup(models: list[str], repeats: int) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    rows = []
    for model in models:
        startup_once("after", model, env)  # warm the model and tokenized-data caches
        samples: dict[str, list[dict]] = {"before": [], "after": [], "floor": []}
        for _ in range(repeats):  # interleaved, so machine load drifts equally on all variants
            for variant in samples:
                samples[variant].append(startup_once(variant, model, env))
        for variant, runs in samples.items():
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("process_seconds", "ready", "flwr_import", "app_import",
                             "model_load", "data")}
            rows.append({"model": model, "variant": variant, "repeats": repeats, **med,
                         "datasets_imported": runs[-1]["datasets_imported"],
                         "bitsandbytes_imported": runs[-1]["bitsandbytes_imported"],
                         "process_seconds_all": [round(r["process_seconds"], 2) for r in runs]})
            print(f"  start-up {model:32s} {variant:6s} process {med['process_seconds']:6.2f} s "
                  f"(ready {med['ready']:5.2f}: model {med['model_load']:5.2f}, "
                  f"data {med['data']:5.2f})", flush=True)
    return rows


def _round_rows(results: Path, silos: int) -> list[dict]:
    doc = json.loads(((results / "latest").resolve() / "metrics.json").read_text())
    return [r for r in doc["rounds"] if r["round"] > 0 and r.get("replies") == silos]


def run_config(args, results: Path) -> str:
    return (f"model.name='{args.model}' num-server-rounds={args.rounds} "
            f"train.max-steps={args.steps} train.batch-size=4 train.progress=false "
            f"data.max-length=64 strategy.fraction-evaluate=0.0 "
            f"strategy.min-available-nodes={args.silos} results.dir='{results}'")


def measure_rounds(args, work: Path) -> dict:
    out: dict = {}
    # --- simulation
    link = LocalSimulationSuperLink(work / "sim-home").start()
    try:
        res = work / "sim-results"
        t0 = time.time()
        proc = link.flwr_run(run_config(args, res), num_supernodes=args.silos,
                             timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"simulation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rounds = _round_rows(res, args.silos)
        out["simulation"] = {
            "flwr_run_seconds": time.time() - t0,
            "round_seconds": [r["seconds"] for r in rounds],
            "bytes_up_per_silo_per_round_metrics": statistics.mean(
                r["bytes_up"] / args.silos for r in rounds),
            "bytes_down_per_silo_per_round_metrics": statistics.mean(
                r["bytes_down"] / args.silos for r in rounds),
        }
    finally:
        link.stop()
    print(f"  simulation: rounds {out['simulation']['round_seconds']}", flush=True)
    # --- loopback deployment
    dep = LoopbackDeployment(work / "deploy", num_sites=args.silos)
    try:
        t0 = time.time()
        dep.start()
        start_s = time.time() - t0
        res = work / "deploy-results"
        run = dep.run(run_config(args, res), timeout=args.timeout)
        rounds = _round_rows(res, args.silos)
        if len(rounds) != args.rounds:
            raise SystemExit(f"deployment run incomplete:\n{run.output[-3000:]}")
        listing = dep.flwr("list", CONNECTION, "--run-id", str(run.run_id), "--format", "json")
        info = json.loads(listing.stdout[listing.stdout.index("{"):])["runs"][0]
        traffic = info["network-traffic"]
        n = args.rounds * args.silos
        out["deployment"] = {
            "start_seconds": start_s,
            "flwr_run_seconds": run.seconds,
            "round_seconds": [r["seconds"] for r in rounds],
            "silo_load_seconds": [r.get("silo_load_seconds") for r in rounds],
            "bytes_up_per_silo_per_round_metrics": statistics.mean(
                r["bytes_up"] / args.silos for r in rounds),
            "bytes_down_per_silo_per_round_metrics": statistics.mean(
                r["bytes_down"] / args.silos for r in rounds),
            "superlink_traffic": traffic,
            "superlink_compute_time": info.get("compute-time"),
            "bytes_up_per_silo_per_round_superlink": traffic["inbound-bytes"] / n,
            "bytes_down_per_silo_per_round_superlink": traffic["outbound-bytes"] / n,
        }
    finally:
        dep.stop()
    print(f"  deployment: rounds {out['deployment']['round_seconds']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny:llama", help="model of the round measurements")
    p.add_argument("--startup-models", default="tiny:llama",
                   help="comma-separated models of the start-up measurements")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-rounds", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.json"))
    args = p.parse_args()

    doc: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_start": os.getloadavg()},
        "settings": vars(args),
    }
    import flwr
    import torch

    doc["machine"].update({"flwr": flwr.__version__, "torch": torch.__version__})
    with tempfile.TemporaryDirectory(prefix="fedshield-bench-deploy-") as tmp:
        os.environ.setdefault("FEDSHIELD_CACHE", str(Path(tmp) / "cache"))
        if not args.skip_startup:
            print("ClientApp start-up per message (fresh processes):", flush=True)
            doc["startup"] = measure_startup(args.startup_models.split(","), args.repeats)
        if not args.skip_rounds:
            print(f"Rounds ({args.model}, {args.silos} silos, no federated evaluation):",
                  flush=True)
            doc["rounds"] = measure_rounds(args, Path(tmp))
    doc["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
