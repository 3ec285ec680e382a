"""The split relay over real gRPC on loopback: exactness, generation, batching, faults, TLS."""

from __future__ import annotations

import copy
import datetime
import ipaddress
import threading
import time

import grpc
import pytest
import torch

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.load import load_base_model
from fedshield_flwr.models.lora import apply_lora
from fedshield_flwr.split.arch import SplitLayout
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.packing import pack
from fedshield_flwr.split.relay import RelayClient, RelayError, RelayServer, encode_activation
from fedshield_flwr.split.relay import relay_pb2 as pb
from fedshield_flwr.split.relay import relay_pb2_grpc as pb_grpc
from fedshield_flwr.split.relay.server import PROTOCOL_VERSION
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.split.silo_model import SiloTrainer, SplitSilo

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LR = 3e-3


_BASES: dict[str, torch.nn.Module] = {}


def _peft(name: str, seed: int = 7):
    if name not in _BASES:
        _BASES[name] = load_base_model(name)
    return apply_lora(copy.deepcopy(_BASES[name]), LORA, seed=seed)


def _parties(name="tiny:llama", n_silos=1, **split):
    settings = SplitSettings.from_section({"head-layers": 1, "tail-layers": 1, **split})
    peft = _peft(name)
    layout = SplitLayout.for_model(peft, 1, 1)
    middle = MiddleServer(peft, layout, learning_rate=LR)
    silos = [SplitSilo(_peft(name), layout) for _ in range(n_silos)]
    return settings, middle, silos


def _batches(n, seed=0, batch=3, width=16):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 500, (batch, width), generator=gen)
        lens = torch.randint(4, width + 1, (batch,), generator=gen)
        mask = (torch.arange(width)[None] < lens[:, None]).long()
        out.append((ids, mask))
    return out


def _client(relay: RelayServer, silo: str, layout: str, **kw) -> RelayClient:
    token = relay.issue_token(silo, round=1)
    return RelayClient(relay.address, token, silo, layout, **kw).connect()


def test_split_training_over_grpc_gives_the_unsplit_losses():
    settings, middle, (silo,) = _parties()
    batches = _batches(4)
    ref = _peft("tiny:llama")
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
    ref.train()
    want = []
    for ids, mask in batches:
        loss = ref(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(float(loss.detach()))
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        with _client(relay, "s1", silo.layout.fingerprint()) as link:
            trainer = SiloTrainer(silo, link, learning_rate=LR, name="s1")
            got = [trainer.train_step(ids, mask).loss for ids, mask in batches]
        assert relay.stats()["groups"] == 4
    trained = [v for k, v in silo.adapter_state().items() if "lora_B" in k]
    assert all(abs(v).max() > 0 for v in trained)  # lora_B starts at 0: the adapter did train
    assert max(abs(a - b) for a, b in zip(want, got)) < 1e-5, (want, got)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_generation_over_grpc_equals_unsplit_greedy_and_frees_kv_sessions(arch):
    name = f"tiny:{arch}"
    settings, middle, (silo,) = _parties(name)
    ref = _peft(name).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        with _client(relay, "s1", silo.layout.fingerprint()) as link:
            out = SiloTrainer(silo, link).generate(prompts, max_new_tokens=8)
            assert relay.stats()["generate_steps"] == 8
            assert relay.stats()["sessions"] == 0
    for p, o in zip(prompts, out):
        g = ref.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        assert o == g[0, len(p) :].tolist()


def _run_silos(relay, silos, batches, names, steps, barrier=True):
    """Each silo trains ``steps`` steps in its own thread; returns losses per silo."""
    losses = {n: [] for n in names}
    errors = []
    start = threading.Barrier(len(silos))

    def work(silo, name, seed):
        try:
            with _client(relay, name, silo.layout.fingerprint()) as link:
                trainer = SiloTrainer(silo, link, learning_rate=LR, name=name)
                if barrier:
                    start.wait(timeout=30)
                for ids, mask in _batches(steps, seed=seed):
                    losses[name].append(trainer.train_step(ids, mask).loss)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(s, n, i)) for i, (s, n) in enumerate(zip(silos, names))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return losses


