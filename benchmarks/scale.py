"""What a round costs the server as the federation grows (writes results/scale.json and a plot).

Real ``flwr run`` simulations of the app (our own SuperLink, tiny model, very few steps) with
4, 16, 64 and 256 virtual silos; the strategy samples all of them up to 64 and half of 256, so
4, 16, 64 and 128 take part in a training round. Ray gets one CPU per ClientApp
(``client-resources-num-cpus=1``): two silos run at a time on a 2-core machine, whatever the
number of virtual silos. Only two silos evaluate per round (``fraction-evaluate``), so the round
is dominated by training and aggregation.

Per mode and participant count (last training round):

* ``server_seconds_per_silo``: the server's CPU seconds in the round (``server_cpu_seconds`` of
  metrics.json: the ServerApp thread's configure, reply pulling, validation and aggregation, plus
  the split relay's threads; not the time spent waiting for silos, and not Flower's simulation
  engine, which shares the process and polls every virtual node ten times a second:
  ``server_process_cpu_seconds`` is the whole process, kept for comparison) per participating
  silo, less ``server_fixed_seconds``, the per-round server evaluation that does not depend on
  the number of silos (lpp's IP margin on the owner's rows), and less ``server_idle_poll_seconds``,
  the polls that found no reply (the server waiting: one poll per 0.5 s of round, and here the
  round grows with the silos because two train at a time; on a deployment it does not);
  ``server_seconds_per_silo_with_idle_polls`` keeps them in;
* ``server_peak_rss_mb``: the ServerApp process's peak RSS (``ru_maxrss``);
* ``bytes_up`` / ``bytes_down``: payload bytes of the training round, all silos;
* ``round_seconds``: wall time of the round (silos run two at a time: grows with silos).

Every process of the simulations runs torch on ``--threads`` threads (``OMP_NUM_THREADS``,
default 1): with more, part of split's middle runs on torch's own worker threads, which the
server clock does not see (nor can it tell them from the engine's native threads), and the share
it misses changes with the load on the cores.

``shield_precision``: the largest |error| of the decrypted shield aggregate against the exact
float64 FedAvg, with the real TenSEAL keyset that :func:`params_for_silos` selects, at 64 and
1024 silos (one ciphertext block per silo).

    .venv/bin/python benchmarks/scale.py --quick     # 4/16/64 silos, fedavg + shield, 1 round
    .venv/bin/python benchmarks/scale.py             # 4/16/64/256 silos, every mode, 2 rounds

``relay``: the split relay (its own process, the middle blocks of ``bench:llama-mid`` as in
benchmarks/split.py) with 1, 4 and 16 silo processes training through it at once over real gRPC
on loopback (silo processes at nice 10: they share the relay's cores here, and on a deployment
each has its own machine): ``tokens_per_s`` (real tokens of every silo over the phase's wall time) and the
relay process's RSS over the phase (``rss_mb`` peak, ``rss_start_mb``); phases run 1, 4, 16, 16,
4, 1 so that both directions see the same background load, and a count's two phases are averaged.

Results merge into ``--out``: the modes (and the relay) measured by this invocation replace
their entries and the others are kept, with each one's command in ``settings.runs``.

    .venv/bin/python benchmarks/scale.py --modes split --silos 16,64,256
    .venv/bin/python benchmarks/scale.py --relay-only
    .venv/bin/python benchmarks/scale.py --shield-fold-only

``shield_fold``: the shield server's CPU per silo for a realistic adapter (SmolLM2-135M, LoRA r=8
on q,k,v,o, 921,600 parameters) folding 128 real uploads (see :func:`shield_fold`).
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
RELAY_COUNTS = (1, 4, 16)


def _sibling(name: str):
    """Another script of benchmarks/ as a module (split.py's relay process, model and batches;
    shield.py's SmolLM2 adapter shapes): one definition of each."""
    import importlib

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def relay_silo(args, idx: int, port: int, token: str, batches: list, barrier, out_q) -> None:
    """One silo process: connect, one untimed step, then the timed steps at the barrier."""
    import torch

    from fedshield_flwr.split.relay import RelayClient
    from fedshield_flwr.split.silo_model import SiloTrainer, SplitSilo

    sb = _sibling("split")
    torch.set_num_threads(1)
    # every silo shares the relay's 2 cores here; on a deployment each has its own machine. At
    # nice 10 the silos leave the relay the CPU it needs, so 16 silo processes measure the
    # relay's batching, not the kernel handing the relay a 1/17 share of the cores.
    os.nice(10)
    name = f"silo-{idx}"
    silo = SplitSilo.from_pretrained(args.path, sb._settings(args), sb._lora(args), seed=args.seed)
    trainer = SiloTrainer(silo, None, learning_rate=args.lr, name=name)
    link = RelayClient(f"127.0.0.1:{port}", token, name, silo.layout.fingerprint())
    trainer.link = link.connect()
    trainer.train_step(*sb._tensors(batches[0]))  # warm-up, untimed
    barrier.wait(timeout=900)
    t0, tokens = time.time(), 0
    for b in batches[1:]:
        tokens += trainer.train_step(*sb._tensors(b)).tokens
    t1 = time.time()
    link.close()
    out_q.put({"idx": idx, "t0": t0, "t1": t1, "tokens": tokens})


def measure_relay(counts: tuple[int, ...], total_steps: int) -> dict:
    """Relay throughput and RSS with ``counts`` concurrent silo processes (phases ABBA)."""
    import multiprocessing as mp

    sb = _sibling("split")
    args = argparse.Namespace(model="bench:llama-mid", head_layers=1, tail_layers=1, lr=5e-4,
                              window_ms=200.0, seed=0, batch_size=8, max_length=128)
    args.path = sb.model_path(args.model)
    order = list(counts) + list(reversed(counts))
    per_silo = {n: max(1, -(-total_steps // n)) for n in counts}  # timed steps per silo
    need = max(n * (per_silo[n] + 1) for n in counts)
    batches = sb.make_batches(args.path, need, args.batch_size, args.max_length, args.seed)
    ctx = mp.get_context("spawn")
    names = [f"silo-{i}" for i in range(max(counts))]
    ctrl_q, out_q, srv_q, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=sb.server_proc, args=(args, names, 1, ctrl_q, srv_q, stop))
    server.start()
    port, tokens = ctrl_q.get(timeout=600)
    phases = []
    try:
        for n in order:
            k = per_silo[n] + 1
            barrier = ctx.Barrier(n)
            procs = [ctx.Process(target=relay_silo, args=(
                args, i, port, tokens[names[i]], batches[i * k:(i + 1) * k], barrier, out_q))
                for i in range(n)]
            for q in procs:
                q.start()
            rows = [out_q.get(timeout=1800) for _ in procs]
            for q in procs:
                q.join(60)
            t0, t1 = min(r["t0"] for r in rows), max(r["t1"] for r in rows)
            phases.append({"silos": n, "t0": t0, "t1": t1, "tokens": sum(r["tokens"] for r in rows),
                           "steps_per_silo": per_silo[n]})
            print(f"  relay {n:>3} concurrent silos: {phases[-1]['tokens'] / (t1 - t0):7.1f} "
                  f"tokens/s ({phases[-1]['tokens']} tokens in {t1 - t0:.1f} s)", flush=True)
    finally:
        stop.set()
        srv = srv_q.get(timeout=120)
        server.join(60)
    rss = srv["rss"]
    out: dict = {}
    for n in counts:
        mine = [ph for ph in phases if ph["silos"] == n]
        seen = [m for ph in mine for t, m in rss if ph["t0"] <= t <= ph["t1"]]
        out[str(n)] = {
            "tokens_per_s": sum(ph["tokens"] for ph in mine)
            / sum(ph["t1"] - ph["t0"] for ph in mine),
            "rss_mb": max(seen) if seen else None,
            "tokens": sum(ph["tokens"] for ph in mine),
            "steps_per_silo": per_silo[n],
        }
    out["rss_series_mb"] = [round(m, 1) for _, m in rss[:: max(1, len(rss) // 20)]]
    out["rss_start_mb"] = round(rss[0][1], 1) if rss else None
    out["rss_end_mb"] = round(rss[-1][1], 1) if rss else None
    out["relay_stats"] = {k: v for k, v in srv["stats"].items() if k != "drops"}
    out["setup"] = {"model": args.model, "batch_size": args.batch_size,
                    "max_length": args.max_length, "order": order, "threads_per_process": 1}
    return out


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
    fixed = last.get("server_evaluate_cpu_seconds", 0.0)
    idle = last.get("server_idle_poll_cpu_seconds", 0.0)
    if last["replies"] != part:  # a point where silos failed measures nothing about scale
        raise SystemExit(f"{mode} with {silos} silos: {last['replies']} of {part} silos' train "
                         f"replies were accepted ({last.get('failures', 0)} failed); see "
                         f"{metrics.parent}")
    row = {
        "participants": part, "virtual_silos": silos, "replies": last["replies"],
        "server_seconds": last["server_cpu_seconds"],
        # per silo: without the fixed per-round server evaluation (lpp's IP margin), reported apart
        "server_fixed_seconds": fixed,
        "server_seconds_per_silo": (last["server_cpu_seconds"] - fixed - idle) / part,
        # polls that found no reply: waiting, per second of round (which grows with silos here)
        "server_idle_poll_seconds": idle,
        "server_seconds_per_silo_with_idle_polls": (last["server_cpu_seconds"] - fixed) / part,
        "server_process_cpu_seconds": last.get("server_process_cpu_seconds"),
        "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in rounds),
        "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
        "round_seconds": last["seconds"], "flwr_run_wall_seconds": wall,
    }
    print(f"  {mode:<7} {silos:>4} silos ({part:>3} train): server {row['server_seconds']:.2f} s "
          f"cpu ({row['server_seconds_per_silo'] * 1e3:.1f} ms/silo, idle polls "
          f"{idle:.2f} s), peak RSS "
          f"{row['server_peak_rss_mb']:.0f} MB, up {row['bytes_up']:,} B, round "
          f"{row['round_seconds']:.0f} s, wall {wall:.0f} s", flush=True)
    return row


def shield_fold(silos: int, rank: int = 8, distinct: int = 4) -> dict:
    """The shield server's cost per silo for a realistic adapter, at ``silos`` per round.

    Real TenSEAL payloads of the LoRA r=``rank`` q,k,v,o adapter of SmolLM2-135M (shapes from
    benchmarks/shield.py) under the keyset :func:`params_for_silos` selects for ``silos``;
    silo ``i`` encrypts update ``i % distinct`` under its own id, and the server folds it at
    once (deserialize, validate, add, as the round does; the next upload is encrypted only then,
    so the server never holds more than one). Per silo: this thread's CPU seconds of
    ``RoundAccumulator.add``, median and mean; the encryption is the silos' cost, not timed.
    """
    from fedshield_flwr.shield import RoundAccumulator, generate_keyset
    from fedshield_flwr.shield.params import params_for_silos
    from fedshield_flwr.shield.rounds import encrypt_update
    from strategies.base import peak_rss_mb

    shield_bench = _sibling("shield")
    shapes = shield_bench.smollm2_lora_shapes(rank)
    n_params = sum(a * b for a, b in shapes.values())
    params = params_for_silos(silos)
    silo_keys, server_keys = generate_keyset(params)
    updates = shield_bench.make_updates(shapes, distinct, seed=silos)
    acc = RoundAccumulator(server_keys, 1)
    rss0, cpu, size = peak_rss_mb(), [], 0
    for i in range(silos):
        payload, _ = encrypt_update(silo_keys, updates[i % distinct], server_round=1,
                                    silo=str(i), weight=0.1 + 0.01 * i)
        size = len(payload)
        t = time.thread_time()
        acc.add(payload, silo=str(i))
        cpu.append(time.thread_time() - t)
        del payload
    t = time.thread_time()
    acc.finalize()
    fin = time.thread_time() - t
    med, mean = float(np.median(cpu)), float(np.mean(cpu))
    out = {"silos": silos, "adapter": f"SmolLM2-135M LoRA r={rank} q,k,v,o",
           "adapter_params": n_params, "keyset_max_silos": params.max_silos,
           "payload_bytes": size,
           "server_seconds_per_silo": med, "server_seconds_per_silo_mean": mean,
           "server_seconds_per_silo_per_1M_params": med / (n_params / 1e6),
           "server_seconds_per_silo_16_first": float(np.median(cpu[:16])),
           "server_seconds_per_silo_16_last": float(np.median(cpu[-16:])),
           "finalize_seconds": fin, "peak_rss_growth_mb": peak_rss_mb() - rss0}
    print(f"  shield fold, {silos} silos x {n_params:,}-parameter adapter: "
          f"{med * 1e3:.1f} ms/silo = {out['server_seconds_per_silo_per_1M_params']:.4f} s per "
          f"silo per 1M parameters (first 16 {out['server_seconds_per_silo_16_first'] * 1e3:.1f}"
          f" ms, last 16 {out['server_seconds_per_silo_16_last'] * 1e3:.1f} ms)", flush=True)
    return out


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

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, rows in doc["modes"].items():
        xs = sorted(int(k) for k in rows)
        axes[0].plot(xs, [rows[str(x)]["server_seconds_per_silo"] * 1e3 for x in xs], "o-",
                     label=mode)
        axes[1].plot(xs, [rows[str(x)]["server_peak_rss_mb"] for x in xs], "o-", label=mode)
    axes[0].set(xscale="log", xlabel="silos per round", ylabel="server CPU ms per silo")
    axes[1].set(xscale="log", xlabel="silos per round", ylabel="server peak RSS (MB)")
    relay = [(n, doc["relay"][str(n)]) for n in RELAY_COUNTS if str(n) in doc.get("relay", {})]
    if relay:
        axes[2].plot([n for n, _ in relay], [r["tokens_per_s"] for _, r in relay], "o-",
                     label="tokens/s")
        twin = axes[2].twinx()
        twin.plot([n for n, _ in relay], [r["rss_mb"] for _, r in relay], "s--", color="gray")
        twin.set_ylabel("relay RSS (MB, dashed)")
    axes[2].set(xscale="log", xlabel="concurrent silos", ylabel="split relay tokens/s")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("FedShield-Flwr server cost vs federation size (tiny:llama, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="4/16/64 silos, fedavg + shield, 1 round of 1 step, no relay")
    p.add_argument("--modes", default="")
    p.add_argument("--silos", default="")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--relay-only", action="store_true", help="only the relay with 1/4/16 silos")
    p.add_argument("--no-relay", action="store_true")
    p.add_argument("--shield-fold-only", action="store_true",
                   help="only the shield server's per-silo cost for a SmolLM2-135M adapter")
    p.add_argument("--shield-fold-silos", type=int, default=128)
    p.add_argument("--relay-steps", type=int, default=24,
                   help="timed split steps per relay phase, shared by its silos")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every process of the simulations (OMP_NUM_THREADS); "
                        "1 keeps split's middle on the relay thread the server clock counts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = p.parse_args(argv)
    modes = "" if args.relay_only or args.shield_fold_only else (
        args.modes or ("fedavg,shield" if args.quick else "fedavg,lpp,shield,split"))
    silo_list = [int(s) for s in (args.silos or ("4,16,64" if args.quick else "4,16,64,256"))
                 .split(",")]
    args.rounds = args.rounds or (1 if args.quick else 2)
    relay = not (args.quick or args.no_relay or args.shield_fold_only)
    command = {**vars(args), "modes": modes, "silos": silo_list}

    out_path = Path(args.out)
    doc: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc.setdefault("modes", {})
    doc.setdefault("relay", {})
    runs = doc.setdefault("settings", {}).setdefault("runs", {})
    doc["settings"]["note"] = "merged from one scale.py invocation per group (see runs)"
    doc.update({"benchmark": "scale",
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}})
    from fedshield_flwr.shield.params import MAX_SILOS_LIMIT

    doc["shield_max_silos"] = MAX_SILOS_LIMIT
    if modes:
        doc["shield_precision"] = shield_precision([64, 1024])
        # The SuperLink's simulation process (ServerApp, relay) and the ClientApps inherit it.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
            try:
                for mode in modes.split(","):
                    rows = {}
                    for silos in silo_list:
                        row = run_one(link, mode, silos, args, Path(tmp))
                        rows[str(row["participants"])] = row
                        doc["modes"][mode] = rows
                        runs[mode] = {"command": command}
                        out_path.write_text(json.dumps(doc, indent=2))  # partial results
            finally:
                link.stop()
    if "shield" in modes.split(",") or args.shield_fold_only:
        doc["shield_fold"] = shield_fold(args.shield_fold_silos)
        runs["shield_fold"] = {"command": command}
    if relay:
        doc["relay"] = measure_relay(RELAY_COUNTS, args.relay_steps)
        runs["relay"] = {"command": command}
        out_path.write_text(json.dumps(doc, indent=2))

    print(f"\n{'mode':<8} {'silos':>5} {'ms/silo':>8} {'RSS MB':>7} {'bytes up':>12} "
          f"{'bytes down':>12}")
    for mode, rows in doc["modes"].items():
        for k, r in rows.items():
            print(f"{mode:<8} {k:>5} {r['server_seconds_per_silo'] * 1e3:8.1f} "
                  f"{r['server_peak_rss_mb']:7.0f} {r['bytes_up']:>12,} {r['bytes_down']:>12,}")
    for n in RELAY_COUNTS:
        r = doc["relay"].get(str(n))
        if r:
            print(f"relay {n:>3} silos: {r['tokens_per_s']:8.1f} tokens/s, relay RSS "
                  f"{r['rss_mb']:.0f} MB")
    out_path.write_text(json.dumps(doc, indent=2))
    plot(doc, out_path.with_suffix(".png"))
    print(f"wrote {args.out} and {out_path.with_suffix('.png')}")
    return doc


if __name__ == "__main__":
    main()
