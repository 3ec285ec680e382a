"""Hundreds of silos: streamed aggregation, dropout at 64 silos, and the shield keyset size.

Real strategy code over real Flower Messages (and real CKKS ciphertexts for shield), at tiny
scale: small adapters, in-process grids.
"""

import gc
import threading
import time
import weakref
from collections import OrderedDict
from fractions import Fraction
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedshield_flwr.lpp.adapter import AdapterQuantSpec, prepare_global_adapter
from fedshield_flwr.shield import KeysetError, PruneSchedule, decrypt_aggregate, generate_keyset
from fedshield_flwr.shield.params import MAX_SILOS_LIMIT, ShieldParams, params_for_silos
from fedshield_flwr.shield.rounds import encrypt_update
from strategies.base import ServerCpuClock, WeightedSum
from strategies.fedavg import LoraFedAvg
from strategies.lpp import LppStrategy
from strategies.shield import ShieldStrategy
from tests.helpers import PushPull, reply, server_message

TEMPLATE = OrderedDict([("a.lora_A.weight", np.zeros((2, 3), np.float32)),
                        ("a.lora_B.weight", np.zeros((3, 2), np.float32))])
SILOS = 64


def _state(seed):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(v.shape).astype(np.float32))
                       for k, v in TEMPLATE.items())


def _weight(node):
    return 5 + (node * 7) % 23


def _train_reply(node, state, n, rnd=1, to=None):
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))
    metrics = MetricRecord({"num-examples": n, "server-round": rnd, "train_loss": 1.0})
    return reply(to or server_message(RecordDict({}), node),
                 RecordDict({"arrays": arrays, "metrics": metrics}))


def _exact_mean(states, weights):
    """sum w x / sum w in exact rational arithmetic, rounded to float32 at the end."""
    total = sum(Fraction(w) for w in weights)
    out = OrderedDict()
    for k, v in TEMPLATE.items():
        flat = [sum(Fraction(float(s[k].reshape(-1)[j])) * Fraction(w)
                    for s, w in zip(states, weights)) / total for j in range(v.size)]
        out[k] = np.array([float(x) for x in flat], np.float32).reshape(v.shape)
    return out


def test_streamed_fedavg_is_the_exact_fedavg_and_keeps_no_reply(flower_identity):
    nodes = list(range(1, SILOS + 1))
    states = {n: _state(n) for n in nodes}
    refs = []
    alive_when_yielded = []

    def stream():
        for n in nodes:
            if n % 16 == 0:
                gc.collect()
                alive_when_yielded.append(sum(r() is not None for r in refs))
            msg = _train_reply(n, states[n], _weight(n))
            refs.append(weakref.ref(msg))
            yield msg
            del msg

    strat = LoraFedAvg(TEMPLATE)
    arrays, metrics = strat.aggregate_train(1, stream())
    # at most the reply being folded is alive: the strategy kept none of the earlier ones
    assert max(alive_when_yielded) <= 1, alive_when_yielded
    expected = _exact_mean([states[n] for n in nodes], [_weight(n) for n in nodes])
    for k in TEMPLATE:
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k])
    assert strat.accepted_replies == SILOS
    assert metrics["num-examples"] == sum(_weight(n) for n in nodes)


def test_weighted_sum_holds_two_float64_arrays_per_tensor_and_ignores_arrival_order():
    acc, backwards = WeightedSum(), WeightedSum()
    for n in range(1, 200):
        acc.add(_state(n), _weight(n))
    for n in reversed(range(1, 200)):
        backwards.add(_state(n), _weight(n))
    assert len(acc.sums) == len(acc.errors) == len(TEMPLATE)
    assert all(v.dtype == np.float64 and v.shape == TEMPLATE[k].shape
               for k, v in acc.sums.items())
    assert acc.count == 199
    for k, v in acc.mean().items():
        np.testing.assert_array_equal(v, backwards.mean()[k])


def test_a_malformed_reply_mid_stream_is_named_and_what_was_folded_is_kept(flower_identity):
    nodes = list(range(1, 11))
    states = {n: _state(n) for n in nodes}
    bad = _state(99)
    bad["a.lora_A.weight"] = np.zeros((5, 5), np.float32)

    def stream():
        for n in nodes[:5]:
            yield _train_reply(n, states[n], _weight(n))
        yield _train_reply(77, bad, 10)
        for n in nodes[5:]:
            yield _train_reply(n, states[n], _weight(n))

    strat = LoraFedAvg(TEMPLATE)
    arrays, _ = strat.aggregate_train(1, stream())
    assert strat.accepted_replies == 10 and strat.rejected_replies == 1
    assert any("77" in p and "round 1" in p and "shape" in p for p in strat.problems)
    expected = _exact_mean([states[n] for n in nodes], [_weight(n) for n in nodes])
    for k in TEMPLATE:
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k])


