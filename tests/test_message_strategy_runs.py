"""Flower message-API strategies in real runs: cloud, edges and clients as separate processes.

Each run mixes the APIs somewhere, and each would fail without the adapter: a message-API
class is refused at start otherwise ("is not a flwr.server.strategy.Strategy")."""

from __future__ import annotations

import json
import re

import pytest

from fedphd.common.core.pruning import PrunedUNet2DModel
from tests.conftest import fedphd, port_overrides
from tests.test_deployment import TESTS_DIR, assert_model_trained, launch
from tests.test_reliability import (  # noqa: F401 - processes, straight: fixtures used below
    all_records,
    cloud_records,
    processes,
    run_flat_twice_crashing_once,
    same_models,
    straight,
)

pytestmark = pytest.mark.slow

DP = "flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping"


def test_flat_run_with_central_dp_configured_in_toml_around_a_users_message_fedavg(
        tmp_path, ports):
    """Flower's message-API DP wrapper (server-side fixed clipping) around a user's subclass
    of ``flwr.serverapp.strategy.FedAvg``, every argument from the config: the cloud log shows
    Flower clipping each update and adding the noise, the user's ``aggregate_train`` saw both
    clients as nodes, and the model trained."""
    out, record = tmp_path / "dp", tmp_path / "calls.jsonl"
    args = (f'{{strategy = {{ path = "custom_strategy.RecordingMessageFedAvg", args = '
            f'{{ record_to = "{record}" }} }}, noise_multiplier = 0.01, clipping_norm = 50.0, '
            f'num_sampled_clients = 2}}')
    env = {"PYTHONPATH": str(TESTS_DIR)}
    records = launch(out, ports, "--set", "topology.edges=0", "--set", "topology.clients=2",
                     "--set", "topology.cloud_rounds=1", "--set", f"topology.cloud_strategy={DP}",
                     "--set", f"topology.cloud_strategy_args={args}", env=env)
    assert_model_trained(out, [])
    (cloud,) = [r for r in records if r["tier"] == "cloud"]
    assert sorted(cloud["participants"]) == ["client 0", "client 1"] and cloud["model_updated"]
    log = (out / "logs" / "cloud.log").read_text()
    assert log.count("aggregate_fit: parameters are clipped by value: 50.0000.") == 2, log
    # Flower's stdev: noise_multiplier x clipping_norm / num_sampled_clients.
    assert "aggregate_fit: central DP noise with 0.2500 stdev added" in log, log
    (call,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(reply["node"] for reply in call["replies"]) == [1000, 1001]


def test_hierarchical_run_message_fedadam_at_the_cloud_message_fedavg_at_the_edges(
        tmp_path, ports):
    out = tmp_path / "adam"
    records = launch(out, ports, "--set", "topology.edges=2", "--set", "topology.clients=2",
                     "--set", "topology.cloud_rounds=2", "--set", "topology.edge_rounds=1",
                     "--set", "topology.cloud_strategy=flwr.serverapp.strategy.FedAdam",
                     "--set", "topology.cloud_strategy_args={eta=0.001}",
                     "--set", "topology.edge_strategy=flwr.serverapp.strategy.FedAvg")
    assert_model_trained(out, [])
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [1, 2]
    for r in cloud:
        assert sorted(r["participants"]) == ["edge 0", "edge 1"] and r["model_updated"]
    # FedAdam's numpy maths is float64; the global model stays float32 on the wire.
    assert cloud[0]["bytes"]["cloud->edge"] == cloud[1]["bytes"]["cloud->edge"]
    # Flower's own lines: FedAdam aggregating the 2 edges, each edge's FedAvg its client.
    assert "aggregate_train: Received 2 results and 0 failures" in (
        out / "logs" / "cloud.log").read_text()
    for edge in (0, 1):
        edge_log = (out / "logs" / f"edge-{edge}.log").read_text()
        assert edge_log.count("aggregate_train: Received 1 results and 0 failures") == 2


def test_hierarchical_run_legacy_cloud_and_a_users_message_strategy_at_the_edge(
        tmp_path, ports):
    out, record = tmp_path / "edge", tmp_path / "edge-calls.jsonl"
    launch(out, ports, "--set", "topology.edges=1", "--set", "topology.clients=2",
           "--set", "topology.cloud_rounds=1", "--set", "topology.edge_rounds=2",
           "--set", "topology.edge_strategy=custom_strategy.RecordingMessageFedAvg",
           "--set", f'topology.edge_strategy_args={{record_to="{record}"}}',
           env={"PYTHONPATH": str(TESTS_DIR)})
    assert_model_trained(out, [])
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [call["round"] for call in calls] == [1, 2]
    for call in calls:
        assert sorted(reply["node"] for reply in call["replies"]) == [1000, 1001]
        assert all("num-examples" in reply["metrics"] and "client_id" not in reply["metrics"]
                   for reply in call["replies"])


def test_a_crashed_cloud_with_message_fedadam_pruning_and_q8_resumes_into_the_same_model(
        tmp_path, processes, straight):  # noqa: F811 - the fixtures imported above
    """Message-API FedAdam at the cloud, FedPhD's pruning before round 2, 8-bit updates both
    ways, 2 clients, 4 rounds, run twice at once; the second cloud is killed in round 3 and
    resumed: FedAdam's moments come back from the checkpoint, so the final model equals the
    uninterrupted run's bit for bit."""
    settings = ["topology.clients=2", "topology.cloud_rounds=4", "topology.min_fit_clients=2",
                "topology.cloud_strategy=flwr.serverapp.strategy.FedAdam",
                "topology.cloud_strategy_args={eta=0.001}", "training.local_steps=4",
                "pruning.enabled=true", "pruning.sparse_rounds=1", "pruning.ratio=0.3",
                "codec.downlink=q8", "codec.uplink=q8"]
    out = run_flat_twice_crashing_once(tmp_path, processes, straight, settings)

    records = cloud_records(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert same_models(out, tmp_path / "straight-run")
    pruned = [r for r in all_records(out) if r["tier"] == "pruning"]
    assert len(pruned) == 1 and pruned[0]["params_after"] < pruned[0]["params_before"]
    assert PrunedUNet2DModel.from_pretrained(out / "model" / "unet").config.pruned_shapes


def test_legacy_qfedavg_without_evaluate_fn_is_refused_at_start_in_one_line(tmp_path, ports):
    result = fedphd("cloud", *port_overrides(ports), "--out", str(tmp_path / "q"),
                    "--set", "topology.edges=0",
                    "--set", "topology.cloud_strategy=flwr.server.strategy.QFedAvg", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fedphd cloud: topology.cloud_strategy = "
                                "'flwr.server.strategy.QFedAvg' needs evaluate_fn"), lines
    assert "Traceback" not in result.stderr
    assert re.search(r"a TOML config cannot give", lines[-1])
