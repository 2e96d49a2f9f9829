"""TLS on every gRPC link: the [tls] settings, the certificates of docker/make-certs.sh and of
``fedphd launch``, and real ``fedphd`` processes that talk TLS, or plaintext only when asked."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedphd.common.settings.config import ConfigError, TlsConfig, load_config
from fedphd.common.wire.tls import (
    client_certificate,
    client_root_certificates,
    server_certificates,
    with_run_certificates,
)
from tests.conftest import fedphd, port_overrides

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "training.local_steps=2", "--set", "diffusion.sampling_steps=2",
        "--set", "output.grid_samples=4", "--set", "evaluation.final=false",
        "--set", "output.progress=false"]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="docker/make-certs.sh needs the openssl program")


def make_certs(folder: Path, *hosts: str, options: tuple[str, ...] = ()) -> Path:
    result = subprocess.run(["sh", str(REPO / "docker" / "make-certs.sh"), *options, str(folder),
                             *hosts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def script_certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("docker/make-certs.sh needs the openssl program")
    return make_certs(tmp_path_factory.mktemp("certs"), "localhost", "127.0.0.1")


def tls_overrides(certs: Path) -> list[str]:
    return ["--set", f'tls.ca_cert="{certs / "ca.pem"}"',
            "--set", f'tls.server_cert="{certs / "server.pem"}"',
            "--set", f'tls.server_key="{certs / "server.key"}"']


def handshake(ca: Path, cert: Path, key: Path, host: str) -> dict:
    """A TLS handshake with a local server holding ``cert``, verified with ``ca`` for ``host``;
    returns the certificate the client saw."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            connection, _ = listener.accept()
            # A client that refuses the certificate ends the handshake: nothing to do here.
            with contextlib.suppress(ssl.SSLError, OSError), \
                    server_context.wrap_socket(connection, server_side=True):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_context = ssl.create_default_context(cafile=str(ca))
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_context.wrap_socket(raw, server_hostname=host) as tls:
            seen = tls.getpeercert()
        thread.join(timeout=10)
    return seen


# -- settings ---------------------------------------------------------------------------------

def test_plaintext_and_certificates_contradict_and_a_certificate_needs_its_key():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["tls.insecure=true", 'tls.ca_cert="ca.pem"'])
    assert all(word in str(error.value) for word in ("tls", "insecure", "ca_cert"))
    with pytest.raises(ConfigError, match="server_key"):
        load_config(None, ['tls.ca_cert="ca.pem"', 'tls.server_cert="server.pem"'])


def test_roles_need_certificates_unless_plaintext_is_asked_for():
    for needed_by in (server_certificates, client_root_certificates):
        with pytest.raises(ConfigError) as error:
            needed_by(TlsConfig())
        for key in ("tls.ca_cert", "tls.server_cert", "tls.server_key", "tls.insecure"):
            assert key in str(error.value)
        assert needed_by(TlsConfig(insecure=True)) is None


def test_missing_certificate_files_are_named_with_their_key(tmp_path, script_certs):
    gone = tmp_path / "gone.pem"
    tls = TlsConfig(ca_cert=str(script_certs / "ca.pem"), server_cert=str(gone),
                    server_key=str(script_certs / "server.key"))
    with pytest.raises(ConfigError) as error:
        server_certificates(tls)
    assert "tls.server_cert" in str(error.value) and str(gone) in str(error.value)
    # A client needs the CA certificate only.
    assert client_root_certificates(tls) == (script_certs / "ca.pem").read_bytes()
    with pytest.raises(ConfigError) as error:
        client_root_certificates(TlsConfig(ca_cert=str(tmp_path / "no-ca.pem")))
    assert "tls.ca_cert" in str(error.value) and "no-ca.pem" in str(error.value)


def test_the_scripts_server_certificate_verifies_for_every_name_given(script_certs):
    files = (script_certs / "ca.pem", script_certs / "server.pem", script_certs / "server.key")
    for host in ("localhost", "127.0.0.1"):
        assert handshake(*files, host)["subject"]
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(*files, "cloud.example.org")


def peer_tls(folder: Path, peer: str) -> TlsConfig:
    return TlsConfig(ca_cert=str(folder / "ca.pem"), client_cert=str(folder / f"{peer}.pem"),
                     client_key=str(folder / f"{peer}.key"))


