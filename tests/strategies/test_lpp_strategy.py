"""lpp over real Flower Messages: FedLPP's update rule, bad replies, one-time base delivery.

The first tests drive :class:`strategies.lpp.LppStrategy` on a small adapter. The others run
whole rounds in-process: the real ServerApp mode (:class:`server_app.lpp.LppMode`) talks
through :class:`HandlerGrid` to the real ClientApp (``client_app.app``) of three silos with a
tiny Llama, and every message that leaves the server is inspected.
"""

from __future__ import annotations

from collections import OrderedDict
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedshield_flwr.lpp.adapter import AdapterQuantSpec, prepare_global_adapter
from strategies.lpp import LppStrategy
from tests.helpers import PushPull, context, reply, server_message, tiny_run_config

TEMPLATE = OrderedDict([("a.lora_A.weight", np.zeros((4, 32), np.float32)),
                        ("a.lora_B.weight", np.zeros((32, 4), np.float32))])
HASH = "ab" * 32


def _state(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(v.shape)).astype(np.float32))
                       for k, v in TEMPLATE.items())


def _arrays(state):
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def _train_reply(node, state, n=10, rnd=1):
    metrics = MetricRecord({"num-examples": n, "server-round": rnd, "train_loss": 1.0})
    return reply(server_message(RecordDict({}), node),
                 RecordDict({"arrays": _arrays(state), "metrics": metrics}))


class NodeGrid(PushPull):
    """Node sampling reads the node ids; base queries are answered from ``holders``."""

    def __init__(self, nodes, holders=()):
        self.nodes, self.holders, self.queries = list(nodes), set(holders), []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == "query"
            self.queries.append(m.metadata.dst_node_id)
            m.metadata.__dict__["_message_id"] = str(uuid4())
            have = m.metadata.dst_node_id in self.holders
            out.append(reply(m, RecordDict({"config": ConfigRecord(
                {"has-base": have, "base-hash": m.content["config"]["base-hash"]})})))
        return out


def _strategy(server_lr=1.0, bits=4):
    return LppStrategy(TEMPLATE, lambda: {"w": np.zeros(8, np.uint8)}, HASH,
                       AdapterQuantSpec(bits, 32), server_lr, min_train_nodes=1,
                       min_available_nodes=1, min_evaluate_nodes=1)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_server_moves_the_fp_adapter_by_the_mean_progress_over_what_was_sent(
        flower_identity, server_lr):
    strat = _strategy(server_lr)
    fp = _state(0, 0.01)
    msgs = list(strat.configure_train(1, _arrays(fp), ConfigRecord(), NodeGrid([1, 2], [1, 2])))
    assert len(msgs) == 2 and all("base" not in m.content for m in msgs)
    _, sent = prepare_global_adapter(fp, AdapterQuantSpec(4, 32))
    a, b = _state(1, 0.01), _state(2, 0.01)
    new, metrics = strat.aggregate_train(1, [_train_reply(1, a, 10), _train_reply(2, b, 30)])
    for k in TEMPLATE:
        expected = fp[k] + server_lr * ((10 * a[k] + 30 * b[k]) / 40 - sent[k])
        np.testing.assert_allclose(new[k].numpy(), expected, atol=1e-6)
    assert metrics["num-examples"] == 40


