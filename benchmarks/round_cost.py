"""Where a federated round's time and bytes go, for the tiny model and the embedded default.

Runs the real app with ``flwr run`` as a local simulation (our own SuperLink, 2 silos) and reads
what the silos report per round: model load, local training, (de)serialization and evaluation
seconds, plus the payload bytes up/down per silo that the server counted. "transfer + overhead" is
the round's wall time minus the silos' own compute (silos run one after another in simulation),
i.e. Flower's message transport, scheduling and the server's aggregation.

    .venv/bin/python benchmarks/round_cost.py            # both models
    .venv/bin/python benchmarks/round_cost.py --models tiny:llama --rounds 3

Prints a table and writes benchmarks/results/round_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402


def run_model(link: LocalSimulationSuperLink, model: str, args, out_dir: Path) -> list[dict]:
    results = out_dir / model.replace(":", "-")
    cfg = (f"model.name='{model}' num-server-rounds={args.rounds} train.max-steps={args.steps} "
           f"train.batch-size={args.batch_size} train.progress=false "
           f"data.max-eval-examples={args.eval_examples} results.dir='{results}'")
    t0 = time.time()
    proc = link.flwr_run(cfg, num_supernodes=args.silos, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"flwr run failed for {model}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = time.time() - t0
    doc = json.loads(((results / "latest").resolve() / "metrics.json").read_text())
    rows = []
    for r in doc["rounds"]:
        if r["round"] == 0:
            continue
        n = args.silos
        load = (r.get("silo_load_seconds") or 0.0) + (r.get("silo_eval_load_seconds") or 0.0)
        train = r.get("silo_train_seconds") or 0.0
        ser = r.get("silo_serialize_seconds") or 0.0
        ev = r.get("silo_eval_seconds") or 0.0
        compute = n * (load + train + ser + ev)
        rows.append({
            "model": model, "round": r["round"], "round_seconds": r["seconds"],
            "load_seconds_per_silo": load, "train_seconds_per_silo": train,
            "serialize_seconds_per_silo": ser, "eval_seconds_per_silo": ev,
            "transfer_and_overhead_seconds": max(r["seconds"] - compute, 0.0),
            "bytes_up_per_silo": r["bytes_up"] // n, "bytes_down_per_silo": r["bytes_down"] // n,
            "train_loss": r["train_loss"], "eval_loss": r["eval_loss"],
        })
    print(f"  {model}: {len(rows)} rounds, flwr run wall {wall:.0f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny:llama,embedded:smollm2-135m-instruct")
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "round_cost.json"))
    args = p.parse_args()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="round-cost-") as tmp:
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            for model in args.models.split(","):
                rows += run_model(link, model.strip(), args, Path(tmp))
        finally:
            link.stop()

    hdr = (f"{'model':<32} {'rnd':>3} {'round s':>8} {'load s':>7} {'train s':>8} {'ser s':>7} "
           f"{'eval s':>7} {'xfer+ovh s':>10} {'up/silo':>10} {'down/silo':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<32} {r['round']:>3} {r['round_seconds']:8.1f} "
              f"{r['load_seconds_per_silo']:7.2f} {r['train_seconds_per_silo']:8.2f} "
              f"{r['serialize_seconds_per_silo']:7.3f} {r['eval_seconds_per_silo']:7.2f} "
              f"{r['transfer_and_overhead_seconds']:10.1f} {r['bytes_up_per_silo']:>10,} "
              f"{r['bytes_down_per_silo']:>10,}")
    doc = {
        "benchmark": "round_cost",
        "settings": vars(args),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "rounds": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
