"""split over real Flower Messages and a real relay: round control, tokens, FedAvg, lifecycle."""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections import OrderedDict
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client_app import split as silo_split
from fedshield_flwr.config import ConfigError, RunConfig
from fedshield_flwr.split.protocol import (
    ADDRESS_KEY,
    CA_KEY,
    PARTS_HASH_KEY,
    PARTS_RECORD,
    SILO_KEY,
    TOKEN_KEY,
)
from fedshield_flwr.split.relay import RelayClient, RelayError
from fedshield_flwr.split.relay.control import RelayControl
from fedshield_flwr.split.silo import SplitRoundError
from fedshield_flwr.train import cosine_lr
from fedshield_flwr.wire import decode_arrays, encode_arrays
from server_app.split import SplitMode
from strategies.fedavg import weighted_average
from tests.helpers import PushPull, context, reply, tiny_run_config

NODES = (11, 12)


class FakeGrid(PushPull):
    """What the strategy asks a Grid for when it samples nodes."""

    def __init__(self, nodes=NODES):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and all(m.metadata.message_type == "query" for m in messages):
            # the silo parts query: the real handler of each silo answers
            return [silo_split.query(m, _silo_ctx(NODES.index(m.metadata.dst_node_id)))
                    for m in messages]
        raise RuntimeError("SuperLink went away")


def _flat(**overrides):
    return tiny_run_config(**{"strategy.name": "split", **overrides})


def _mode(tmp_path: Path, **overrides) -> SplitMode:
    return SplitMode(RunConfig.from_flat(_flat(**overrides)), tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mode(tmp_path_factory):
    m = _mode(tmp_path_factory.mktemp("split-run"))
    m.relay.start()
    yield m
    m.relay.stop()


def _silo_ctx(i: int):
    return context(_flat(), {"partition-id": i, "num-partitions": 2})


def _sorted(messages) -> list[Message]:
    """Flower samples nodes in random order; tests address silos by node id."""
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _connect(mode: SplitMode, msg: Message, silo: str | None = None) -> RelayClient:
    conf = msg.content["config"]
    return RelayClient(conf[ADDRESS_KEY], conf[TOKEN_KEY], silo or conf[SILO_KEY],
                       mode.middle.layout.fingerprint()).connect()


def test_train_messages_carry_only_round_control_and_a_token_per_silo(mode, flower_identity):
    msgs = _sorted(mode.strategy.configure_train(1, mode.initial_arrays(), ConfigRecord({}),
                                                 FakeGrid()))
    assert [m.metadata.dst_node_id for m in msgs] == list(NODES)
    tokens = set()
    for m, node in zip(msgs, NODES):
        # the silo parts go along only to a silo that does not hold them yet
        assert set(m.content) - {PARTS_RECORD} == {"arrays", "config"}
        assert len(m.content["arrays"]) == 0  # round 1: silos start from their seeded init
        conf = m.content["config"]
        # no CA: no TLS
        assert set(conf) == {"server-round", ADDRESS_KEY, TOKEN_KEY, SILO_KEY, PARTS_HASH_KEY}
        assert conf[PARTS_HASH_KEY] == mode.parts.content_hash
        assert conf[ADDRESS_KEY] == f"127.0.0.1:{mode.relay.server.port}"
        assert conf[SILO_KEY] == str(node)
        tokens.add(conf[TOKEN_KEY])
    assert len(tokens) == 2
    lr = mode.middle.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(cosine_lr(1, 3, 5e-4, 5e-5))
    mode.strategy.relay.end_phase(1)


def test_a_token_works_only_for_its_silo_and_only_until_its_round_ends(mode, flower_identity):
    msgs = _sorted(mode.strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FakeGrid()))
    with _connect(mode, msgs[0]):  # silo 11 with its own token
        pass
    with pytest.raises(RelayError, match="issued to silo '11'") as exc:
        _connect(mode, msgs[0], silo="12")  # silo 12 replaying silo 11's token
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    mode.strategy.aggregate_train(2, [])  # the round ends: its tokens are revoked
    with pytest.raises(RelayError, match="revoked") as exc:
        _connect(mode, msgs[1])
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert mode.relay.server.stats()["rejected_auth"] >= 2


