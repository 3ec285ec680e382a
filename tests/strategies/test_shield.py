"""shield strategy over real Flower Messages and real CKKS payloads."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedshield_flwr.shield import (
    PruneSchedule,
    ServerKeyset,
    SiloState,
    catch_up,
    decrypt_aggregate,
    encrypt_update,
    generate_keyset,
)
from strategies.shield import ShieldStrategy
from tests.helpers import reply, server_message

SHAPES = OrderedDict([("l.q_proj.lora_A.weight", (4, 512)), ("l.q_proj.lora_B.weight", (512, 4))])


@pytest.fixture(scope="module")
def keys():
    return generate_keyset()


@pytest.fixture(scope="module")
def other_keys():
    return generate_keyset()


def update(seed, scale=1e-2):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (rng.standard_normal(s) * scale).astype(np.float32))
                       for k, s in SHAPES.items())


def flat(state):
    return np.concatenate([v.reshape(-1).astype(np.float64) for v in state.values()])


def train_reply(node, payload: bytes, rnd, n=100, loss=1.0):
    metrics = MetricRecord({"num-examples": n, "server-round": rnd, "train_loss": loss})
    arr = ArrayRecord(OrderedDict([("payload", Array(np.frombuffer(payload, np.uint8).copy()))]))
    return reply(server_message(RecordDict({}), node),
                 RecordDict({"payload": arr, "metrics": metrics}))


def make_strategy(keys, schedule=None):
    _, server = keys
    return ShieldStrategy(lambda: server, schedule or PruneSchedule(), num_rounds=3)


def test_server_side_holds_only_a_public_keyset_that_cannot_decrypt(keys, flower_identity):
    silo, server = keys
    strat = make_strategy(keys)
    assert isinstance(strat.keyset, ServerKeyset)
    assert not any("secret" in f for f in ServerKeyset.__dataclass_fields__)
    payload, _ = encrypt_update(silo, update(0), server_round=1, silo="1", weight=1.0)
    strat.aggregate_train(1, [train_reply(1, payload, 1)])
    record = strat.log.downlink(0)[0]
    with pytest.raises(TypeError, match="cannot decrypt"):
        decrypt_aggregate(server, record)  # no secret key: decryption must fail
    assert decrypt_aggregate(silo, record).values.shape[0] == flat(update(0)).size


def test_exact_weighted_mean_and_bad_payloads_dropped_by_name(keys, other_keys, flower_identity,
                                                               caplog):
    silo, _ = keys
    weights = {1: 0.1, 2: 0.3}
    good = {n: encrypt_update(silo, update(n), server_round=1, silo=str(n), weight=w)[0]
            for n, w in weights.items()}
    wrong_key, _ = encrypt_update(other_keys[0], update(3), server_round=1, silo="3", weight=1.0)
    wrong_round, _ = encrypt_update(silo, update(4), server_round=2, silo="4", weight=1.0)
    truncated, _ = encrypt_update(silo, update(5), server_round=1, silo="5", weight=1.0)
    garbled = bytearray(encrypt_update(silo, update(6), server_round=1, silo="6", weight=1.0)[0])
    garbled[len(garbled) // 2] ^= 0xFF
    nan = update(7)
    nan["l.q_proj.lora_A.weight"][0, 0] = np.nan
    with pytest.raises(Exception, match="NaN|non-finite|finite"):
        encrypt_update(silo, nan, server_round=1, silo="7", weight=1.0)  # refused before encryption
    replies = [
        train_reply(1, good[1], 1),
        train_reply(3, wrong_key, 1),
        train_reply(4, wrong_round, 1),
        train_reply(5, truncated[:-100], 1),
        train_reply(6, bytes(garbled), 1),
        train_reply(2, good[2], 1),
        train_reply(2, good[2], 1),  # duplicate
        Message(Error(code=1, reason="ClientApp raised UpdateError: NaN in update"),
                reply_to=server_message(RecordDict({}), 7)),
    ]
    strat = make_strategy(keys)
    with caplog.at_level("WARNING", logger="fedshield.server"):
        _, metrics = strat.aggregate_train(1, replies)
    assert strat.accepted_replies == 2 and strat.rejected_replies == 6
    for node in (3, 4, 5, 6, 7):
        assert any(str(node) in p and "round 1" in p for p in strat.problems), (node, strat.problems)
    agg = decrypt_aggregate(silo, strat.log.downlink(0)[0])
    expected = (0.1 * flat(update(1)) + 0.3 * flat(update(2))) / 0.4
    assert np.max(np.abs(agg.values - expected)) < 1e-6
    assert metrics["num-examples"] == 200


def test_round_with_no_valid_payload_keeps_the_log(keys, flower_identity):
    silo, _ = keys
    strat = make_strategy(keys)
    payload, _ = encrypt_update(silo, update(1), server_round=1, silo="1", weight=1.0)
    strat.aggregate_train(1, [train_reply(1, payload, 1)])
    before = strat.log.to_bytes()
    bad, _ = encrypt_update(silo, update(2), server_round=1, silo="1", weight=1.0)
    assert strat.aggregate_train(2, [train_reply(1, bad, 2)]) == (None, None)
    assert strat.log.to_bytes() == before


class NodeGrid:
    """Only what node sampling reads from a Grid: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_silo_that_missed_a_round_receives_the_missing_aggregates(keys, flower_identity):
    silo, _ = keys
    strat = make_strategy(keys, PruneSchedule(target=0.5))
    strat.min_available_nodes = strat.min_train_nodes = 1
    states = {n: SiloState() for n in (1, 2)}
    g0 = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    globals_ = {1: g0, 2: g0}
    for rnd, active in ((1, [1, 2]), (2, [1]), (3, [1, 2])):
        msgs = {m.metadata.dst_node_id: m for m in
                strat.configure_train(rnd, ArrayRecord(), __import__("flwr").app.ConfigRecord(),
                                      NodeGrid(active))}
        replies = []
        for n in active:
            records = [a.numpy() for a in msgs[n].content["downlink"].values()]
            globals_[n], states[n] = catch_up(silo, globals_[n], records, states[n], silo=str(n))
            payload, states[n] = encrypt_update(silo, update(10 * rnd + n), server_round=rnd,
                                                silo=str(n), weight=1.0, state=states[n],
                                                schedule=PruneSchedule(target=0.5))
            replies.append(train_reply(n, payload, rnd))
        strat.aggregate_train(rnd, replies)
    # after round 3 both silos catch up to the same global adapter
    for n in (1, 2):
        msgs = {m.metadata.dst_node_id: m for m in
                strat.configure_evaluate(3, ArrayRecord(),
                                         __import__("flwr").app.ConfigRecord(), NodeGrid([1, 2]))}
        records = [a.numpy() for a in msgs[n].content["downlink"].values()]
        globals_[n], states[n] = catch_up(silo, globals_[n], records, states[n], silo=str(n))
        assert states[n].global_round == 3
    assert all(np.array_equal(globals_[1][k], globals_[2][k]) for k in SHAPES)
