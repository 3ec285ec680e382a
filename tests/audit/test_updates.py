"""Update attacks: fedavg's server wins on a strong update; shield's server holds only noise;
a colluding silo decrypts the real shield payload back to the update."""

import copy

import numpy as np
import torch

from fedshield_flwr.audit.membership import tokenized_rows
from fedshield_flwr.audit.updates import (
    colluding_silo_update,
    server_view_update,
    shield_upload,
    state_norm,
    update_auc,
)
from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.lora import apply_lora, get_adapter_state, set_adapter_state
from fedshield_flwr.train import collate

MAX_LEN = 64
# Every linear layer, the head included: the random tiny base's head (std 0.02, frozen) caps
# its logits near +-1.3, so an adapter on the blocks alone cannot memorize its rows (training
# loss stays near ln 512) and a membership attack would have nothing to find.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head")


def _flat(state):
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in state.values()])


def test_update_attack_wins_shield_server_guesses_and_colluding_silo_wins(tiny_tokenizer,
                                                                          qa_rows):
    from fedshield_flwr.models.tiny import build_tiny_model

    model = apply_lora(build_tiny_model("llama"), LoraSettings(
        r=32, alpha=64, dropout=0.0, target_modules=ALL_LINEAR), seed=0)
    g = copy.deepcopy(get_adapter_state(model))
    members, nonmembers = qa_rows[:24], qa_rows[24:48]
    toks = tokenized_rows(members, tiny_tokenizer, max_length=MAX_LEN)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for step in range(100):
        batch = collate([toks[(step * 8 + i) % 24] for i in range(8)], tiny_tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = get_adapter_state(model)
    u = {k: after[k] - g[k] for k in g}
    set_adapter_state(model, g)
    fed = update_auc(model, tiny_tokenizer, g, u, members, nonmembers, max_length=MAX_LEN)
    assert fed >= 0.75  # a random tiny base learns little: a wide adapter, many steps
    silo_ks, server_ks, data, payload, aggregate = shield_upload(u, weight=0.024)
    lora_b = next(v for k, v in u.items() if "lora_B" in k)
    assert lora_b.astype(np.float32).tobytes()[:64] not in data  # no plaintext on the wire
    view = server_view_update(payload, u, server_ks.modulus, state_norm(u))
    assert abs(np.corrcoef(_flat(view), _flat(u))[0, 1]) < 0.05
    shield_server = update_auc(model, tiny_tokenizer, g, view, members, nonmembers,
                               max_length=MAX_LEN)
    assert abs(shield_server - 0.5) < 0.25
    decrypted = colluding_silo_update(silo_ks, aggregate, u)
    assert np.abs(_flat(decrypted) - _flat(u)).max() < 1e-4
    colluding = update_auc(model, tiny_tokenizer, g, decrypted, members, nonmembers,
                           max_length=MAX_LEN)
    assert abs(colluding - fed) < 0.05


def test_candidate_rows_drop_a_members_twin_and_count_held_out_rows():
    from fedshield_flwr.audit.updates import candidate_rows

    row = lambda i: {"instruction": f"q{i}", "input": "", "response": f"a{i}"}  # noqa: E731
    train = [row(0), row(1), row(0), row(2), row(3), row(4)]
    held = [row(1), row(5), row(5)]
    members, nonmembers, n_held = candidate_rows(train, [0, 1, 2], held, limit=10)
    assert members == [row(0), row(1)]  # train[2] is train[0] again
    assert nonmembers == [row(5), row(2), row(3), row(4)]  # row 1 is a member, row 5 once
    assert n_held == 1
    assert len(candidate_rows(train, [0, 1, 2], held)[1]) == 2  # default: as many as members


def test_strong_update_attack_wins_on_a_real_local_round_and_is_at_chance_on_random_inputs():
    """tiny:llama, 4 real train_lora steps: the shadow-calibrated extrapolated attack wins where
    the plain loss difference is weak; a random split of non-members and a random update of the
    same norm are at chance."""
    from fedshield_flwr.audit.artifacts import build_data, full_model, local_round
    from fedshield_flwr.audit.membership import auc
    from fedshield_flwr.audit.run import run_config, shadow_update
    from fedshield_flwr.audit.updates import (
        PLAIN,
        candidate_rows,
        strong_attack,
        update_scores,
    )
    from fedshield_flwr.models.load import load_tokenizer

    cfg = run_config(["model.name='tiny:llama'", "data.max-length=64", "train.max-steps=4"])
    tok = load_tokenizer(cfg.model.name)
    data = build_data(cfg, tok, public_rows=40, eval_rows=8)
    pad = tok.pad_token_id
    model = full_model(cfg)
    g, u, idx = local_round(cfg, model, data.silo_train_tok, pad)
    set_adapter_state(model, g)
    members, nonmembers, _ = candidate_rows(data.silo_train, idx, data.silo_eval, limit=48)
    attack = strong_attack(shadow_update(cfg, data, pad))

    def scores(update, rows, a=attack):
        return update_scores(model, tok, g, update, rows, max_length=MAX_LEN, attack=a)

    strong = auc(scores(u, members), scores(u, nonmembers))
    plain = auc(scores(u, members, PLAIN), scores(u, nonmembers, PLAIN))
    assert strong >= 0.7
    assert strong > plain
    rnd = scores(u, nonmembers)
    assert abs(auc(rnd[::2], rnd[1::2]) - 0.5) < 0.2
    gen = np.random.default_rng(0)
    noise = {k: gen.standard_normal(v.shape).astype(np.float32) for k, v in u.items()}
    scale = state_norm(u) / state_norm(noise)
    noise = {k: v * scale for k, v in noise.items()}
    assert abs(auc(scores(noise, members), scores(noise, nonmembers[:len(members)])) - 0.5) < 0.2
