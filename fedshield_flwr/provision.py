"""Provisioning for a deployment: TLS certificates for the SuperLink, SuperNode key pairs.

What is written, and who keeps it
---------------------------------
``fedshield certs --out DIR --san coordinator.example.org,10.0.0.5``::

    DIR/ca.crt        CA certificate: give a copy to every site and to every `flwr` user
    DIR/ca.key        CA private key: keep offline; only needed to issue a new server certificate
    DIR/server.pem    SuperLink certificate (SANs: localhost, 127.0.0.1 and the --san entries)
    DIR/server.key    SuperLink private key: stays on the coordinator

``fedshield nodes --out DIR --count 3`` (or ``fedshield nodes add --out DIR --name site-1``)::

    DIR/site-1        SuperNode private key (OpenSSH ECDSA P-384): stays on that site
    DIR/site-1.pub    its public key: the coordinator registers it with `flwr supernode register`

The formats are the ones Flower 1.42 reads: ``flower-superlink --ssl-ca-certfile/--ssl-certfile/
--ssl-keyfile`` take PEM files; ``flower-supernode --auth-supernode-private-key`` takes an OpenSSH
private key (``load_ssh_private_key``) and ``flwr supernode register`` an OpenSSH public key of a
NIST curve (``load_ssh_public_key``), exactly what ``ssh-keygen -t ecdsa -b 384`` writes.

Nothing is regenerated silently: every function refuses to overwrite an existing file unless
``force=True`` (``--force``), and checks all of its targets before writing the first one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The SuperLink's own SuperExec (subprocess isolation) reaches the Runtime API over loopback,
# so the server certificate must always be valid for these names too.
LOOPBACK_SANS = ("localhost", "127.0.0.1")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ProvisionError(RuntimeError):
    """Provisioning could not proceed; the message names the file and the remedy."""


@dataclass(frozen=True)
class CertificateSet:
    """Paths of the TLS material for one SuperLink."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sans: tuple[str, ...]

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` arguments that enable TLS with these files."""
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair (OpenSSH ECDSA P-384)."""

    name: str
    private_key: Path
    public_key: Path

    def supernode_args(self) -> list[str]:
        """``flower-supernode`` arguments that authenticate with this key."""
        return ["--auth-supernode-private-key", str(self.private_key)]

    def register_command(self, connection: str | None = None) -> list[str]:
        """The ``flwr`` command that registers this SuperNode on the SuperLink."""
        cmd = ["flwr", "supernode", "register", str(self.public_key)]
        if connection:
            cmd.append(connection)
        return cmd + ["--name", self.name]


# --------------------------------------------------------------------------- helpers
def _refuse_overwrite(paths: Iterable[Path], force: bool, what: str, why: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ProvisionError(
            f"{what}: {names} already exist(s); refusing to overwrite them ({why}). Use another "
            "--out directory, delete the files on purpose, or pass --force"
        )


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private files are created 0600 and never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _general_name(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", entry):
        raise ProvisionError(
            f"SAN entry {entry!r} is neither an IP address nor a DNS name; give the names and "
            "addresses the sites use to reach the SuperLink, e.g. --san coordinator.example.org"
        )
    return x509.DNSName(entry)


def parse_sans(sans: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalize a comma-separated string or a list of SANs; loopback names always included."""
    if isinstance(sans, str):
        sans = sans.split(",")
    out: list[str] = list(LOOPBACK_SANS)
    for entry in sans or ():
        entry = entry.strip()
        if entry and entry not in out:
            _general_name(entry)  # validate early, before anything is written
            out.append(entry)
    return tuple(out)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --------------------------------------------------------------------------- certificates
def create_certificates(
    out_dir: str | os.PathLike,
    sans: str | Sequence[str] | None = None,
    days: int = 365,
    common_name: str = "fedshield-superlink",
    force: bool = False,
) -> CertificateSet:
    """Create a CA and a SuperLink server certificate signed by it.

    Parameters
    ----------
    out_dir : path
        Directory for ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` (created if needed).
    sans : str or sequence of str, optional
        Host names and IP addresses under which sites and ``flwr`` users reach the SuperLink
        (comma separated when a string). ``localhost`` and ``127.0.0.1`` are always added.
    days : int, default 365
        Validity of both certificates.
    common_name : str, default "fedshield-superlink"
        Subject CN of the server certificate (clients verify the SANs, not the CN).
    force : bool, default False
        Overwrite existing files. Every site must then receive the new ``ca.crt``.

    Returns
    -------
    CertificateSet
        The paths written.

    Raises
    ------
    ProvisionError
        A target file exists (and ``force`` is false), or a SAN entry is malformed.
    """
    if days < 1:
        raise ProvisionError(f"certificate validity must be >= 1 day, got {days}")
    out = Path(out_dir).expanduser()
    names = parse_sans(sans)
    certs = CertificateSet(out / "ca.crt", out / "ca.key", out / "server.pem",
                           out / "server.key", names)
    _refuse_overwrite([certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key], force,
                      f"TLS certificates in {out}",
                      "every site and flwr user trusts the current ca.crt")

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshield-flwr CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedShield-Flwr")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(certs.ca_key, _pem_private(ca_key), private=True)
    _write(certs.server_key, _pem_private(server_key), private=True)
    _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return certs


def certificate_sans(path: str | os.PathLike) -> tuple[str, ...]:
    """The DNS names and IP addresses a PEM certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(ext.get_values_for_type(x509.DNSName)) + tuple(
        str(ip) for ip in ext.get_values_for_type(x509.IPAddress))


