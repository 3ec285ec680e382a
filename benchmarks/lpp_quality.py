"""Does training against a quantized base cost the owner quality? fedavg vs lpp on the demo.

Runs the demo setup (3 silos, the embedded SmolLM2-135M-Instruct, chatterbot Q/A, same seed and
rounds as ``make demo``) with ``flwr run`` as a local simulation, first as ``fedavg`` on the full
base, then as ``lpp`` (silos hold only the NF4 package and a 4-bit global adapter), then ``lpp``
once more for one round to show that a second run downloads no base. Compared on the same rows:
the held-out splits of the three silos, which fedavg's silos evaluate and lpp's server
evaluates (``lpp.eval-partitions=3``).

* ``final_eval_loss_fedavg``: fedavg's final eval loss (full base + adapter).
* ``final_eval_loss_fp``: lpp's server model (full base + fp32 global adapter); target within
  3% of fedavg.
* ``final_eval_loss_silo_proxy``: NF4 base + 4-bit adapter, the best a silo can hold.
* ``bytes_down_per_round``: what the server sent per round in each lpp run.

    .venv/bin/python benchmarks/lpp_quality.py                  # the demo setup (~25 min)
    .venv/bin/python benchmarks/lpp_quality.py --model tiny:llama --rounds 2   # quick check
    .venv/bin/python benchmarks/lpp_quality.py \
        --fedavg-from benchmarks/results/shield_quality.json   # fedavg from that run (~15 min)

The silos get a fresh package cache (a temporary ``FEDSHIELD_CACHE`` that links the converted
models and the server's package cache), so the first run really delivers the base. Writes the
``final_eval_loss_*`` fields into ``benchmarks/results/lpp.json`` (see ``benchmarks/lpp.py``)
and the details into ``benchmarks/results/lpp_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(1, str(ROOT / "benchmarks"))  # a site-packages "benchmarks" can shadow the folder
from lpp import record_federated_eval_losses  # noqa: E402  (benchmarks/lpp.py)

from fedshield_flwr.models import cache_root  # noqa: E402
from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402


def fresh_silo_cache(tmp: Path) -> Path:
    """A cache root sharing the converted models and server packages, with no silo packages."""
    real = cache_root()
    root = tmp / "cache"
    root.mkdir()
    for name in ("models", "lpp-base", "silo-data"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(real / name)
    return root


def run(link, name: str, config: str, res_dir: Path, silos: int) -> dict:
    t0 = time.time()
    proc = link.flwr_run(f"{config} results.dir='{res_dir}'", num_supernodes=silos, timeout=5400)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    doc = json.loads(((res_dir / "latest").resolve() / "metrics.json").read_text())
    wall = time.time() - t0
    print(f"  {name}: {len(doc['rounds']) - 1} rounds in {wall:.0f} s", flush=True)
    return {
        "rounds": doc["rounds"],
        "wall_seconds": wall,
        "config": {
            k: v
            for k, v in doc["config"].items()
            if k.startswith(("model.", "strategy.", "lpp.", "train.", "data."))
            or k == "num-server-rounds"
        },
    }


def fedavg_from(path: Path, expect: dict[str, object]) -> dict:
    """fedavg's rounds from an earlier run of the same setup.

    ``path`` is a ``shield_quality.json`` (the demo) or an earlier ``lpp_quality`` output.
    fedavg on CPU is deterministic (seeded; reruns agree to the last digit), so the earlier
    figures are this setup's; the config is checked against this app's defaults overridden by
    ``expect`` (this run's ``--model`` / ``--data`` / ``--extra`` keys that fedavg shares).
    """
    from fedshield_flwr.config import default_flat_config

    doc = json.loads(path.read_text())["details"]["fedavg"]
    if "rounds" in doc:  # an earlier lpp_quality output: reuse it as it is
        doc = {**doc, "eval_loss_per_round": [r["eval_loss"] for r in doc["rounds"]]}
    want = {**default_flat_config(), **expect}
    rounds = int(doc["config"].get("num-server-rounds", want["num-server-rounds"]))
    if want["num-server-rounds"] == 1 and rounds > 1:
        # round 1 runs at train.learning-rate-max whatever the number of rounds (cosine_lr), so
        # the first round of a longer fedavg run is this run's fedavg
        want["num-server-rounds"] = rounds
        doc = {**doc, "eval_loss_per_round": doc["eval_loss_per_round"][:2]}
        print(f"  fedavg: round 1 of the {rounds}-round run in {path}")
    differ = {k: (v, want.get(k)) for k, v in doc["config"].items()
              if k != "train.progress" and not k.startswith("lpp.") and want.get(k) != v}
    if differ:
        raise SystemExit(f"{path}: fedavg ran with other settings {differ}; rerun without "
                         "--fedavg-from")
    losses = doc["eval_loss_per_round"]
    print(f"  fedavg: from {path} ({len(losses) - 1} rounds, final {losses[-1]:.4f})")
    return {"rounds": [{"round": i, "eval_loss": v, "bytes_down": None}
                       for i, v in enumerate(losses)],
            "wall_seconds": doc["wall_seconds"], "config": doc["config"], "source": str(path)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="default: the demo's model (pyproject)")
    p.add_argument("--rounds", type=int, default=0, help="default: the demo's rounds (pyproject)")
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--data", default="", help="data.name (default: the demo's embedded set)")
    p.add_argument("--extra", default="", help="extra --run-config entries for every run")
    p.add_argument("--lpp-extra", default="", help="extra --run-config entries for lpp only")
    p.add_argument("--no-second-run", action="store_true",
                   help="skip the one-round second lpp run (it only measures the downlink)")
    p.add_argument("--fedavg-from", default="",
                   help="take fedavg from this shield_quality.json instead of running it")
    p.add_argument("--keep-adapter", default="",
                   help="copy the lpp run's final fp32 global adapter (safetensors) here "
                        "(for benchmarks/lpp_margin.py)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lpp_quality.json"))
    p.add_argument("--lpp-json", default=str(ROOT / "benchmarks" / "results" / "lpp.json"))
    args = p.parse_args()

    common = f"train.progress=false lpp.eval-partitions={args.silos}"
    expect: dict[str, object] = {}
    if args.model:
        common += f" model.name='{args.model}'"
        expect["model.name"] = args.model
    if args.data:
        common += f" data.name='{args.data}'"
        expect["data.name"] = args.data
    common += f" {args.extra}"
    rounds = f" num-server-rounds={args.rounds}" if args.rounds else ""
    if args.rounds:
        expect["num-server-rounds"] = args.rounds
    with tempfile.TemporaryDirectory(prefix="lpp-quality-") as tmp:
        os.environ["FEDSHIELD_CACHE"] = str(fresh_silo_cache(Path(tmp)))
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            if args.fedavg_from:
                fedavg = fedavg_from(Path(args.fedavg_from), expect)
            else:
                fedavg = run(link, "fedavg", f"{common}{rounds} strategy.name='fedavg'",
                             Path(tmp) / "f", args.silos)
            lpp = run(link, "lpp", f"{common}{rounds} strategy.name='lpp' {args.lpp_extra}",
                      Path(tmp) / "l", args.silos)
            if args.keep_adapter:
                ckpt = (Path(tmp) / "l" / "latest").resolve() / "checkpoints"
                final = sorted(ckpt.glob("round-*.safetensors"))[-1]
                Path(args.keep_adapter).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(final, args.keep_adapter)
                print(f"  kept {final.name} as {args.keep_adapter}")
            again = None if args.no_second_run else run(
                link,
                "lpp (second run, 1 round)",
                f"{common} strategy.name='lpp' num-server-rounds=1 lpp.server-eval=false "
                f"{args.lpp_extra}",
                Path(tmp) / "l2",
                args.silos,
            )
        finally:
            link.stop()
    last = lpp["rounds"][-1]
    result = {
        "final_eval_loss_fedavg": fedavg["rounds"][-1]["eval_loss"],
        "final_eval_loss_fp": last["server_eval_loss"],
        "final_eval_loss_silo_proxy": last["proxy_eval_loss"],
        "final_eval_loss_silo_reported": last["eval_loss"],
        "fp_vs_fedavg": last["server_eval_loss"] / fedavg["rounds"][-1]["eval_loss"] - 1,
        "ip_loss_gap_per_round": [r["ip_loss_gap"] for r in lpp["rounds"]],
        "bytes_down_per_round": {
            "lpp_first_run": [r["bytes_down"] for r in lpp["rounds"]],
            "lpp_second_run": [r["bytes_down"] for r in again["rounds"]] if again else None,
            "fedavg": [r["bytes_down"] for r in fedavg["rounds"]],
        },
        "details": {"fedavg": fedavg, "lpp": lpp, "lpp_second_run": again},
    }
    rows = [
        ("fedavg final eval loss (full base)", f"{result['final_eval_loss_fedavg']:.4f}"),
        (
            "lpp server model (full base + fp adapter)",
            f"{result['final_eval_loss_fp']:.4f} "
            f"({result['fp_vs_fedavg'] * 100:+.2f}% vs fedavg, target <= +3%)",
        ),
        (
            f"lpp silo proxy (NF4 base + {last.get('adapter_bits', 4)}-bit adapter)",
            f"{result['final_eval_loss_silo_proxy']:.4f}"
            f" (IP margin {last['ip_loss_gap']:+.4f} nats, ppl x{last['ip_perplexity_ratio']:.3f})",
        ),
        (
            "lpp bytes down per round, first run",
            " / ".join(
                f"{b / 1e6:.2f} MB" for b in result["bytes_down_per_round"]["lpp_first_run"]
            ),
        ),
    ]
    if again:
        rows.append(("lpp bytes down per round, second run",
                     " / ".join(f"{b / 1e6:.2f} MB"
                                for b in result["bytes_down_per_round"]["lpp_second_run"])))
    for k, v in rows:
        print(f"{k:<44} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not (args.model or args.rounds or args.extra or args.data or args.lpp_extra
            or args.no_second_run):  # only the demo setup goes there
        record_federated_eval_losses(
            result["final_eval_loss_fp"],
            result["final_eval_loss_fedavg"],
            result["final_eval_loss_silo_proxy"],
            args.lpp_json,
            source="python benchmarks/lpp_quality.py (details in lpp_quality.json)",
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
