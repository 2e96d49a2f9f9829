"""Failures and bad input, for real: cloud and clients as separate processes over gRPC that
this test starts itself (so it owns every pid it kills, stops or restarts)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedphd.common.commands.launcher import write_resolved_config
from fedphd.common.core.diffusion import load_model
from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
from fedphd.common.settings.config import load_config
from fedphd.common.settings.topology import edge_of_client
from fedphd.common.wire.limits import (
    GRPC_CEILING_BYTES,
    MESSAGE_MARGIN_BYTES,
    max_message_bytes,
    model_bytes,
)
from tests.conftest import free_port_block

# Fast rounds on the offline digits; plaintext, since these processes are all ours.
FAST = ["tls.insecure=true", "topology.edges=0", "training.local_steps=2",
        "diffusion.sampling_steps=2", "output.grid_samples=4", "evaluation.final=false",
        "topology.connect_timeout=120", "output.progress=false"]
ATTACKS = ["nan", "inf", "shape", "dtype", "count", "arch", "truncated", "bomb", "pickle",
           "raw-pickle", "codec", "metrics", "examples"]
# What the cloud's `rejected` reason says for each attack.
REASONS = {
    "nan": "NaN or Inf", "inf": "NaN or Inf", "shape": "has shape", "dtype": "has dtype",
    "count": "tensors, the model has", "arch": "tensors, the model has",
    "truncated": "truncated", "bomb": "1099511627776", "pickle": "pickled",
    "raw-pickle": "not an npy tensor", "codec": "unknown tensor type",
    "metrics": "label_hist", "examples": "num_examples",
}
ROUNDS = 20


class Processes:
    """The processes of one test: each logs to its own file; all are stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        self.started[name] = process
        return process

    def fedphd(self, name: str, *argv: str) -> subprocess.Popen:
        return self.start(name, "-m", "fedphd.common.commands.cli", *argv)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-3000:]}" for name in self.started)

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot handle SIGKILL late
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()


def run_config(folder: Path, *overrides: str) -> tuple[Path, str]:
    """A resolved config file every process reads, and the cloud's address."""
    port = free_port_block(1)
    cfg = load_config(overrides=[*FAST, f"topology.cloud_port={port}", *overrides])
    return write_resolved_config(cfg, folder / "config.toml"), f"127.0.0.1:{port}"


def cloud_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["tier"] == "cloud"]


