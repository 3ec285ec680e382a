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

``--sweep`` runs the settings of :data:`SWEEP` instead (fedavg, record level, epsilon 8): each
private run and the non-private run (``dp.level='none'``) it is compared with, the same setting's
(``baseline`` = its own name: a change of rounds or batch) or the demo's (``baseline`` "demo": a
change of learning rate or LoRA shape, judged against the demo's non-private loss as the issue's
target is). It writes ``"record_sweep"`` (a list of ``{"settings", "epsilon", "eval_loss",
"eval_loss_nonprivate", "gap", "mia_auc", ...}``, gap = eval_loss / eval_loss_nonprivate - 1) and
the runs themselves under ``"record_sweep_private"`` and ``"record_sweep_nonprivate"`` (setting
name -> run); the other keys of the file are kept. ``--sweep b32,b32:inf`` runs only those
(``NAME``: the private run, ``NAME:inf``: that setting's non-private run) and merges them into
the runs already in the file.

    PYTHONPATH=. .venv/bin/python benchmarks/dp.py             # the demo: SmolLM2-135M, 3 silos, 3 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/dp.py --quick     # tiny:llama, 2 silos, a smoke run
    PYTHONPATH=. .venv/bin/python benchmarks/dp.py --modes fedavg --epsilons inf,8
    PYTHONPATH=. .venv/bin/python benchmarks/dp.py --sweep     # the record-level sweep at eps 8
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


# The record-level sweep (fedavg, epsilon 8; demo: 3 silos, SmolLM2-135M). ``baseline``: the setting
# whose non-private run (``dp.level='none'``, the same ``rounds`` and ``run_config``) the private
# run is compared with.
SWEEP: list[dict] = [
    {"name": "demo", "rounds": 3, "run_config": "", "baseline": "demo"},
    {"name": "b32", "rounds": 3, "run_config": "train.batch-size=32", "baseline": "b32"},
    {"name": "lr2e-3", "rounds": 3,
     "run_config": "train.learning-rate-max=2e-3 train.learning-rate-min=2e-4", "baseline": "demo"},
    {"name": "r2-qv", "rounds": 3,
     "run_config": "model.lora.r=2 model.lora.alpha=4 model.lora.target-modules='q_proj,v_proj'",
     "baseline": "demo"},
    {"name": "r2-qv-lr2e-3", "rounds": 3,
     "run_config": "model.lora.r=2 model.lora.alpha=4 model.lora.target-modules='q_proj,v_proj' "
                   "train.learning-rate-max=2e-3 train.learning-rate-min=2e-4", "baseline": "demo"},
]
SWEEP_EPSILON = "8"


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
            mia_rows: int, tag: str = "") -> dict:
    from fedshield_flwr.audit.run import run_config

    dp = "dp.level='none'" if eps == "inf" else f"dp.level='record' dp.epsilon={float(eps)}"
    res = work / f"{tag}{mode}-{eps}"
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
    if last.get("eval_loss") is None:  # metrics.json writes a non-finite loss as null
        raise RuntimeError(f"{mode} eps={eps}: no finite final eval loss (round {last['round']}); "
                           f"see {metrics.resolve()}")
    cfg = run_config([overrides])  # one string, as flwr run parses --run-config
    row = {"epsilon": last.get("dp_epsilon"), "eval_loss": last["eval_loss"],
           "eval_loss_round0": doc["rounds"][0]["eval_loss"],
           "noise_multiplier": last.get("dp_noise_multiplier"), "rounds": last["round"],
           "run_seconds": seconds,
           **final_mia(cfg, (res / "latest").resolve(), silos, last["round"], mia_rows)}
    print(f"{mode:>7} eps={eps:>4}: spent {row['epsilon']}, eval_loss {row['eval_loss']:.4f}, "
          f"MIA AUC {row['mia_auc']:.3f} ({seconds:.0f} s)", flush=True)
    return row


def sweep_rows(private: dict, nonprivate: dict) -> list[dict]:
    """The ``record_sweep`` rows: each private run beside its setting's non-private run."""
    by_name = {s["name"]: s for s in SWEEP}
    rows = []
    for name, r in private.items():
        s = by_name[name]
        base = nonprivate.get(s["baseline"], {})
        ref = base.get("eval_loss")
        rows.append({
            "name": name, "settings": {"rounds": s["rounds"], "run_config": s["run_config"]},
            "target_epsilon": float(SWEEP_EPSILON), "epsilon": r["epsilon"],
            "eval_loss": r["eval_loss"], "eval_loss_nonprivate": ref, "baseline": s["baseline"],
            "gap": None if ref is None else r["eval_loss"] / ref - 1.0,
            "mia_auc": r["mia_auc"], "mia_auc_nonprivate": base.get("mia_auc"),
            "noise_multiplier": r["noise_multiplier"], "eval_loss_round0": r["eval_loss_round0"],
            "run_seconds": r["run_seconds"]})
    return rows