def test_concurrent_silos_are_batched_into_one_middle_step():
    settings, middle, silos = _parties(n_silos=3, **{"batch-window-ms": 2000.0})
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        t0 = time.monotonic()
        losses = _run_silos(relay, silos, None, ["a", "b", "c"], steps=3)
        stats = relay.stats()
    assert stats["silo_steps"] == 9 and stats["max_group_size"] == 3
    assert stats["groups"] == 3  # one middle step per training step of the three silos
    assert time.monotonic() - t0 < 30  # the window closed early: all connected silos were in
    assert all(len(v) == 3 for v in losses.values())


def test_silo_disconnecting_mid_step_is_dropped_and_the_other_goes_on():
    settings, middle, (a, b) = _parties(n_silos=2, **{"batch-window-ms": 5000.0})
    ((ids_a, mask_a),) = _batches(1, seed=10)
    ((ids_b, mask_b),) = _batches(1, seed=11)
    # reference: silo a alone on a fresh copy of everything
    s_ref, m_ref, (a_ref,) = _parties()
    with RelayServer(m_ref, s_ref) as relay:
        relay.start(port=0, host="127.0.0.1")
        with _client(relay, "a", a_ref.layout.fingerprint()) as link:
            tr = SiloTrainer(a_ref, link, learning_rate=LR)
            want = [tr.train_step(ids_a, mask_a).loss, tr.train_step(ids_a, mask_a).loss]

    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        la = _client(relay, "a", a.layout.fingerprint())
        lb = _client(relay, "b", b.layout.fingerprint())
        got = []

        def run_a():
            tr = SiloTrainer(a, la, learning_rate=LR, name="a")
            got.append(tr.train_step(ids_a, mask_a).loss)
            got.append(tr.train_step(ids_a, mask_a).loss)

        def run_b():  # forward, then vanish before sending the gradient
            silo = b
            lens = mask_b.sum(1)
            h = pack(silo.head_forward(ids_b, mask_b), lens).detach()
            lb.forward(0, h, lens.tolist(), True)
            lb.close()

        ta, tb = threading.Thread(target=run_a), threading.Thread(target=run_b)
        tb.start()
        ta.start()
        ta.join(60)
        tb.join(60)
        stats = relay.stats()
        la.close()
    assert stats["max_group_size"] == 2  # b was in the first batched step...
    assert any("silo 'b'" in d for d in stats["drops"])  # ...and dropped from it
    assert stats["connected"] == 1 and stats["sessions"] == 0
    # a's training is exactly a's training alone: b contributed nothing to the middle adapter
    assert len(got) == 2 and max(abs(x - y) for x, y in zip(got, want)) < 1e-5


def test_silo_without_gradient_in_time_is_dropped_and_told_why():
    settings, middle, (b,) = _parties(**{"step-timeout-s": 0.3})
    ((ids, mask),) = _batches(1)
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        with _client(relay, "slow", b.layout.fingerprint()) as link:
            lens = mask.sum(1)
            h = pack(b.head_forward(ids, mask), lens).detach()
            out = link.forward(0, h, lens.tolist(), True)
            time.sleep(0.8)
            with pytest.raises(RelayError, match="silo 'slow' step 0.*no gradient for step 0"):
                link.backward(0, torch.zeros_like(out))
        assert any("silo 'slow' step 0" in d for d in relay.stats()["drops"])


def _raw_stream(relay, silo, token, messages, layout):
    """Send Hello + ``messages`` on a raw stream; returns (replies, grpc error or None)."""
    channel = grpc.insecure_channel(relay.address)
    stub = pb_grpc.SplitRelayStub(channel)
    msgs = [pb.SiloMessage(hello=pb.Hello(protocol=PROTOCOL_VERSION, layout=layout))] + messages
    replies = []
    try:
        for r in stub.Stream(
            iter(msgs), metadata=(("authorization", f"Bearer {token}"), ("x-fedshield-silo", silo))
        ):
            replies.append(r)
        return replies, None
    except grpc.RpcError as exc:
        return replies, exc
    finally:
        channel.close()


