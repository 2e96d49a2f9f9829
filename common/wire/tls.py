"""Transport security of the gRPC links: the certificates each role uses, and throwaway ones.

Every link is TLS when ``[tls]`` names certificates (the servers get ``(CA, certificate,
key)``, the clients the CA certificate to verify servers with), and plaintext only with an
explicit ``tls.insecure = true``. A role configured with neither stops at start with a
message naming the keys. The files are checked when a role starts, with the key and the file
named when one is missing.

Mutual TLS (``tls.require_client_auth``, on whenever certificates are configured): a peer
presents its own certificate (``tls.client_cert``/``tls.client_key``: CN ``client-N`` or
``edge-N``), its server refuses any peer without one signed by the run's CA, and the
peer's identity is the one its certificate names, not the one it claims. A peer checks its
own certificate against its ``--client-id``/``--edge-id`` at start, so a mix-up is one line
there, not a refusal later. Revoked certificates go on ``tls.deny``.

``fedphd launch`` runs everything on this machine; with neither configured it makes a
throwaway CA, a server certificate and one certificate per client and edge for the run
(:func:`with_run_certificates`), so a local run is mutual TLS too without any set-up.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, FilePath, ValidationError

from fedphd.common.settings.config import ConfigError, RunConfig, TlsConfig

log = logging.getLogger("fedphd.tls")

NOT_CONFIGURED = (
    "no TLS certificates configured and plaintext not asked for: set tls.ca_cert (every "
    "role), tls.server_cert and tls.server_key (the cloud and edges) to PEM files "
    "(docker/make-certs.sh makes a test CA and certificates), or tls.insecure = true for "
    "plaintext gRPC links"
)
CERT_DAYS = 30


# --- Peer identities ----------------------------------------------------------------------

PEER_NAME = re.compile(r"^(client|edge)-(\d+)$")


def certified_identity(names: list[str]) -> tuple[str, int] | None:
    """``(kind, number)`` of the first name of the form ``client-N`` / ``edge-N`` among a
    certificate's common name and DNS names; None when it names no peer."""
    for name in names:
        match = PEER_NAME.match(name.strip())
        if match:
            return match.group(1), int(match.group(2))
    return None


def fingerprint(pem: bytes | str) -> str:
    """SHA-256 of a PEM certificate's DER bytes, lower-case hex without colons (what
    ``openssl x509 -fingerprint -sha256`` prints, colons and case aside)."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


def normal_fingerprint(value: str) -> str:
    """A deny-list entry as :func:`fingerprint` writes it (``AB:CD:..`` and ``abcd..`` match)."""
    return value.replace(":", "").strip().lower()


@dataclass(frozen=True)
class Admission:
    """Whom a server lets in.

    ``kind``: the peers it serves ("client": an edge, or the cloud in flat mode; "edge": the
    cloud of a hierarchical run). ``certified``: peers must present a certificate signed by
    the run's CA, and their identity is the one it names. ``deny``: revoked identities
    ("client-3") or certificate fingerprints.
    """

    kind: str
    certified: bool = False
    deny: frozenset[str] = frozenset()

    def denied(self, identity: tuple[str, int] | None, digest: str) -> bool:
        names = {normal_fingerprint(entry) for entry in self.deny} | set(self.deny)
        named = identity is not None and f"{identity[0]}-{identity[1]}" in names
        return named or digest in names


class _ServerFiles(BaseModel):
    """What a server role (cloud, edge) reads: Flower wants all three."""

    model_config = ConfigDict(extra="ignore")
    ca_cert: FilePath
    server_cert: FilePath
    server_key: FilePath


class _ClientFiles(BaseModel):
    """What a client role (client, and an edge towards the cloud) reads."""

    model_config = ConfigDict(extra="ignore")
    ca_cert: FilePath


def _files(model: type[BaseModel], tls: TlsConfig, use: str) -> BaseModel:
    """Validate the files ``model`` needs; the error names each key and its file."""
    if not (tls.ca_cert or tls.server_cert or tls.server_key):
        raise ConfigError(NOT_CONFIGURED)
    try:
        return model.model_validate(tls.model_dump())
    except ValidationError as error:
        lines = [f"TLS certificates to {use}:"]
        for item in error.errors():
            key = f"tls.{item['loc'][0]}"
            value = item.get("input")
            problem = "not set" if value is None else f"no such file: {value!r}"
            lines.append(f"  {key}: {problem}")
        raise ConfigError("\n".join(lines)) from None


def server_certificates(tls: TlsConfig) -> tuple[bytes, bytes, bytes] | None:
    """``(CA, certificate, key)`` for Flower's gRPC server; None = plaintext, as asked for."""
    if tls.insecure:
        return None
    files = _files(_ServerFiles, tls, "serve TLS (cloud and edges)")
    return (files.ca_cert.read_bytes(), files.server_cert.read_bytes(),
            files.server_key.read_bytes())


def client_root_certificates(tls: TlsConfig) -> bytes | None:
    """The CA certificate a client verifies its server with; None = plaintext, as asked for."""
    if tls.insecure:
        return None
    return _files(_ClientFiles, tls, "verify the server (clients and edges)").ca_cert.read_bytes()


def client_auth_required(tls: TlsConfig) -> bool:
    """Mutual TLS: on whenever certificates are configured, unless turned off explicitly."""
    return not tls.insecure and tls.require_client_auth is not False


def server_admission(tls: TlsConfig, kind: str) -> Admission:
    """Whom a server serving ``kind`` ("client" or "edge") peers lets in."""
    return Admission(kind=kind, certified=client_auth_required(tls), deny=frozenset(tls.deny))