def wait_until(condition, timeout: float, what: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{procs.logs()}")
        time.sleep(0.2)


def start_flat_run(procs: Processes, config: Path, address: str, out: Path,
                   clients: int) -> subprocess.Popen:
    cloud = procs.fedphd("cloud", "cloud", "--config", str(config), "--listen", address,
                         "--out", str(out))
    for client in range(clients):
        start_client(procs, config, address, client, out)
    return cloud


def start_client(procs: Processes, config: Path, address: str, client: int, out: Path):
    return procs.fedphd(f"client-{client}", "client", "--config", str(config), "--client-id",
                        str(client), "--server", address,
                        "--state-dir", str(out / "clients" / f"client-{client}"))


def finish(procs: Processes, cloud: subprocess.Popen, timeout: float) -> None:
    try:
        code = cloud.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the cloud did not finish within {timeout:.0f} s\n{procs.logs()}")
    assert code == 0, procs.logs()


def saved_model(out: Path) -> list[np.ndarray]:
    """The run's final model as saved (a pruned one too), through the product's loader."""
    return model_to_ndarrays(load_model(out / "model")[0])


def test_message_limit_follows_the_model_size():
    tiny = load_config()
    assert model_bytes(tiny) == 4 * 1_112_801  # every state tensor, fp32
    assert max_message_bytes(tiny) == 2 * 4 * 1_112_801 + MESSAGE_MARGIN_BYTES
    reference = load_config(overrides=["model.preset=ddpm-cifar10"])
    assert max_message_bytes(reference) == 2 * model_bytes(reference) + MESSAGE_MARGIN_BYTES
    assert max_message_bytes(load_config(overrides=["topology.max_message_mb=100"])) == 100 << 20
    assert max_message_bytes(load_config(overrides=["topology.max_message_mb=2048"])) == (
        GRPC_CEILING_BYTES)


@pytest.mark.slow
def test_bad_payloads_are_rejected_and_the_model_equals_the_run_without_attacker(
        tmp_path, processes):
    """One attacker client answers each round with another bad payload (the last one over the
    message limit); the final global model is bit-identical to a run without it. The clean
    run also checks that the cloud's memory does not grow from round 2 to round 20."""
    clean_out, attacked_out = tmp_path / "clean", tmp_path / "attacked"
    # Clean run: two honest clients.
    config, address = run_config(tmp_path / "clean-config", "topology.clients=2",
                                 f"topology.cloud_rounds={ROUNDS}")
    clean_cloud = start_flat_run(processes, config, address, clean_out, 2)
    # Attacked run, at the same time: the same two honest clients plus the attacker; every
    # round waits for all three (min_fit_clients), so the attacker is in every round.
    kinds = [*ATTACKS, *ATTACKS][: ROUNDS - 1] + ["oversized"]
    attacked = Processes(tmp_path / "attacked-logs")
    try:
        config, address = run_config(tmp_path / "attacked-config", "topology.clients=2",
                                     f"topology.cloud_rounds={ROUNDS}",
                                     "topology.min_fit_clients=3")
        cloud = start_flat_run(attacked, config, address, attacked_out, 2)
        attacker = attacked.start("attacker", "-m", "tests.attacker", "--server", address,
                                  "--client-id", "2", "--kinds", ",".join(kinds))
        finish(processes, clean_cloud, timeout=900)
        finish(attacked, cloud, timeout=900)
        assert attacker.wait(timeout=60) != 0  # refused over the limit: it gives up, saying why
        assert "exceeds the gRPC message limit" in attacked.log("attacker"), attacked.logs()
    finally:
        attacked.stop_all()

    records = cloud_records(attacked_out)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for record, kind in zip(records, kinds, strict=True):
        assert sorted(record["participants"]) == ["client 0", "client 1"], record
        assert record["model_updated"]
        if kind == "oversized":  # refused by gRPC itself: a failed answer, nothing decoded
            assert record["failures"] == 1 and record["rejected"] == {}, record
        else:
            assert list(record["rejected"]) == ["client 2"], record
            assert REASONS[kind] in record["rejected"]["client 2"], (kind, record)
    cloud_log = attacked.log("cloud")
    assert "rejected the update of client 2" in cloud_log

    clean, attacked_model = saved_model(clean_out), saved_model(attacked_out)
    assert all(np.array_equal(a, b) for a, b in zip(clean, attacked_model, strict=True))
    cfg = load_config(config)
    initial = model_to_ndarrays(build_unet(unet_config(cfg.model), seed=cfg.seed))
    assert not all(np.array_equal(a, b) for a, b in zip(clean, initial, strict=True))

    # Memory: no growth per round (VmRSS of the cloud after round 2 vs after round 20).
    rss = {r["round"]: r["rss_mb"] for r in cloud_records(clean_out)}
    assert 0 < rss[ROUNDS] <= rss[2] * 1.05, rss


def rounds_started(procs: Processes) -> int:
    """Fit rounds the cloud has sent instructions for (``run_fit_round`` logs each sampling;
    it replaced Flower's ``Server.fit_round`` and its "configure_fit: strategy sampled")."""
    return len(re.findall(r"fedphd\.rounds: round \d+: \d+ of \d+ peers selected",
                          procs.log("cloud")))


@pytest.mark.slow
def test_killed_and_hanging_clients_fail_their_round_and_rejoin(tmp_path, processes):
    """Flat run, 3 clients, every round waits for all three (min_fit_clients = 3):
    round 2: client 2 is killed (SIGKILL) mid-round and restarted; the round ends at once
    with the other two, and the restarted client is in round 3;
    round 3: client 1 hangs (SIGSTOP): the round ends after topology.round_timeout with the
    others; resumed (SIGCONT), client 1 rejoins by itself and is in round 4."""
    out = tmp_path / "run"
    timeout = 25
    config, address = run_config(tmp_path, "topology.clients=3", "topology.cloud_rounds=4",
                                 "topology.min_fit_clients=3", "training.local_steps=4",
                                 f"topology.round_timeout={timeout}")
    cloud = start_flat_run(processes, config, address, out, 3)
    # Whatever the machine's load: the victim is stopped (SIGSTOP) as soon as the previous
    # round is recorded, so it cannot answer the next one, and killed once that round began.
    wait_until(lambda: len(cloud_records(out)) >= 1, 300, "round 1 to end", processes)
    os.kill(processes.started["client-2"].pid, signal.SIGSTOP)
    wait_until(lambda: rounds_started(processes) >= 2, 300, "round 2", processes)
    processes.started["client-2"].kill()
    processes.started["client-2"].wait(timeout=30)
    start_client(processes, config, address, 2, out)

    wait_until(lambda: len(cloud_records(out)) >= 2, 300, "round 2 to end", processes)
    hanging = processes.started["client-1"]
    os.kill(hanging.pid, signal.SIGSTOP)
    wait_until(lambda: len(cloud_records(out)) >= 3, 300, "round 3 to end", processes)
    os.kill(hanging.pid, signal.SIGCONT)
    finish(processes, cloud, timeout=300)

    records = cloud_records(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    first, killed, hung, last = records
    assert sorted(first["participants"]) == ["client 0", "client 1", "client 2"]
    # The killed client's dropped connection fails its answer at once, not at the timeout.
    assert sorted(killed["participants"]) == ["client 0", "client 1"], killed
    assert killed["failures"] == 1 and killed["model_updated"]
    assert killed["seconds"] < timeout
    # The restarted client rejoined; the hanging one failed its round after the timeout.
    assert sorted(hung["participants"]) == ["client 0", "client 2"], hung
    assert hung["failures"] == 1 and hung["model_updated"]
    # Flower's server counts a client's time from its previous answer: the wait for the
    # restarted client before this round counts too.
    assert hung["seconds"] + hung["waited_seconds"] >= timeout - 3, hung
    assert sorted(last["participants"]) == ["client 0", "client 1", "client 2"], last
    assert "rejoining" in processes.log("client-1")
    # Everyone, the resumed client included, was released at the end.
    for name in ("client-0", "client-1"):
        assert processes.started[name].wait(timeout=60) == 0, processes.logs()


@pytest.mark.parametrize(("arch", "reason"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be an object"),
    ('{"no_such_argument": 3}', "no_such_argument"),
])
def test_an_instruction_with_a_bad_architecture_fails_the_answer_saying_why(tmp_path, arch,
                                                                             reason):
    import torch

    from fedphd.client.client import DiffusionClient, LocalData
    from fedphd.common.wire.keys import ARCH_KEY
    from fedphd.common.wire.transport import Code, FitIns, ndarrays_to_parameters

    client = DiffusionClient(load_config(), 0, LocalData([], []), torch.device("cpu"), tmp_path)
    res = client.fit(FitIns(ndarrays_to_parameters([]), {ARCH_KEY: arch}))
    assert res.status.code != Code.OK
    assert reason in res.status.message
    if arch.startswith("{\"no"):
        assert ARCH_KEY in res.status.message


def test_pickled_and_inflated_tensors_are_refused_before_numpy_reads_them():
    import io
    import pickle

    from fedphd.common.wire import codec
    from fedphd.common.wire.transport import Parameters
    from tests.attacker import _declare_shape, npy

    refused = {
        "pickled": npy(np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "raw pickle": pickle.dumps(np.zeros(3, np.float32)),
        "truncated": npy(np.zeros(100, np.float32))[:-8],
        "inflated": _declare_shape(npy(np.zeros(4, np.float32)), "(1099511627776,)"),
    }
    for blob in refused.values():
        with pytest.raises(codec.CodecError, match="malformed tensor 0"):
            codec.decode(Parameters(tensors=[blob], tensor_type=codec.FP32))
    ok = io.BytesIO()
    np.save(ok, np.arange(6, dtype=np.float32).reshape(2, 3))
    (array,) = codec.decode(Parameters(tensors=[ok.getvalue()], tensor_type=codec.FP32))
    assert array.shape == (2, 3) and array.dtype == np.float32


def test_failures_are_described_with_their_sender():
    from fedphd.common.federation.validation import describe_failure
    from fedphd.common.wire.transport import Code, FitRes, GrpcBridgeClosed, Parameters, Status
    from tests.test_strategy import FakeProxy

    error = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "fit failed: boom"),
                   Parameters(tensors=[], tensor_type=""), 0, {"client_id": 4})
    assert describe_failure((FakeProxy("x"), error)) == (
        "client 4 answered with an error: fit failed: boom")
    assert "round_timeout" in describe_failure(GrpcBridgeClosed())
    assert "max_message_mb" in describe_failure(GrpcBridgeClosed())


@pytest.mark.slow
def test_a_killed_edge_fails_its_cloud_round_and_comes_back_with_its_client(tmp_path,
                                                                            processes):
    """Hierarchical run, 2 edges with one client each: edge 1 is killed (SIGKILL) mid cloud
    round 2 and restarted; the cloud ends round 2 with edge 0, and in round 3 edge 1 is back
    with its client, which reconnected to the restarted edge by itself."""
    out = tmp_path / "run"
    edge_port = free_port_block(2)
    config, address = run_config(tmp_path, "topology.edges=2", "topology.clients=2",
                                 "topology.cloud_rounds=3", "topology.edge_rounds=1",
                                 "training.local_steps=4", f"topology.edge_base_port={edge_port}")
    cloud = processes.fedphd("cloud", "cloud", "--config", str(config), "--listen", address,
                             "--out", str(out))

    def start_edge(edge: int) -> subprocess.Popen:
        return processes.fedphd(f"edge-{edge}", "edge", "--config", str(config), "--edge-id",
                                str(edge), "--cloud", address,
                                "--listen", f"127.0.0.1:{edge_port + edge}")

    for edge in (0, 1):
        start_edge(edge)
        start_client(processes, config, f"127.0.0.1:{edge_port + edge}", edge, out)
    # Stopped as soon as round 1 is recorded, edge 1 cannot answer round 2 whatever the load;
    # it is killed once round 2 began.
    wait_until(lambda: len(cloud_records(out)) >= 1, 300, "cloud round 1 to end", processes)
    os.kill(processes.started["edge-1"].pid, signal.SIGSTOP)
    wait_until(lambda: rounds_started(processes) >= 2, 300, "cloud round 2", processes)
    processes.started["edge-1"].kill()
    processes.started["edge-1"].wait(timeout=30)
    start_edge(1)
    finish(processes, cloud, timeout=400)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cloud_lines = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud_lines] == [1, 2, 3]
    first, killed, back = cloud_lines
    assert sorted(first["participants"]) == ["edge 0", "edge 1"]
    assert killed["participants"] == ["edge 0"] and killed["failures"] == 1, killed
    assert killed["model_updated"]
    assert sorted(back["participants"]) == ["edge 0", "edge 1"], back
    edge_1 = [r for r in records if r["tier"] == "edge" and r["edge"] == 1]
    # The restarted edge numbers its rounds from the cloud round, like one that never died.
    assert [(r["cloud_round"], r["round"]) for r in edge_1] == [(1, 1), (3, 3)]
    assert edge_1[-1]["clients"] == ["client 1"]
    assert "rejoining" in processes.log("client-1")
    for name in ("client-0", "client-1", "edge-0", "edge-1"):
        assert processes.started[name].wait(timeout=60) == 0, processes.logs()


