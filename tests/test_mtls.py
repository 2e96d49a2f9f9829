"""Mutual TLS with identities: servers require client certificates signed by the run's CA, a
peer's identity is the one its certificate names, revoked certificates (``tls.deny``) are
refused, and every refusal is one clear line on both sides. Unit tests of the identity rules,
then real ``fedphd`` processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bench.harness import free_port_block
from fedphd.common.settings.config import ConfigError, TlsConfig, load_config
from fedphd.common.wire.tls import (
    Admission,
    certified_identity,
    client_certificate,
    fingerprint,
    make_test_certificates,
    peer_certificate_files,
    server_admission,
    with_run_certificates,
)
from fedphd.common.wire.transport import (
    BoundedClientManager,
    Client,
    GetPropertiesRes,
    PeerCertificate,
    Refused,
    TrafficMeter,
    connect_client,
    disconnect_all,
    establish_identity,
    ok_status,
    peer_identity,
    start_flower_server,
)
from tests.conftest import fedphd, port_overrides
from tests.test_tls import FAST, wait_for_port

HOSTS = ["localhost", "127.0.0.1"]
PEERS = ["client-0", "client-1", "client-2", "edge-0"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mtls")
    make_test_certificates(folder, HOSTS, PEERS)
    return folder


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other-ca")
    make_test_certificates(folder, HOSTS, ["client-0"])
    return folder


def own(certs: Path, peer: str, **extra) -> TlsConfig:
    return TlsConfig(ca_cert=str(certs / "ca.pem"), client_cert=str(certs / f"{peer}.pem"),
                     client_key=str(certs / f"{peer}.key"), **extra)


# -- identity rules -----------------------------------------------------------------------

def test_a_certificate_names_a_peer_by_its_cn_or_a_dns_name():
    assert certified_identity(["client-3"]) == ("client", 3)
    assert certified_identity(["cloud.example.org", "edge-12"]) == ("edge", 12)
    assert certified_identity(["localhost", "client-x", "server-1"]) is None


def test_the_certified_identity_wins_and_a_different_claim_is_refused():
    certified = Admission("client", certified=True)
    cert = PeerCertificate(("client", 2), "ab", ("client-2",))
    identity = establish_identity({"client_id": 2, "label_hist": "[3, 4]"}, cert, certified)
    assert (identity.name, identity.certified, identity.declared_examples) == ("client 2", True, 7)
    # A peer that declares nothing is who its certificate says.
    assert establish_identity({}, cert, certified).name == "client 2"
    with pytest.raises(Refused) as refusal:
        establish_identity({"client_id": 0}, cert, certified)
    assert str(refusal.value) == "its certificate names client 2, it declared client_id 0"
    with pytest.raises(Refused, match="its certificate names edge 1; this server serves clients"):
        establish_identity({}, PeerCertificate(("edge", 1), "ab", ("edge-1",)), certified)
    with pytest.raises(Refused, match="presented no certificate"):
        establish_identity({"client_id": 2}, None, certified)
    with pytest.raises(Refused, match="label_hist is not a list of counts"):
        establish_identity({"label_hist": "[-5]"}, cert, certified)


def test_without_client_certificates_the_identity_is_the_declared_one():
    plain = Admission("edge")
    identity = establish_identity({"edge_id": 1}, None, plain)
    assert (identity.name, identity.certified, identity.declared_examples) == ("edge 1", False,
                                                                              None)
    assert establish_identity({}, None, plain) is None
    with pytest.raises(Refused, match="it declared client_id 4; this server serves edges"):
        establish_identity({"client_id": 4}, None, plain)


def test_deny_list_matches_identities_and_fingerprints_in_either_spelling(certs):
    digest = fingerprint((certs / "client-1.pem").read_bytes())
    colons = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()
    admission = server_admission(TlsConfig(deny=["client-3", colons]), "client")
    assert admission.certified  # on by default
    assert admission.denied(("client", 3), "00")
    assert admission.denied(("client", 1), digest)
    assert not admission.denied(("client", 0), "00")
    assert not server_admission(TlsConfig(insecure=True), "client").certified
    assert not server_admission(TlsConfig(require_client_auth=False), "client").certified


def test_a_peer_checks_its_own_certificate_at_start(certs, tmp_path):
    chain, key = client_certificate(own(certs, "client-1"), "client", 1, "--client-id")
    assert chain == (certs / "client-1.pem").read_bytes() and b"PRIVATE KEY" in key
    with pytest.raises(ConfigError) as error:
        client_certificate(own(certs, "client-1"), "client", 0, "--client-id")
    assert str(error.value) == (
        f"tls.client_cert ({certs / 'client-1.pem'}) names client-1, but this is "
        "client 0 (--client-id 0): give it its own certificate")
    with pytest.raises(ConfigError, match=r"^tls.client_cert: not set; servers require"):
        client_certificate(TlsConfig(ca_cert=str(certs / "ca.pem")), "edge", 0, "--edge-id")
    # Client certificates off, or plaintext: nothing to present.
    assert client_certificate(TlsConfig(ca_cert=str(certs / "ca.pem"),
                                        require_client_auth=False), "client", 0, "-") is None
    assert client_certificate(TlsConfig(insecure=True), "client", 0, "-") is None
    gone = TlsConfig(ca_cert=str(certs / "ca.pem"), client_cert=str(tmp_path / "x.pem"),
                     client_key=str(certs / "client-0.key"))
    with pytest.raises(ConfigError, match=r"tls.client_cert: no such file: .*x\.pem"):
        client_certificate(gone, "client", 0, "--client-id")


def test_launch_makes_one_certificate_per_peer_with_a_private_key(tmp_path):
    cfg = with_run_certificates(load_config(None, ["topology.edges=2", "topology.clients=3"]),
                                tmp_path / "tls")
    for peer in ("client-0", "client-1", "client-2", "edge-0", "edge-1"):
        cert, key = peer_certificate_files(cfg.tls, peer)
        assert key.stat().st_mode & 0o077 == 0
        kind, number = peer.split("-")
        assert client_certificate(cfg.tls.model_copy(update={
            "client_cert": str(cert), "client_key": str(key)}), kind, int(number), "-")
    assert peer_certificate_files(cfg.tls, "client-3") is None


class Declaring(Client):
    """A client that says who it is and how many samples it holds, and does nothing else."""

    def __init__(self, number: int) -> None:
        self.number = number

    def get_properties(self, ins):
        return GetPropertiesRes(status=ok_status(), properties={
            "client_id": self.number, "label_hist": json.dumps([5, self.number])})


def test_clients_in_threads_of_one_process_present_their_own_certificates(certs):
    """The certificate a client presents is its thread's (the benchmarks host many clients
    per process); the server identifies each by its certificate before counting it."""
    ca = (certs / "ca.pem").read_bytes()
    manager = BoundedClientManager(max_wait=30)
    address = f"127.0.0.1:{free_port_block(1)}"
    server = start_flower_server(
        address, manager, TrafficMeter(),
        certificates=(ca, (certs / "server.pem").read_bytes(),
                      (certs / "server.key").read_bytes()),
        admission=Admission("client", certified=True))
    threads = [threading.Thread(target=connect_client, daemon=True, args=(address, Declaring(n)),
                                kwargs={"root_certificates": ca, "max_wait_time": 30,
                                        "client_certificate": (
                                            (certs / f"client-{n}.pem").read_bytes(),
                                            (certs / f"client-{n}.key").read_bytes())})
               for n in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        assert manager.wait_for(2, timeout=60)
        identities = sorted((peer_identity(p).name, peer_identity(p).certified,
                             peer_identity(p).declared_examples) for p in manager.all().values())
        assert identities == [("client 0", True, 5), ("client 1", True, 6)]
        disconnect_all(manager)
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        server.stop(grace=0)


class SlowEdge(Client):
    """An edge that says who it is only once ``release`` is set (a real edge answers once
    its own clients are connected)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def get_properties(self, ins):
        self.release.wait(timeout=60)
        return GetPropertiesRes(status=ok_status(), properties={"edge_id": 4})


