"""The split frontier at small noise multipliers: learned-attack recovery and held-out loss.

Complements benchmarks/privacy.py (whose frontier starts at z = 0.5) on the same rows:

    PYTHONPATH=. .venv/bin/python benchmarks/privacy_frontier.py --dp-multipliers 0.02,0.05,0.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dp-multipliers", default="0.02,0.05,0.1")
    p.add_argument("--head-layers", type=int, default=1)
    p.add_argument("--public-rows", type=int, default=120)
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--split-steps", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy_frontier.json"))
    args = p.parse_args()
    import torch

    from fedshield_flwr.audit.artifacts import build_data
    from fedshield_flwr.audit.report import write_json
    from fedshield_flwr.audit.run import AuditOptions, run_config, split_frontier, split_inversion
    from fedshield_flwr.models.load import load_tokenizer

    torch.set_num_threads(2)
    t0 = time.time()
    cfg = run_config([f"split.head-layers={args.head_layers}"])
    opts = AuditOptions(modes=("split",), sigmas=(0.0,), head_layers=(args.head_layers,),
                        dp_multipliers=tuple(float(x) for x in args.dp_multipliers.split(",")),
                        public_rows=args.public_rows, eval_rows=args.eval_rows,
                        split_steps=args.split_steps, progress=False)
    tok = load_tokenizer(cfg.model.name)
    data = build_data(cfg, tok, public_rows=opts.public_rows, eval_rows=opts.eval_rows)
    out: dict = {}
    split_inversion(cfg, data, tok, opts, out)
    split_frontier(cfg, data, tok, opts, out)
    out["wall_s"] = time.time() - t0
    write_json(out, args.out)
    print(json.dumps(out["split_frontier"], indent=1, default=str))


if __name__ == "__main__":
    main()