def all_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def edge_rounds(records: list[dict]) -> list[tuple[int, int, tuple[str, ...]]]:
    return sorted((r["edge"], r["round"], tuple(sorted(r["clients"])))
                  for r in records if r["tier"] == "edge")


def steps_logged(procs: Processes, name: str) -> int:
    """Local trainings a client has finished (one log line each)."""
    return procs.log(name).count(" steps in ")


def same_models(left: Path, right: Path) -> bool:
    return all(np.array_equal(a, b)
               for a, b in zip(saved_model(left), saved_model(right), strict=True))


@pytest.fixture
def straight(tmp_path):
    """A second set of processes, for the same run without a crash."""
    procs = Processes(tmp_path / "straight-logs")
    yield procs
    procs.stop_all()


def crash_in_round_3(procs: Processes, config: Path, address: str, out: Path, held: str,
                     other_done, replayed_by: str) -> None:
    """With ``held`` stopped (SIGSTOP), round 3 cannot end; once ``other_done()``, the cloud
    is killed (SIGKILL) and started again with --resume, ``held`` goes on, and the resumed
    run must finish with ``replayed_by`` having replayed round 3."""
    os.kill(procs.started[held].pid, signal.SIGSTOP)
    wait_until(other_done, 300, "the others to finish round 3", procs)
    assert len(cloud_records(out)) == 2, procs.logs()  # round 3 waits for the stopped one
    procs.started["cloud"].kill()
    procs.started["cloud"].wait(timeout=30)
    cloud = procs.fedphd("cloud-resumed", "cloud", "--config", str(config), "--listen",
                         address, "--out", str(out), "--resume")
    os.kill(procs.started[held].pid, signal.SIGCONT)
    finish(procs, cloud, timeout=600)
    assert "resuming after cloud round 2 of 4" in procs.log("cloud-resumed"), procs.logs()
    assert "cloud round 3 again" in procs.log(replayed_by), procs.logs()


