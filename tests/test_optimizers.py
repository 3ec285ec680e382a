"""Server optimizers (``strategy.optimizer``): Flower's own classes stepping our validated mean.

The reference of every test is the Flower strategy class itself (``FedAvgM``, ``FedAdam``,
``FedYogi``, ``FedAdagrad``), run the way Flower runs it: ``configure_train`` with the global
arrays, then ``aggregate_train`` on a reply that carries the round's average (a single reply:
Flower's weighted mean of one record is that record).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedshield_flwr.config import SERVER_OPTIMIZERS, ConfigError, RunConfig, default_flat_config
from fedshield_flwr.lpp.adapter import AdapterQuantSpec, lpp_server_update, prepare_global_adapter
from fedshield_flwr.optimizers import OPTIMIZERS, ServerOptimizer
from fedshield_flwr.results import RunResults
from server_app.base import ServerMode
from strategies.fedavg import LoraFedAvg, weighted_average
from strategies.lpp import LppStrategy
from tests.helpers import reply, server_message

TEMPLATE = OrderedDict([("a.lora_A.weight", np.zeros((4, 32), np.float32)),
                        ("a.lora_B.weight", np.zeros((32, 4), np.float32))])
NODES = dict(min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2)

# name -> (our ServerOptimizer kwargs, the Flower class, its constructor kwargs)
CASES = {
    "fedavgm": ({"server_learning_rate": 0.7, "server_momentum": 0.9}, FedAvgM,
                {"server_learning_rate": 0.7, "server_momentum": 0.9}),
    "fedadam": ({"server_learning_rate": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
                FedAdam, {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}),
    "fedadam-defaults": ({}, FedAdam, {}),
    "fedyogi": ({}, FedYogi, {}),  # server-learning-rate 0: Flower's default eta (0.01)
    "fedadagrad": ({"server_learning_rate": 0.2, "tau": 1e-2}, FedAdagrad,
                   {"eta": 0.2, "tau": 1e-2}),
}


class NodeGrid:
    """What FedAvg.configure_train needs of a Grid: the connected node ids."""

    def get_node_ids(self):
        return [1, 2]


def _state(seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(v.shape)).astype(np.float32))
                       for k, v in TEMPLATE.items())


def _arrays(state):
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def _numpy(record):
    return OrderedDict((k, a.numpy()) for k, a in record.items())


def _train_reply(node, state, n, rnd):
    metrics = MetricRecord({"num-examples": n, "server-round": rnd, "train_loss": 1.0})
    return reply(server_message(RecordDict({}), node),
                 RecordDict({"arrays": _arrays(state), "metrics": metrics}))


def _round_replies(rnd):
    """Two silos' adapters of round ``rnd`` (10 and 30 examples) and their weighted mean."""
    a, b = _state(10 * rnd + 1), _state(10 * rnd + 2)
    return [_train_reply(1, a, 10, rnd), _train_reply(2, b, 30, rnd)], \
        weighted_average([a, b], [10, 30])


def _opt(name):
    ours, _, _ = CASES[name]
    return ServerOptimizer(name.split("-")[0], **ours)


def _flower(name):
    _, cls, kwargs = CASES[name]
    return cls(**NODES, **kwargs)


def _flower_step(ref, rnd, current, average):
    """One round of Flower's own strategy class on ``average``; float32 like the silos hold."""
    ref.configure_train(rnd, _arrays(current), ConfigRecord(), NodeGrid())
    out, _ = ref.aggregate_train(rnd, [_train_reply(1, average, 1, rnd)])
    return OrderedDict((k, a.numpy().astype(np.float32)) for k, a in out.items())


def _our_round(strat, rnd, current):
    replies, _ = _round_replies(rnd)
    strat.configure_train(rnd, _arrays(current), ConfigRecord(), NodeGrid())
    new, _ = strat.aggregate_train(rnd, replies)
    return _numpy(new)


def test_every_configured_optimizer_has_a_flower_class():
    assert tuple(OPTIMIZERS) == SERVER_OPTIMIZERS


@pytest.mark.parametrize("name", list(CASES))
def test_two_rounds_equal_flowers_own_strategy_bit_for_bit(flower_identity, name):
    strat = LoraFedAvg(TEMPLATE, _opt(name), **NODES)
    ref = _flower(name)
    current = _state(0)
    for rnd in (1, 2):
        ours = _our_round(strat, rnd, current)
        expected = _flower_step(ref, rnd, current, _round_replies(rnd)[1])
        for k in TEMPLATE:
            assert ours[k].dtype == np.float32
            np.testing.assert_array_equal(ours[k], expected[k])
        assert not all(np.array_equal(ours[k], _round_replies(rnd)[1][k]) for k in TEMPLATE)
        current = ours


