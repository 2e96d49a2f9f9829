"""Stock-Flower peers, for real: ``examples/plain_client.py`` (Flower, torch and diffusers, no
import of the project) trains a flat run's model with quantised updates both ways; and a
``fedphd client`` pointed at a stock Flower server (FedAvg) stops at its first instruction
with one line and exit status 1."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
from fedphd.common.settings.config import load_config
from fedphd.common.wire import codec
from tests.conftest import fedphd, free_port_block
from tests.test_bounded_influence import change, listening
from tests.test_reliability import (
    Processes,
    cloud_records,
    finish,
    run_config,
    saved_model,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plain_client.py"
PLAIN_SERVER = Path(__file__).resolve().parent / "plain_flower_server.py"
EXAMPLE_ID, EXAMPLE_IMAGES = 1, 256


def example_module() -> ModuleType:
    """The example client as a module (its ``main`` only runs as a script)."""
    spec = importlib.util.spec_from_file_location("plain_client_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_client_imports_nothing_from_the_project():
    tree = ast.parse(EXAMPLE.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in modules}
    assert roots <= {"__future__", "argparse", "hashlib", "io", "json", "math", "sys", "time",
                     "pathlib", "grpc", "numpy", "torch", "diffusers", "flwr", "sklearn"}, roots


def sample_model(rng: np.random.Generator) -> list[np.ndarray]:
    """Tensors of the shapes a U-Net has (4-D convolutions, 2-D linear, 1-D norms)."""
    return [rng.standard_normal(shape).astype(np.float32)
            for shape in [(8, 3, 3, 3), (16, 8), (16,), (5, 7), (1,)]]


@pytest.mark.parametrize("name", ["fp32", "fp16", "q8", "q4"])
def test_the_examples_codecs_agree_with_the_projects(name):
    example = example_module()
    rng = np.random.default_rng(0)
    reference = sample_model(rng)
    trained = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in reference]
    tolerance = {"fp32": 0.0, "fp16": 4e-3, "q8": 0.01 * 8 / 255, "q4": 0.01 * 8 / 15}[name]
    # Its answers, as the server decodes them (q8/q4: an update from what it was sent).
    answer = example.encode(trained, reference, name, True, np.random.default_rng(1))
    assert answer.tensor_type == codec._TENSOR_TYPES[name]
    decoded = codec.decode(answer, reference=reference)
    for got, want in zip(decoded, trained, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= tolerance + 1e-7
    # The server's downlink, as it rebuilds it: bit for bit what the server's own decoder
    # gives, so the digest it reports back matches the server's.
    sent = codec.encode(trained, name, reference=reference, rng=np.random.default_rng(2))
    rebuilt = example.decode(sent, reference)
    expected = codec.decode(sent, reference=reference)
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt, expected, strict=True))
    assert example.digest(rebuilt) == codec.digest(expected)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()


@pytest.mark.slow
def test_the_example_client_takes_part_in_a_run_with_quantised_updates(tmp_path, processes):
    # Two rounds, q8 both ways: round 1 sends whole fp32 weights, round 2 an update from the
    # model the example reported (received_digest) that it holds; answers are q8 updates.
    # The example is the run's only client, so the model moved by its answers alone.
    config, address = run_config(tmp_path / "config", "topology.clients=1",
                                 "topology.cloud_rounds=2", "codec.downlink=q8",
                                 "codec.uplink=q8")
    out = tmp_path / "out"
    cloud = processes.fedphd("cloud", "cloud", "--config", str(config), "--listen", address,
                             "--out", str(out))
    # Started with the cloud, not after it listens: the example retries (Flower alone does not).
    example = processes.start("example", str(EXAMPLE), "--server", address, "--client-id",
                              str(EXAMPLE_ID), "--insecure", "--steps", "2",
                              "--images", str(EXAMPLE_IMAGES))
    finish(processes, cloud, timeout=300)
    assert example.wait(timeout=60) == 0, processes.logs()
    log = processes.log("example")
    assert log.count(f"answering {EXAMPLE_IMAGES} samples as fedphd.q8-delta") == 2, log
    assert "Traceback" not in log, log

    records = cloud_records(out)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["participants"] == [f"client {EXAMPLE_ID}"], record
        assert record["rejected"] == {} and record["failures"] == 0, record
        assert record["examples_by_sender"] == {f"client {EXAMPLE_ID}": EXAMPLE_IMAGES}, record
        assert record["digests_checked"] == 1 and record["digest_mismatches"] == [], record
        assert record["model_updated"], record
    # Round 2's downlink is a q8 update (~1/4 of fp32): the example's digest matched.
    first, second = (r["bytes"]["cloud->client"] for r in records)
    assert second < 0.35 * first, records

    cfg = load_config(config)
    initial = model_to_ndarrays(build_unet(unet_config(cfg.model), seed=cfg.seed))
    assert np.linalg.norm(change(saved_model(out), initial)) > 0


def test_a_fedphd_client_stops_at_a_stock_flower_server_with_one_line(tmp_path, processes):
    address = f"127.0.0.1:{free_port_block(1)}"
    server = processes.start("plain-server", str(PLAIN_SERVER), "--listen", address)
    wait_until(lambda: listening(address), 60, "the plain Flower server to listen", processes)
    result = fedphd("client", "--set", "tls.insecure=true", "--set",
                    "topology.connect_timeout=30", "--client-id", "0", "--server", address,
                    "--state-dir", str(tmp_path / "state"), timeout=120)
    assert result.returncode == 1, result.stderr
    line = (f"fedphd client: the server at {address} is not a FedPhD server: its fit "
            "instruction has no fedphd.arch")
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert server.wait(timeout=90) == 0, processes.logs()
    assert "received 0 results and 1 failures" in processes.log("plain-server")