def run_sweep(args, argv, out_path: Path, link, work: Path, write_keys) -> None:
    by_name = {s["name"]: s for s in SWEEP}
    if args.sweep == "all":
        picks = [s["name"] for s in SWEEP]
        picks += [f"{b}:inf" for b in dict.fromkeys(s["baseline"] for s in SWEEP)]
        private: dict = {}
        nonprivate: dict = {}
        commands: list[str] = []
        wall = 0.0
    else:
        picks = args.sweep.split(",")
        doc = json.loads(out_path.read_text()) if out_path.exists() else {}
        private = dict(doc.get("record_sweep_private", {}))
        nonprivate = dict(doc.get("record_sweep_nonprivate", {}))
        setup = doc.get("record_sweep_setup", {})  # the earlier --sweep NAME commands
        commands, wall = list(setup.get("commands", [])), float(setup.get("wall_s", 0.0))
    for pick in picks:
        name, _, eps = pick.partition(":")
        if name not in by_name or eps not in ("", "inf"):
            raise SystemExit(f"--sweep: unknown {pick!r} (settings: {', '.join(by_name)}; "
                             "NAME or NAME:inf)")
    t0 = time.time()
    for pick in picks:
        name, _, eps = pick.partition(":")
        s = by_name[name]
        row = one_run(link, work, s["run_config"], "fedavg", eps or SWEEP_EPSILON, args.silos,
                      s["rounds"], args.mia_rows, tag=f"{name}-")
        (nonprivate if eps else private)[name] = row
        write_keys({"record_sweep": sweep_rows(private, nonprivate),
                    "record_sweep_private": private, "record_sweep_nonprivate": nonprivate,
                    "record_sweep_setup": {
                        "mode": "fedavg", "level": "record", "silos": args.silos,
                        "commands": [*commands, " ".join(["benchmarks/dp.py",
                                                          *(argv or sys.argv[1:])])],
                        "wall_s": wall + time.time() - t0}})
    print(f"\n{'setting':>10} {'spent':>6} {'eval_loss':>9} {'non-priv':>8} {'gap':>7} "
          f"{'MIA AUC':>7}")
    for r in sweep_rows(private, nonprivate):
        ref = "-" if r["eval_loss_nonprivate"] is None else f"{r['eval_loss_nonprivate']:.4f}"
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:+.1f}%"
        print(f"{r['name']:>10} {r['epsilon']:6.2f} {r['eval_loss']:9.4f} {ref:>8} {gap:>7} "
              f"{r['mia_auc']:7.3f}")
    print(f"wrote {out_path}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="fedavg,shield")
    p.add_argument("--epsilons", default="inf,8,3,1")
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mia-rows", type=int, default=64)
    p.add_argument("--run-config", default="", help="more k=v overrides, as flwr run")
    p.add_argument("--quick", action="store_true", help="tiny:llama, 2 silos, 2 rounds")
    p.add_argument("--sweep", nargs="?", const="all", default=None,
                   help="run the record-level sweep (SWEEP) instead: all, or NAME,NAME:inf,...")
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

    def write_keys(keys: dict) -> None:  # only this run's keys; the file's others are kept
        latest = json.loads(out_path.read_text()) if out_path.exists() else {}
        latest.update(keys)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(latest, indent=2) + "\n")

    def write() -> None:  # after every run: a stopped benchmark keeps what it measured
        write_keys({"record": record, "record_setup": {
            "quick": args.quick, "silos": args.silos, "rounds": args.rounds,
            "run_config": base.strip() or "pyproject.toml defaults (the demo)",
            "command": " ".join(["benchmarks/dp.py", *(argv or sys.argv[1:])]),
            "wall_s": time.time() - t0}})

    try:
        if args.sweep:
            run_sweep(args, argv, out_path, link, work, write_keys)
        else:
            for mode in args.modes.split(","):
                for eps in args.epsilons.split(","):
                    record.setdefault(mode, {})[eps] = one_run(link, work, base, mode, eps,
                                                               args.silos, args.rounds,
                                                               args.mia_rows)
                    write()
    except BaseException:
        print(f"kept the runs in {work}", file=sys.stderr)
        raise
    finally:
        link.stop()
    shutil.rmtree(work, ignore_errors=True)  # only after a clean finish: a failed run stays
    if args.sweep:
        return json.loads(out_path.read_text())
    print(f"\n{'mode':>7} {'target':>6} {'spent':>7} {'eval_loss':>9} {'MIA AUC':>7}")
    for mode, cols in record.items():
        for eps, r in cols.items():
            spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            print(f"{mode:>7} {eps:>6} {spent:>7} {r['eval_loss']:9.4f} {r['mia_auc']:7.3f}")
    print(f"wrote {out_path}")
    return doc


if __name__ == "__main__":
    main()