def test_unknown_expired_revoked_and_foreign_tokens_are_rejected():
    settings, middle, (silo,) = _parties()
    lay = silo.layout.fingerprint()
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        _, err = _raw_stream(relay, "a", "not-a-token", [], lay)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "silo 'a'" in err.details()
        expired = relay.issue_token("a", round=1, ttl_s=0.05)
        time.sleep(0.1)
        _, err = _raw_stream(relay, "a", expired, [], lay)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.details()
        other = relay.issue_token("b", round=1)
        _, err = _raw_stream(relay, "a", other, [], lay)
        assert "issued to silo 'b'" in err.details()
        revoked = relay.issue_token("a", round=2)
        assert relay.revoke_round(2) == 1
        with pytest.raises(RelayError, match="UNAUTHENTICATED"):
            RelayClient(relay.address, revoked, "a", lay).connect()
        replies, err = _raw_stream(relay, "a", relay.issue_token("a", 3), [], "llama/other")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "layout" in err.details()
        assert relay.stats()["rejected_auth"] == 4


def test_malformed_and_oversized_frames_are_refused_naming_the_silo_and_others_go_on():
    settings, middle, (silo,) = _parties(**{"max-frame-mb": 0.01})  # 10 KiB
    lay = silo.layout.fingerprint()
    good = encode_activation(torch.zeros(6, 64), [2, 4], "fp32")
    bad_dtype = pb.Activation()
    bad_dtype.CopyFrom(good)
    bad_dtype.values.dtype = "float64"
    bad_len = pb.Activation()
    bad_len.CopyFrom(good)
    bad_len.lengths[:] = [2, 5]
    huge = encode_activation(torch.zeros(50, 64), [50], "fp32")  # 12.8 KB
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        for frame, expect in [
            (bad_dtype, "does not accept"),
            (bad_len, "expected [7, 64]"),
            (huge, "exceeds the relay limit"),
        ]:
            msg = pb.SiloMessage(forward=pb.Forward(step=4, train=True, hidden=frame))
            replies, err = _raw_stream(relay, "evil", relay.issue_token("evil", 1), [msg], lay)
            assert len(replies) == 1 and err is not None  # welcome, then refused
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "silo 'evil' step 4 forward" in err.details() and expect in err.details()
        bwd = pb.SiloMessage(backward=pb.Backward(step=9, grad=good))
        _, err = _raw_stream(relay, "evil", relay.issue_token("evil", 1), [bwd], lay)
        assert "without a pending training forward" in err.details()
        assert relay.stats()["rejected_frames"] == 4
        with _client(relay, "good", lay) as link:  # the relay still serves well-formed silos
            ((ids, mask),) = _batches(1)
            assert SiloTrainer(silo, link).train_step(ids, mask).loss > 0
            with pytest.raises(Exception, match="silo 'good'.*exceeds the relay limit"):
                link.forward(1, torch.zeros(50, 64), [50], False)


def _self_signed():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key_pem


def test_relay_with_tls_certificates_serves_tls_only():
    settings, middle, (silo,) = _parties()
    cert, key = _self_signed()
    lay = silo.layout.fingerprint()
    with RelayServer(middle, settings) as relay:
        port = relay.start(port=0, host="127.0.0.1", certificates=(cert, cert, key))
        token = relay.issue_token("a", 1)
        with RelayClient(
            f"127.0.0.1:{port}", token, "a", lay, root_certificates=cert, activation_dtype="fp16"
        ) as link:
            ((ids, mask),) = _batches(1)
            assert SiloTrainer(silo, link).train_step(ids, mask).loss > 0
        plain = RelayClient(f"127.0.0.1:{port}", relay.issue_token("a", 1), "a", lay, timeout_s=10)
        with pytest.raises(RelayError, match="UNAVAILABLE"):
            plain.connect()
        plain.close()


def test_a_reconnecting_silo_replaces_its_old_stream():
    settings, middle, (silo,) = _parties()
    lay = silo.layout.fingerprint()
    ((ids, mask),) = _batches(1)
    with RelayServer(middle, settings) as relay:
        relay.start(port=0, host="127.0.0.1")
        old = _client(relay, "a", lay)
        with _client(relay, "a", lay) as new:
            assert SiloTrainer(silo, new).train_step(ids, mask).loss > 0
            with pytest.raises(RelayError, match="replaced by a newer stream"):
                old.forward(0, torch.zeros(2, 64), [2], False)
            assert relay.stats()["connected"] == 1
        old.close()