def test_the_owners_correction_step_runs_on_fedlpps_result_every_round(flower_identity):
    """The correction callable gets the round and FedLPP's updated adapter; its result is the
    new global adapter (what the next round quantizes and sends)."""
    seen = []

    def correct(server_round, fp):
        seen.append((server_round, {k: v.copy() for k, v in fp.items()}))
        return OrderedDict((k, v + 1.0) for k, v in fp.items())

    strat = LppStrategy(TEMPLATE, lambda: {"w": np.zeros(8, np.uint8)}, HASH,
                        AdapterQuantSpec(4, 32), 1.0, correct=correct, min_train_nodes=1,
                        min_available_nodes=1, min_evaluate_nodes=1)
    fp = _state(0, 0.01)
    list(strat.configure_train(2, _arrays(fp), ConfigRecord(), NodeGrid([1], [1])))
    _, sent = prepare_global_adapter(fp, AdapterQuantSpec(4, 32))
    a = _state(1, 0.01)
    new, _ = strat.aggregate_train(2, [_train_reply(1, a, 10, rnd=2)])
    assert [r for r, _ in seen] == [2]
    for k in TEMPLATE:
        updated = fp[k] + (a[k] - sent[k])
        np.testing.assert_allclose(seen[0][1][k], updated, atol=1e-6)
        np.testing.assert_allclose(new[k].numpy(), updated + 1.0, atol=1e-6)


def test_what_silos_receive_is_a_bit_packed_k_bit_adapter(flower_identity):
    strat = _strategy(bits=3)
    msgs = list(strat.configure_train(2, _arrays(_state(0)), ConfigRecord(),
                                      NodeGrid([1], [1])))
    adapter = msgs[0].content["adapter"]
    n = sum(v.size for v in TEMPLATE.values())
    codes = sum(a.numpy().nbytes for k, a in adapter.items() if k.endswith(":codes"))
    assert codes == sum(int(np.ceil(v.size * 3 / 8)) for v in TEMPLATE.values())
    assert all(a.numpy().dtype == np.uint8 or a.numpy().size <= n // 32
               for a in adapter.values())
    assert msgs[0].content["config"]["base-hash"] == HASH
    assert msgs[0].content["config"]["server-round"] == 2


@pytest.mark.parametrize("case,fragment", [
    ("wrong_shape", "shape"),
    ("wrong_dtype", "dtype"),
    ("nan", "NaN"),
    ("other_round", "replied for round 5"),
])
def test_bad_silo_adapter_is_refused_by_silo_and_round(flower_identity, caplog, case, fragment):
    strat = _strategy()
    fp = _state(0, 0.01)
    strat.configure_train(3, _arrays(fp), ConfigRecord(), NodeGrid([1, 9], [1, 9]))
    bad, rnd = _state(3, 0.01), 3
    if case == "wrong_shape":
        bad["a.lora_A.weight"] = np.zeros((4, 16), np.float32)
    elif case == "wrong_dtype":
        bad["a.lora_A.weight"] = bad["a.lora_A.weight"].astype(np.float64)
    elif case == "nan":
        bad["a.lora_B.weight"][0, 0] = np.nan
    else:
        rnd = 5
    good = _state(1, 0.01)
    with caplog.at_level("WARNING", logger="fedshield.server"):
        new, _ = strat.aggregate_train(3, [_train_reply(1, good, rnd=3),
                                           _train_reply(9, bad, rnd=rnd)])
    problem = " ".join(strat.problems)
    assert fragment in problem and "9" in problem and "round 3" in problem
    assert strat.accepted_replies == 1 and strat.rejected_replies == 1
    _, sent = prepare_global_adapter(fp, AdapterQuantSpec(4, 32))
    for k in TEMPLATE:  # the round went on with silo 1 alone
        np.testing.assert_allclose(new[k].numpy(), fp[k] + good[k] - sent[k], atol=1e-6)


def test_base_goes_only_to_silos_without_it_and_again_after_a_failure(flower_identity):
    strat = _strategy()
    grid = NodeGrid([1, 2, 3], holders=[1])
    msgs = {m.metadata.dst_node_id: m for m in
            strat.configure_train(1, _arrays(_state(0)), ConfigRecord(), grid)}
    assert sorted(grid.queries) == [1, 2, 3]
    assert "base" not in msgs[1].content and "base" in msgs[2].content and "base" in msgs[3].content
    # 2 and 3 replied: they hold it now; 1 failed (e.g. its cache was wiped): ask it again
    failed = Message(Error(code=1, reason="no cached base"), reply_to=msgs[1])
    strat.aggregate_train(1, [failed, _train_reply(2, _state(2)), _train_reply(3, _state(3))])
    grid.queries.clear()
    grid.holders = set()
    msgs = {m.metadata.dst_node_id: m for m in
            strat.configure_train(2, _arrays(_state(0)), ConfigRecord(), grid)}
    assert grid.queries == [1]
    assert "base" in msgs[1].content and "base" not in msgs[2].content


