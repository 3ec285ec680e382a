"""Validation: every bad input is refused, names the silo and the round, leaves the sum alone."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield_flwr.shield import (
    KeyMismatchError,
    PayloadError,
    PruneSchedule,
    RoundAccumulator,
    UpdateError,
    as_array,
    decrypt_aggregate,
    encode_record,
    encrypt_update,
    generate_keyset,
)
from tests.shield import body_of, make_update, reframe

ROUND = 4
SCHEDULE = PruneSchedule(target=0.5)


@pytest.fixture(scope="module")
def keys():
    return generate_keyset()


@pytest.fixture(scope="module")
def good(keys):
    """Valid round-4 payloads of silos "1" and "2"."""
    silo, _ = keys
    return {
        sid: encrypt_update(silo, make_update(int(sid)), server_round=ROUND, silo=sid,
                            weight=1.0, schedule=SCHEDULE)[0]
        for sid in ("1", "2")
    }


def _bad_payloads(keys, good):
    """name -> (payload sent by silo "2", substring expected in the error)."""
    silo, _ = keys
    p = good["2"]
    garbled = bytearray(p)
    garbled[len(p) // 2] ^= 0x5A
    other_silo, _ = generate_keyset()
    other_key = encrypt_update(other_silo, make_update(2), server_round=ROUND, silo="2",
                               weight=1.0, schedule=SCHEDULE)[0]
    denser = encrypt_update(silo, make_update(2), server_round=ROUND, silo="2", weight=1.0,
                            schedule=PruneSchedule(target=0.25))[0]
    stale = encrypt_update(silo, make_update(2), server_round=ROUND - 1, silo="2", weight=1.0,
                           schedule=SCHEDULE)[0]
    coeff = b"\xff" * 7 + body_of(p)[7:]  # first coefficient 2**56 - 1 >= q
    flipped = bytearray(p)
    flipped[p.index(b'"weights": [') + 12] ^= 0x04  # weight 1.0 -> 5.0: valid JSON
    return {
        "truncated": (p[: len(p) - 1000], "truncated"),
        "truncated header": (p[:40], "truncated header"),
        "garbled body": (bytes(garbled), "garbled bytes"),
        "garbled header value": (bytes(flipped), "garbled bytes"),
        "garbled header": (p[:12] + b"\x00" * 10 + p[22:], "garbled header"),
        "not a payload": (b"hello world, this is not shield", "not a shield payload"),
        "wrong key id": (other_key, "key id"),
        "wrong parameter set": (reframe(p, param_set="ckks-n4096-q60-s40-k64"),
                                "parameter set"),
        "wrong block count": (denser, "ciphertexts for a 7-block mask"),
        "inconsistent block count": (reframe(p, num_blocks=8), "mask"),
        "wrong round": (stale, "is for round 3"),
        "coefficient out of range": (reframe(p, body=coeff), "out of range"),
        "impostor label": (good["1"], "labelled as coming from silo 1"),
        "bad weight": (reframe(p, weights=[-1.0]), "finite and positive"),
    }


BAD = ["truncated", "truncated header", "garbled body", "garbled header value",
       "garbled header", "not a payload",
       "wrong key id", "wrong parameter set", "wrong block count", "inconsistent block count",
       "wrong round", "coefficient out of range", "impostor label", "bad weight"]


@pytest.mark.parametrize("name", BAD)
def test_bad_payload_is_refused_naming_silo_and_round(keys, good, name):
    _, server = keys
    payload, expected = _bad_payloads(keys, good)[name]
    acc = RoundAccumulator(server, ROUND, schedule=SCHEDULE)
    acc.add(good["1"], silo="1")
    with pytest.raises(PayloadError) as info:
        acc.add(payload, silo="2")
    message = str(info.value)
    assert expected in message
    assert "silo 2" in message and f"round {ROUND}" in message
    assert info.value.silo == "2" and info.value.round == ROUND
    if name == "wrong key id":
        assert isinstance(info.value, KeyMismatchError)
    assert acc.silos == ("1",)


def test_duplicate_reply_is_refused_naming_silo_and_round(keys, good):
    _, server = keys
    acc = RoundAccumulator(server, ROUND)
    acc.add(good["1"], silo="1")
    with pytest.raises(PayloadError, match=f"silo 1 replied twice in round {ROUND}"):
        acc.add(good["1"], silo="1")


def test_refused_payload_never_corrupts_the_running_sum(keys, good):
    silo, server = keys
    clean = RoundAccumulator(server, ROUND)
    for sid in ("1", "2"):
        clean.add(good[sid], silo=sid)
    noisy = RoundAccumulator(server, ROUND)
    noisy.add(good["1"], silo="1")
    for payload, _ in _bad_payloads(keys, good).values():
        with pytest.raises(PayloadError):
            noisy.add(payload, silo="2")
    noisy.add(as_array(good["2"]), silo="2")  # Flower delivers a uint8 array
    a, b = clean.finalize(), noisy.finalize()
    np.testing.assert_array_equal(a.c0, b.c0)
    np.testing.assert_array_equal(a.seeds, b.seeds)
    assert a.silos == b.silos and a.total_weight == b.total_weight == 2.0
    expected = decrypt_aggregate(silo, encode_record(server, a)).values
    np.testing.assert_array_equal(decrypt_aggregate(silo, encode_record(server, b)).values,
                                  expected)


def test_damaged_downlink_is_refused_by_the_silo(keys, good):
    silo, server = keys
    acc = RoundAccumulator(server, ROUND)
    acc.add(good["1"], silo="1")
    record = bytearray(encode_record(server, acc.finalize()))
    record[-5] ^= 1
    with pytest.raises(PayloadError, match="the server sent an invalid shield payload"):
        decrypt_aggregate(silo, bytes(record))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_update_is_refused_before_encryption(keys, bad_value, monkeypatch):
    silo, _ = keys
    update = make_update(0)
    update["layers.0.q_proj.lora_B.weight"][3, 2] = bad_value
    called = []
    monkeypatch.setattr(type(silo.engine), "encrypt_blocks",
                        lambda self, values: called.append(1))
    with pytest.raises(UpdateError) as info:
        encrypt_update(silo, update, server_round=ROUND, silo="3", weight=1.0)
    message = str(info.value)
    assert "silo 3" in message and f"round-{ROUND}" in message and "NaN/Inf" in message
    assert "layers.0.q_proj.lora_B.weight" in message
    assert not called


def test_update_beyond_headroom_or_bad_weight_is_refused(keys):
    silo, _ = keys
    update = make_update(0)
    with pytest.raises(UpdateError, match="headroom"):
        encrypt_update(silo, update, server_round=1, silo="a", weight=1e6)
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UpdateError, match="finite positive"):
            encrypt_update(silo, update, server_round=1, silo="a", weight=weight)