def test_an_expired_token_is_refused(mode, flower_identity):
    from fedshield_flwr.split.settings import SplitSettings

    relay = RelayControl(mode.middle, SplitSettings.from_section({"token-ttl-s": 0.3}),
                         lambda r: 1e-4)
    relay.start()
    try:
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=11, message_type="train")
        (sent,) = relay.attach([msg], 1)
        time.sleep(0.5)
        with pytest.raises(RelayError, match="expired") as exc:
            _connect(mode, sent)
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        relay.stop()


def test_round_trains_through_the_relay_and_averages_head_tail_by_examples(
        mode, flower_identity):
    strat = mode.strategy
    middle_before = mode.middle.adapter_state()
    msgs = _sorted(strat.configure_train(1, mode.initial_arrays(), ConfigRecord({}),
                                         FakeGrid()))
    replies = [silo_split.train(m, _silo_ctx(i)) for i, m in enumerate(msgs)]
    for r in replies:
        assert set(r.content) == {"arrays", "metrics"}  # the reply: head + tail adapter, metrics
        assert set(r.content["arrays"]) == set(mode.template)
        assert r.content["metrics"]["relay-bytes-up"] > 0
    arrays, metrics = strat.aggregate_train(1, replies)
    states = [decode_arrays(r.content["arrays"], "test") for r in replies]
    expected = weighted_average(states, [8, 8])  # 2 steps x batch 4 per silo
    got = decode_arrays(arrays, "test")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert metrics["num-examples"] == 16 and metrics["train_loss"] > 0
    assert metrics["relay_silo_steps"] == 4 and metrics["relay_bytes_down"] > 0
    after = mode.middle.adapter_state()  # the relay trained the middle adapter
    assert any(not np.array_equal(after[k], middle_before[k]) for k in after)
    assert not set(after) & set(mode.template)

    ev = _sorted(strat.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid()))
    ev_replies = [silo_split.evaluate(m, _silo_ctx(i)) for i, m in enumerate(ev)]
    out = strat.aggregate_evaluate(1, ev_replies)
    assert 0 < out["eval_loss"] < 20 and out["relay_eval_bytes"] > 0
    assert mode.middle.adapter_state().keys() == after.keys()
    assert all(np.array_equal(mode.middle.adapter_state()[k], after[k]) for k in after)