def test_the_script_makes_each_peer_its_own_certificate_and_issues_more(script_certs,
                                                                         tmp_path):
    # By default 4 clients and 2 edges (the default config's), each named in its certificate.
    for kind, count in (("client", 4), ("edge", 2)):
        for number in range(count):
            peer = f"{kind}-{number}"
            assert client_certificate(peer_tls(script_certs, peer), kind, number, "-")
            assert (script_certs / f"{peer}.key").stat().st_mode & 0o077 == 0
    assert not (script_certs / "client-4.pem").exists()
    # --issue signs one more with the kept CA key; anything but client-N / edge-N is refused.
    folder = make_certs(tmp_path / "small", "localhost", options=("--clients", "1", "--edges", "0"))
    assert not (folder / "edge-0.pem").exists()
    issued = subprocess.run(["sh", str(REPO / "docker" / "make-certs.sh"), "--issue",
                             "client-7", str(folder)], capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0, issued.stderr
    assert client_certificate(peer_tls(folder, "client-7"), "client", 7, "-")
    bad = subprocess.run(["sh", str(REPO / "docker" / "make-certs.sh"), "--issue", "bob",
                          str(folder)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "make-certs: --issue takes client-N or edge-N, not 'bob'"


def test_launch_makes_a_throwaway_ca_unless_told_otherwise(tmp_path):
    cfg = with_run_certificates(load_config(), tmp_path / "tls")
    tls = cfg.tls
    paths = [Path(tls.ca_cert), Path(tls.server_cert), Path(tls.server_key)]
    assert all(path.is_file() and path.parent == tmp_path / "tls" for path in paths)
    assert Path(tls.server_key).stat().st_mode & 0o077 == 0  # the key is the owner's only
    for host in ("127.0.0.1", "localhost"):
        assert handshake(*paths, host)
    # Plaintext asked for, or certificates given: the launcher leaves them as they are.
    plaintext = load_config(None, ["tls.insecure=true"])
    assert with_run_certificates(plaintext, tmp_path / "none") == plaintext
    own = load_config(None, ['tls.ca_cert="a.pem"', 'tls.server_cert="b.pem"',
                             'tls.server_key="c.pem"'])
    assert with_run_certificates(own, tmp_path / "none") == own
    assert not (tmp_path / "none").exists()


# -- real processes ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("role", [["cloud"], ["edge", "--edge-id", "0"],
                                  ["client", "--client-id", "0"]])
def test_a_role_without_tls_settings_stops_at_start_naming_the_keys(tmp_path, ports, role):
    result = fedphd(*role, *port_overrides(ports), timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    for key in ("tls.ca_cert", "tls.server_cert", "tls.server_key", "tls.insecure"):
        assert key in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["script certificates", "plaintext asked for"])
def test_a_short_hierarchical_run_over_the_chosen_transport(tmp_path, ports, script_certs, mode):
    out = tmp_path / "run"
    transport = (tls_overrides(script_certs) if mode == "script certificates"
                 else ["--set", "tls.insecure=true"])
    result = fedphd("launch", "--out", str(out), "--timeout", "400", *FAST,
                    *port_overrides(ports), "--set", "topology.edges=1",
                    "--set", "topology.clients=2", "--set", "topology.cloud_rounds=1",
                    "--set", "topology.edge_rounds=1", *transport, timeout=500)
    logs = {p.stem: p.read_text() for p in (out / "logs").glob("*.log")}
    assert result.returncode == 0, result.stderr[-3000:] + json.dumps(logs)[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (cloud,) = [r for r in records if r["tier"] == "cloud"]
    assert cloud["model_updated"] and sorted(
        e for r in records if r["tier"] == "edge" for e in r["clients"]
    ) == ["client 0", "client 1"]

    resolved = load_config(out / "config.toml").tls
    expected = (f"TLS, CA {script_certs / 'ca.pem'}" if mode == "script certificates"
                else "plaintext (tls.insecure = true)")
    if mode == "script certificates":
        assert resolved.ca_cert == str(script_certs / "ca.pem")  # the user's, not a new CA
    else:
        assert resolved.insecure and resolved.ca_cert is None
    assert not (out / "tls").exists()
    # Every process says how its links are secured: cloud, the edge (both ways), clients.
    assert set(logs) == {"cloud", "edge-0", "client-0", "client-1"}
    assert all(expected in text for text in logs.values()), logs


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the cloud exited before it served"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listened on port {port} within {timeout:.0f} s")


@pytest.mark.slow
def test_a_tls_server_refuses_plaintext_and_foreign_ca_clients_with_clear_errors(
    tmp_path, ports, script_certs
):
    address = f"127.0.0.1:{ports['cloud']}"
    with (tmp_path / "cloud.log").open("wb") as sink:
        cloud = subprocess.Popen(
            [sys.executable, "-m", "fedphd.common.commands.cli", "cloud",
             "--out", str(tmp_path / "cloud"),
             *port_overrides(ports), *tls_overrides(script_certs),
             "--set", "topology.connect_timeout=300"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(ports["cloud"], cloud, timeout=180)
        # It serves TLS with the script's certificate for the address dialled.
        context = ssl.create_default_context(cafile=str(script_certs / "ca.pem"))
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", ports["cloud"]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]

        plaintext = fedphd("client", "--client-id", "0", "--server", address,
                           "--set", "tls.insecure=true", "--set", "topology.connect_timeout=5",
                           timeout=300)
        assert plaintext.returncode == 1, plaintext.stderr[-2000:]
        assert "plaintext" in plaintext.stderr and "tls.insecure" in plaintext.stderr
        assert "Traceback" not in plaintext.stderr

        # A client of another CA: its own certificate too (mutual TLS), but the server's
        # does not verify for it.
        other = make_certs(tmp_path / "other", "localhost", "127.0.0.1")
        foreign = fedphd("client", "--client-id", "0", "--server", address,
                         "--set", f'tls.ca_cert="{other / "ca.pem"}"',
                         "--set", f'tls.client_cert="{other / "client-0.pem"}"',
                         "--set", f'tls.client_key="{other / "client-0.key"}"',
                         "--set", "topology.connect_timeout=60", timeout=300)
        assert foreign.returncode == 1, foreign.stderr[-2000:]
        for fragment in ("TLS handshake", "CERTIFICATE_VERIFY_FAILED", "tls.ca_cert", address):
            assert fragment in foreign.stderr, foreign.stderr[-2000:]
        assert "Traceback" not in foreign.stderr
    finally:
        cloud.terminate()
        try:
            cloud.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cloud.kill()
            cloud.wait(timeout=10)