def run_flat_twice_crashing_once(tmp_path: Path, processes: Processes, straight: Processes,
                                 settings: list[str]) -> Path:
    """A flat run of 2 clients with ``settings``, twice at once: straight (in
    ``tmp_path / "straight-run"``) and with the cloud crashed in round 3 and resumed
    (:func:`crash_in_round_3`); the crashed run's folder, once both finished."""
    config, address = run_config(tmp_path / "straight", *settings)
    straight_cloud = start_flat_run(straight, config, address, tmp_path / "straight-run", 2)
    out = tmp_path / "run"
    config, address = run_config(tmp_path / "crashed", *settings)
    start_flat_run(processes, config, address, out, 2)
    wait_until(lambda: len(cloud_records(out)) >= 2, 400, "round 2 to end", processes)
    crash_in_round_3(processes, config, address, out, "client-1",
                     lambda: steps_logged(processes, "client-0") >= 3, "client-0")
    finish(straight, straight_cloud, timeout=400)
    return out


@pytest.mark.slow
def test_a_crashed_flat_cloud_resumes_into_the_model_of_a_run_that_never_stopped(
        tmp_path, processes, straight):
    """Flat SCAFFOLD (state at the cloud and at every client) with 8-bit updates both ways
    (error feedback at the clients, downlinks from the model each client holds), 2 clients,
    4 rounds, run twice at once. In the second run client 1 is stopped once round 2 is
    recorded, so round 3 cannot end; client 0 trains round 3; the cloud is killed (SIGKILL)
    and started again with --resume; client 1 goes on. Both clients rejoin by themselves,
    client 0 replays round 3 from its start, and the final model equals the uninterrupted
    run's bit for bit."""
    settings = ["topology.clients=2", "topology.cloud_rounds=4", "topology.min_fit_clients=2",
                "topology.cloud_strategy=fedphd.server.scaffold.Scaffold", "training.local_steps=4",
                "codec.downlink=q8", "codec.uplink=q8"]
    out = run_flat_twice_crashing_once(tmp_path, processes, straight, settings)

    records = cloud_records(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4]  # round 3's lines once, no gap
    assert all(sorted(r["participants"]) == ["client 0", "client 1"] for r in records)
    # After the resume the downlinks were still 8-bit updates, not full weights: every
    # round's training messages took as many bytes as in the uninterrupted run.
    straight_records = cloud_records(tmp_path / "straight-run")
    assert [r["bytes"] for r in records] == [r["bytes"] for r in straight_records]
    assert same_models(out, tmp_path / "straight-run")


