"""What a round costs the server as the federation grows (writes results/scale.json and a plot).

Real ``flwr run`` simulations of the app (our own SuperLink, tiny model, very few steps) with
4, 16, 64 and 256 virtual silos; the strategy samples all of them up to 64 and half of 256, so
4, 16, 64 and 128 take part in a training round. Ray gets one CPU per ClientApp
(``client-resources-num-cpus=1``): two silos run at a time on a 2-core machine, whatever the
number of virtual silos. Only two silos evaluate per round (``fraction-evaluate``), so the round
is dominated by training and aggregation.

Per mode and participant count (last training round):

* ``server_seconds_per_silo``: the ServerApp process's CPU seconds in the round
  (``server_cpu_seconds``: configure, reply pulling, validation, aggregation; not the time spent
  waiting for silos) per participating silo;
* ``server_peak_rss_mb``: the ServerApp process's peak RSS (``ru_maxrss``);
* ``bytes_up`` / ``bytes_down``: payload bytes of the training round, all silos;
* ``round_seconds``: wall time of the round (silos run two at a time: grows with silos).

``shield_precision``: the largest |error| of the decrypted shield aggregate against the exact
float64 FedAvg, with the real TenSEAL keyset that :func:`params_for_silos` selects, at 64 and
1024 silos (one ciphertext block per silo).

    .venv/bin/python benchmarks/scale.py --quick     # 4/16/64 silos, fedavg + shield, 1 round
    .venv/bin/python benchmarks/scale.py             # 4/16/64/256 silos, every mode, 2 rounds

The split relay with 1, 4 and 16 concurrent silos is not measured by this script yet
(``relay`` stays empty; see benchmarks/split.py for 1 and 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402

PARTICIPANTS = {4: 4, 16: 16, 64: 64, 256: 128}  # virtual silos -> silos per training round


def run_one(link: LocalSimulationSuperLink, mode: str, silos: int, args, out: Path) -> dict:
    part = PARTICIPANTS[silos]
    results = out / f"{mode}-{silos}"
    cfg = (f"strategy.name='{mode}' model.name='tiny:llama' num-server-rounds={args.rounds} "
           f"train.max-steps={args.steps} train.batch-size=2 train.progress=false "
           f"data.max-eval-examples=4 results.dir='{results}' "
           f"strategy.fraction-train={part / silos} strategy.min-train-nodes={part} "
           f"strategy.fraction-evaluate={2 / silos} strategy.min-evaluate-nodes=2 "
           f"strategy.min-available-nodes={silos}")
    t0 = time.time()
    proc = link.flwr_run(cfg, num_supernodes=silos, timeout=args.timeout, checked=True,
                         federation="client-resources-num-cpus=1")
    wall = time.time() - t0
    metrics = (results / "latest").resolve() / "metrics.json"
    if proc.returncode != 0 or not metrics.exists():
        raise SystemExit(f"{mode} with {silos} silos failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    rounds = [r for r in json.loads(metrics.read_text())["rounds"] if r["round"] >= 1]
    last = rounds[-1]
    if last["replies"] != part:  # a point where silos failed measures nothing about scale
        raise SystemExit(f"{mode} with {silos} silos: {last['replies']} of {part} silos' train "
                         f"replies were accepted ({last.get('failures', 0)} failed); see "
                         f"{metrics.parent}")
    row = {
        "participants": part, "virtual_silos": silos, "replies": last["replies"],
        "server_seconds": last["server_cpu_seconds"],
        "server_seconds_per_silo": last["server_cpu_seconds"] / part,
        "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in rounds),
        "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
        "round_seconds": last["seconds"], "flwr_run_wall_seconds": wall,
    }
    print(f"  {mode:<7} {silos:>4} silos ({part:>3} train): server {row['server_seconds']:.2f} s "
          f"cpu ({row['server_seconds_per_silo'] * 1e3:.1f} ms/silo), peak RSS "
          f"{row['server_peak_rss_mb']:.0f} MB, up {row['bytes_up']:,} B, round "
          f"{row['round_seconds']:.0f} s, wall {wall:.0f} s", flush=True)
    return row


def shield_precision(silo_counts: list[int]) -> dict:
    """Max |decrypted aggregate - exact FedAvg| with the auto-selected keyset (real TenSEAL)."""
    from collections import OrderedDict

    from fedshield_flwr.shield import RoundAccumulator, decrypt_aggregate, generate_keyset
    from fedshield_flwr.shield.params import params_for_silos
    from fedshield_flwr.shield.rounds import encrypt_update

    out = {}
    for n in silo_counts:
        params = params_for_silos(n)
        silo, server = generate_keyset(params)
        rng = np.random.default_rng(n)
        acc = RoundAccumulator(server, 1)
        exact = np.zeros(params.values_per_block)
        total = 0.0
        t0 = time.time()
        for i in range(n):
            u = (rng.standard_normal(params.values_per_block) * 1e-2).astype(np.float32)
            w = float(rng.integers(50, 500)) * 1e-3  # num-examples x shield.weight-scale
            payload, _ = encrypt_update(silo, OrderedDict([("x.lora_A.weight", u)]),
                                        server_round=1, silo=str(i), weight=w)
            acc.add(payload, silo=str(i))
            exact += w * u.astype(np.float64)
            total += w
        got = decrypt_aggregate(silo, acc.finalize()).values
        err = float(np.max(np.abs(got - exact / total)))
        out[str(n)] = {"max_silos": params.max_silos, "value_bound": params.value_bound,
                       "max_abs_error": err, "seconds": time.time() - t0}
        print(f"  shield precision, {n} silos (keyset max_silos={params.max_silos}, headroom "
              f"{params.value_bound:.0f}): max |error| {err:.2e}", flush=True)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in doc["modes"].items():
        xs = sorted(int(k) for k in rows)
        axes[0].plot(xs, [rows[str(x)]["server_seconds_per_silo"] * 1e3 for x in xs], "o-",
                     label=mode)
        axes[1].plot(xs, [rows[str(x)]["server_peak_rss_mb"] for x in xs], "o-", label=mode)
    axes[0].set(xscale="log", xlabel="silos per round", ylabel="server CPU ms per silo")
    axes[1].set(xscale="log", xlabel="silos per round", ylabel="server peak RSS (MB)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("FedShield-Flwr server cost vs federation size (tiny:llama, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="4/16/64 silos, fedavg + shield, 1 round of 1 step")
    p.add_argument("--modes", default="")
    p.add_argument("--silos", default="")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = p.parse_args(argv)
    modes = (args.modes or ("fedavg,shield" if args.quick else "fedavg,lpp,shield,split"))
    silo_list = [int(s) for s in (args.silos or ("4,16,64" if args.quick else "4,16,64,256"))
                 .split(",")]
    args.rounds = args.rounds or (1 if args.quick else 2)

    doc: dict = {"benchmark": "scale", "settings": {**vars(args), "modes": modes,
                                                   "silos": silo_list},
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()},
                 "modes": {}, "relay": {}}
    from fedshield_flwr.shield.params import MAX_SILOS_LIMIT

    doc["shield_max_silos"] = MAX_SILOS_LIMIT
    doc["shield_precision"] = shield_precision([64, 1024])
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            for mode in modes.split(","):
                rows = {}
                for silos in silo_list:
                    row = run_one(link, mode, silos, args, Path(tmp))
                    rows[str(row["participants"])] = row
                    doc["modes"][mode] = rows
                    Path(args.out).write_text(json.dumps(doc, indent=2))  # partial results
        finally:
            link.stop()

    print(f"\n{'mode':<8} {'silos':>5} {'ms/silo':>8} {'RSS MB':>7} {'bytes up':>12} "
          f"{'bytes down':>12}")
    for mode, rows in doc["modes"].items():
        for k, r in rows.items():
            print(f"{mode:<8} {k:>5} {r['server_seconds_per_silo'] * 1e3:8.1f} "
                  f"{r['server_peak_rss_mb']:7.0f} {r['bytes_up']:>12,} {r['bytes_down']:>12,}")
    Path(args.out).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return doc


if __name__ == "__main__":
    main()
