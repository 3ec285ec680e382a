"""Benchmark of the ``shield`` mode's cryptography (writes ``benchmarks/results/shield.json``).

One federated round on a synthetic adapter update (default: LoRA r=16 on q,k,v,o of
SmolLM2-135M, 30 layers, hidden 576, k/v projections 576->192: 1,843,200 parameters; shapes are
computed, the model is not loaded) with ``--silos`` silos whose updates are Gaussian with
standard deviation 1e-2 and whose aggregation weights differ. Schemes:

* ``fedshield-llm-reference``: FedShield-LLM's scheme re-implemented
  (:mod:`fedshield_flwr.shield.reference`): public-key CKKS, N=8192, [60,40,40,60], scale 2**40,
  Galois keys, one CKKSVector per tensor, L1-unstructured pruning that zeroes entries and still
  encrypts them, unweighted mean (server multiplies by 1/K);
* ``shield-dense`` / ``shield-p50`` / ``shield-p75`` / ``shield-p90``: this library at block
  pruning ratio 0 / 0.5 / 0.75 / 0.9 (exact weighted mean, error feedback).

Per scheme: ``bytes_per_round`` (one silo's upload), ``ratio_to_plaintext`` (/ fp32 dense adapter
bytes), ``client_seconds`` (prune + encode + encrypt + serialize, one silo, one process),
``server_seconds_per_silo`` (deserialize + validate + add), ``silo_decrypt_seconds``,
``max_abs_error`` against the plaintext mean *of what was actually sent* (the pruned updates for
pruned schemes; weighted for shield, unweighted for the reference as its scheme defines), the
same seconds per 1M adapter parameters, and the machine. Seconds are medians over silos and
``--repeat`` runs (wall clock; ``*_cpu_seconds`` is process CPU time, less sensitive to other
load on a shared machine).

Run: ``.venv/bin/python benchmarks/shield.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedshield_flwr.shield import (  # noqa: E402
    PruneSchedule,
    RoundAccumulator,
    SiloState,
    decrypt_aggregate,
    encode_record,
    encrypt_update,
    generate_keyset,
)
from fedshield_flwr.shield.reference import (  # noqa: E402
    ReferenceParams,
    reference_context,
    reference_decrypt,
    reference_encrypt,
    reference_prune,
    reference_public_context,
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "shield.json"
UPDATE_SCALE = 1e-2
SHIELD_SCHEMES = {"shield-dense": 0.0, "shield-p50": 0.5, "shield-p75": 0.75, "shield-p90": 0.9}
TARGETS = {
    "shield-dense ratio_to_plaintext <=": 4.0,
    "shield-p75 ratio_to_plaintext <=": 1.0,
    "shield-p75 client_seconds_per_1M_params <=": 0.3,
    "shield-* server_seconds_per_silo_per_1M_params <=": 0.05,
    "shield-* max_abs_error <=": 1e-6,
}

# SmolLM2-135M: 30 layers, hidden 576, 9 query heads and 3 KV heads of dim 64.
SMOLLM2 = {"layers": 30, "hidden": 576, "kv_out": 3 * 64}


def smollm2_lora_shapes(rank: int) -> OrderedDict[str, tuple[int, int]]:
    """PEFT adapter state shapes of LoRA on q,k,v,o of SmolLM2-135M, in PEFT's order."""
    h, kv = SMOLLM2["hidden"], SMOLLM2["kv_out"]
    outs = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    shapes: OrderedDict[str, tuple[int, int]] = OrderedDict()
    for layer in range(SMOLLM2["layers"]):
        for module, out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, h)
            shapes[f"{prefix}.lora_B.weight"] = (out, rank)
    return shapes


def synthetic_shapes(num_params: int) -> OrderedDict[str, tuple[int, int]]:
    """Tensors of 16 x 576 (the last one shorter) totalling ``num_params`` values."""
    shapes: OrderedDict[str, tuple[int, int]] = OrderedDict()
    left, i = num_params, 0
    while left > 0:
        rows = min(16, -(-left // 576))
        cols = 576 if left >= rows * 576 else left
        rows = 1 if cols != 576 else rows
        shapes[f"synthetic.{i}.lora_A.weight"] = (rows, cols)
        left -= rows * cols
        i += 1
    return shapes


def make_updates(shapes, silos: int, seed: int) -> list[OrderedDict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        OrderedDict((n, (rng.standard_normal(s) * UPDATE_SCALE).astype(np.float32))
                    for n, s in shapes.items())
        for _ in range(silos)
    ]


def flat(state) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in state.values()])


