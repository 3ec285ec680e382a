"""Record-level DP, measured: final eval loss and membership-inference AUC at epsilon = inf, 8, 3, 1.

For each mode (fedavg, shield) and each target epsilon, one real Flower simulation
(``dp.level='record'``, the noise multiplier computed from ``dp.epsilon`` for the planned rounds;
``inf`` is ``dp.level='none'``). Then the audit's final-model membership inference
(:func:`fedshield_flwr.audit.membership.reference_auc`: reference-model attack, the public base as
reference) against the exported adapter: members are rows silo 0 actually drew in training
(recomputed from its seeds), non-members its held-out rows.

Writes ``benchmarks/results/dp.json`` as ``{"record": {mode: {eps: {"epsilon", "eval_loss",
"mia_auc", ...}}}, "client": ...}``; a ``client`` key already there (client-level DP, filled by
another script) is kept. ``epsilon`` is the largest any silo spent (``dp_epsilon`` of the last
round of metrics.json), None at ``inf``.

    PYTHONPATH=. .venv/bin/python benchmarks/dp.py             # the demo: SmolLM2-135M, 3 silos, 3 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/dp.py --quick     # tiny:llama, 2 silos, a smoke run
    PYTHONPATH=. .venv/bin/python benchmarks/dp.py --modes fedavg --epsilons inf,8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402

QUICK = ("model.name='tiny:llama' data.max-length=64 train.max-steps=3 train.batch-size=4 "
         "data.max-eval-examples=16")


def drawn_rows(cfg, n_rows: int, partition_id: int, rounds: int) -> list[int]:
    """The rows a silo's training drew over ``rounds`` (same seeds as ``silo.train_round``)."""
    from fedshield_flwr.dp.record import plan_record_dp, poisson_batches
    from fedshield_flwr.train import batch_schedule

    t = cfg.train
    seen: set[int] = set()
    for r in range(1, rounds + 1):
        seed = t.seed + 1000 * r + partition_id
        if cfg.dp.level == "record":
            q = plan_record_dp(cfg.dp, t, n_rows, cfg.num_server_rounds).sample_rate
            batches = poisson_batches(n_rows, q, t.max_steps, seed)
        else:
            batches = batch_schedule(n_rows, t.batch_size,
                                     t.max_steps * t.gradient_accumulation_steps, seed)
        seen.update(i for b in batches for i in b)
    return sorted(seen)


def final_mia(cfg, run_dir: Path, silos: int, rounds: int, mia_rows: int) -> dict:
    from peft import PeftModel

    from fedshield_flwr.audit.membership import reference_auc
    from fedshield_flwr.config import NodeSettings
    from fedshield_flwr.data import load_silo_data
    from fedshield_flwr.models import load_base_model, load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    data = load_silo_data(cfg.data, NodeSettings(partition_id=0, num_partitions=silos), tok,
                          cfg.train.seed)
    idx = drawn_rows(cfg, len(data.train), 0, rounds)
    n = min(mia_rows, len(idx), len(data.eval))
    members = [data.train[i] for i in idx[:n]]
    nonmembers = list(data.eval[:n])
    model = PeftModel.from_pretrained(load_base_model(cfg.model.name), str(run_dir / "adapter"))
    reference = load_base_model(cfg.model.name)
    value = reference_auc(model, reference, tok, members, nonmembers,
                          max_length=cfg.data.max_length)
    return {"mia_auc": value, "mia_members": n, "mia_nonmembers": n}


def one_run(link, work: Path, base: str, mode: str, eps: str, silos: int, rounds: int,
            mia_rows: int) -> dict:
    from fedshield_flwr.audit.run import run_config

    dp = "dp.level='none'" if eps == "inf" else f"dp.level='record' dp.epsilon={float(eps)}"
    res = work / f"{mode}-{eps}"
    overrides = (f"{base} strategy.name='{mode}' num-server-rounds={rounds} train.progress=false "
                 f"{dp}")
    t0 = time.time()
    out = link.flwr_run(f"{overrides} results.dir='{res}'", num_supernodes=silos,
                        timeout=3600)
    seconds = time.time() - t0
    metrics = res / "latest" / "metrics.json"
    if out.returncode != 0 or not metrics.exists():
        raise RuntimeError(f"{mode} eps={eps}: the run failed:\n{out.stdout[-3000:]}"
                           f"\n{out.stderr[-3000:]}")
    doc = json.loads(metrics.read_text())
    if doc.get("status") != "completed":
        raise RuntimeError(f"{mode} eps={eps}: run {doc.get('status')}: {doc.get('error')}")
    last = doc["rounds"][-1]
    cfg = run_config(overrides.split())
    row = {"epsilon": last.get("dp_epsilon"), "eval_loss": last["eval_loss"],
           "eval_loss_round0": doc["rounds"][0]["eval_loss"],
           "noise_multiplier": last.get("dp_noise_multiplier"), "rounds": last["round"],
           "run_seconds": seconds,
           **final_mia(cfg, (res / "latest").resolve(), silos, last["round"], mia_rows)}
    print(f"{mode:>7} eps={eps:>4}: spent {row['epsilon']}, eval_loss {row['eval_loss']:.4f}, "
          f"MIA AUC {row['mia_auc']:.3f} ({seconds:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="fedavg,shield")
    p.add_argument("--epsilons", default="inf,8,3,1")
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mia-rows", type=int, default=64)
    p.add_argument("--run-config", default="", help="more k=v overrides, as flwr run")
    p.add_argument("--quick", action="store_true", help="tiny:llama, 2 silos, 2 rounds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp.json"))
    args = p.parse_args(argv)
    base = args.run_config
    if args.quick:
        base, args.silos, args.rounds = f"{QUICK} {base}", 2, 2
    out_path = Path(args.out)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {}
    record = doc.setdefault("record", {})
    work = Path(tempfile.mkdtemp(prefix="fedshield-dp-bench-"))
    link = LocalSimulationSuperLink(work / "flwr-home").start()
    t0 = time.time()

    def write() -> None:  # after every run: a stopped benchmark keeps what it measured
        latest = json.loads(out_path.read_text()) if out_path.exists() else {}
        doc["client"] = latest.get("client", doc.get("client", {}))  # another script's key
        doc["record_setup"] = {
            "quick": args.quick, "silos": args.silos, "rounds": args.rounds,
            "run_config": base.strip() or "pyproject.toml defaults (the demo)",
            "command": " ".join(["benchmarks/dp.py", *(argv or sys.argv[1:])]),
            "wall_s": time.time() - t0}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=2) + "\n")

    try:
        for mode in args.modes.split(","):
            for eps in args.epsilons.split(","):
                record.setdefault(mode, {})[eps] = one_run(link, work, base, mode, eps,
                                                           args.silos, args.rounds,
                                                           args.mia_rows)
                write()
    finally:
        link.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'mode':>7} {'target':>6} {'spent':>7} {'eval_loss':>9} {'MIA AUC':>7}")
    for mode, cols in record.items():
        for eps, r in cols.items():
            spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            print(f"{mode:>7} {eps:>6} {spent:>7} {r['eval_loss']:9.4f} {r['mia_auc']:7.3f}")
    print(f"wrote {out_path}")
    return doc


if __name__ == "__main__":
    main()