def test_a_peer_being_identified_has_arrived_for_the_wait_for_peers():
    """The cloud's wait for edges ends when they connected in time, even if one says who it
    is only after that wait's deadline; it counts once accepted."""
    manager = BoundedClientManager(max_wait=30, identify_timeout=60)
    address = f"127.0.0.1:{free_port_block(1)}"
    server = start_flower_server(address, manager, TrafficMeter(), admission=Admission("edge"))
    release = threading.Event()
    edge = threading.Thread(target=connect_client, args=(address, SlowEdge(release)),
                            kwargs={"max_wait_time": 30}, daemon=True)
    try:
        edge.start()
        for _ in range(300):  # connected within 30 s: being identified, not yet accepted
            if manager.identifying:
                break
            release.wait(timeout=0.1)
        assert manager.identifying == 1 and manager.num_available() == 0
        # Released after this wait's own deadline (1 s) has passed.
        threading.Timer(3.0, release.set).start()
        assert manager.wait_for(1, timeout=1)
        (proxy,) = manager.all().values()
        assert peer_identity(proxy).name == "edge 4" and not peer_identity(proxy).certified
    finally:
        release.set()
        disconnect_all(manager)
        edge.join(timeout=30)
        server.stop(grace=0)


# -- real processes -------------------------------------------------------------------------

