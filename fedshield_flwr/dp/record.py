"""Record-level DP: DP-SGD at every silo on the trainable (LoRA) parameters, with Opacus.

Why Opacus: its per-sample gradients (the :class:`~opacus.GradSampleModule` hooks) work on the
``nn.Linear`` layers LoRA adds, also inside a bitsandbytes 4-bit or a PEFT-wrapped model, because
hooks go only on modules with trainable parameters (the frozen base layers get none); its
:class:`~opacus.optimizers.DPOptimizer` clips each sample's gradient and adds the Gaussian noise;
and its RDP accountant is the one :mod:`fedshield_flwr.dp.accounting` uses.

One optimizer step (:func:`dp_train_lora`):

1. **Poisson sampling**: every training row enters the step's batch independently with
   probability ``q = batch_size * gradient_accumulation_steps / records`` (seeded per silo, round
   and step). That is the sampled Gaussian mechanism the RDP accountant assumes; the batch size
   varies (possibly 0), and a batch larger than ``batch_size`` runs as several physical
   micro-batches accumulated into one step (Opacus's ``signal_skip_step``).
2. **Per-sample gradients**: the loss is the sum over rows of each row's mean token loss
   (:func:`row_losses`), so Opacus's hooks give each row's own gradient.
3. **Clip and noise** (Opacus ``DPOptimizer``): each row's gradient over all LoRA parameters is
   scaled to L2 norm ``<= dp.max-grad-norm`` (C); the clipped sum gets ``N(0, (sigma C)^2)`` noise
   per coordinate and is divided by the expected batch size ``q * records``; AdamW then steps.

Gradient checkpointing is off under DP (recomputed forwards would fire Opacus's hooks twice), as
is ``train.max-grad-norm`` (the per-sample clip replaces it).

Accounting is stateless: after server round ``r`` a silo has taken ``r * train.max-steps`` sampled
steps, so ``epsilon(r)`` comes from the round number alone (:meth:`RecordDpPlan.epsilon_after_round`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedshield_flwr.config import DpSettings, TrainSettings
from fedshield_flwr.data.templates import IGNORE_INDEX
from fedshield_flwr.dp.accounting import epsilon_after, noise_multiplier_for
from fedshield_flwr.dp.report import DP_EPSILON, DP_EPSILON_NEXT

log = logging.getLogger(__name__)

DP_NOISE = "dp-noise-multiplier"


@dataclass(frozen=True)
class RecordDpPlan:
    """The DP-SGD parameters a silo uses for the whole run (same every round)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson rate q of each step
    delta: float
    steps_per_round: int
    records: int

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.records

    def epsilon_after_round(self, server_round: int) -> float:
        return epsilon_after(self.noise_multiplier, self.delta, self.sample_rate,
                             max(server_round, 0) * self.steps_per_round)

    def metrics(self, server_round: int) -> dict[str, float]:
        """The train metrics a silo reports after ``server_round``."""
        return {DP_EPSILON: self.epsilon_after_round(server_round),
                DP_EPSILON_NEXT: self.epsilon_after_round(server_round + 1),
                DP_NOISE: self.noise_multiplier}


def plan_record_dp(dp: DpSettings, train: TrainSettings, records: int, num_rounds: int,
                   who: str = "silo") -> RecordDpPlan:
    """The plan for a silo with ``records`` training rows over ``num_rounds`` rounds.

    ``dp.noise-multiplier`` if > 0, else the one that spends ``dp.epsilon`` after all planned
    steps (``num_rounds * train.max-steps``); ``dp.delta`` 0 means ``1 / records``.
    """
    if records < 1:
        raise ValueError(f"{who}: record-level DP needs training rows (got {records})")
    sample_rate = min(1.0, train.batch_size * train.gradient_accumulation_steps / records)
    delta = dp.delta if dp.delta > 0 else 1.0 / records
    if delta > 1.0 / records:
        log.warning("%s: dp.delta=%g is above 1/records=%g; (epsilon, delta) is weak",
                    who, delta, 1.0 / records)
    steps = train.max_steps
    if dp.noise_multiplier > 0:
        sigma = dp.noise_multiplier
    else:
        try:
            sigma = noise_multiplier_for(dp.epsilon, delta, sample_rate, num_rounds * steps)
        except Exception as exc:  # opacus raises a bare ValueError when it cannot get there
            raise ValueError(f"{who}: no noise multiplier reaches dp.epsilon={dp.epsilon} at "
                             f"delta={delta:g} over {num_rounds} rounds x {steps} steps with "
                             f"sample rate {sample_rate:.3g} ({exc}); raise dp.epsilon, lower "
                             "train.batch-size or give dp.noise-multiplier") from exc
    return RecordDpPlan(float(sigma), dp.max_grad_norm, sample_rate, delta, steps, records)