def _train_round(m: SplitMode, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    msgs = _sorted(m.strategy.configure_train(server_round, arrays, ConfigRecord({}), FakeGrid()))
    out, _ = m.strategy.aggregate_train(
        server_round, [silo_split.train(msg, _silo_ctx(i)) for i, msg in enumerate(msgs)])
    return out


def test_a_round_resumed_from_a_checkpoint_equals_the_uninterrupted_round(
        tmp_path, flower_identity):
    straight = _mode(tmp_path / "a")
    straight.relay.start()
    try:
        after1 = _train_round(straight, 1, straight.initial_arrays())
        ckpt = straight.checkpoint(after1)
        after2 = straight.checkpoint(_train_round(straight, 2, after1))
    finally:
        straight.relay.stop()
    resumed = _mode(tmp_path / "b")  # a new ServerApp process
    resumed.relay.start()
    try:
        again = resumed.checkpoint(_train_round(resumed, 2, resumed.restore(ckpt)))
    finally:
        resumed.relay.stop()
    assert after2.keys() == again.keys()
    assert all(np.array_equal(after2[k], again[k]) for k in after2)  # silo-side and middle


def test_bad_reply_is_dropped_with_silo_and_round_named(mode, flower_identity):
    good_state = OrderedDict((k, np.ones_like(v)) for k, v in mode.template.items())
    bad_state = OrderedDict(good_state)
    first = next(iter(bad_state))
    bad_state[first] = np.zeros((3, 3), np.float32)
    msgs = _sorted(mode.strategy.configure_train(3, ArrayRecord(), ConfigRecord({}), FakeGrid()))

    def answer(msg, state):
        metrics = MetricRecord({"num-examples": 8, "server-round": 3, "train_loss": 1.0})
        return reply(msg, RecordDict({"arrays": encode_arrays(state), "metrics": metrics}))

    arrays, _ = mode.strategy.aggregate_train(3, [answer(msgs[0], good_state),
                                                  answer(msgs[1], bad_state)])
    assert np.array_equal(arrays[first].numpy(), good_state[first])
    assert mode.strategy.rejected_replies == 1
    assert any("silo node 12 in round 3" in p and "shape" in p for p in mode.strategy.problems)


def test_silo_error_names_silo_round_and_remedy(mode, flower_identity):
    msgs = _sorted(mode.strategy.configure_train(4, ArrayRecord(), ConfigRecord({}), FakeGrid()))
    mode.strategy.relay.end_phase(4)  # the server gave up on the round
    with pytest.raises(SplitRoundError,
                       match=r"silo 0 \(node 1\) in round 4.*revoked.*strategy.round-timeout"):
        silo_split.train(msgs[0], _silo_ctx(0))
    bare = Message(RecordDict({"arrays": ArrayRecord(),
                               "config": ConfigRecord({"server-round": 4})}),
                   dst_node_id=11, message_type="train")
    with pytest.raises(ValueError, match=r"silo 1 \(node 1\) in round 4: .*lacks relay-address"):
        silo_split.train(bare, _silo_ctx(1))


def test_checkpoint_restores_both_adapters_and_export_merges_them_for_peft(
        mode, tmp_path, flower_identity):
    rng = np.random.default_rng(0)
    silo = OrderedDict((k, rng.standard_normal(v.shape).astype(np.float32))
                       for k, v in mode.template.items())
    ckpt = mode.checkpoint(encode_arrays(silo))
    assert {k.split("/")[0] for k in ckpt} == {"silo", "middle"}

    fresh = _mode(tmp_path)  # a restarted ServerApp
    arrays = fresh.restore(ckpt)
    assert all(np.array_equal(arrays[k].numpy(), silo[k]) for k in silo)
    assert all(np.array_equal(fresh.middle.adapter_state()[k], ckpt["middle/" + k])
               for k in fresh.middle.adapter_state())
    with pytest.raises(ValueError, match="no 'middle/' tensors"):
        fresh.restore({k: v for k, v in ckpt.items() if k.startswith("silo/")})
    assert len(fresh.restore({k: v for k, v in ckpt.items() if k.startswith("middle/")})) == 0

    from peft import PeftModel
    from safetensors.numpy import load_file

    from fedshield_flwr.models import load_base_model

    out = fresh.export(arrays, tmp_path)
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert set(exported) == {k.split("/", 1)[1] for k in ckpt}
    model = PeftModel.from_pretrained(load_base_model("tiny:llama"), str(out))
    assert any("layers.0." in n and "lora_A" in n for n, _ in model.named_parameters())
    assert fresh.export(ArrayRecord(), tmp_path / "none") is None


def test_the_relay_is_stopped_when_the_run_fails(tmp_path, flower_identity):
    m = _mode(tmp_path)
    with pytest.raises(RuntimeError, match="SuperLink went away"):
        m.strategy.run(FakeGrid(), m.initial_arrays(), num_rounds=1)
    assert not m.relay.running
    port = int(m.relay.public_address.rsplit(":", 1)[1])
    with pytest.raises(RelayError) as exc:  # nothing serves that port any more
        RelayClient(f"127.0.0.1:{port}", "t", "11", m.middle.layout.fingerprint(),
                    timeout_s=5).connect()
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE


def test_concurrent_runs_get_their_own_relay_port(mode):
    other = RelayControl(mode.middle, mode.settings, lambda r: 1e-4)
    try:
        other.start()
        assert other.public_address != mode.relay.public_address
    finally:
        other.stop()


def _self_signed():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tls_relay_sends_its_ca_and_silos_connect_with_it(mode, tmp_path, flower_identity):
    cert, key = _self_signed()
    (tmp_path / "ca.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    settings = RunConfig.from_flat(_flat(**{
        "split.relay-ca-cert": str(tmp_path / "ca.pem"),
        "split.relay-server-cert": str(tmp_path / "ca.pem"),
        "split.relay-server-key": str(tmp_path / "key.pem")}))
    from fedshield_flwr.split.settings import SplitSettings

    relay = RelayControl(mode.middle, SplitSettings.from_config(settings), lambda r: 1e-4)
    relay.start()
    try:
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=11, message_type="train")
        (sent,) = relay.attach([msg], 1)
        conf = sent.content["config"]
        assert conf[CA_KEY] == cert.decode()
        with RelayClient(conf[ADDRESS_KEY], conf[TOKEN_KEY], conf[SILO_KEY],
                         mode.middle.layout.fingerprint(),
                         root_certificates=conf[CA_KEY].encode()):
            pass
        with pytest.raises(RelayError):  # a plaintext client is refused
            RelayClient(conf[ADDRESS_KEY], conf[TOKEN_KEY], conf[SILO_KEY],
                        mode.middle.layout.fingerprint(), timeout_s=5).connect()
    finally:
        relay.stop()


