"""Does encryption or pruning cost quality? fedavg vs shield-dense vs shield-p75 on the demo.

Runs the demo setup (3 silos, the embedded SmolLM2-135M-Instruct, chatterbot Q/A, same seed and
rounds as ``make demo``) three times with ``flwr run`` as a local simulation and compares the
final held-out eval loss. Dense shield computes the same weighted mean as fedavg (the CKKS error
is ~1e-8); pruned shield sends 25% of the update blocks per round and keeps the rest as a residual
(error feedback), so part of each update arrives a round or more later. Its mask is the
prioritized round robin of ``fedshield_flwr.shield.pruning`` (LoRA-B blocks are sent
``shield.prune-lead-weight`` times as often as the rest); silos train from the global adapter
plus their own residual and the last round sends every block (``shield.local-residual``,
``shield.flush-final-round``). The JSON records every ``shield.*`` setting of each run.

    .venv/bin/python benchmarks/shield_quality.py                 # the demo setup
    .venv/bin/python benchmarks/shield_quality.py --model tiny:llama --rounds 3   # quick check
    .venv/bin/python benchmarks/shield_quality.py --schemes shield-p75-noflush,shield-p75-nolocal \
        --out benchmarks/results/shield_quality_ablation.json      # what each rule contributes

Prints a table and writes benchmarks/results/shield_quality.json =
{"fedavg": loss, "shield-dense": loss, "shield-p75": loss, "details": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402

SCHEMES = {
    "fedavg": "strategy.name='fedavg'",
    "shield-dense": "strategy.name='shield' shield.prune-ratio=0.0",
    "shield-p75": "strategy.name='shield' shield.prune-ratio=0.75",
    # ablations of shield-p75 (not run by default): without the last round's flush, without
    # training from global + own residual, without both (plain error feedback)
    "shield-p75-noflush": "strategy.name='shield' shield.prune-ratio=0.75 "
                          "shield.flush-final-round=false",
    "shield-p75-nolocal": "strategy.name='shield' shield.prune-ratio=0.75 "
                          "shield.local-residual=false",
    "shield-p75-plain-ef": "strategy.name='shield' shield.prune-ratio=0.75 "
                           "shield.flush-final-round=false shield.local-residual=false",
}
DEFAULT_SCHEMES = "fedavg,shield-dense,shield-p75"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: the demo's model (pyproject)")
    p.add_argument("--rounds", type=int, default=0, help="default: the demo's rounds (pyproject)")
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--extra", default="", help="extra --run-config entries for every scheme")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES,
                   help=f"comma-separated, of {', '.join(SCHEMES)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shield_quality.json"))
    args = p.parse_args()

    common = "train.progress=false"
    if args.model:
        common += f" model.name='{args.model}'"
    if args.rounds:
        common += f" num-server-rounds={args.rounds}"
    common += f" {args.extra}"
    result: dict = {"details": {}}
    with tempfile.TemporaryDirectory(prefix="shield-quality-") as tmp:
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            for name in args.schemes.split(","):
                res_dir = Path(tmp) / name
                t0 = time.time()
                proc = link.flwr_run(f"{common} {SCHEMES[name]} results.dir='{res_dir}'",
                                     num_supernodes=args.silos, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
                doc = json.loads(((res_dir / "latest").resolve() / "metrics.json").read_text())
                rounds = doc["rounds"]
                result[name] = rounds[-1]["eval_loss"]
                result["details"][name] = {
                    "eval_loss_per_round": [r["eval_loss"] for r in rounds],
                    "bytes_up_per_round": [r["bytes_up"] for r in rounds[1:]],
                    "wall_seconds": time.time() - t0,
                    "config": {k: v for k, v in doc["config"].items()
                               if k.startswith(("model.", "strategy.", "shield.", "train."))
                               or k == "num-server-rounds"},
                }
                print(f"  {name}: final eval loss {result[name]:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        finally:
            link.stop()
    base = result.get("fedavg")
    print(f"{'scheme':<20} {'final eval loss':>16} {'vs fedavg':>10} {'uplink bytes/round':>20}")
    for name in args.schemes.split(","):
        rel = "" if base is None else f"{(result[name] - base) / base * 100:+.2f}%"
        up = result["details"][name]["bytes_up_per_round"]
        print(f"{name:<20} {result[name]:16.4f} {rel:>10} {sum(up) / max(len(up), 1):20,.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