@pytest.mark.slow
def test_a_crashed_hierarchical_cloud_resumes_into_the_model_of_a_run_that_never_stopped(
        tmp_path, processes, straight):
    """FedPhD as configured in configs/fedphd-digits.toml (SH-weighted aggregation, client
    re-assignment every cloud round, 40 % of an edge's clients per edge round, pruning after a
    sparse round) with 8-bit updates on every link, 2 edges, 6 clients, 4 cloud rounds, run
    twice at once. In the second run
    edge 1 is stopped (SIGSTOP) as soon as cloud round 3 reaches it and edge 0 finishes that
    round; the cloud is killed and resumed from the checkpoint of round 2 (a pruned model);
    edge 1 goes on. Edges and clients replay round 3 from its start: the final model equals
    the uninterrupted run's bit for bit."""
    edge_ports = {name: free_port_block(2) for name in ("straight", "crashed")}

    def start(procs: Processes, name: str, out: Path) -> tuple[subprocess.Popen, Path, str]:
        port = edge_ports[name]
        config, address = run_config(
            tmp_path / name, "topology.edges=2", "topology.clients=6",
            "topology.cloud_rounds=4", "topology.edge_rounds=2", "training.local_steps=4",
            "pruning.enabled=true", "pruning.sparse_rounds=1", "codec.downlink=q8",
            "codec.uplink=q8",
            f"topology.edge_base_port={port}",
            "topology.cloud_strategy=fedphd.server.fedphd.FedPhD", "topology.fraction_fit=0.4",
            "topology.cloud_strategy_args.selection_scale=720.0",
            "topology.cloud_strategy_args.sh_weight=1800.0", "partition.method=classes",
        )
        cloud = procs.fedphd("cloud", "cloud", "--config", str(config), "--listen", address,
                             "--out", str(out))
        for edge in (0, 1):
            procs.fedphd(f"edge-{edge}", "edge", "--config", str(config), "--edge-id",
                         str(edge), "--cloud", address, "--listen", f"127.0.0.1:{port + edge}")
        topology = load_config(config).topology
        for client in range(6):
            edge = edge_of_client(client, topology)
            start_client(procs, config, f"127.0.0.1:{port + edge}", client, out)
        return cloud, config, address

    out = tmp_path / "run"
    straight_cloud, _, _ = start(straight, "straight", tmp_path / "straight-run")
    _, config, address = start(processes, "crashed", out)
    wait_until(lambda: "edge 1: cloud round 3 begins" in processes.log("edge-1"), 600,
               "cloud round 3 at edge 1", processes)
    crash_in_round_3(processes, config, address, out, "edge-1",
                     lambda: "edge 0: cloud round 3 done" in processes.log("edge-0"), "edge-0")
    finish(straight, straight_cloud, timeout=600)

    records = all_records(out)
    assert [r["round"] for r in records if r["tier"] == "cloud"] == [1, 2, 3, 4]
    assert [r["round"] for r in records if r["tier"] == "pruning"] == [1]
    # Each edge round once, with the clients the uninterrupted run sampled.
    assert edge_rounds(records) == edge_rounds(all_records(tmp_path / "straight-run"))
    assert sorted({(edge, number) for edge, number, _ in edge_rounds(records)}) == [
        (edge, number) for edge in (0, 1) for number in range(1, 9)]
    assert len(edge_rounds(records)) == 16
    assert same_models(out, tmp_path / "straight-run")
    initial = load_config(config)
    assert sum(a.size for a in saved_model(out)) < model_bytes(initial) // 4  # pruned


