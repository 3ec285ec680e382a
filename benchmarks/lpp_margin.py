"""How wide is lpp's IP margin at each adapter width? One final adapter, the silo proxy at 2-8 bits.

Takes the final fp32 global adapter of an lpp run (``benchmarks/lpp_quality.py --keep-adapter``)
and measures, with the server's own code (:meth:`server_app.lpp.LppMode.ip_margin`) on the
server's held-out rows of that run, the proxy a silo would hold if that adapter reached it at
2, 3, 4 or 8 bits. This is the margin side of the frontier ``lpp.margin-action`` moves along:
the owner's model is the same at every width here; what fewer bits cost the silos' training
(and so the owner's model) over a run is not measured by this script.

    .venv/bin/python benchmarks/lpp_margin.py --adapter /tmp/alice.safetensors \\
        --data benchmarks/data/alice.jsonl --out benchmarks/results/lpp_margin_alice.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="safetensors of the fp32 global adapter")
    p.add_argument("--model", default="", help="model.name of the run (default: the demo's)")
    p.add_argument("--data", default="", help="data.name of the run (default: the demo's)")
    p.add_argument("--silos", type=int, default=3, help="lpp.eval-partitions of the run")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from safetensors.numpy import load_file

    from fedshield_flwr.config import RunConfig, default_flat_config
    from fedshield_flwr.wire import encode_arrays
    from server_app.lpp import LppMode

    flat = {**default_flat_config(), "strategy.name": "lpp", "lpp.eval-partitions": args.silos,
            "train.progress": False}
    if args.data:
        flat["data.name"] = args.data
    if args.model:
        flat["model.name"] = args.model
    cfg = RunConfig.from_flat(flat)
    fp = load_file(args.adapter)
    with tempfile.TemporaryDirectory(prefix="lpp-margin-") as tmp:
        mode = LppMode(cfg, Path(tmp))
        arrays = encode_arrays({k: fp[k] for k in mode.template})
        spec = mode.strategy.spec
        rows = []
        for bits in (int(b) for b in args.bits.split(",")):
            mode.strategy.spec = replace(spec, bits=bits)
            m = mode.ip_margin(cfg.num_server_rounds, arrays)
            rows.append({"adapter_bits": bits, "server_eval_loss": m["server_eval_loss"],
                         "proxy_eval_loss": m["proxy_eval_loss"], "ip_loss_gap": m["ip_loss_gap"],
                         "ip_perplexity_ratio": m["ip_perplexity_ratio"]})
            print(f"  {bits} bits: server {m['server_eval_loss']:.4f}, proxy "
                  f"{m['proxy_eval_loss']:.4f}, margin {m['ip_loss_gap']:+.4f} nats", flush=True)
    out = {"adapter": args.adapter, "data": args.data or cfg.data.name, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