def client_certificate(tls: TlsConfig, kind: str, number: int,
                       flag: str) -> tuple[bytes, bytes] | None:
    """``(certificate, key)`` PEM this peer presents to its server; None when it presents
    none (plaintext, or client certificates off and none configured).

    The certificate must name this peer (``kind-number``): a certificate of another peer
    would be refused by the server, so it stops here, at start, naming both.
    """
    if tls.insecure:
        return None
    if not tls.client_cert:
        if client_auth_required(tls):
            raise ConfigError(
                f"tls.client_cert: not set; servers require a certificate naming this peer "
                f"({kind}-{number}) unless tls.require_client_auth = false "
                "(docker/make-certs.sh makes one per client and edge)"
            )
        return None
    paths = {"tls.client_cert": Path(tls.client_cert), "tls.client_key": Path(tls.client_key)}
    for key, path in paths.items():
        if not path.is_file():
            raise ConfigError(f"{key}: no such file: {str(path)!r}")
    chain, private_key = (path.read_bytes() for path in paths.values())
    names = list(dict.fromkeys(certificate_names(chain, tls.client_cert)))
    if certified_identity(names) != (kind, number):
        raise ConfigError(
            f"tls.client_cert ({tls.client_cert}) names {', '.join(names) or 'no peer'}, but "
            f"this is {kind} {number} ({flag} {number}): give it its own certificate"
        )
    return chain, private_key


def certificate_names(pem: bytes, path: str) -> list[str]:
    """A PEM certificate's common name and DNS names (where peers' identities are)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError(f"tls.client_cert: {path!r} is not a PEM certificate") from None
    names = [str(attribute.value) for attribute in
             certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    with contextlib.suppress(x509.ExtensionNotFound):
        names += certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    return names


def describe_tls(tls: TlsConfig) -> str:
    """For logs: how this process's links are secured."""
    if tls.insecure:
        return "plaintext (tls.insecure = true)"
    mutual = ", client certificates required" if client_auth_required(tls) else ""
    return f"TLS, CA {tls.ca_cert}{mutual}"


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    peers: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name: (cert, key)


def make_test_certificates(folder: Path, hosts: list[str], peers: list[str] = (),
                           days: int = CERT_DAYS) -> CertificateFiles:
    """A throwaway CA, one server certificate valid for ``hosts`` (names or IP addresses) and
    one client certificate per name of ``peers`` ("client-0", "edge-1": CN and DNS name).

    The same files as docker/make-certs.sh, made in-process with ``cryptography`` (which Flower
    itself depends on) so ``fedphd launch`` needs no openssl program.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    sign = _Signer(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = sign.certificate("FedPhD test CA", ca_key, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False), True),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    _write_certificate(folder / "ca.pem", ca)
    pairs = {}
    for name, usage, names in [("server", ExtendedKeyUsageOID.SERVER_AUTH,
                                [_general_name(host) for host in hosts]),
                               *[(peer, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(peer)])
                                 for peer in peers]]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = hosts[0] if name == "server" else name
        certificate = sign.certificate(subject, key, ca_key, [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.SubjectAlternativeName(names), False),
        ])
        pairs[name] = (folder / f"{name}.pem", folder / f"{name}.key")
        _write_certificate(pairs[name][0], certificate)
        _write_key(pairs[name][1], key)
    server = pairs.pop("server")
    return CertificateFiles(folder / "ca.pem", server[0], server[1], pairs)


@dataclass(frozen=True)
class _Signer:
    """Certificates of one throwaway CA: all valid from an hour ago for ``days``."""

    days: int

    def certificate(self, subject: str, key, signer, extensions):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedPhD test CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=self.days))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())


def _write_certificate(path: Path, certificate) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.unlink(missing_ok=True)  # a new file, so the mode below applies
    path.touch(mode=0o600)  # private before a byte of the key is in it
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _general_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def with_run_certificates(cfg: RunConfig, folder: Path) -> RunConfig:
    """``fedphd launch``: the user's TLS choice, or a throwaway CA for this run when none,
    with a certificate for every client and edge (each role gets its own, see
    :func:`peer_certificate_files`).

    The CA's key is not kept: nothing else can ever be signed by it.
    """
    tls = cfg.tls
    if tls.insecure or tls.ca_cert or tls.server_cert or tls.server_key:
        return cfg
    hosts = list(dict.fromkeys([cfg.topology.host, "localhost", "127.0.0.1"]))
    peers = ([f"client-{c}" for c in range(cfg.topology.clients)]
             + [f"edge-{e}" for e in range(cfg.topology.edges)])
    files = make_test_certificates(folder, hosts, peers)
    log.info("TLS: made a throwaway CA, a server certificate for %s and certificates for "
             "%d clients and %d edges in %s", ", ".join(hosts), cfg.topology.clients,
             cfg.topology.edges, folder)
    resolved = tls.model_copy(update={"ca_cert": str(files.ca_cert.resolve()),
                                      "server_cert": str(files.server_cert.resolve()),
                                      "server_key": str(files.server_key.resolve())})
    return cfg.model_copy(update={"tls": resolved})


def peer_certificate_files(tls: TlsConfig, peer: str) -> tuple[Path, Path] | None:
    """``fedphd launch``: the certificate and key of ``peer`` ("client-0") next to the CA
    certificate (where the launcher and docker/make-certs.sh put them), if there; None when
    ``[tls]`` names a certificate itself, or plaintext, or there is none."""
    if tls.insecure or tls.client_cert or not tls.ca_cert:
        return None
    folder = Path(tls.ca_cert).parent
    pair = (folder / f"{peer}.pem", folder / f"{peer}.key")
    return pair if all(path.is_file() for path in pair) else None