IMPOSTOR = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fedphd.common.wire.transport import (
        Client, GetPropertiesRes, PeerRefused, connect_client, ok_status)

    class Impostor(Client):
        def get_properties(self, ins):
            return GetPropertiesRes(status=ok_status(), properties={"client_id": 0})

    folder, address = Path(sys.argv[1]), sys.argv[2]
    try:
        connect_client(address, Impostor(), root_certificates=(folder / "ca.pem").read_bytes(),
                       max_wait_time=60, client_certificate=(
                           (folder / "client-1.pem").read_bytes(),
                           (folder / "client-1.key").read_bytes()))
    except PeerRefused as error:
        print(f"impostor: {error}", file=sys.stderr)
        sys.exit(1)
""")


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float) -> int:
    """Wait for a process we started; kill it (by its pid) if it outlives ``timeout``."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


@pytest.mark.slow
def test_peers_without_a_valid_certificate_or_lying_about_their_id_are_refused(
    tmp_path, ports, certs, other_ca
):
    """Flat run, clients 0 and 1 honest. Refused at connect time, each with one line: a
    client without a certificate, one with another CA's, an impostor with client 1's
    certificate claiming client_id 0, and client 2 whose certificate is on tls.deny. A
    client given another client's certificate stops at start. The run completes."""
    address = f"127.0.0.1:{ports['cloud']}"
    cli = [sys.executable, "-m", "fedphd.common.commands.cli"]
    ca = ["--set", f'tls.ca_cert="{certs / "ca.pem"}"']
    denied = fingerprint((certs / "client-2.pem").read_bytes())
    cloud = start([*cli, "cloud", "--out", str(tmp_path / "run"), *FAST, *port_overrides(ports),
                   *ca, "--set", f'tls.server_cert="{certs / "server.pem"}"',
                   "--set", f'tls.server_key="{certs / "server.key"}"',
                   "--set", f'tls.deny=["{denied}"]', "--set", "topology.edges=0",
                   "--set", "topology.clients=2", "--set", "topology.cloud_rounds=1",
                   "--set", "topology.connect_timeout=300"], tmp_path / "cloud.log")

    def client(number: int, peer_files: Path | None, *extra: str) -> list[str]:
        files = [] if peer_files is None else [
            "--set", f'tls.client_cert="{peer_files / f"client-{number}.pem"}"',
            "--set", f'tls.client_key="{peer_files / f"client-{number}.key"}"']
        return [*cli, "client", "--client-id", str(number), "--server", address, *FAST, *ca,
                *files, "--set", "topology.connect_timeout=60", *extra]

    refused = {
        "no certificate": client(0, None, "--set", "tls.require_client_auth=false"),
        "another CA": client(0, other_ca),
        "impostor": [sys.executable, "-c", IMPOSTOR, str(certs), address],
        "denied": client(2, certs, "--set", "topology.clients=3"),
    }
    try:
        wait_for_port(ports["cloud"], cloud, timeout=180)
        logs = {name: tmp_path / f"{name.replace(' ', '-')}.log" for name in refused}
        processes = {name: start(argv, logs[name]) for name, argv in refused.items()}
        codes = {name: finish(process, timeout=240) for name, process in processes.items()}
        assert codes == dict.fromkeys(refused, 1), {n: logs[n].read_text()[-1500:] for n in logs}

        closed = (f"fedphd client: the Flower server at {address} closed the TLS connection 3 "
                  "times in a row before a session began: it requires a client certificate "
                  "signed by its CA and {}; check that tls.client_cert and tls.client_key were "
                  "issued by the run's CA (tls.ca_cert), are not expired and are not revoked")
        assert last_line(logs["no certificate"]) == closed.format(
            "this client presented none (tls.client_cert is not set)")
        assert last_line(logs["another CA"]) == closed.format(
            "this client's tls.client_cert was not accepted")
        assert last_line(logs["impostor"]) == (
            f"impostor: the Flower server at {address} refused this peer: its certificate "
            "names client 1, it declared client_id 0")
        assert last_line(logs["denied"]) == (
            f"fedphd client: the Flower server at {address} refused this peer: client 2 is "
            "on this server's deny list (tls.deny)")
        assert all("Traceback" not in log.read_text() for log in logs.values())

        # Another client's certificate: stopped at start, before any connection.
        swapped = subprocess.run(
            [*client(0, None), "--set", f'tls.client_cert="{certs / "client-1.pem"}"',
             "--set", f'tls.client_key="{certs / "client-1.key"}"'],
            capture_output=True, text=True, timeout=240)
        assert swapped.returncode == 2, swapped.stderr[-1500:]
        assert swapped.stderr.strip().splitlines()[-1] == (
            f"fedphd client: tls.client_cert ({certs / 'client-1.pem'}) names client-1, "
            "but this is client 0 (--client-id 0): give it its own certificate")

        honest = [start(client(n, certs), tmp_path / f"client-{n}.log") for n in (0, 1)]
        assert finish(cloud, timeout=400) == 0, (tmp_path / "cloud.log").read_text()[-3000:]
        assert [finish(process, timeout=60) for process in honest] == [0, 0]
    finally:
        if cloud.poll() is None:
            cloud.kill()
            cloud.wait(timeout=10)

    cloud_log = (tmp_path / "cloud.log").read_text()
    assert ("refused a peer: its certificate names client 1, it declared client_id 0"
            in cloud_log)
    assert f"refused client 2 (certificate sha256 {denied}): it is on tls.deny" in cloud_log
    assert "Traceback" not in cloud_log
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (round_one,) = [r for r in records if r["tier"] == "cloud"]
    assert round_one["model_updated"]
    assert sorted(round_one["examples_by_sender"]) == ["client 0", "client 1"]


