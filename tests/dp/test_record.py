"""Record-level DP-SGD (Opacus): per-sample clipping, noise scale, accounting, a training round."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedshield_flwr.config import (
    DataSettings,
    DpSettings,
    LoraSettings,
    NodeSettings,
    TrainSettings,
)
from fedshield_flwr.data import load_silo_data
from fedshield_flwr.dp.accounting import epsilon_after
from fedshield_flwr.dp.record import (
    RecordDpPlan,
    dp_optimizer,
    dp_train_lora,
    per_sample_hooks,
    plan_record_dp,
    poisson_batches,
    row_losses,
)
from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model, load_tokenizer
from fedshield_flwr.train import collate, token_loss


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("tiny:llama")
    model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4, dropout=0.0), seed=0)
    data = load_silo_data(DataSettings(max_length=48, max_eval_examples=8),
                          NodeSettings(partition_id=0, num_partitions=4), tok, seed=0)
    return tok, model, data


def _batch(tok, data, n=6):
    return collate(data.train[:n], tok.pad_token_id)


def _plan(sigma, clip, records=100, q=0.05):
    return RecordDpPlan(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, delta=1e-3,
                        steps_per_round=4, records=records)


def test_row_losses_are_the_token_loss_per_row(tiny):
    tok, model, data = tiny
    batch = _batch(tok, data)
    with torch.no_grad():
        per_row = row_losses(model, batch)
        total, count = token_loss(model, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert float((per_row * counts).sum()) == pytest.approx(float(total), rel=1e-5)


def test_every_per_sample_gradient_is_clipped_to_max_grad_norm(tiny):
    tok, model, data = tiny
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tok, data)
    # Each row's own gradient by plain autograd, one row at a time.
    own = []
    for i in range(len(batch["input_ids"])):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(row_losses(model, one).sum(), params)
        own.append(torch.cat([g.flatten() for g in grads]))
    own = torch.stack(own)
    clip = float(own.norm(dim=1).median())  # clips about half the rows, not all
    hooks = per_sample_hooks(model)
    try:
        opt = dp_optimizer(params, 0.0, 0.0, _plan(0.0, clip), seed=0)
        row_losses(model, batch).sum().backward()
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
        torch.testing.assert_close(per_sample, own, rtol=1e-4, atol=1e-6)  # Opacus's hooks
        opt.signal_skip_step(True)  # clip and accumulate only: summed_grad = sum of clipped rows
        opt.step()
        summed = torch.cat([p.summed_grad.flatten() for p in params])
    finally:
        hooks.remove_hooks()
        for p in params:
            p.grad_sample = p.summed_grad = p.grad = None
    norms = own.norm(dim=1)
    clipped = own * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()
    assert (norms > clip).any() and (norms < clip).any()
    torch.testing.assert_close(summed, clipped.sum(dim=0), rtol=1e-4, atol=1e-6)


def test_noise_std_is_sigma_times_clip_over_the_expected_batch(tiny):
    _, model, _ = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    sigma, clip = 1.3, 0.7
    plan = _plan(sigma, clip, records=200, q=0.05)  # expected batch 10
    opt = dp_optimizer(params, 0.0, 0.0, plan, seed=3)  # lr 0: the step leaves p.grad to read
    draws = []
    for _ in range(5):  # an empty Poisson batch: the gradient is the noise alone
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
        opt.step()
        draws.append(torch.cat([p.grad.flatten() for p in params]))
        opt.zero_grad(set_to_none=True)
    noise = torch.stack(draws) * plan.expected_batch_size
    assert noise.numel() > 10_000
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.05 * sigma * clip)
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.03)
    for p in params:
        p.grad = None


def test_accountant_epsilon_equals_opacus_stepping_its_own_accountant():
    plan = plan_record_dp(DpSettings(level="record", epsilon=8.0), TrainSettings(
        batch_size=8, max_steps=5), records=400, num_rounds=3)
    assert plan.delta == pytest.approx(1 / 400) and plan.sample_rate == pytest.approx(0.02)
    acc = RDPAccountant()
    for r in (1, 2, 3):
        for _ in range(plan.steps_per_round):
            acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert plan.epsilon_after_round(r) == pytest.approx(acc.get_epsilon(plan.delta), rel=1e-9)
    # The computed noise spends (just about) the whole target over the planned 3 rounds.
    assert plan.epsilon_after_round(3) <= 8.0 and plan.epsilon_after_round(3) > 7.5
    assert plan.metrics(2) == {"dp-epsilon": plan.epsilon_after_round(2),
                               "dp-epsilon-next": plan.epsilon_after_round(3),
                               "dp-noise-multiplier": plan.noise_multiplier}
    assert epsilon_after(plan.noise_multiplier, plan.delta, plan.sample_rate, 0) == 0.0


def test_poisson_sampling_draws_each_row_with_rate_q():
    batches = poisson_batches(1000, 0.03, 200, seed=5)
    assert batches == poisson_batches(1000, 0.03, 200, seed=5)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert float(sizes.mean()) == pytest.approx(30, rel=0.05)
    assert float(sizes.std()) > 2  # not a fixed batch size


def test_dp_round_trains_and_noise_changes_the_update(tiny):
    tok, _, data = tiny
    settings = TrainSettings(max_steps=2, batch_size=4, progress=False)
    states = []
    for sigma in (0.0, 2.0):
        model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4), seed=0)
        start = get_adapter_state(model)
        res = dp_train_lora(model, data.train, settings, 1e-3, tok.pad_token_id, seed=1,
                            plan=plan_record_dp(DpSettings(level="record", noise_multiplier=
                                                           max(sigma, 1e-9)), settings,
                                                len(data.train), 1))
        assert math.isfinite(res.loss) and res.steps == 2
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks gone
        states.append(get_adapter_state(model))
        assert any((states[-1][k] != start[k]).any() for k in start)
    assert any((states[0][k] != states[1][k]).any() for k in states[0])


def test_a_large_poisson_batch_runs_as_micro_batches_of_one_step(tiny):
    tok, _, data = tiny
    settings = TrainSettings(max_steps=1, batch_size=2, progress=False)
    model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4), seed=0)
    plan = RecordDpPlan(1e-9, 1.0, sample_rate=12 / len(data.train), delta=1e-3,
                        steps_per_round=1, records=len(data.train))
    assert len(poisson_batches(len(data.train), plan.sample_rate, 1, seed=1)[0]) > 4
    res = dp_train_lora(model, data.train, settings, 1e-3, tok.pad_token_id, seed=1, plan=plan)
    assert res.steps == 1 and res.num_examples == 12 and math.isfinite(res.loss)


def test_per_sample_gradients_work_on_lpps_rebuilt_4bit_base(tiny):
    """lpp trains LoRA on bitsandbytes 4-bit layers: Opacus hooks only the LoRA nn.Linear."""
    from fedshield_flwr.lpp.quantize import BaseQuantSpec, build_quantized_package
    from fedshield_flwr.lpp.rebuild import build_model_from_package

    tok, _, data = tiny
    base = load_base_model("tiny:llama").eval()
    silo = build_model_from_package(build_quantized_package(base, BaseQuantSpec("nf4")))
    model = apply_lora(silo, LoraSettings(r=4, dropout=0.0), seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tok, data, n=3)
    hooks = per_sample_hooks(model)
    try:
        row_losses(model, batch).sum().backward()
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
    finally:
        hooks.remove_hooks()
    for p in params:
        p.grad_sample = p.grad = None
    one = {k: v[1:2] for k, v in batch.items()}
    own = torch.cat([g.flatten() for g in torch.autograd.grad(row_losses(model, one).sum(),
                                                             params)])
    assert per_sample.shape[0] == 3
    torch.testing.assert_close(per_sample[1], own, rtol=1e-3, atol=1e-6)