@pytest.mark.slow
def test_an_edge_that_never_returns_costs_one_bounded_wait_and_its_client_moves(tmp_path,
                                                                              processes):
    """Edge 1 is killed for good after cloud round 1. The next round waits
    topology.connect_timeout for it, then runs with edge 0; later rounds do not wait again;
    the run ends. Edge 1's client, started with edge 0 as its fallback (--server E1,E0),
    gives up on edge 1 after topology.connect_timeout and trains under edge 0."""
    out = tmp_path / "run"
    edge_port = free_port_block(2)
    rounds = 6
    config, address = run_config(tmp_path, "topology.edges=2", "topology.clients=2",
                                 f"topology.cloud_rounds={rounds}", "topology.edge_rounds=1",
                                 "training.local_steps=4", "topology.connect_timeout=15",
                                 f"topology.edge_base_port={edge_port}")
    cloud = processes.fedphd("cloud", "cloud", "--config", str(config), "--listen", address,
                             "--out", str(out))
    edges = [f"127.0.0.1:{edge_port + edge}" for edge in (0, 1)]
    for edge in (0, 1):
        processes.fedphd(f"edge-{edge}", "edge", "--config", str(config), "--edge-id",
                         str(edge), "--cloud", address, "--listen", edges[edge])
    start_client(processes, config, edges[0], 0, out)
    start_client(processes, config, f"{edges[1]},{edges[0]}", 1, out)
    wait_until(lambda: len(cloud_records(out)) >= 1, 300, "cloud round 1 to end", processes)
    # The cloud waits while the client gives up on edge 1, so rounds remain for it at edge 0.
    os.kill(cloud.pid, signal.SIGSTOP)
    processes.started["edge-1"].kill()
    processes.started["edge-1"].wait(timeout=30)
    wait_until(lambda: f"is gone; joining {edges[0]}" in processes.log("client-1"), 120,
               "client 1 to fall back to edge 0", processes)
    os.kill(cloud.pid, signal.SIGCONT)
    finish(processes, cloud, timeout=300)

    records = all_records(out)
    cloud_lines = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud_lines] == list(range(1, rounds + 1))
    assert sorted(cloud_lines[0]["participants"]) == ["edge 0", "edge 1"]
    assert all(r["participants"] == ["edge 0"] and r["model_updated"]
               for r in cloud_lines[1:]), cloud_lines
    log = processes.log("cloud")
    # One bounded wait: in the first round that began after the edge left, not after.
    assert log.count("1 of 2 edges connected after topology.connect_timeout") == 1, log
    at_edge_0 = [r["clients"] for r in records if r["tier"] == "edge" and r["edge"] == 0]
    assert at_edge_0[0] == ["client 0"]
    assert sorted(at_edge_0[-1]) == ["client 0", "client 1"], at_edge_0
    for name in ("client-0", "client-1"):  # released by edge 0 at the end
        assert processes.started[name].wait(timeout=60) == 0, processes.logs()


def test_grpcs_closed_channel_race_is_not_shown_as_a_traceback():
    """grpc's connectivity thread may outlive its channel and raise 'Channel closed!' (seen
    once in 15 refused plaintext clients): a debug line, not a traceback; any other
    exception in a thread still reaches the hook that was there before."""
    import threading

    from fedphd.common.wire.transport import quiet_closed_channel_watchers

    def _poll_connectivity():  # the name of grpc's polling function
        raise ValueError("Cannot monitor channel state: Channel closed!")

    def other_work():
        raise ValueError("something else went wrong")

    previous, reported = threading.excepthook, []
    threading.excepthook = lambda args: reported.append(str(args.exc_value))
    try:
        quiet_closed_channel_watchers()
        quiet_closed_channel_watchers()  # once is enough: not chained twice
        for target in (_poll_connectivity, other_work):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert reported == ["something else went wrong"]
