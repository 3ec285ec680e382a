"""Privacy, measured: every `fedshield audit` attack on the embedded model and data.

Writes ``benchmarks/results/privacy.json`` (``split_grid``, ``split_dp_grid``, ``split_frontier``,
``split_default``, ``split_gradients``, ``split_trained_head``, ``mia``, ``sanity``) and
``benchmarks/results/privacy.png``, and prints the table. All numbers of one run come from the
same held-out silo rows and the same public text.

    PYTHONPATH=. .venv/bin/python benchmarks/privacy.py            # the full grid
    PYTHONPATH=. .venv/bin/python benchmarks/privacy.py --quick    # tiny:llama, seconds
    PYTHONPATH=. .venv/bin/python benchmarks/privacy.py --only mia # refresh mia + sanity only

``--only mia`` skips split's inversion grid and frontier, runs the update attacks and every
released model's attack, and merges ``mia``, ``eval_loss_fedavg`` and the update sanity results
into the existing JSON (the split keys are kept as they are). With ``--only-modes fedavg,lpp,shield``
split is not trained at all and its released-model AUCs are kept from the JSON, flagged in
``mia.final_model_kept``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-config", nargs="*", default=[], help="k=v overrides, as flwr run")
    p.add_argument("--sigmas", default="0,0.1,0.5,1,2")
    p.add_argument("--head-layers", default="1,2,4")
    p.add_argument("--dp-multipliers", default="0.5,1,2,4")
    p.add_argument("--public-rows", type=int, default=120)
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--split-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shield-views", type=int, default=8,
                   help="shield uploads the shield server attacks (its AUC is their mean)")
    p.add_argument("--quick", action="store_true", help="tiny:llama, small grid (a smoke run)")
    p.add_argument("--only", choices=["mia"], default=None,
                   help="mia: only the membership attacks, merged into the existing --out JSON")
    p.add_argument("--only-modes", default="fedavg,lpp,shield,split",
                   help="with --only mia: the modes attacked (comma separated)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.json"))
    args = p.parse_args(argv)

    import torch

    from fedshield_flwr.audit.report import plot, table, write_json
    from fedshield_flwr.audit.run import AuditOptions, run_audit, run_config

    torch.set_num_threads(args.threads)
    overrides = list(args.run_config)
    if args.quick:
        overrides = ["model.name='tiny:llama' data.max-length=64 train.max-steps=4", *overrides]
        args.head_layers, args.public_rows, args.eval_rows, args.split_steps = "1,2", 60, 12, 3
    cfg = run_config(overrides)
    opts = AuditOptions(
        sigmas=tuple(float(x) for x in args.sigmas.split(",")),
        head_layers=tuple(int(x) for x in args.head_layers.split(",")),
        dp_multipliers=tuple(float(x) for x in args.dp_multipliers.split(",")),
        public_rows=args.public_rows, eval_rows=args.eval_rows, split_steps=args.split_steps,
        split_grid=args.only != "mia", shield_views=args.shield_views,
        **({"modes": tuple(args.only_modes.split(","))} if args.only == "mia" else {}),
    )
    t0 = time.time()
    res = run_audit(cfg, opts)
    if args.only == "mia":
        return _merge_mia(res, Path(args.out), argv, time.time() - t0)
    run = res.get("split_run")
    if run is not None:
        res["split_default"] = {"settings": run["settings"],
                                "token_recovery": res["split_trained_head"]["token_recovery"],
                                "token_recovery_round1": _round1_recovery(res, run["settings"]),
                                "token_epsilon": run["token_epsilon"],
                                "eval_loss": run["eval_loss"],
                                "eval_loss_fedavg": res.get("eval_loss_fedavg"),
                                "steps": run["steps"]}
    res["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    res["threads"] = args.threads
    res["wall_s"] = time.time() - t0
    out = write_json(res, args.out)
    png = plot(res, Path(args.out).with_suffix(".png"))
    print(table(res))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return res


def _merge_mia(res: dict, out: Path, argv, wall_s: float) -> dict:
    """Replace ``mia``, ``eval_loss_fedavg`` and the update sanity keys of the JSON at ``out``."""
    import json

    from fedshield_flwr.audit.report import table, write_json

    old = json.loads(out.read_text()) if out.exists() else {}
    kept = {}
    for key in ("final_model_auc", "final_model_loss_threshold_auc"):
        for mode, v in old.get("mia", {}).get(key, {}).items():
            if mode not in res["mia"].get(key, {}):
                res["mia"].setdefault(key, {})[mode] = v
                kept.setdefault(key, []).append(mode)
    if kept:
        res["mia"]["final_model_kept"] = {
            "modes": sorted({m for v in kept.values() for m in v}),
            "why": "not re-run by --only mia (kept from the previous run of the JSON)"}
    old["mia"] = res["mia"]
    old["eval_loss_fedavg"] = res.get("eval_loss_fedavg")
    sanity = old.setdefault("sanity", {})
    for k, v in res.get("sanity", {}).items():
        if k.startswith("fedavg_update_mia"):
            sanity[k] = v
    old["mia_command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    old["mia_wall_s"] = wall_s
    write_json(old, out)
    print(table(old))
    print(f"\nmerged mia and sanity into {out}")
    return old


def _round1_recovery(res: dict, settings: dict):
    """Best attack in the grids at the run's split settings before any training (round 1)."""
    cands = [g["token_recovery"] for g in res.get("split_grid", [])
             if settings["noise_multiplier"] == 0 and g["head_layers"] == settings["head_layers"]
             and g["sigma"] == settings["noise_sigma"] and g["attack"] != "naive_embedding"]
    cands += [g["token_recovery"] for g in res.get("split_dp_grid", [])
              if settings["noise_multiplier"] > 0 and g["head_layers"] == settings["head_layers"]
              and g["noise_multiplier"] == settings["noise_multiplier"]]
    return max(cands) if cands else None


if __name__ == "__main__":
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    main()