# ---- whole rounds in-process: real ServerApp mode, real ClientApp, tiny Llama ---------------


class HandlerGrid(PushPull):
    """Delivers each message to the real ClientApp of its node, in-process; records traffic."""

    def __init__(self, run_config, num_nodes=3):
        from client_app import app as client

        self.handlers = {"train": client.train, "evaluate": client.evaluate,
                         "query": client.query}
        self.contexts = {n + 1: context(run_config, {"partition-id": n,
                                                     "num-partitions": num_nodes}, n + 1)
                         for n in range(num_nodes)}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(m)
            handler = self.handlers[m.metadata.message_type]
            try:
                out.append(handler(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # what Flower turns a ClientApp exception into
                out.append(Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"),
                                   reply_to=m))
        return out


@pytest.fixture(scope="module")
def lpp_config():
    return tiny_run_config(**{"strategy.name": "lpp", "num-server-rounds": 2,
                              "lpp.eval-partitions": 3})


def _run(cfg_flat, tmp_path, grid):
    from fedshield_flwr.config import RunConfig
    from server_app.app import build_mode

    cfg = RunConfig.from_flat(cfg_flat)
    mode = build_mode(cfg, tmp_path)
    rows = []
    final = mode.strategy.run(grid, mode.initial_arrays(), num_rounds=cfg.num_server_rounds,
                              train_config=mode.train_config(),
                              evaluate_config=mode.evaluate_config(),
                              on_round_end=lambda rec, _: rows.append(rec.as_row()),
                              server_evaluate=mode.server_evaluate)
    return mode, final, rows


def test_lpp_rounds_send_no_full_precision_weight_and_the_base_once(
        flower_identity, lpp_config, tmp_path, monkeypatch):
    import client_app.lpp  # noqa: F401  (the silo side under test)
    from fedshield_flwr.lpp.package import package_from_arrays
    from fedshield_flwr.lpp.quantize import assert_no_full_precision_weights
    from fedshield_flwr.models import load_base_model
    from fedshield_flwr.silo import clear_runtimes

    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "cache"))
    clear_runtimes()
    grid = HandlerGrid(lpp_config)
    mode, final, rows = _run(lpp_config, tmp_path / "run1", grid)
    assert [r["round"] for r in rows] == [0, 1, 2]
    base_bytes = mode.package.nbytes
    # the package went down once per silo, in the first message; later rounds carry no base
    # round 0 = 3 evaluate messages (+ base), rounds 1-2 = 3 train + 3 evaluate (adapter only)
    per_adapter_msg = rows[1]["bytes_down"] / 6
    assert rows[2]["bytes_down"] == pytest.approx(rows[1]["bytes_down"], rel=1e-3)
    assert rows[0]["bytes_down"] - 3 * per_adapter_msg == pytest.approx(3 * base_bytes, rel=0.15)  # + npy headers
    assert sorted(mode.strategy.base_sent_to) == [1, 2, 3]
    # IP margin every round: both losses finite, written with the round
    for r in rows:
        assert np.isfinite(r["server_eval_loss"]) and np.isfinite(r["proxy_eval_loss"])
        assert r["ip_loss_gap"] == pytest.approx(r["proxy_eval_loss"] - r["server_eval_loss"])
    assert rows[2]["train_loss"] > 0 and rows[2]["replies"] == 3

    # no full-precision base weight in anything the server sent
    full = {n: p.detach().numpy().ravel() for n, p in
            load_base_model("tiny:llama").named_parameters() if p.ndim >= 2}
    big = min(v.size for v in full.values())
    for m in grid.sent:
        for rec_name, rec in m.content.array_records.items():
            arrays = {k: a.numpy() for k, a in rec.items()}
            if rec_name == "base":
                assert_no_full_precision_weights(package_from_arrays(arrays))
            for key, arr in arrays.items():
                if arr.dtype.kind == "f":
                    assert arr.size < big, (rec_name, key, arr.shape)
    # the server's global adapter stays full precision on the server and moved
    fp = {k: a.numpy() for k, a in final.items()}
    assert all(v.dtype == np.float32 for v in fp.values())
    assert any(not np.array_equal(fp[k], mode.template[k]) for k in fp)

    # a second run on the same silos downloads nothing: every silo has the base cached
    grid2 = HandlerGrid(lpp_config)
    mode2, _, rows2 = _run({**lpp_config, "num-server-rounds": 1, "lpp.server-eval": False},
                           tmp_path / "run2", grid2)
    assert mode2.strategy.base_sent_to == []
    assert all("base" not in m.content for m in grid2.sent)
    assert rows2[0]["bytes_down"] == pytest.approx(3 * per_adapter_msg, rel=0.01)