@contextlib.contextmanager
def native_stdout_silenced():
    """Silence C++ ``std::cout`` (TenSEAL warns once per multi-ciphertext CKKSVector)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def per_million(seconds: float, num_params: int) -> float:
    return seconds / (num_params / 1e6)


def bench_shield(name: str, ratio: float, updates, weights, repeat: int, num_params: int,
                 parallel_workers: int) -> dict[str, Any]:
    silo_keys, server_keys = generate_keyset()
    schedule = PruneSchedule(target=ratio)
    rnd = 1
    client, client_cpu, server, finalize, decrypt, errors = [], [], [], [], [], []
    upload = downlink = blocks_sent = blocks_total = 0
    for _ in range(repeat):
        payloads, sent = [], []
        for i, (update, weight) in enumerate(zip(updates, weights)):
            with Timer() as t:
                payload, state = encrypt_update(silo_keys, update, server_round=rnd, silo=str(i),
                                                weight=weight, schedule=schedule,
                                                state=SiloState())
            client.append(t.wall)
            client_cpu.append(t.cpu)
            payloads.append(payload)
            sent.append(weight * state.last_upload.sent_vector(num_params))
            upload = len(payload)
            blocks_sent = int(state.last_upload.blocks.size)
            blocks_total = -(-num_params // silo_keys.params.values_per_block)
        acc = RoundAccumulator(server_keys, rnd, schedule=schedule)
        for i, payload in enumerate(payloads):
            with Timer() as t:
                acc.add(payload, silo=str(i))
            server.append(t.wall)
        with Timer() as t:
            record = encode_record(server_keys, acc.finalize())
        finalize.append(t.wall)
        downlink = len(record)
        with Timer() as t:
            mean = decrypt_aggregate(silo_keys, record).values
        decrypt.append(t.wall)
        expected = np.sum(sent, axis=0) / sum(weights)
        errors.append(float(np.abs(mean - expected).max()))
    out: dict[str, Any] = {
        "prune_ratio": ratio,
        "blocks_sent": blocks_sent,
        "blocks_total": blocks_total,
        "bytes_per_round": upload,
        "downlink_bytes": downlink,
        "ratio_to_plaintext": upload / (4 * num_params),
        "client_seconds": median(client),
        "client_cpu_seconds": median(client_cpu),
        "server_seconds_per_silo": median(server),
        "server_finalize_seconds": median(finalize),
        "silo_decrypt_seconds": median(decrypt),
        "max_abs_error": max(errors),
        "error_against": "weighted mean of what the silos actually sent (the pruned updates)"
        if ratio > 0 else "weighted mean of the dense updates",
        "client_seconds_per_1M_params": per_million(median(client), num_params),
        "client_cpu_seconds_per_1M_params": per_million(median(client_cpu), num_params),
        "server_seconds_per_silo_per_1M_params": per_million(median(server), num_params),
        "params": silo_keys.params.to_dict(),
    }
    if parallel_workers > 1:
        # A fresh pool per call, as in a deployed ClientApp (one process per message).
        walls = []
        for _ in range(repeat):
            with Timer() as t:
                encrypt_update(silo_keys, updates[0], server_round=rnd, silo="0",
                               weight=weights[0], schedule=schedule, workers=parallel_workers)
            walls.append(t.wall)
        out["client_seconds_parallel"] = median(walls)
        out["client_seconds_parallel_per_1M_params"] = per_million(median(walls), num_params)
        out["parallel_workers"] = parallel_workers
    return out


def bench_reference(updates, repeat: int, num_params: int, sparsity: float) -> dict[str, Any]:
    import tenseal as ts

    with Timer() as setup:
        context = reference_context(ReferenceParams())
        public = reference_public_context(context)
    public_bytes = len(context.serialize(save_secret_key=False))
    shapes = OrderedDict((n, v.shape) for n, v in updates[0].items())
    client, client_cpu, server, finalize, decrypt, errors = [], [], [], [], [], []
    upload = 0
    for _ in range(repeat):
        payloads = []
        for update in updates:
            with native_stdout_silenced(), Timer() as t:
                payload = reference_encrypt(context, update, sparsity)
            client.append(t.wall)
            client_cpu.append(t.cpu)
            payloads.append(payload)
            upload = sum(len(b) for b in payload.values())
        # server: deserialize + add per silo, then x 1/K (timed as finalize); this is
        # reference_aggregate() split so that the per-silo part can be timed
        totals = None
        for payload in payloads:
            with Timer() as t:
                vectors = {n: ts.ckks_vector_from(public, b) for n, b in payload.items()}
                if totals is None:
                    totals = vectors
                else:
                    for n in totals:
                        totals[n] += vectors[n]
            server.append(t.wall)
        with Timer() as t:
            aggregate = OrderedDict((n, (v * (1.0 / len(payloads))).serialize())
                                    for n, v in totals.items())
        finalize.append(t.wall)
        with Timer() as t:
            mean = reference_decrypt(context, aggregate, shapes)
        decrypt.append(t.wall)
        sent = [flat(reference_prune(u, sparsity)) for u in updates]
        errors.append(float(np.abs(flat(mean) - np.mean(sent, axis=0)).max()))
    return {
        "prune_ratio": sparsity,
        "bytes_per_round": upload,
        "ratio_to_plaintext": upload / (4 * num_params),
        "client_seconds": median(client),
        "client_cpu_seconds": median(client_cpu),
        "server_seconds_per_silo": median(server),
        "server_finalize_seconds": median(finalize),
        "silo_decrypt_seconds": median(decrypt),
        "max_abs_error": max(errors),
        "error_against": "unweighted mean of the pruned (zeroed) updates, as FedShield-LLM "
                         "averages",
        "client_seconds_per_1M_params": per_million(median(client), num_params),
        "client_cpu_seconds_per_1M_params": per_million(median(client_cpu), num_params),
        "server_seconds_per_silo_per_1M_params": per_million(median(server), num_params),
        "setup_seconds": setup.wall,
        "public_context_bytes": public_bytes,
        "params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60],
                   "scale_bits": 40, "galois_keys": True, "encryption": "public key"},
    }


def machine_info() -> dict[str, Any]:
    import tenseal

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tenseal": tenseal.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def check_targets(results: dict[str, Any]) -> dict[str, bool]:
    shield = [results[k] for k in SHIELD_SCHEMES if k in results]
    checks = {
        "shield-dense ratio_to_plaintext <=": results.get("shield-dense", {}).get(
            "ratio_to_plaintext"),
        "shield-p75 ratio_to_plaintext <=": results.get("shield-p75", {}).get(
            "ratio_to_plaintext"),
        "shield-p75 client_seconds_per_1M_params <=": results.get("shield-p75", {}).get(
            "client_seconds_per_1M_params"),
        "shield-* server_seconds_per_silo_per_1M_params <=": max(
            (s["server_seconds_per_silo_per_1M_params"] for s in shield), default=None),
        "shield-* max_abs_error <=": max((s["max_abs_error"] for s in shield), default=None),
    }
    return {k: (v is not None and v <= TARGETS[k]) for k, v in checks.items()}


def print_table(results: dict[str, Any], num_params: int) -> None:
    head = (f"{'scheme':<24}{'bytes/round':>13}{'x fp32':>8}{'client s':>10}{'s/1M':>8}"
            f"{'server s/silo':>15}{'s/1M':>8}{'decrypt s':>11}{'max err':>10}")
    print(f"\nadapter: {num_params:,} params, fp32 {4 * num_params:,} bytes")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if not isinstance(r, dict) or "bytes_per_round" not in r:
            continue
        print(f"{name:<24}{r['bytes_per_round']:>13,}{r['ratio_to_plaintext']:>8.2f}"
              f"{r['client_seconds']:>10.3f}{r['client_seconds_per_1M_params']:>8.3f}"
              f"{r['server_seconds_per_silo']:>15.4f}"
              f"{r['server_seconds_per_silo_per_1M_params']:>8.4f}"
              f"{r['silo_decrypt_seconds']:>11.3f}{r['max_abs_error']:>10.1e}")
    dense = results.get("shield-dense", {})
    if "client_seconds_parallel" in dense:
        print(f"shield-dense with {dense['parallel_workers']} processes (pool started per call): "
              f"client {dense['client_seconds_parallel']:.3f} s "
              f"({dense['client_seconds_parallel_per_1M_params']:.3f} s/1M)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=None,
                        help="synthetic adapter size (default: LoRA r=16 q,k,v,o of "
                             "SmolLM2-135M = 1,843,200)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the default adapter")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for the parallel shield-dense measurement (1 = skip)")
    parser.add_argument("--reference-sparsity", type=float, default=0.75,
                        help="FedShield-LLM pruning ratio (its bytes do not depend on it)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    shapes = (synthetic_shapes(args.params) if args.params else smollm2_lora_shapes(args.rank))
    num_params = int(sum(np.prod(s) for s in shapes.values()))
    updates = make_updates(shapes, args.silos, args.seed)
    weights = [1.0 + 0.5 * i for i in range(args.silos)]
    results: dict[str, Any] = {}
    machine = machine_info()
    if not args.skip_reference:
        print("fedshield-llm-reference ...", flush=True)
        results["fedshield-llm-reference"] = bench_reference(updates, args.repeat, num_params,
                                                             args.reference_sparsity)
    for name, ratio in SHIELD_SCHEMES.items():
        print(f"{name} ...", flush=True)
        results[name] = bench_shield(name, ratio, updates, weights, args.repeat, num_params,
                                     args.workers if name == "shield-dense" else 1)
    machine["load_average_at_end"] = list(os.getloadavg())
    results["config"] = {
        "num_params": num_params,
        "plaintext_bytes": 4 * num_params,
        "adapter": "synthetic" if args.params else f"SmolLM2-135M LoRA r={args.rank} q,k,v,o",
        "silos": args.silos,
        "weights": weights,
        "repeat": args.repeat,
        "update_scale": UPDATE_SCALE,
        "seconds": "median over silos and repeats, wall clock",
    }
    results["machine"] = machine
    results["targets"] = {k: {"limit": v} for k, v in TARGETS.items()}
    for key, met in check_targets(results).items():
        results["targets"][key]["met"] = met
    print_table(results, num_params)
    print("\ntargets:")
    for key, item in results["targets"].items():
        print(f"  {'OK ' if item['met'] else 'MISS'} {key} {item['limit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
