"""Benchmark of split learning through the gRPC relay on loopback (writes results/split.json).

One relay process (middle blocks) and four silo processes, on the same model, batches and seed.
Solo phases (only silo 0 connected) and four-silo phases alternate twice, so that every figure
sees the same background load over time (the machine may be shared):

* ``tokens_per_s_local``: unsplit LoRA training, run by silo 0 in solo phases step by step
  alternating with its split step on the same batch (the baseline);
* ``tokens_per_s_split_1``: silo 0 alone through the relay (solo phases);
* ``tokens_per_s_split_4``: the four silos concurrently (client batching), total tokens over
  wall time, with the relay process's RSS sampled over the timed part;
* ``bytes_per_token`` for fp32 / fp16 / int8 frames (all four transfers of a step, serialized
  protobuf bytes, per real token) against ``bytes_per_token_fedsea_reference``: left-padded fp16
  hidden states as FedSEA-LLaMA sends them, on the same length-varying batches;
* ``loss_with_noise``: training and held-out loss after split training with FedSEA noise at two
  relative sigmas, next to the noise-free run.

Run ``.venv/bin/python benchmarks/split.py`` (default: a random 8-block Llama with hidden 256 and
the embedded Q/A data, ~2-3 min on 2 CPU cores) or ``--model embedded:smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedshield_flwr.config import LoraSettings  # noqa: E402
from fedshield_flwr.models.load import cache_root, load_base_model, load_tokenizer  # noqa: E402
from fedshield_flwr.models.lora import apply_lora  # noqa: E402
from fedshield_flwr.split.arch import SplitLayout  # noqa: E402
from fedshield_flwr.split.middle import MiddleServer  # noqa: E402
from fedshield_flwr.split.settings import SplitSettings  # noqa: E402
from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer, SplitSilo  # noqa: E402

BENCH_MODELS = {
    # a mid-size random Llama: big enough that a step is compute bound, as with real models
    "bench:llama-mid": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ),
}


def model_path(name: str) -> str:
    """A loadable name: ``bench:*`` models are built once into the fedshield cache."""
    if name not in BENCH_MODELS:
        return name
    target = cache_root() / "models" / name.replace(":", "-")
    if not (target / "config.json").exists():
        from transformers import AutoModelForCausalLM, LlamaConfig

        from fedshield_flwr.models.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **BENCH_MODELS[name])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    return str(target)


def make_batches(name: str, n: int, batch: int, max_length: int, seed: int):
    """``n`` right-padded batches of embedded Q/A pairs (instruction, newline, response)."""
    from fedshield_flwr.data.embedded import chatterbot_pairs

    tok = load_tokenizer(name)
    pairs = chatterbot_pairs()
    order = np.random.default_rng(seed).permutation(len(pairs))
    out = []
    for b in range(n):
        rows = [pairs[int(i)] for i in order[b * batch : (b + 1) * batch]]
        texts = [r["instruction"] + "\n" + r["response"] + (tok.eos_token or "") for r in rows]
        enc = tok(
            texts,
            truncation=True,
            max_length=max_length,
            padding=True,
            padding_side="right",
            return_tensors="np",
        )
        out.append((enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)))
    return out


def _lora(args) -> LoraSettings:
    return LoraSettings(r=8, alpha=16, dropout=0.0)


def _settings(args, **extra) -> SplitSettings:
    return SplitSettings.from_section(
        {"head-layers": args.head_layers, "tail-layers": args.tail_layers, **extra}
    )


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensors(b):
    return torch.from_numpy(b[0]), torch.from_numpy(b[1])


# ---------------------------------------------------------------------------------------------
# processes


def server_proc(args, names, threads, ctrl_q, out_q, stop_evt):
    """The relay with the middle blocks; samples its own RSS."""
    from fedshield_flwr.split.relay import RelayServer

    torch.set_num_threads(threads)
    settings = _settings(args, **{"batch-window-ms": args.window_ms})
    middle = MiddleServer.from_pretrained(
        args.path, settings, _lora(args), seed=args.seed, learning_rate=args.lr
    )
    relay = RelayServer(middle, settings)
    port = relay.start(port=0, host="127.0.0.1")
    ctrl_q.put((port, {n: relay.issue_token(n, round=1) for n in names}))
    samples: list[tuple[float, float]] = []
    while not stop_evt.wait(0.25):
        samples.append((time.time(), _rss_mb()))
    stats = relay.stats()
    relay.stop()
    out_q.put({"rss": samples, "stats": stats})


def silo_proc(args, idx, port, token, batches, schedule, threads, barrier, out_q):
    """One silo process: follows ``schedule``, a list of ``(phase, steps, timed)``.

    ``solo`` phases: only silo 0 trains through the relay, alternating step by step with the
    unsplit baseline on the same batch (both then see the same CPU: the machine may be shared);
    the other silos are disconnected. ``all`` phases: the four silos train concurrently.
    """
    from fedshield_flwr.split.relay import RelayClient

    torch.set_num_threads(threads)
    name = f"silo-{idx}"
    silo = SplitSilo.from_pretrained(args.path, _settings(args), _lora(args), seed=args.seed)
    local = LocalBaseline(args) if idx == 0 else None
    trainer = SiloTrainer(silo, None, learning_rate=args.lr, name=name)
    batch_iter = iter(batches)
    link, phases, losses = None, [], []
    for phase, steps, timed in schedule:
        active = idx == 0 or phase == "all"
        if active and link is None:
            link = RelayClient(f"127.0.0.1:{port}", token, name, silo.layout.fingerprint())
            trainer.link = link.connect()
        barrier.wait(timeout=600)
        t0, busy, tokens = time.time(), 0.0, 0
        for _ in range(steps if active else 0):
            b = next(batch_iter)
            if phase == "solo":
                local.step(b, timed)
            t = time.perf_counter()
            r = trainer.train_step(*_tensors(b))
            busy += time.perf_counter() - t
            tokens += r.tokens
            losses.append(r.loss)
        t1 = time.time()
        barrier.wait(timeout=600)
        if active:
            phases.append(
                {
                    "phase": phase,
                    "timed": timed,
                    "t0": t0,
                    "t1": t1,
                    "tokens": tokens,
                    "split_seconds": busy,
                }
            )
        if idx != 0 and link is not None:  # leave, so that solo steps never wait for us
            link.close()
            link = None
    out = {
        "idx": idx,
        "phases": phases,
        "losses": losses,
        "local": local.result() if local is not None else None,
    }
    if link is not None:
        out["traffic"] = link.traffic()
        link.close()
    out_q.put(out)


class LocalBaseline:
    """Unsplit LoRA training of the same model: the reference for throughput and losses."""

    def __init__(self, args):
        self.model = apply_lora(load_base_model(args.path), _lora(args), seed=args.seed)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args.lr
        )
        self.losses: list[float] = []
        self.tokens, self.seconds = 0, 0.0

    def step(self, b, timed: bool) -> None:
        ids, mask = _tensors(b)
        self.model.train()
        t = time.perf_counter()
        loss = self.model(
            input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        ).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timed:
            self.seconds += time.perf_counter() - t
            self.tokens += int(mask.sum())
        self.losses.append(float(loss.detach()))

    def result(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds, "losses": self.losses}


def run_split(args, batches: list, threads: int) -> dict:
    """Relay process + four silo processes; alternating solo and four-silo phases."""
    ctx = mp.get_context("spawn")
    names = [f"silo-{i}" for i in range(4)]
    half = max(1, args.steps // 2)
    # warm up both modes, then alternate solo / all twice so both see the same load over time
    schedule = [("solo", args.warmup, False), ("all", args.warmup, False)]
    schedule += [("solo", half, True), ("all", half, True)] * 2
    n_solo = sum(n for p, n, _ in schedule if p == "solo")
    n_all = sum(n for p, n, _ in schedule if p == "all")
    per_silo = [batches[: n_solo + n_all]]
    for i in range(1, 4):
        start = n_solo + n_all + (i - 1) * n_all
        per_silo.append(batches[start : start + n_all])
    ctrl_q, out_q, stop_evt = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=server_proc, args=(args, names, threads, ctrl_q, out_q, stop_evt))
    server.start()
    port, tokens = ctrl_q.get(timeout=300)
    barrier = ctx.Barrier(4)
    silos = [
        ctx.Process(
            target=silo_proc,
            args=(args, i, port, tokens[names[i]], per_silo[i], schedule, threads, barrier, out_q),
        )
        for i in range(4)
    ]
    for p in silos:
        p.start()
    results = sorted((out_q.get(timeout=900) for _ in silos), key=lambda r: r["idx"])
    for p in silos:
        p.join(60)
    stop_evt.set()
    srv = out_q.get(timeout=60)
    server.join(60)

    solo = [ph for ph in results[0]["phases"] if ph["phase"] == "solo" and ph["timed"]]
    split1_tps = sum(ph["tokens"] for ph in solo) / sum(ph["split_seconds"] for ph in solo)
    local = results[0]["local"]
    all_tok, all_sec, windows = 0, 0.0, []
    for k in range(2):  # the two timed four-silo phases
        ph = [[p for p in r["phases"] if p["phase"] == "all" and p["timed"]][k] for r in results]
        t0, t1 = min(p["t0"] for p in ph), max(p["t1"] for p in ph)
        all_tok += sum(p["tokens"] for p in ph)
        all_sec += t1 - t0
        windows.append((t0, t1))
    # server RSS from the first timed phase to the end: it must not grow with the steps
    first = min(ph["t0"] for ph in solo)
    last = max(w[1] for w in windows)
    timed = [m for t, m in srv["rss"] if first <= t <= last] or [m for _, m in srv["rss"]]
    series = [round(timed[int(i * (len(timed) - 1) / 9)], 1) for i in range(10)]
    return {
        "tokens_per_s_local": local["tokens"] / local["seconds"],
        "tokens_per_s_split_1": split1_tps,
        "tokens_per_s_split_4": all_tok / all_sec,
        "server_rss_mb": {
            "start": round(timed[0], 1),
            "peak": round(max(timed), 1),
            "end": round(timed[-1], 1),
            "series_10": series,
        },
        "server_stats": {k: v for k, v in srv["stats"].items() if k != "drops"},
        "local_losses": local["losses"],
        "split_losses": results[0]["losses"],
        "schedule": schedule,
    }


# ---------------------------------------------------------------------------------------------
# in-process measurements


def measure_bytes(args, batches) -> dict:
    """Wire bytes per real token for each dtype, and the FedSEA left-padded fp16 reference."""
    from fedshield_flwr.split.relay import RelayClient, RelayServer

    out: dict = {}
    settings = _settings(args)
    middle = MiddleServer.from_pretrained(
        args.path, settings, _lora(args), seed=args.seed, learning_rate=args.lr
    )
    silo = SplitSilo.from_pretrained(args.path, settings, _lora(args), seed=args.seed)
    hidden = silo.layout.hidden_size
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        for dtype in ("fp32", "fp16", "int8"):
            link = RelayClient(
                relay.address,
                relay.issue_token(dtype, 1),
                dtype,
                silo.layout.fingerprint(),
                activation_dtype=dtype,
            ).connect()
            trainer = SiloTrainer(silo, link, learning_rate=args.lr)
            tokens = sum(trainer.train_step(*_tensors(b)).tokens for b in batches)
            t = link.traffic()
            step_bytes = sum(
                v for k, v in t.items() if k.split("_", 1)[-1] in ("forward", "backward")
            )
            link.close()
            out[dtype] = round(step_bytes / tokens, 1)
    # FedSEA: hidden states left-padded to the batch's longest sequence, fp16, in each of the
    # four transfers of a U-shaped step (head->server, server->tail, and both gradients back).
    padded = sum(b[1].shape[0] * b[1].shape[1] for b in batches)
    real = sum(int(b[1].sum()) for b in batches)
    reference = 4 * padded * hidden * 2 / real
    return {
        "bytes_per_token": out,
        "bytes_per_token_fedsea_reference": round(reference, 1),
        "padding_fraction": round(1 - real / padded, 3),
    }


def measure_noise(args, train_batches, eval_batches, sigmas) -> dict:
    """Loss after split training with relative Gaussian noise on the head output.

    ``train_loss_last``: mean training loss (noisy forward) of the last 3 steps; ``eval_loss``:
    held-out loss of the trained adapters without noise.
    """
    out: dict = {}
    for sigma in (0.0, *sigmas):
        settings = _settings(args)
        middle = MiddleServer.from_pretrained(
            args.path, settings, _lora(args), seed=args.seed, learning_rate=args.lr
        )
        silo = SplitSilo.from_pretrained(args.path, settings, _lora(args), seed=args.seed)
        middle.set_learning_rate(args.noise_lr)
        trainer = SiloTrainer(
            silo, LocalLink(middle), learning_rate=args.noise_lr, noise_sigma=sigma, seed=args.seed
        )
        losses = [trainer.train_step(*_tensors(b)).loss for b in train_batches]
        clean = SiloTrainer(silo, LocalLink(middle), noise_sigma=0.0)
        held_out = float(np.mean([clean.evaluate(*_tensors(b)) for b in eval_batches]))
        out[f"sigma={sigma:g}"] = {
            "train_loss_last": round(float(np.mean(losses[-3:])), 4),
            "eval_loss": round(held_out, 4),
        }
    return out


# ---------------------------------------------------------------------------------------------


def measure_parts(models: list[str], head: int, tail: int) -> dict:
    """What a silo downloads instead of the model: the parts package of each model."""
    from fedshield_flwr.models.lora import get_adapter_state
    from fedshield_flwr.split.parts import build_parts_package

    out = {}
    for name in dict.fromkeys(models):
        path = model_path(name)
        base = load_base_model(path)
        layout = SplitLayout.for_model(base, head, tail)
        middle = tuple(f"layers.{i}." for i in layout.middle)  # Llama-style block names
        adapter = {k: v for k, v in get_adapter_state(apply_lora(load_base_model(path),
                                                                 LoraSettings())).items()
                   if not any(m in k for m in middle)}
        t = time.time()
        pkg = build_parts_package(base, layout, load_tokenizer(path), adapter, source=name)
        sent = sum(int(np.prod(s)) for s in pkg.manifest["params"].values())
        full = pkg.manifest["num_params_full"]
        out[name] = {"layout": layout.fingerprint(), "package_bytes": pkg.nbytes,
                     "params_sent": sent, "params_full": full,
                     "params_sent_fraction": round(sent / full, 4),
                     "full_model_fp32_bytes": 4 * full,
                     "build_seconds": round(time.time() - t, 2)}
        print(f"silo parts of {name} ({layout.fingerprint()}): {pkg.nbytes / 1e6:.1f} MB, "
              f"{sent:,} of {full:,} parameters ({sent / full:.1%})", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="bench:llama-mid",
        help="bench:llama-mid (default), tiny:llama, embedded:smollm2-135m-instruct, "
        "an HF id or a local directory",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per silo")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--head-layers", type=int, default=1)
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--window-ms", type=float, default=200.0)
    p.add_argument("--noise-steps", type=int, default=10)
    p.add_argument(
        "--noise-lr",
        type=float,
        default=3e-3,
        help="learning rate of the noise runs (high, so that a few steps learn)",
    )
    p.add_argument("--sigmas", default="0.1,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: on a shared or busy CPU, OpenMP "
        "spinning makes more threads many times slower)",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="torch threads of the relay process in the 4-silo run (0: --threads)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "split.json"))
    p.add_argument("--parts-only", action="store_true",
                   help="only (re)measure the silo parts packages and update 'silo_parts' in --out")
    args = p.parse_args(argv)
    parts_models = [args.model, "embedded:smollm2-135m-instruct"]
    if args.parts_only:
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
        result["silo_parts"] = measure_parts(parts_models, args.head_layers, args.tail_layers)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return result
    args.path = model_path(args.model)
    t_start = time.time()
    torch.set_num_threads(args.threads)

    n_batches = 4 * (args.warmup + args.steps) + 2 * args.steps + 8
    all_batches = make_batches(args.path, n_batches, args.batch_size, args.max_length, args.seed)
    probe = SplitLayout.for_model(load_base_model(args.path), args.head_layers, args.tail_layers)
    print(
        f"model {args.model}: {probe.fingerprint()}, batch {args.batch_size} x <= "
        f"{args.max_length} tokens, {args.steps} timed steps per mode, {args.threads} threads",
        flush=True,
    )
    parts = {}
    t = time.time()
    split = run_split(args, all_batches, args.threads)
    parts["throughput"] = round(time.time() - t, 1)
    tps_local, tps_split1 = split["tokens_per_s_local"], split["tokens_per_s_split_1"]
    tps_split4 = split["tokens_per_s_split_4"]
    print(f"local {tps_local:.1f}, split x1 {tps_split1:.1f}, split x4 {tps_split4:.1f} tok/s")
    t = time.time()
    wire = measure_bytes(args, all_batches[:8])
    parts["bytes"] = round(time.time() - t, 1)
    t = time.time()
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    noise = measure_noise(args, all_batches[: args.noise_steps], all_batches[-4:], sigmas)

    result = {
        "model": args.model,
        "layout": probe.fingerprint(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "timed_steps_per_silo": args.steps,
        "threads": args.threads,
        "tokens_per_s_local": round(tps_local, 1),
        "tokens_per_s_split_1": round(tps_split1, 1),
        "tokens_per_s_split_4": round(tps_split4, 1),
        "ratio_split_1_vs_local": round(tps_split1 / tps_local, 3),
        "ratio_split_4_vs_split_1": round(tps_split4 / tps_split1, 3),
        "server_rss_mb": split["server_rss_mb"],
        "server_stats": split["server_stats"],
        "schedule": [f"{p}x{n}{'' if t else ' (warm-up)'}" for p, n, t in split["schedule"]],
        **wire,
        "fp16_vs_fedsea_reference": round(
            wire["bytes_per_token"]["fp16"] / wire["bytes_per_token_fedsea_reference"], 3
        ),
        "loss_with_noise": noise,
        "silo_parts": measure_parts(parts_models, args.head_layers, args.tail_layers),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.time() - t_start, 1),
        "seconds_by_part": {**parts, "noise": round(time.time() - t, 1)},
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def print_table(r: dict) -> None:
    rows = [
        ("tokens/s local (unsplit LoRA)", f"{r['tokens_per_s_local']:.1f}", ""),
        (
            "tokens/s split, 1 silo",
            f"{r['tokens_per_s_split_1']:.1f}",
            f"x{r['ratio_split_1_vs_local']:.2f} of local (target >= 0.85)",
        ),
        (
            "tokens/s split, 4 silos total",
            f"{r['tokens_per_s_split_4']:.1f}",
            f"x{r['ratio_split_4_vs_split_1']:.2f} of 1 silo (target >= 1)",
        ),
        (
            "server RSS MB (start/peak/end)",
            "{start}/{peak}/{end}".format(**r["server_rss_mb"]),
            "timed part of the run",
        ),
    ]
    for k, v in r["bytes_per_token"].items():
        rows.append((f"bytes/token {k}", f"{v:.0f}", ""))
    rows.append(
        (
            "bytes/token FedSEA fp16 padded",
            f"{r['bytes_per_token_fedsea_reference']:.0f}",
            f"fp16 = x{r['fp16_vs_fedsea_reference']:.2f} (target <= 0.5)",
        )
    )
    for k, v in r["loss_with_noise"].items():
        rows.append(
            (
                f"loss {k}",
                f"{v['train_loss_last']:.3f} / {v['eval_loss']:.3f}",
                "train (last 3) / held-out",
            )
        )
    w = max(len(a) for a, _, _ in rows)
    print()
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>16}  {c}")
    print()


if __name__ == "__main__":
    main()