def test_silo_without_the_base_says_so_and_refuses_a_tampered_one(
        flower_identity, lpp_config, tmp_path, monkeypatch):
    from client_app import app as client
    from fedshield_flwr.config import RunConfig
    from fedshield_flwr.lpp.adapter import adapter_to_arrays
    from fedshield_flwr.lpp.quantize import BaseQuantSpec, build_quantized_package
    from fedshield_flwr.models import load_base_model, load_tokenizer
    from fedshield_flwr.packages.format import PackageError, package_to_arrays
    from fedshield_flwr.silo import clear_runtimes, initial_adapter
    from fedshield_flwr.wire import encode_arrays

    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "cache"))
    clear_runtimes()
    pkg = build_quantized_package(load_base_model("tiny:llama"), BaseQuantSpec(),
                                  load_tokenizer("tiny:llama"))
    ctx = context(lpp_config, {"partition-id": 1, "num-partitions": 3})
    q = server_message(RecordDict({"config": ConfigRecord(
        {"base-hash": pkg.content_hash, "server-round": 1})}), 4, "query")
    assert client.query(q, ctx).content["config"]["has-base"] is False

    sent_q, _ = prepare_global_adapter(initial_adapter(RunConfig.from_flat(lpp_config)),
                                       AdapterQuantSpec())
    config = ConfigRecord({"base-hash": pkg.content_hash, "server-round": 1})
    adapter = encode_arrays(adapter_to_arrays(sent_q))
    no_base = server_message(RecordDict({"adapter": adapter, "config": config}), 4, "train")
    with pytest.raises(PackageError, match="silo 1 has no cached base"):
        client.train(no_base, ctx)

    arrays = package_to_arrays(pkg)
    key = next(k for k, v in arrays.items() if v.dtype == np.uint8 and v.size > 64
               and not k.startswith("tokenizer") and not k.startswith("__"))
    arrays[key] = arrays[key].copy()
    arrays[key][0] ^= 0xFF
    tampered = server_message(RecordDict({"adapter": adapter, "config": config,
                                          "base": encode_arrays(arrays)}), 4, "train")
    with pytest.raises(PackageError, match="corrupted or tampered"):
        client.train(tampered, ctx)
    assert client.query(q, ctx).content["config"]["has-base"] is False

    good = server_message(RecordDict({"adapter": adapter, "config": config,
                                      "base": encode_arrays(package_to_arrays(pkg))}), 4, "train")
    out = client.train(good, ctx)
    assert out.content["metrics"]["server-round"] == 1
    assert client.query(q, ctx).content["config"]["has-base"] is True