class DropoutGrid(PushPull):
    """64 silos; the ``dropped`` ones receive their train message and never answer.

    Replies are handed out a few at a time, as a SuperLink would while silos finish.
    """

    def __init__(self, nodes, answer, dropped):
        self.nodes, self.answer, self.dropped = list(nodes), answer, set(dropped)
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            if m.metadata.dst_node_id not in self.dropped:
                out.append(self.answer(m))
        return out

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [i for i in message_ids if i in self.__dict__.get("_replies", {})]
        return super().pull_messages(ready[:3])  # at most 3 of those that have arrived


def _dropped(nodes):
    rng = np.random.default_rng(7)
    return set(rng.choice(nodes, size=len(nodes) // 10, replace=False).tolist())  # 10 %: 6


def test_fedavg_round_of_64_silos_with_10_percent_dropping_is_the_fedavg_of_responders(
        flower_identity):
    nodes = list(range(1, SILOS + 1))
    dropped = _dropped(nodes)
    states = {n: _state(n) for n in nodes}

    def answer(m):
        node = m.metadata.dst_node_id
        return _train_reply(node, states[node], _weight(node), to=m)

    grid = DropoutGrid(nodes, answer, dropped)
    strat = LoraFedAvg(TEMPLATE, fraction_train=1.0, fraction_evaluate=0.0,
                       min_train_nodes=SILOS, min_available_nodes=SILOS)
    rows = []
    initial = ArrayRecord(OrderedDict((k, Array(v)) for k, v in TEMPLATE.items()))
    out = strat.run(grid, initial, num_rounds=1, timeout=2.0,
                    on_round_end=lambda rec, arrays: rows.append(rec))
    responders = [n for n in nodes if n not in dropped]
    assert len(dropped) == 6 and grid.pulls > 1  # the replies streamed in several pulls
    expected = _exact_mean([states[n] for n in responders], [_weight(n) for n in responders])
    for k in TEMPLATE:
        np.testing.assert_array_equal(out[k].numpy(), expected[k])
    assert rows[-1].replies == SILOS - 6 and strat.last_train_replies == SILOS - 6


class QueryGrid(DropoutGrid):
    """lpp asks each silo whether it holds the base package: every one does."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query":
            out = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = str(uuid4())
                out.append(reply(m, RecordDict({"config": ConfigRecord(
                    {"has-base": True, "base-hash": m.content["config"]["base-hash"]})})))
            return out
        return super().send_and_receive(messages, timeout)


def test_lpp_round_of_64_silos_with_10_percent_dropping_is_fedlpp_of_responders(
        flower_identity):
    nodes = list(range(1, SILOS + 1))
    dropped = _dropped(nodes)
    states = {n: _state(n) for n in nodes}
    fp = _state(1000)

    def answer(m):
        node = m.metadata.dst_node_id
        return _train_reply(node, states[node], _weight(node), to=m)

    spec = AdapterQuantSpec(4, 32)
    strat = LppStrategy(TEMPLATE, lambda: {"w": np.zeros(8, np.uint8)}, "h" * 64, spec, 1.0,
                        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=SILOS,
                        min_available_nodes=SILOS)
    grid = QueryGrid(nodes, answer, dropped)
    out = strat.run(grid, ArrayRecord(OrderedDict((k, Array(v)) for k, v in fp.items())),
                    num_rounds=1, timeout=2.0)
    responders = [n for n in nodes if n not in dropped]
    mean = _exact_mean([states[n] for n in responders], [_weight(n) for n in responders])
    _, sent = prepare_global_adapter(fp, spec)
    for k in TEMPLATE:  # FedLPP: fp + (mean - sent), float32 arithmetic on the exact mean
        np.testing.assert_allclose(out[k].numpy(), fp[k] + (mean[k] - sent[k]), atol=2e-6)
    assert strat.accepted_replies == SILOS - 6 and strat.rejected_replies == 0


def test_shield_round_of_64_silos_with_10_percent_dropping_is_the_fedavg_of_responders(
        flower_identity):
    silo_keys, server_keys = generate_keyset()
    nodes = list(range(1, SILOS + 1))
    dropped = _dropped(nodes)
    rng = np.random.default_rng(3)
    updates = {n: OrderedDict([("l.q.lora_A.weight", (rng.standard_normal((2, 512)) * 1e-2)
                                .astype(np.float32))]) for n in nodes}

    def answer(m):
        node = m.metadata.dst_node_id
        payload, _ = encrypt_update(silo_keys, updates[node], server_round=1, silo=str(node),
                                    weight=_weight(node) * 1e-3)
        arr = ArrayRecord(OrderedDict([("payload", Array(np.frombuffer(payload, np.uint8)
                                                         .copy()))]))
        metrics = MetricRecord({"num-examples": _weight(node), "server-round": 1,
                                "train_loss": 1.0})
        return reply(m, RecordDict({"payload": arr, "metrics": metrics}))

    strat = ShieldStrategy(lambda: server_keys, PruneSchedule(), num_rounds=1,
                           fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=SILOS,
                           min_available_nodes=SILOS)
    strat.run(DropoutGrid(nodes, answer, dropped), ArrayRecord(), num_rounds=1, timeout=2.0)
    responders = [n for n in nodes if n not in dropped]
    agg = decrypt_aggregate(silo_keys, strat.log.downlink(0)[0])
    assert sorted(int(s) for s in agg.silos) == responders
    w = np.array([_weight(n) for n in responders], np.float64)
    exact = sum(wi * updates[n]["l.q.lora_A.weight"].reshape(-1).astype(np.float64)
                for wi, n in zip(w, responders)) / w.sum()
    assert np.max(np.abs(agg.values - exact)) < 1e-6  # CKKS noise only, no dropped silo in it


def test_shield_downlink_is_built_once_per_starting_round_and_shared_by_its_silos():
    """Messages to silos that lack the same aggregates share one downlink record (Flower
    hashes and pushes a shared object once): the server's cost per silo does not grow with the
    size of the aggregate; a silo that is up to date gets an empty downlink."""
    from fedshield_flwr.shield import RoundAccumulator
    from fedshield_flwr.shield.protocol import read_downlink

    silo_keys, server_keys = generate_keyset()
    update = OrderedDict([("l.q.lora_A.weight", np.full((2, 512), 1e-2, np.float32))])
    acc = RoundAccumulator(server_keys, 1)
    for n in (1, 2):
        acc.add(encrypt_update(silo_keys, update, server_round=1, silo=str(n), weight=0.5)[0],
                silo=str(n))
    strat = ShieldStrategy(lambda: server_keys, PruneSchedule(), num_rounds=2,
                           fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=8,
                           min_available_nodes=8)
    strat.aggregate_log().append(acc.finalize())
    nodes = list(range(1, 9))
    strat.known_round.update({7: 1, 8: 1})  # up to date: they applied round 1
    msgs = list(strat.configure_train(2, ArrayRecord(), ConfigRecord(),
                                      DropoutGrid(nodes, None, ())))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert sorted(by_node) == nodes
    behind = [by_node[n].content["downlink"] for n in range(1, 7)]
    assert all(r is behind[0] for r in behind)  # one object for the six silos behind
    assert [bytes(a) for a in read_downlink(by_node[1])] == strat.log.downlink(0)
    assert read_downlink(by_node[7]) == [] and read_downlink(by_node[8]) == []
    assert by_node[7].content["downlink"] is by_node[8].content["downlink"]


def test_keyset_is_sized_from_the_federation_and_refused_past_1024():
    assert params_for_silos(4) == ShieldParams()  # small federations keep the default (64)
    assert params_for_silos(65).max_silos == 128
    assert params_for_silos(1024).max_silos == 1024
    assert params_for_silos(1024).value_bound == pytest.approx(ShieldParams().value_bound / 16)
    with pytest.raises(KeysetError, match="1025 silo updates.*at most 1024.*sample fewer"):
        params_for_silos(MAX_SILOS_LIMIT + 1)


class Nodes:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_shield_server_asks_for_a_keyset_of_its_sample_size_and_refuses_a_small_one(
        flower_identity):
    _, server = generate_keyset()  # max_silos=64
    strat = ShieldStrategy(lambda: server, PruneSchedule(), num_rounds=2, fraction_train=0.5,
                           min_train_nodes=2, min_available_nodes=2)
    msgs = strat.configure_evaluate(0, ArrayRecord(), ConfigRecord(), Nodes(200))
    assert {m.content["config"]["max-silos"] for m in msgs} == {100}
    with pytest.raises(KeysetError, match="server, round 1.*samples 100 silos.*max_silos=64.*"
                                          "keys init --silos 100"):
        strat.configure_train(1, ArrayRecord(), ConfigRecord(), Nodes(200))
    with pytest.raises(KeysetError, match="at most 1024"):
        strat.configure_evaluate(0, ArrayRecord(), ConfigRecord(), Nodes(4000))


def test_keys_init_sizes_the_keyset_for_the_federation_and_refuses_past_1024(tmp_path, capsys):
    from fedshield_flwr.cli import main
    from fedshield_flwr.shield import ServerKeyset

    assert main(["keys", "init", "--out", str(tmp_path / "k"), "--silos", "300"]) == 0
    assert ServerKeyset.load(tmp_path / "k" / "shield-server.key").params.max_silos == 512
    assert main(["keys", "init", "--out", str(tmp_path / "big"), "--silos", "2000"]) == 1
    assert "at most 1024" in capsys.readouterr().err
    assert not (tmp_path / "big" / "shield-silo.key").exists()


def test_a_streamed_error_reply_names_the_silo_it_was_sent_to(flower_identity):
    # A SuperLink answers for a dead node with an error reply from itself (src node 0): the
    # strategy must name the silo from the ids of the messages the stream pushed this round.
    from flwr.app import Error, Message

    nodes = [1, 2, 3]
    dead = 3

    def answer(m):
        node = m.metadata.dst_node_id
        if node != dead:
            return _train_reply(node, _state(node), 10, to=m)
        err = Message(Error(code=0, reason="node unavailable"), reply_to=m)
        err.metadata.__dict__["_src_node_id"] = 0
        return err

    grid = DropoutGrid(nodes, answer, dropped=())
    strat = LoraFedAvg(TEMPLATE, fraction_train=1.0, fraction_evaluate=0.0,
                       min_train_nodes=3, min_available_nodes=3)
    strat.destinations = {"stale-id": 99}  # what an earlier send left
    initial = ArrayRecord(OrderedDict((k, Array(v)) for k, v in TEMPLATE.items()))
    strat.run(grid, initial, num_rounds=1, timeout=2.0)
    assert strat.rejected_replies == 1 and strat.accepted_replies == 2
    assert any(p.startswith(f"silo node {dead} failed train in round 1: ")
               for p in strat.problems), strat.problems



def _spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_server_cpu_counts_the_server_and_relay_threads_not_the_simulation_engine():
    """server_cpu_seconds: this thread and relay-* threads; a Flower engine thread is left out."""
    clock = ServerCpuClock()
    spun, release = threading.Event(), threading.Event()

    def relay_work():
        _spin(0.3)
        spun.set()
        release.wait()

    engine = threading.Thread(target=_spin, args=(0.6,), name="Thread-7 (add_messages_to_queue)")
    relay = threading.Thread(target=relay_work, name="relay-rpc_0")
    engine.start()
    relay.start()
    _spin(0.2)
    engine.join()
    assert spun.wait(30)
    spent = clock.elapsed()
    release.set()
    relay.join()
    # 0.2 s in this thread + 0.3 s in the relay's; the engine's 0.6 s is not the server's
    assert 0.45 <= spent <= 0.7, spent


def test_polls_that_find_no_reply_are_counted_apart_as_waiting(flower_identity):
    """server_idle_poll_cpu_seconds: the CPU of polls that returned nothing (the server waiting
    for silos, per second of round), not of the polls that brought replies."""
    from strategies.base import ReplyStream, RoundLoop

    class SlowGrid(DropoutGrid):
        pull_interval = 0.0

        def pull_messages(self, message_ids):
            self.pulls += 1
            if self.pulls <= 3:  # three empty polls, 0.1 s of CPU each
                _spin(0.1)
                return []
            _spin(0.2)  # then one that brings every reply
            return PushPull.pull_messages(self, message_ids)

    nodes = [1, 2, 3]
    grid = SlowGrid(nodes, lambda m: _train_reply(m.metadata.dst_node_id, _state(0), 4, to=m), ())
    loop = RoundLoop()
    msgs = [server_message(RecordDict({}), n) for n in nodes]
    got = list(ReplyStream(loop, grid, msgs, timeout=30.0))
    assert len(got) == 3 and grid.pulls == 4
    assert 0.25 <= loop.idle_poll_cpu <= 0.4, loop.idle_poll_cpu