def poisson_batches(n_rows: int, sample_rate: float, steps: int, seed: int) -> list[list[int]]:
    """For each of ``steps`` steps, the rows drawn independently with probability ``sample_rate``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nonzero(torch.rand(n_rows, generator=gen) < sample_rate).flatten().tolist()
            for _ in range(steps)]


def _ce_tokens(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def row_losses(model, batch: dict[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
    """Each row's mean next-token loss over its labelled tokens (0 for a row with none).

    The same loss as :func:`fedshield_flwr.train.token_loss` (output head on labelled positions
    only, in chunks recomputed in backward), kept per row so the per-sample gradients are each
    row's own.
    """
    from fedshield_flwr.train import CHUNKED_LOSS_MODEL_TYPES, _causal_lm

    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    counts = keep.sum(dim=1)
    lm = _causal_lm(model)
    if getattr(lm.config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch.get("attention_mask")).logits[:, :-1]
        tok = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0),
                              reduction="none") * keep
        return tok.sum(dim=1) / counts.clamp(min=1)
    hidden = lm.base_model(input_ids=batch["input_ids"],
                           attention_mask=batch.get("attention_mask")).last_hidden_state
    rows = keep.nonzero()[:, 0]
    hidden, flat_targets = hidden[:, :-1][keep], targets[keep]
    head = lm.get_output_embeddings()
    parts = []
    for i in range(0, len(flat_targets), chunk):
        h, t = hidden[i:i + chunk], flat_targets[i:i + chunk]
        parts.append(checkpoint(_ce_tokens, h, t, head, use_reentrant=False)
                     if torch.is_grad_enabled() else _ce_tokens(h, t, head))
    tok = torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
    sums = torch.zeros(len(counts), device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)
    return sums / counts.clamp(min=1)


def per_sample_hooks(model):
    """Opacus per-sample-gradient hooks on the modules with trainable parameters of ``model``.

    Returns the :class:`~opacus.GradSampleModule`; the caller keeps calling ``model`` itself
    (the hooks fire on its submodules) and calls ``.remove_hooks()`` when done.
    """
    from opacus import GradSampleModule

    try:
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    except Exception as exc:
        raise ValueError(f"record-level DP: Opacus cannot compute per-sample gradients of this "
                         f"model's trainable layers ({exc}); train only LoRA layers") from exc


def dp_optimizer(params, learning_rate: float, weight_decay: float, plan: RecordDpPlan,
                 seed: int):
    from opacus.optimizers import DPOptimizer

    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    return DPOptimizer(torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay),
                       noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                       expected_batch_size=max(1, round(plan.expected_batch_size)),
                       loss_reduction="mean", generator=gen)


def dp_train_lora(model, rows: Sequence[dict], settings: TrainSettings, learning_rate: float,
                  pad_id: int, seed: int, plan: RecordDpPlan, desc: str = "train"):
    """One round of DP-SGD (see the module docstring); returns a ``train.TrainResult``."""
    from fedshield_flwr.train import TrainResult, _device, collate, set_gradient_checkpointing

    if not rows:
        raise ValueError(f"{desc}: no training rows")
    t0 = time.time()
    torch.manual_seed(seed)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    set_gradient_checkpointing(model, False)
    hooks = per_sample_hooks(model)
    opt = dp_optimizer(params, learning_rate, settings.weight_decay, plan, seed + 7919)
    batches = poisson_batches(len(rows), plan.sample_rate, settings.max_steps, seed)
    model.train()
    losses: list[float] = []
    seen = 0
    try:
        for picked in batches:
            seen += len(picked)
            chunks = [picked[i:i + settings.batch_size]
                      for i in range(0, len(picked), settings.batch_size)]
            step_loss = 0.0
            if not chunks:  # an empty Poisson batch: the step is noise only
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for k, chunk in enumerate(chunks):
                batch = {key: v.to(device) for key, v in collate([rows[i] for i in chunk],
                                                                 pad_id).items()}
                per_row = row_losses(model, batch)
                with warnings.catch_warnings():  # Opacus's hook on the first LoRA layer, whose
                    # input needs no gradient, is harmless: its per-sample weight grad is right
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    per_row.sum().backward()
                step_loss += float(per_row.detach().sum())
                opt.signal_skip_step(do_skip=k < len(chunks) - 1)
                opt.step()  # a skipped step keeps the clipped sum for the next chunk
                opt.zero_grad(set_to_none=True)
            losses.append(step_loss / max(len(picked), 1))
    finally:
        hooks.remove_hooks()
        for p in params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    model.eval()
    loss = float(sum(losses) / len(losses)) if losses else math.nan
    log.info("%s: DP-SGD %d steps, sigma=%.3f, C=%.3g, q=%.4f, %d rows drawn", desc,
             settings.max_steps, plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate,
             seen)
    # The FedAvg weight is the expected number of rows, not the drawn one (which depends on the
    # Poisson draws and so on the data): it reveals only the size of the silo.
    expected = max(1, round(plan.expected_batch_size * settings.max_steps))
    return TrainResult(loss=loss, steps=settings.max_steps, num_examples=expected,
                       seconds=time.time() - t0)
