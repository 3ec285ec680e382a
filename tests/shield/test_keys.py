"""Keysets: files round trip, no silent overwrite, the server keyset cannot decrypt."""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
import pytest
import tenseal as ts

from fedshield_flwr.shield import (
    KeysetError,
    RoundAccumulator,
    ServerKeyset,
    SiloKeyset,
    _proto,
    decode_record,
    decrypt_aggregate,
    encode_record,
    encrypt_update,
    generate_keyset,
    write_keyset_files,
)
from fedshield_flwr.shield.keys import _encode_file
from fedshield_flwr.shield.seal_backend import SealEngine, generate_key_material
from tests.shield import flat, make_update


@pytest.fixture(scope="module")
def keys():
    return generate_keyset()


def _one_round(silo: SiloKeyset, server: ServerKeyset) -> tuple[bytes, np.ndarray]:
    update = make_update(0)
    payload, _ = encrypt_update(silo, update, server_round=1, silo="a", weight=1.0)
    acc = RoundAccumulator(server, 1)
    acc.add(payload, silo="a")
    return encode_record(server, acc.finalize()), flat(update)


def test_keyset_files_round_trip(tmp_path):
    silo_path, server_path = write_keyset_files(tmp_path / "keys")
    silo, server = SiloKeyset.load(silo_path), ServerKeyset.load(server_path)
    assert silo.key_id == server.key_id and len(silo.key_id) == 32
    assert silo.params == server.params and silo.modulus == server.modulus
    assert silo.public() == server
    record, expected = _one_round(silo, server)
    assert np.abs(decrypt_aggregate(silo, record).values - expected).max() < 1e-6
    # the file format is documented: magic, JSON header, TenSEAL context readable by TenSEAL
    raw = server_path.read_bytes()
    assert raw[:8] == b"FSKEYSET"
    assert not ts.context_from(server.context).is_private()
    assert ts.context_from(silo.context).is_private()


def test_keyset_files_are_never_overwritten_silently(tmp_path):
    silo_path, server_path = write_keyset_files(tmp_path)
    before = silo_path.read_bytes(), server_path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_keyset_files(tmp_path)
    assert (silo_path.read_bytes(), server_path.read_bytes()) == before
    write_keyset_files(tmp_path, overwrite=True)
    assert silo_path.read_bytes() != before[0]
    assert SiloKeyset.load(silo_path).key_id == ServerKeyset.load(server_path).key_id


def test_silo_key_file_is_readable_by_owner_only(tmp_path):
    silo_path, _ = write_keyset_files(tmp_path)
    assert stat.S_IMODE(os.stat(silo_path).st_mode) == 0o600


def test_server_keyset_type_has_no_secret_key_field(keys):
    _, server = keys
    assert {f.name for f in dataclasses.fields(ServerKeyset)} == {
        "key_id", "params", "modulus", "context"}
    assert _proto.CTX_PRIVATE not in _proto.parse_fields(server.context)
    assert not ts.context_from(server.context).is_private()


def test_server_side_decryption_attempt_fails(keys, tmp_path):
    silo, server = keys
    record, expected = _one_round(silo, server)
    # 1. the decryption API refuses the server keyset
    with pytest.raises(TypeError, match="cannot decrypt"):
        decrypt_aggregate(server, record)
    # 2. the server file cannot be loaded as a silo keyset
    server.save(tmp_path / "server.key")
    with pytest.raises(KeysetError, match="expected 'silo'"):
        SiloKeyset.load(tmp_path / "server.key")
    # 3. a server that makes up its own secret key for the same parameters decrypts garbage
    rogue = generate_key_material(server.params)
    engine = SealEngine(server.params, rogue.parms, rogue.secret_key)
    parsed = decode_record(server, record)
    garbage = engine.decrypt_blocks(parsed.c0, parsed.seeds).reshape(-1)[: expected.size]
    assert np.abs(garbage - expected).max() > 1e3


def test_server_keyset_loader_refuses_a_private_context(keys):
    silo, server = keys
    forged = _encode_file("server", silo.key_id, silo.params, silo.modulus, silo.context)
    with pytest.raises(KeysetError, match="contains a secret key"):
        ServerKeyset.from_bytes(forged)


def test_silo_keyset_refuses_a_public_key_of_another_keyset(keys):
    silo, _ = keys
    other, _ = generate_keyset()
    context = (
        _proto.field_bytes(_proto.CTX_ENCRYPTION_PARAMETERS, other._parts.parms)
        + _proto.field_bytes(_proto.CTX_PUBLIC, other._parts.public_message)
        + _proto.field_bytes(_proto.CTX_PRIVATE,
                             _proto.field_bytes(_proto.PRIV_SECRET_KEY, silo._parts.secret_key))
    )
    forged = _encode_file("silo", other.key_id, other.params, other.modulus, context)
    with pytest.raises(Exception, match="does not belong to its secret key"):
        SiloKeyset.from_bytes(forged)


def test_corrupt_keyset_file_is_refused(keys):
    _, server = keys
    raw = bytearray(server.to_bytes())
    raw[-100] ^= 0xFF
    with pytest.raises(KeysetError, match="corrupt"):
        ServerKeyset.from_bytes(bytes(raw))
    with pytest.raises(KeysetError, match="not a fedshield keyset"):
        ServerKeyset.from_bytes(b"not a keyset at all")


def test_shield_params_allow_1024_silos_with_headroom_and_refuse_more():
    from fedshield_flwr.shield.errors import KeysetError
    from fedshield_flwr.shield.params import ShieldParams

    p = ShieldParams(max_silos=1024)
    assert p.value_bound > 100.0  # default scale kept: precision unchanged, headroom ~181
    assert ShieldParams().value_bound / p.value_bound == 16.0
    import pytest as _pytest
    with _pytest.raises(KeysetError, match="max_silos 1025"):
        ShieldParams(max_silos=1025)


def test_server_refuses_an_update_past_the_keysets_max_silos():
    from fedshield_flwr.shield import PayloadError
    from fedshield_flwr.shield.params import ShieldParams

    silo, server = generate_keyset(ShieldParams(max_silos=2))
    acc = RoundAccumulator(server, 1)
    for name in ("a", "b"):
        payload, _ = encrypt_update(silo, make_update(0), server_round=1, silo=name, weight=1.0)
        acc.add(payload, silo=name)
    payload, _ = encrypt_update(silo, make_update(0), server_round=1, silo="c", weight=1.0)
    with pytest.raises(PayloadError, match="silo c .*round 1.*max_silos=2"):
        acc.add(payload, silo="c")
    assert acc.silos == ("a", "b")
