"""The audit's table, JSON and plot (attack success against noise and head depth)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(res: dict) -> str:
    """A plain-text summary: the split grid, the frontier, the membership attacks, sanity."""
    lines = [f"fedshield audit: {res.get('model')} on {res.get('data')} "
             f"({res.get('public_rows')} public rows, {res.get('eval_rows')} held-out silo rows, "
             f"{res.get('eval_content_tokens')} content tokens)"]
    grid = res.get("split_grid", [])
    if grid:
        sigmas = sorted({g["sigma"] for g in grid})
        lines.append("\nsplit, curious server: top-1 content-token recovery "
                     "(learned / white-box nearest neighbour)")
        lines.append("head-layers | " + " | ".join(f"sigma={s:g}" for s in sigmas))
        for h in sorted({g["head_layers"] for g in grid}):
            cells = []
            for s in sigmas:
                by = {g["attack"]: g["token_recovery"] for g in grid
                      if g["head_layers"] == h and g["sigma"] == s}
                cells.append(f"{100 * by.get('learned', math.nan):5.1f}% / "
                             f"{100 * by.get('nearest_neighbour', math.nan):5.1f}%")
            lines.append(f"{h:>11} | " + " | ".join(cells))
    for g in res.get("split_dp_grid", []):
        if g["attack"] == "learned":
            lines.append(f"  clip-norm={g['clip_norm']:.3g} noise-multiplier={g['noise_multiplier']:g}"
                         f" (eps={_f(g['token_epsilon'], 2)} per token at delta={g['dp_delta']:g})"
                         f" head={g['head_layers']}: learned {100 * g['token_recovery']:.1f}%")
    for r in res.get("split_frontier", []):
        lines.append(f"  frontier z={r['noise_multiplier']:g}: eval loss {r['eval_loss']:.4f} "
                     f"(x{r['loss_ratio']:.3f}), recovery {_f(r['token_recovery'])}")
    if "split_gradients" in res:
        lines.append(f"split gradients -> target tokens: "
                     f"{100 * res['split_gradients']['target_recovery']:.1f}%")
    if "split_trained_head" in res:
        lines.append(f"split, head LoRA trained {res['split_trained_head']['steps']} steps: "
                     f"{100 * res['split_trained_head']['token_recovery']:.1f}%")
    mia = res.get("mia", {})
    if mia:
        lines.append("\nmembership inference AUC (0.5 = chance)")
        for k in ("fedavg_server_auc", "lpp_server_auc", "shield_server_auc",
                  "shield_colluding_silo_auc"):
            if k in mia:
                extra = ""
                if k == "shield_server_auc" and mia.get("shield_server_auc_views"):
                    sem = mia.get("shield_server_auc_sem")
                    extra = (f"  (mean of {len(mia['shield_server_auc_views'])} uploads"
                             + (f", +-{sem:.3f} s.e.)" if sem is not None else ")"))
                lines.append(f"  {k:28s} {mia[k]:.3f}{extra}")
        if "chance_band_95" in mia:
            lines.append(f"  (one AUC on {mia.get('members')} + {mia.get('nonmembers')} rows: "
                         f"chance is 0.5 +- {mia['chance_band_95']:.3f} at 95%)")
        for k in ("final_model_auc", "final_model_loss_threshold_auc"):
            for mode, v in mia.get(k, {}).items():
                lines.append(f"  {k} [{mode}] {v:.3f}")
    for name, s in res.get("sanity", {}).items():
        ok = s.get("strong_enough")
        flag = "" if ok is None else ("  ok" if ok else "  NOT STRONG ENOUGH")
        val = s.get("token_recovery", s.get("target_recovery", s.get("auc")))
        lines.append(f"sanity {name}: {_f(val)}{flag}")
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return _clean(x.item())
    return x


def write_json(res: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(res), indent=2) + "\n")
    return path


def plot(res: dict, path: str | Path) -> Path | None:
    """Recovery against ``split.noise-sigma`` per head depth and attack; the frontier beside it."""
    grid = res.get("split_grid", [])
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for h in sorted({g["head_layers"] for g in grid}):
        for attack, style in (("learned", "-o"), ("nearest_neighbour", "--s")):
            pts = sorted((g["sigma"], g["token_recovery"]) for g in grid
                         if g["head_layers"] == h and g["attack"] == attack)
            if pts:
                ax.plot(*zip(*pts), style, label=f"head {h}, {attack}")
    ax.set_xlabel("split.noise-sigma (relative to mean |h|)")
    ax.set_ylabel("top-1 content-token recovery")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.05, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    ax.set_title("curious server inverting head outputs")
    ax = axes[1]
    fr = [r for r in res.get("split_frontier", []) if r.get("token_recovery") is not None]
    if fr:
        ax.plot([r["loss_ratio"] for r in fr], [r["token_recovery"] for r in fr], "-o")
        for r in fr:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["loss_ratio"], r["token_recovery"]),
                        fontsize=7)
        ax.axhline(0.05, color="grey", lw=0.8, ls=":")
        ax.axvline(1.05, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("held-out loss / no-noise loss")
        ax.set_ylabel("learned-attack recovery")
        ax.set_title("clip + Gaussian: recovery vs loss cost")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
