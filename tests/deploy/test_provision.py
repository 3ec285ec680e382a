"""Provisioning: TLS certificates and SuperNode keys in the formats Flower reads, never overwritten."""

from __future__ import annotations

import argparse
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedshield_flwr.cli import main as cli
from fedshield_flwr.provision import (
    ProvisionError,
    certificate_sans,
    create_certificates,
    create_node_key,
    create_node_keys,
    load_node_key,
    registration_instructions,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_has_loopback_and_requested_sans_and_chains_to_the_ca(tmp_path):
    c = create_certificates(tmp_path, sans="coordinator.example.org,10.0.0.5, superlink")
    assert set(certificate_sans(c.server_cert)) == {
        "localhost", "127.0.0.1", "coordinator.example.org", "10.0.0.5", "superlink"}
    ca = x509.load_pem_x509_certificate(c.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert _mode(c.ca_key) == 0o600 and _mode(c.server_key) == 0o600  # secrets stay private
    assert _mode(c.ca_cert) == 0o644


def _handshake(certs, host: str) -> bytes:
    """TLS from a client that trusts only our CA, strict X.509 checks, to a loopback server."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def serve():
            conn, _ = srv.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                    return tls.recv(2)
        finally:
            t.join(10)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "superlink"])
def test_certificates_pass_a_strict_tls_handshake_for_every_san(tmp_path, host):
    """What the SuperLink's own SuperExec, the SuperNodes and `flwr` do: verify chain and name."""
    assert _handshake(create_certificates(tmp_path, sans="superlink"), host) == b"ok"


def test_a_name_outside_the_sans_fails_the_handshake(tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(create_certificates(tmp_path, sans="superlink"), "evil.example.org")


def test_node_keys_load_with_flowers_own_loaders(tmp_path):
    """flower-supernode reads the private key, `flwr supernode register` the public key."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key = create_node_key(tmp_path, "site-1")
    private, public = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(key.private_key), auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1)
    assert try_load_public_key(key.public_key) == public_key_to_bytes(public)
    assert _mode(key.private_key) == 0o600
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_node_key(tmp_path, "site-1") == key


def test_nothing_is_overwritten_without_force(tmp_path):
    c = create_certificates(tmp_path / "certs")
    before = c.ca_cert.read_bytes()
    with pytest.raises(ProvisionError, match="--force"):
        create_certificates(tmp_path / "certs", sans="other.example.org")
    assert c.ca_cert.read_bytes() == before

    create_node_key(tmp_path / "keys", "site-2")
    pub = (tmp_path / "keys" / "site-2.pub").read_bytes()
    with pytest.raises(ProvisionError, match="already be registered"):
        create_node_key(tmp_path / "keys", "site-2")
    # A batch that collides anywhere writes nothing at all.
    with pytest.raises(ProvisionError):
        create_node_keys(tmp_path / "keys", 3)
    assert not (tmp_path / "keys" / "site-1").exists()
    assert not (tmp_path / "keys" / "site-3").exists()
    assert (tmp_path / "keys" / "site-2.pub").read_bytes() == pub

    assert create_node_key(tmp_path / "keys", "site-2", force=True).public_key.read_bytes() != pub
    assert create_certificates(tmp_path / "certs", force=True).ca_cert.read_bytes() != before


@pytest.mark.parametrize("bad", ["bad name", "-leading", "a" * 64, "x/y"])
def test_invalid_node_names_are_refused(tmp_path, bad):
    with pytest.raises(ProvisionError, match="invalid"):
        create_node_key(tmp_path, bad)
    assert not any(tmp_path.iterdir())


def test_malformed_sans_and_mismatched_pairs_are_refused(tmp_path):
    with pytest.raises(ProvisionError, match="SAN entry"):
        create_certificates(tmp_path / "c", sans="not a host")
    assert not (tmp_path / "c").exists()
    a, b = create_node_key(tmp_path, "a"), create_node_key(tmp_path, "b")
    a.public_key.write_bytes(b.public_key.read_bytes())
    with pytest.raises(ProvisionError, match="does not belong"):
        load_node_key(tmp_path, "a")


def test_cli_certs_and_nodes_write_files_print_instructions_and_refuse_overwrite(
        tmp_path, capsys):
    assert cli(["certs", "--out", str(tmp_path / "c"), "--san", "coord.example.org"]) == 0
    assert "coord.example.org" in capsys.readouterr().out
    assert cli(["certs", "--out", str(tmp_path / "c")]) == 1
    assert "--force" in capsys.readouterr().err

    assert cli(["nodes", "--out", str(tmp_path / "k"), "--count", "2",
                "--superlink", "coord.example.org:8000"]) == 0
    out = capsys.readouterr().out
    assert "flwr supernode register" in out and "coord.example.org:8000" in out
    assert (tmp_path / "k" / "site-2.pub").exists()
    assert cli(["nodes", "add", "--out", str(tmp_path / "k"), "--name", "site-3"]) == 0
    assert "site-3.pub" in capsys.readouterr().out
    assert cli(["nodes", "add", "--out", str(tmp_path / "k"), "--name", "site-3"]) == 1
    assert cli(["nodes", "--out", str(tmp_path / "k")]) == 2  # neither --count nor add


def test_registration_instructions_name_every_site(tmp_path):
    keys = create_node_keys(tmp_path, 2)
    text = registration_instructions(keys, "prod", "coord:8000")
    for k in keys:
        assert f"flwr supernode register {k.public_key} prod --name {k.name}" in text
        assert f"--auth-supernode-private-key {k.name}" in text
