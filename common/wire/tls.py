"""Transport security of the gRPC links: the certificates each role uses, and throwaway ones.

Every link is TLS when ``[tls]`` names certificates (Flower's own certificate support: the
servers get ``(CA, certificate, key)``, the clients the CA certificate to verify servers with),
and plaintext only with an explicit ``tls.insecure = true``. A role configured with neither
stops at start with a message naming the keys. The files are checked when a role starts, with
the key and the file named when one is missing.

``fedphd launch`` runs everything on this machine; with neither configured it makes a
throwaway CA and server certificate for the run (:func:`with_run_certificates`), so a local
run is TLS too without any set-up.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
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


def describe_tls(tls: TlsConfig) -> str:
    """For logs: how this process's links are secured."""
    return "plaintext (tls.insecure = true)" if tls.insecure else f"TLS, CA {tls.ca_cert}"


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_test_certificates(folder: Path, hosts: list[str],
                           days: int = CERT_DAYS) -> CertificateFiles:
    """A throwaway CA and one server certificate valid for ``hosts`` (names or IP addresses).

    The same files as docker/make-certs.sh, made in-process with ``cryptography`` (which Flower
    itself depends on) so ``fedphd launch`` needs no openssl program.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days))

    def certificate(subject: str, key, issuer: str, signer, extensions) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("FedPhD test CA", ca_key, "FedPhD test CA", ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False), True),
    ])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(hosts[0], server_key, "FedPhD test CA", ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName([_general_name(host) for host in hosts]), False),
    ])

    folder.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca.public_bytes(pem))
    files.server_cert.write_bytes(server.public_bytes(pem))
    files.server_key.unlink(missing_ok=True)  # a new file, so the mode below applies
    files.server_key.touch(mode=0o600)  # private before a byte of the key is in it
    files.server_key.write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return files


def _general_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def with_run_certificates(cfg: RunConfig, folder: Path) -> RunConfig:
    """``fedphd launch``: the user's TLS choice, or a throwaway CA for this run when none.

    The CA's key is not kept: nothing else can ever be signed by it.
    """
    tls = cfg.tls
    if tls.insecure or tls.ca_cert or tls.server_cert or tls.server_key:
        return cfg
    hosts = list(dict.fromkeys([cfg.topology.host, "localhost", "127.0.0.1"]))
    files = make_test_certificates(folder, hosts)
    log.info("TLS: made a throwaway CA and a server certificate for %s in %s",
             ", ".join(hosts), folder)
    resolved = TlsConfig(ca_cert=str(files.ca_cert.resolve()),
                         server_cert=str(files.server_cert.resolve()),
                         server_key=str(files.server_key.resolve()))
    return cfg.model_copy(update={"tls": resolved})
