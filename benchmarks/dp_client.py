"""Client-level DP on a many-silo federation: epsilon and final eval loss against non-private.

Runs ``flwr run`` as a local simulation with ``--silos`` silos (16: the issue's setting) on a
tiny model, once without DP and once per mode with ``dp.level='client'`` (fedavg: clipped,
uniform, noised mean on the server; shield: every silo clips and adds its noise share before
encryption), with the same seed, data and sampling. The federation epsilon is the one the
server wrote into the last round's metrics (Opacus RDP, q = strategy.fraction-train).

    PYTHONPATH=. .venv/bin/python benchmarks/dp_client.py            # 16 silos, 5 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/dp_client.py --quick    # 16 silos, 3 rounds, fedavg

Merges ``{"client": {...}}`` into ``benchmarks/results/dp.json`` (the record-level part of that
file is ``benchmarks/dp.py``'s) and prints the table.
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


def _run(link, common: str, extra: str, res_dir: Path, silos: int) -> dict:
    t0 = time.time()
    proc = link.flwr_run(f"{common} {extra} results.dir='{res_dir}'", num_supernodes=silos,
                         timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({extra}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    doc = json.loads(((res_dir / "latest").resolve() / "metrics.json").read_text())
    if doc.get("status") != "completed":
        raise SystemExit(f"run did not complete ({extra}): {doc.get('error')}")
    rounds = doc["rounds"]
    return {"eval_loss": rounds[-1]["eval_loss"],
            "eval_loss_per_round": [r["eval_loss"] for r in rounds],
            "epsilon": rounds[-1].get("dp_epsilon", float("inf")),
            "epsilon_per_round": [r.get("dp_epsilon") for r in rounds[1:]],
            "noise_multiplier": rounds[-1].get("dp_noise_multiplier"),
            "delta": rounds[-1].get("dp_delta"),
            "replies_per_round": [r["replies"] for r in rounds[1:]],
            "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--silos", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fraction-train", type=float, default=0.25)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--clip", type=float, default=0.1, help="dp.max-grad-norm (per update)")
    p.add_argument("--steps", type=int, default=4, help="train.max-steps per silo and round")
    p.add_argument("--modes", default="fedavg,shield")
    p.add_argument("--model", default="tiny:llama")
    p.add_argument("--quick", action="store_true", help="3 rounds, fedavg only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.modes = 3, "fedavg"

    common = (f"model.name='{args.model}' num-server-rounds={args.rounds} "
              f"train.max-steps={args.steps} train.batch-size=4 train.progress=false "
              f"data.max-eval-examples=8 data.max-length=64 "
              f"strategy.fraction-train={args.fraction_train} strategy.min-train-nodes=1")
    dp = f"dp.level='client' dp.epsilon={args.epsilon} dp.max-grad-norm={args.clip}"
    settings = {"silos": args.silos, "rounds": args.rounds, "fraction_train": args.fraction_train,
                "target_epsilon": args.epsilon, "max_grad_norm": args.clip,
                "delta": 1 / args.silos, "train_max_steps": args.steps, "model": args.model}
    out: dict = {"settings": settings}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dp-client-") as tmp:
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            for mode in args.modes.split(","):
                name = f"strategy.name='{mode}'"
                base = _run(link, common, name, Path(tmp) / f"{mode}-nodp", args.silos)
                print(f"  {mode} non-private: eval loss {base['eval_loss']:.4f} "
                      f"({base['wall_s']:.0f} s)", flush=True)
                priv = _run(link, common, f"{name} {dp}", Path(tmp) / f"{mode}-dp", args.silos)
                print(f"  {mode} client DP: eps {priv['epsilon']:.3f}, eval loss "
                      f"{priv['eval_loss']:.4f} ({priv['wall_s']:.0f} s)", flush=True)
                out[mode] = {"epsilon": priv["epsilon"], "eval_loss": priv["eval_loss"],
                             "eval_loss_nonprivate": base["eval_loss"],
                             "details": {"private": priv, "nonprivate": base}}
        finally:
            link.stop()
    out["command"] = " ".join(["benchmarks/dp_client.py", *(argv or sys.argv[1:])])
    out["wall_s"] = round(time.time() - t0, 1)

    print(f"{'mode':<8} {'epsilon':>8} {'sigma':>7} {'eval loss':>10} {'non-private':>12} "
          f"{'delta':>7}")
    for mode in args.modes.split(","):
        r = out[mode]
        print(f"{mode:<8} {r['epsilon']:8.3f} {r['details']['private']['noise_multiplier']:7.3f} "
              f"{r['eval_loss']:10.4f} {r['eval_loss_nonprivate']:12.4f} "
              f"{r['details']['private']['delta']:7.4f}")
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {}
    merged = doc.get("client", {})  # a later run of other --modes keeps the earlier modes
    merged.update(out)
    doc["client"] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path} (key 'client')")
    return out


if __name__ == "__main__":
    main()