def test_fedavg_optimizer_returns_the_weighted_mean_unchanged(flower_identity):
    replies, mean = _round_replies(1)
    for strat in (LoraFedAvg(TEMPLATE, **NODES),
                  LoraFedAvg(TEMPLATE, ServerOptimizer("fedavg"), **NODES)):
        strat.configure_train(1, _arrays(_state(0)), ConfigRecord(), NodeGrid())
        new, _ = strat.aggregate_train(1, replies)
        for k in TEMPLATE:
            np.testing.assert_array_equal(new[k].numpy(), mean[k])
        assert strat.optimizer.state() == {}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_lpp_steps_the_fp_adapter_towards_fedlpps_result_like_flower(flower_identity, name):
    spec = AdapterQuantSpec(4, 32)
    strat = LppStrategy(TEMPLATE, lambda: {"w": np.zeros(8, np.uint8)}, "ab" * 32, spec, 0.5,
                        optimizer=_opt(name), **NODES)
    strat.delivery.holders.update({1, 2})  # both silos hold the base: no query round trip
    ref = _flower(name)
    fp = _state(0)
    for rnd in (1, 2):
        replies, mean = _round_replies(rnd)
        strat.configure_train(rnd, _arrays(fp), ConfigRecord(), NodeGrid())
        new, _ = strat.aggregate_train(rnd, replies)
        _, sent = prepare_global_adapter(fp, spec)
        target = lpp_server_update(fp, sent, [mean], [1.0], 0.5)  # FedLPP's "average"
        expected = _flower_step(ref, rnd, fp, target)
        for k in TEMPLATE:
            np.testing.assert_array_equal(new[k].numpy(), expected[k])
        fp = _numpy(new)


class _Mode(ServerMode):
    """The plaintext-adapter checkpoint of server_app/base.py around a bare LoraFedAvg."""

    def __init__(self, name):
        self.template = OrderedDict((k, v.copy()) for k, v in TEMPLATE.items())
        self.strategy = LoraFedAvg(TEMPLATE, _opt(name), **NODES)


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_restore_next_round_equals_an_uninterrupted_run(flower_identity, tmp_path,
                                                                   name):
    straight = _Mode(name)
    current = _state(0)
    for rnd in (1, 2, 3):
        current = _our_round(straight.strategy, rnd, current)

    first = _Mode(name)
    resumed = _state(0)
    for rnd in (1, 2):
        resumed = _our_round(first.strategy, rnd, resumed)
    state = first.checkpoint(_arrays(resumed))
    assert any(k.startswith("optimizer/") for k in state)
    results = RunResults.create(tmp_path, "run", {})
    results.save_checkpoint(2, state)
    done, loaded, _ = RunResults.resume(tmp_path, "run").load_checkpoint()
    second = _Mode(name)  # a fresh process: a new strategy and optimizer
    arrays = second.restore(loaded)
    assert done == 2
    resumed = _our_round(second.strategy, 3, _numpy(arrays))
    for k in TEMPLATE:
        np.testing.assert_array_equal(resumed[k], current[k])
    a, b = straight.strategy.optimizer.state(), second.strategy.optimizer.state()
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_restore_refuses_a_partial_optimizer_state(flower_identity):
    mode = _Mode("fedadam")
    _our_round(mode.strategy, 1, _state(0))
    state = mode.checkpoint(_arrays(_state(0)))
    del state["optimizer/v_t/a.lora_B.weight"]
    with pytest.raises(ValueError, match="optimizer/v_t/a.lora_B.weight"):
        _Mode("fedadam").restore(state)


@pytest.mark.parametrize("flat,fragment", [
    ({"strategy.optimizer": "sgd"},
     "strategy.optimizer.*fedavg, fedavgm, fedadam, fedyogi, fedadagrad"),
    ({"strategy.name": "split", "strategy.optimizer": "fedavgm"},
     "strategy.optimizer.*split.*not wired"),
    ({"strategy.server-learning-rate": -1.0}, "strategy.server-learning-rate"),
    ({"strategy.server-momentum": -0.1}, "strategy.server-momentum"),
    ({"strategy.beta-1": 1.0}, "strategy.beta-1"),
    ({"strategy.beta-2": -0.5}, "strategy.beta-2"),
    ({"strategy.tau": 0.0}, "strategy.tau"),
])
def test_bad_optimizer_settings_name_the_key_and_the_reason(flat, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flat(default_flat_config() | flat)


@pytest.mark.parametrize("name", ["fedavg", "lpp"])
def test_fedavg_and_lpp_accept_every_optimizer(name):
    for opt in SERVER_OPTIMIZERS:
        cfg = RunConfig.from_flat(default_flat_config() | {"strategy.name": name,
                                                           "strategy.optimizer": opt})
        assert ServerOptimizer.from_settings(cfg.strategy).name == opt


@pytest.mark.parametrize("mode_name,optimizer", [("fedavg", "fedadam"), ("lpp", "fedavgm")])
def test_real_rounds_with_an_optimizer_keep_every_silo_in(flower_identity, tmp_path, monkeypatch,
                                                          mode_name, optimizer):
    """Server mode + real ClientApp in-process: the stepped adapter is one the silos accept."""
    from fedshield_flwr.silo import clear_runtimes
    from tests.helpers import tiny_run_config
    from tests.strategies.test_lpp_strategy import HandlerGrid, _run

    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "cache"))
    clear_runtimes()
    flat = tiny_run_config(**{"strategy.name": mode_name, "num-server-rounds": 2,
                              "strategy.optimizer": optimizer, "strategy.server-momentum": 0.9,
                              "lpp.server-eval": False})
    mode, final, rows = _run(flat, tmp_path / "run", HandlerGrid(flat))
    assert mode.strategy.optimizer.name == optimizer
    assert [r["replies"] for r in rows[1:]] == [3, 3] and all(r["failures"] == 0 for r in rows[1:])
    assert all(a.numpy().dtype == np.float32 for a in final.values())
    assert any(k.startswith("optimizer/") for k in mode.checkpoint(final))
