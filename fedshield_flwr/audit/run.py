"""``fedshield audit``: build every mode's artifacts from a run config and attack them.

:func:`run_audit` returns one JSON-able dict (the shape of ``benchmarks/results/privacy.json``);
:mod:`fedshield_flwr.audit.report` prints and plots it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from fedshield_flwr.audit.artifacts import (
    AuditData,
    build_data,
    full_model,
    local_round,
    split_settings,
)
from fedshield_flwr.audit.inversion import (
    NoiseSpec,
    RidgeInversion,
    candidate_head_outputs,
    head_rows,
    naive_embedding_attack,
    nearest_neighbour_attack,
)
from fedshield_flwr.audit.membership import auc, loss_threshold_auc, reference_auc
from fedshield_flwr.audit.tokens import recovery
from fedshield_flwr.config import ConfigError, RunConfig

AUDITABLE_MODES = ("fedavg", "lpp", "shield", "split")


class AuditError(ValueError):
    """A run config the audit cannot attack; the message says why and what to change."""


@dataclass(frozen=True)
class AuditOptions:
    """What to attack and how much data to spend.

    Parameters
    ----------
    modes : tuple of str
        Modes whose artifacts are attacked (default: all four).
    sigmas, head_layers : tuple
        The split grid of ``split.noise-sigma`` and ``split.head-layers``.
    dp_multipliers : tuple of float
        ``split.noise-multiplier`` values of the frontier (with ``split.clip-norm`` = the median
        public head-output row norm when the run config leaves clip-norm 0).
    public_rows, eval_rows : int
        Rows of the server's public text; held-out silo rows attacked.
    split_steps : int
        Split training steps on the silo (trained-head inversion, gradients, quality).
    nn_vocab : int
        Candidates of the white-box nearest-neighbour attack (0: the whole vocabulary).
    frontier : bool
        Also train split at each ``dp_multipliers`` point for its held-out loss.
    shield_views : int
        Independent shield uploads of the silo's update (fresh CKKS randomness each, as the
        server receives one per round) attacked by the shield server; it reports their mean AUC
        (one AUC on the demo's ~45 rows a side is only good to +-0.12).
    split_grid : bool
        Run split's inversion grid (and the frontier); ``False``: only split's training round
        (gradients, trained head, the released model's membership inference).
    progress : bool
    """

    modes: tuple[str, ...] = AUDITABLE_MODES
    sigmas: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0)
    head_layers: tuple[int, ...] = (1, 2, 4)
    dp_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    public_rows: int = 120
    eval_rows: int = 24
    split_steps: int = 8
    nn_vocab: int = 0
    frontier: bool = True
    split_grid: bool = True
    shield_views: int = 8
    progress: bool = True


def check_auditable(cfg: RunConfig, opts: AuditOptions) -> None:
    """Refuse, with the reason, what the audit cannot attack."""
    bad = [m for m in opts.modes if m not in AUDITABLE_MODES]
    if bad:
        raise AuditError(f"audit: cannot attack mode(s) {bad}; known: {', '.join(AUDITABLE_MODES)}")
    if cfg.model.quantization:
        raise AuditError("audit: model.quantization > 0 (a bitsandbytes base) is not supported: the "
                         "attacks need the full-precision public base; set model.quantization=0 "
                         "(lpp's quantization is audited as lpp)")
    if "split" in opts.modes:
        from fedshield_flwr.models.load import load_base_model

        n = load_base_model(cfg.model.name, 0).config.num_hidden_layers
        deepest = max(opts.head_layers) + split_settings(cfg).tail_layers
        if deepest >= n:
            raise AuditError(f"audit: {cfg.model.name} has {n} decoder blocks; split.head-layers "
                             f"up to {max(opts.head_layers)} plus tail-layers leaves no middle; "
                             "lower --head-layers")


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _split_parts(cfg: RunConfig, head: int, lr: float):
    from fedshield_flwr.split.middle import MiddleServer
    from fedshield_flwr.split.silo_model import SplitSilo

    s = split_settings(cfg, head_layers=head)
    silo = SplitSilo.from_pretrained(cfg.model.name, s, cfg.model.lora, seed=cfg.train.seed)
    middle = MiddleServer.from_pretrained(cfg.model.name, s, cfg.model.lora, seed=cfg.train.seed,
                                          learning_rate=lr)
    return s, silo, middle


def _batches(tok_rows, pad_id, batch_size, steps, seed):
    from fedshield_flwr.train import batch_schedule, collate

    sched = batch_schedule(len(tok_rows), batch_size, steps, seed)
    return [collate([tok_rows[i] for i in idx], pad_id) for idx in sched], sched


def _split_eval_loss(trainer, tok_rows, pad_id, batch_size=8) -> float:
    from fedshield_flwr.data.templates import IGNORE_INDEX
    from fedshield_flwr.train import collate

    total, count = 0.0, 0
    for i in range(0, len(tok_rows), batch_size):
        b = collate(tok_rows[i:i + batch_size], pad_id)
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n:
            total += trainer.evaluate(b["input_ids"], b["attention_mask"], b["labels"]) * n
            count += n
    return total / max(count, 1)


def _public_fit(pub_silo, data: AuditData, pad_id, noise: NoiseSpec, emb, seed):
    rows = head_rows(pub_silo, data.public_tok, data.public_masks, pad_id, noise, seed=seed + 7)
    return RidgeInversion(emb).fit(rows.features, rows.tokens)


def split_inversion(cfg: RunConfig, data: AuditData, tok, opts: AuditOptions, out: dict) -> None:
    """The split grid: each head depth x noise, the white-box and the learned attack."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prefix = data.silo_eval_tok[0]["input_ids"][0]
    grid, sanity = [], {}
    bar = _bar(len(opts.head_layers) * (len(opts.sigmas) + len(opts.dp_multipliers)),
               "split inversion", opts.progress)
    for head in opts.head_layers:
        s, silo, _ = _split_parts(cfg, head, 0.0)
        emb = silo.peft_model.get_input_embeddings().weight.detach().float().numpy()
        vocab = len(emb) if opts.nn_vocab <= 0 else min(opts.nn_vocab, len(emb))
        dictionary = candidate_head_outputs(silo, int(prefix), vocab)
        clean_pub = head_rows(silo, data.public_tok, data.public_masks, pad_id)
        norms = np.linalg.norm(clean_pub.features, axis=1)
        clip = s.clip_norm if s.clip_norm > 0 else float(np.median(norms))
        out.setdefault("head_norms", {})[str(head)] = {
            "median": float(np.median(norms)), "p90": float(np.percentile(norms, 90))}
        points = [("sigma", sg, NoiseSpec(sigma=sg)) for sg in opts.sigmas]
        points += [("dp", z, NoiseSpec(clip_norm=clip, noise_multiplier=z))
                   for z in opts.dp_multipliers]
        for kind, value, noise in points:
            victim = head_rows(silo, data.silo_eval_tok, data.silo_eval_masks, pad_id, noise,
                               seed=cfg.train.seed)
            ridge = _public_fit(silo, data, pad_id, noise, emb, cfg.train.seed)
            preds = {"learned": ridge.predict(victim.features),
                     "nearest_neighbour": nearest_neighbour_attack(victim, dictionary)}
            if kind == "sigma" and value == 0:
                preds["naive_embedding"] = naive_embedding_attack(victim, emb)
            for attack, pred in preds.items():
                entry = {"head_layers": head, "attack": attack,
                         "token_recovery": recovery(pred, victim.tokens, victim.content),
                         "token_recovery_all_positions": recovery(pred, victim.tokens)}
                if kind == "sigma":
                    entry["sigma"] = value
                else:
                    entry.update(sigma=0.0, clip_norm=clip, noise_multiplier=value,
                                 token_epsilon=replace(s, clip_norm=clip,
                                                       noise_multiplier=value).token_epsilon(),
                                 dp_delta=s.dp_delta)
                grid.append(entry)
            bar.update(1)
        del silo
    bar.close()
    out["split_grid"] = [g for g in grid if "noise_multiplier" not in g]
    out["split_dp_grid"] = [g for g in grid if "noise_multiplier" in g]
    win = [g for g in out["split_grid"] if g["sigma"] == 0 and g["head_layers"] == min(opts.head_layers)]
    best = max((g["token_recovery"] for g in win if g["attack"] != "naive_embedding"), default=math.nan)
    sanity["split_inversion_sigma0"] = {"token_recovery": best, "required": 0.5,
                                        "strong_enough": bool(best >= 0.5)}
    out.setdefault("sanity", {}).update(sanity)


def split_training(cfg: RunConfig, data: AuditData, tok, opts: AuditOptions, out: dict) -> None:
    """Trained-head inversion, gradient leakage, the run's split settings' loss and final MIA."""
    from fedshield_flwr.audit.gradients import RecordingLink, record_training
    from fedshield_flwr.models.lora import set_adapter_state
    from fedshield_flwr.split.arch import merge_adapter_states
    from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer
    from fedshield_flwr.train import cosine_lr

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t = cfg.train
    lr = cosine_lr(1, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min)
    s, silo, middle = _split_parts(cfg, split_settings(cfg).head_layers, lr)
    noise = NoiseSpec(s.noise_sigma, s.clip_norm, s.noise_multiplier)
    link = RecordingLink(LocalLink(middle))
    trainer = SiloTrainer(silo, link, learning_rate=lr, max_grad_norm=t.max_grad_norm,
                          noise_sigma=s.noise_sigma, clip_norm=s.clip_norm,
                          noise_multiplier=s.noise_multiplier, seed=t.seed)
    batches, sched = _batches(data.silo_train_tok, pad_id, t.batch_size, opts.split_steps,
                              t.seed + 1000)
    t0 = time.time()
    grads = []
    for b in tqdm(batches, desc="split training", disable=not opts.progress, leave=False):
        grads.append(record_training(trainer, link, [b]))
    train_s = time.time() - t0
    # the server's simulation on public text with the public base: its gradient model
    _, pub_silo, pub_mid = _split_parts(cfg, s.head_layers, 0.0)
    pub_link = RecordingLink(LocalLink(pub_mid))
    pub_trainer = SiloTrainer(pub_silo, pub_link, learning_rate=0.0, noise_sigma=s.noise_sigma,
                              clip_norm=s.clip_norm, noise_multiplier=s.noise_multiplier,
                              seed=t.seed + 3)
    n_pub = max(1, math.ceil(len(data.public_tok) / t.batch_size))
    pub_batches, _ = _batches(data.public_tok, pad_id, t.batch_size, n_pub, t.seed + 5)
    pub = [record_training(pub_trainer, pub_link, [b]) for b in
           tqdm(pub_batches, desc="server's public gradients", disable=not opts.progress,
                leave=False)]
    out_emb = pub_silo.peft_model.get_output_embeddings().weight.detach().float().numpy()
    ridge = RidgeInversion(out_emb, normalize=True).fit(
        np.concatenate([g.features for g in pub]), np.concatenate([g.targets for g in pub]))
    feats = np.concatenate([g.features for g in grads])
    targets = np.concatenate([g.targets for g in grads])
    grad_rec = recovery(ridge.predict(feats), targets)
    out["split_gradients"] = {"attack": "learned", "target_recovery": grad_rec,
                              "positions": int(targets.size), "settings": _settings_dict(s)}
    rnd = np.random.default_rng(0).integers(0, len(out_emb), size=targets.size)
    out.setdefault("sanity", {})["split_gradients"] = {
        "target_recovery": grad_rec, "required": 0.5, "strong_enough": bool(grad_rec >= 0.5),
        "random_guess_recovery": recovery(rnd, targets)}
    # inversion after the silo's head LoRA has trained (the server attacks with the public base)
    emb = pub_silo.peft_model.get_input_embeddings().weight.detach().float().numpy()
    victim = head_rows(silo, data.silo_eval_tok, data.silo_eval_masks, pad_id, noise, seed=t.seed)
    pub_ridge = _public_fit(pub_silo, data, pad_id, noise, emb, t.seed)
    out["split_trained_head"] = {
        "steps": opts.split_steps, "attack": "learned", "settings": _settings_dict(s),
        "token_recovery": recovery(pub_ridge.predict(victim.features), victim.tokens,
                                   victim.content)}
    eval_loss = _split_eval_loss(trainer, data.silo_eval_tok, pad_id)
    out["split_run"] = {"settings": _settings_dict(s), "steps": opts.split_steps,
                        "eval_loss": eval_loss, "train_s": train_s,
                        "token_epsilon": s.token_epsilon()}
    # the released split model: the merged adapter on the unsplit model
    model = full_model(cfg)
    set_adapter_state(model, merge_adapter_states(silo.adapter_state(), middle.adapter_state()))
    from fedshield_flwr.audit.updates import candidate_rows

    members, nonmembers, _ = candidate_rows(data.silo_train, {i for idx in sched for i in idx},
                                            data.silo_eval)
    out.setdefault("_final_models", {})["split"] = model
    out.setdefault("_members", {})["split"] = (members, nonmembers)


def split_frontier(cfg: RunConfig, data: AuditData, tok, opts: AuditOptions, out: dict) -> None:
    """Held-out loss after ``opts.split_steps`` real split steps at each frontier point.

    Points: no noise (the unsplit fedavg loss: split is exact without noise) and clip-norm =
    the median public row norm with each ``opts.dp_multipliers``; joined with the learned
    attack's recovery from ``split_dp_grid``.
    """
    from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer
    from fedshield_flwr.train import cosine_lr

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t = cfg.train
    lr = cosine_lr(1, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min)
    head = split_settings(cfg).head_layers
    clip = out["head_norms"][str(head)]["median"] if "head_norms" in out else 0.0
    points = [(0.0, 0.0)] + [(clip, z) for z in opts.dp_multipliers]
    batches, _ = _batches(data.silo_train_tok, pad_id, t.batch_size, opts.split_steps,
                          t.seed + 1000)
    rows = []
    for c, z in tqdm(points, desc="split frontier", disable=not opts.progress, leave=False):
        s, silo, middle = _split_parts(cfg, head, lr)
        trainer = SiloTrainer(silo, LocalLink(middle), learning_rate=lr,
                              max_grad_norm=t.max_grad_norm, clip_norm=c, noise_multiplier=z,
                              seed=t.seed)
        for b in batches:
            trainer.train_step(b["input_ids"], b["attention_mask"], b["labels"])
        loss = _split_eval_loss(trainer, data.silo_eval_tok, pad_id)
        rec = [g["token_recovery"] for g in out.get("split_dp_grid", [])
               if g["head_layers"] == head and g["noise_multiplier"] == z]
        rows.append({"head_layers": head, "clip_norm": c, "noise_multiplier": z,
                     "token_epsilon": replace(s, clip_norm=c, noise_multiplier=z).token_epsilon()
                     if z > 0 else math.inf,
                     "eval_loss": loss,
                     "token_recovery": max(rec) if rec else (
                         max(g["token_recovery"] for g in out["split_grid"]
                             if g["head_layers"] == head and g["sigma"] == 0
                             and g["attack"] != "naive_embedding") if z == 0 and "split_grid" in out
                         else None)})
    base = rows[0]["eval_loss"]
    for r in rows:
        r["loss_ratio"] = r["eval_loss"] / base
    out["split_frontier"] = rows


def _settings_dict(s) -> dict:
    return {"head_layers": s.head_layers, "tail_layers": s.tail_layers,
            "noise_sigma": s.noise_sigma, "clip_norm": s.clip_norm,
            "noise_multiplier": s.noise_multiplier, "dp_delta": s.dp_delta}


def shadow_update(cfg: RunConfig, data: AuditData, pad_id: int):
    """The server's own local round on its public rows (same config, from the same ``g``)."""
    model = full_model(cfg)
    _, shadow, _ = local_round(cfg, model, data.public_tok, pad_id)
    del model
    return shadow


def update_attacks(cfg: RunConfig, data: AuditData, tok, opts: AuditOptions, out: dict) -> None:
    """fedavg / lpp / shield: the server's update attack, shield's two views, eval losses.

    Every update is attacked with :func:`~fedshield_flwr.audit.updates.strong_attack` (the
    server's shadow update from its own local round on the public rows, extrapolated, log
    ratio); the plain ``loss(g) - loss(g + u)`` attack is reported beside it (``mia["plain"]``).
    """
    from fedshield_flwr.audit.membership import chance_band, row_losses
    from fedshield_flwr.audit.updates import (
        PLAIN,
        add_states,
        candidate_rows,
        colluding_silo_update,
        server_view_update,
        shield_upload,
        state_norm,
        strong_attack,
        update_auc,
        update_scores,
    )
    from fedshield_flwr.models.lora import set_adapter_state
    from fedshield_flwr.shield.settings import ShieldSettings
    from fedshield_flwr.train import evaluate

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    L = cfg.data.max_length
    mia = out.setdefault("mia", {})
    fp_model = full_model(cfg)
    modes = [m for m in ("fedavg", "lpp", "shield") if m in opts.modes]
    if not modes:
        out["_fp_model"] = fp_model
        return
    attack = strong_attack(shadow_update(cfg, data, pad_id))
    mia["attack"] = {"name": "shadow-calibrated extrapolated log-ratio",
                     "alpha": attack.alpha, "log_ratio": attack.log_ratio,
                     "shadow_rows": len(data.public_tok)}
    plain = mia.setdefault("plain", {})
    sanity = out.setdefault("sanity", {})

    def before(members, nonmembers):
        return (row_losses(fp_model, tok, members, max_length=L),
                row_losses(fp_model, tok, nonmembers, max_length=L))

    if "fedavg" in modes or "shield" in modes:
        g, u, idx = local_round(cfg, fp_model, data.silo_train_tok, pad_id)
        members, nonmembers, n_held = candidate_rows(data.silo_train, idx, data.silo_eval)
        mia.update(members=len(members), nonmembers=len(nonmembers),
                   nonmembers_held_out=n_held, rows_drawn=len(idx),
                   chance_band_95=chance_band(len(members), len(nonmembers)))
        out["eval_loss_fedavg"] = evaluate(fp_model, data.silo_eval_tok, 16, pad_id).loss
        set_adapter_state(fp_model, g)
        b = before(members, nonmembers)
        fed = update_auc(fp_model, tok, g, u, members, nonmembers, max_length=L, attack=attack,
                         before=b)
        plain["fedavg_server_auc"] = update_auc(fp_model, tok, g, u, members, nonmembers,
                                                max_length=L, attack=PLAIN, before=b)
        if "fedavg" in modes:
            mia["fedavg_server_auc"] = fed
        sanity["fedavg_update_mia"] = {
            "auc": fed, "auc_plain": plain["fedavg_server_auc"], "required": 0.7,
            "strong_enough": bool(fed >= 0.7)}
        # the same scores on a random split of rows it never trained on: chance
        half = len(nonmembers) // 2
        if half >= 2:
            order = np.random.default_rng(cfg.train.seed).permutation(len(nonmembers))
            rnd = update_scores(fp_model, tok, g, u, nonmembers, max_length=L, attack=attack,
                                before=b[1])[order]
            sanity["fedavg_update_mia_random_split"] = {
                "auc": auc(rnd[:half], rnd[half:]),
                "chance_band_95": chance_band(half, len(nonmembers) - half)}
        out.setdefault("_final_models", {})["fedavg"] = (add_states(g, u), members, nonmembers)
        if "shield" in modes:
            sh = ShieldSettings.from_flat(cfg.extra)
            weight = len(idx) * sh.weight_scale
            silo_ks, server_ks, _, payload, aggregate = shield_upload(u, weight=weight)
            views = []
            for i in tqdm(range(max(1, opts.shield_views)), desc="shield server views",
                          disable=not opts.progress, leave=False):
                if i:  # the same update uploaded again: fresh encryption randomness
                    payload = shield_upload(u, weight=weight, keyset=(silo_ks, server_ks))[3]
                view = server_view_update(payload, u, server_ks.modulus, state_norm(u))
                views.append(update_auc(fp_model, tok, g, view, members, nonmembers,
                                        max_length=L, attack=attack, before=b))
            mia["shield_server_auc"] = float(np.mean(views))
            mia["shield_server_auc_views"] = views
            mia["shield_server_auc_sem"] = (float(np.std(views, ddof=1) / math.sqrt(len(views)))
                                            if len(views) > 1 else None)
            decrypted = colluding_silo_update(silo_ks, aggregate, u)
            mia["shield_colluding_silo_auc"] = update_auc(fp_model, tok, g, decrypted, members,
                                                          nonmembers, max_length=L,
                                                          attack=attack, before=b)
            mia["shield_decryption_max_error"] = float(max(
                np.abs(decrypted[k] - u[k]).max() for k in u))
            out["_final_models"]["shield"] = (add_states(g, decrypted), members, nonmembers)
    if "lpp" in modes:
        q_model = full_model(cfg, quantized=True)
        g, u, idx = local_round(cfg, q_model, data.silo_train_tok, pad_id)
        members, nonmembers, _ = candidate_rows(data.silo_train, idx, data.silo_eval)
        del q_model
        # the server holds the full-precision base: it scores on that, with the received update
        set_adapter_state(fp_model, g)
        mia["lpp_server_auc"] = update_auc(fp_model, tok, g, u, members, nonmembers,
                                           max_length=L, attack=attack)
        out.setdefault("_final_models", {})["lpp"] = (add_states(g, u), members, nonmembers)
    out["_fp_model"] = fp_model


def final_model_attacks(cfg: RunConfig, data: AuditData, tok, out: dict) -> None:
    """Loss-threshold and reference (public base) MIA against each mode's released model."""
    from fedshield_flwr.models.lora import set_adapter_state

    L = cfg.data.max_length
    finals = out.pop("_final_models", {})
    split_members = out.pop("_members", {}).get("split")
    fp_model = out.pop("_fp_model", None) or full_model(cfg)
    reference = full_model(cfg)  # the public base with the initial adapter (B = 0)
    res_loss, res_ref = {}, {}
    for mode, item in finals.items():
        if mode == "split":
            model, (members, nonmembers) = item, split_members
        else:
            state, members, nonmembers = item
            model = fp_model
            set_adapter_state(model, state)
        res_loss[mode] = loss_threshold_auc(model, tok, members, nonmembers, max_length=L)
        res_ref[mode] = reference_auc(model, reference, tok, members, nonmembers, max_length=L)
    mia = out.setdefault("mia", {})
    mia["final_model_auc"] = res_ref
    mia["final_model_loss_threshold_auc"] = res_loss


def run_audit(cfg: RunConfig, opts: AuditOptions = AuditOptions()) -> dict:
    """Build the artifacts of ``cfg`` for every mode in ``opts.modes``, attack them, return all."""
    from fedshield_flwr.models.load import load_tokenizer

    check_auditable(cfg, opts)
    t0 = time.time()
    tok = load_tokenizer(cfg.model.name)
    try:
        data = build_data(cfg, tok, public_rows=opts.public_rows, eval_rows=opts.eval_rows)
    except ConfigError:
        raise
    if len(data.silo_eval) < 2 or len(data.public) < 2:
        raise AuditError(f"audit: {cfg.data.name} gives {len(data.silo_eval)} held-out silo rows "
                         f"and {len(data.public)} public rows; the attacks need at least 2 of "
                         "each: raise data.eval-fraction or use a larger data set")
    out: dict = {"model": cfg.model.name, "data": cfg.data.name,
                 "public_rows": len(data.public), "eval_rows": len(data.silo_eval),
                 "public_tokens": int(sum(len(r["input_ids"]) for r in data.public_tok)),
                 "eval_tokens": int(sum(len(r["input_ids"]) for r in data.silo_eval_tok)),
                 "eval_content_tokens": int(sum(int(m.sum()) for m in data.silo_eval_masks))}
    torch.manual_seed(cfg.train.seed)
    if "split" in opts.modes:
        if opts.split_grid:
            split_inversion(cfg, data, tok, opts, out)
        split_training(cfg, data, tok, opts, out)
        if opts.frontier and opts.split_grid:
            split_frontier(cfg, data, tok, opts, out)
    update_attacks(cfg, data, tok, opts, out)
    final_model_attacks(cfg, data, tok, out)
    out["seconds"] = time.time() - t0
    return out


def run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The defaults of pyproject.toml with ``--run-config``-style overrides (``k=v k2='s'``)."""
    from flwr.common.config import parse_config_args

    flat = RunConfig.defaults()
    flat.update(parse_config_args(list(overrides)) if overrides else {})
    return RunConfig.from_flat(flat)