@pytest.mark.slow
def test_launch_runs_hierarchical_mutual_tls_with_a_certificate_per_peer(tmp_path, ports):
    """``fedphd launch`` without [tls]: the throwaway CA signs a certificate per client and
    edge, each role gets its own, and the servers require them."""
    out = tmp_path / "run"
    result = fedphd("launch", "--out", str(out), "--timeout", "400", *FAST,
                    *port_overrides(ports), "--set", "topology.edges=1",
                    "--set", "topology.clients=2", "--set", "topology.cloud_rounds=1",
                    "--set", "topology.edge_rounds=1", timeout=500)
    logs = {p.stem: p.read_text() for p in (out / "logs").glob("*.log")}
    assert result.returncode == 0, result.stderr[-3000:] + json.dumps(logs)[-4000:]
    assert sorted(p.name for p in (out / "tls").glob("*.key")) == [
        "client-0.key", "client-1.key", "edge-0.key", "server.key"]
    assert all("client certificates required" in text for text in logs.values()), logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (cloud,) = [r for r in records if r["tier"] == "cloud"]
    assert cloud["participants"] == ["edge 0"] and cloud["model_updated"]
    (edge,) = [r for r in records if r["tier"] == "edge"]
    assert edge["clients"] == ["client 0", "client 1"]
