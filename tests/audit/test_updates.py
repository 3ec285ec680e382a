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
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _flat(state):
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in state.values()])


def test_update_attack_wins_shield_server_guesses_and_colluding_silo_wins(tiny_tokenizer,
                                                                          qa_rows):
    from fedshield_flwr.models.tiny import build_tiny_model

    model = apply_lora(build_tiny_model("llama"), LoraSettings(r=32, alpha=64, dropout=0.0, target_modules=ALL_LINEAR), seed=0)
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