def test_remote_relay_host_needs_a_reachable_bind(mode):
    from fedshield_flwr.split.settings import SplitSettings

    bad = SplitSettings.from_section({"relay-host": "coordinator.example",
                                      "relay-bind": "127.0.0.1"})
    with pytest.raises(ValueError, match="split.relay-bind='0.0.0.0'"):
        RelayControl(mode.middle, bad, lambda r: 1e-4).start()
    good = RelayControl(mode.middle, SplitSettings.from_section(
        {"relay-host": "coordinator.example", "relay-bind": "0.0.0.0"}), lambda r: 1e-4)
    try:
        good.start()
        assert good.public_address == f"coordinator.example:{good.server.port}"
    finally:
        good.stop()


def test_shield_aggregation_keeps_head_tail_encrypted_and_a_silo_exports_the_merged_adapter(
        tmp_path, flower_identity):
    from safetensors.numpy import load_file

    from fedshield_flwr.shield.silo import GLOBAL_KEY

    flat = _flat(**{"split.aggregation": "shield", "num-server-rounds": 1})
    m = SplitMode(RunConfig.from_flat(flat), tmp_path)
    silos = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=flat,
                           node_config={"partition-id": i, "num-partitions": 2})
             for i, node in enumerate(NODES)}

    def ask(messages, handler):
        return [handler(msg, silos[msg.metadata.dst_node_id]) for msg in _sorted(messages)]

    m.relay.start()
    try:
        strat = m.strategy
        # Round 0: the silos provision the run's keyset (simulation) and evaluate the seeded init.
        strat.aggregate_evaluate(0, ask(strat.configure_evaluate(
            0, ArrayRecord(), ConfigRecord({}), FakeGrid()), silo_split.evaluate))
        train_msgs = _sorted(strat.configure_train(1, ArrayRecord(), ConfigRecord({}), FakeGrid()))
        assert all(TOKEN_KEY in msg.content["config"] and "arrays" not in msg.content
                   for msg in train_msgs)
        replies = ask(train_msgs, silo_split.train)
        for r in replies:  # ciphertexts only: no plaintext tensor reaches the server
            assert set(r.content) == {"payload", "metrics"}
            assert r.content["payload"]["payload"].dtype == "uint8"
        marker, metrics = strat.aggregate_train(1, replies)
        assert strat.accepted_replies == 2 and metrics["relay_silo_steps"] == 4
        final = strat.configure_evaluate(1, marker, ConfigRecord({}), FakeGrid())
        assert all("middle" in msg.content for msg in final)
        out = strat.aggregate_evaluate(1, ask(final, silo_split.evaluate))
        assert out["eval_loss"] > 0
    finally:
        m.relay.stop()
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(exported) == set(m.template) | set(m.middle.adapter_state())
    held = [decode_arrays(c.state.array_records[GLOBAL_KEY], "t") for c in silos.values()]
    initial = m.parts.adapter()  # the seeded head + tail LoRA every silo started from
    for k in m.template:  # both silos decrypted the same aggregate, and it moved
        assert np.allclose(exported[k], held[0][k], atol=1e-6)
        assert np.allclose(held[0][k], held[1][k], atol=1e-6)
    assert any(not np.allclose(exported[k], initial[k]) for k in m.template)
    ckpt = m.checkpoint(marker)
    assert "aggregate-log" in ckpt and not any(k.startswith("silo/") for k in ckpt)
    assert len(SplitMode(RunConfig.from_flat(flat), tmp_path).restore(ckpt)) == 0


def test_unknown_split_aggregation_is_refused():
    from fedshield_flwr.split.settings import SplitSettings

    with pytest.raises(ConfigError, match="split.aggregation"):
        SplitSettings.from_config(RunConfig.from_flat(_flat(**{"split.aggregation": "mean"})))