# --------------------------------------------------------------------------- SuperNode keys
def create_node_key(out_dir: str | os.PathLike, name: str, force: bool = False) -> NodeKey:
    """Create one SuperNode key pair ``DIR/<name>`` + ``DIR/<name>.pub`` (OpenSSH ECDSA P-384).

    Parameters
    ----------
    out_dir : path
        Directory for the key files (created if needed).
    name : str
        Site name: letters, digits, ``.``, ``_``, ``-`` (also used as ``flwr supernode register
        --name``).
    force : bool, default False
        Overwrite an existing pair. The old public key stays registered on the SuperLink until
        ``flwr supernode unregister`` removes it; the new one must be registered.

    Raises
    ------
    ProvisionError
        The name is invalid or a file exists (and ``force`` is false).
    """
    if not NODE_NAME.match(name):
        raise ProvisionError(
            f"SuperNode name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. site-1)"
        )
    out = Path(out_dir).expanduser()
    key = NodeKey(name, out / name, out / f"{name}.pub")
    _refuse_overwrite([key.private_key, key.public_key], force, f"SuperNode key '{name}'",
                      "its public key may already be registered on the SuperLink")
    private = ec.generate_private_key(ec.SECP384R1())
    _write(key.private_key, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    _write(key.public_key, public + f" fedshield-{name}\n".encode(), private=False)
    return key


def create_node_keys(
    out_dir: str | os.PathLike, count: int, prefix: str = "site", start: int = 1,
    force: bool = False,
) -> list[NodeKey]:
    """Create ``count`` SuperNode key pairs named ``<prefix>-<start>``, ``<prefix>-<start+1>``...

    All targets are checked before the first key is written, so a refusal leaves nothing behind.
    """
    if count < 1:
        raise ProvisionError(f"--count must be >= 1, got {count}")
    out = Path(out_dir).expanduser()
    names = [f"{prefix}-{i}" for i in range(start, start + count)]
    _refuse_overwrite([p for n in names for p in (out / n, out / f"{n}.pub")], force,
                      f"SuperNode keys in {out}",
                      "their public keys may already be registered on the SuperLink")
    return [create_node_key(out, n, force=True) for n in names]


def load_node_key(out_dir: str | os.PathLike, name: str) -> NodeKey:
    """An existing key pair, checked to be in the format ``flower-supernode`` accepts."""
    out = Path(out_dir).expanduser()
    key = NodeKey(name, out / name, out / f"{name}.pub")
    for p in (key.private_key, key.public_key):
        if not p.is_file():
            raise ProvisionError(f"SuperNode key file {p} is missing; create it with "
                                 f"`fedshield nodes add --out {out} --name {name}`")
    try:
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(key.public_key.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ProvisionError(f"SuperNode key '{name}' in {out} is not an OpenSSH key pair "
                             f"({exc}); recreate it with `fedshield nodes add --force`") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
            public, ec.EllipticCurvePublicKey):
        raise ProvisionError(f"SuperNode key '{name}' is not an ECDSA key; Flower needs a NIST "
                             "EC curve (fedshield nodes writes P-384)")
    if private.public_key().public_numbers() != public.public_numbers():
        raise ProvisionError(f"SuperNode key '{name}': {key.public_key} does not belong to "
                             f"{key.private_key}; recreate the pair with --force")
    return key


# --------------------------------------------------------------------------- instructions
def registration_instructions(
    keys: Sequence[NodeKey], connection: str = "fedshield", superlink: str = "COORDINATOR:8000",
    ca_cert: str = "ca.crt",
) -> str:
    """Human-readable steps to register ``keys`` and start each SuperNode."""
    lines = [
        "On the coordinator (the `flwr` CLI with a connection to the SuperLink's Control API):",
        f"  # $FLWR_HOME/config.toml: [superlink.{connection}] address = \"{superlink}\"",
        f"  #                         root-certificates = \"/path/to/{ca_cert}\"",
    ]
    for k in keys:
        lines.append("  " + shlex.join(k.register_command(connection)))
    lines += ["", "On each site (its private key never leaves it):"]
    for k in keys:
        lines.append(
            f"  [{k.name}] flower-supernode --superlink {superlink} --root-certificates "
            f"{ca_cert} --auth-supernode-private-key {k.private_key.name} "
            "--node-config 'data-path=\"/data/train.jsonl\"'")
    return "\n".join(lines)
