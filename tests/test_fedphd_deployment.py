"""FedPhD end to end: pruned model, SH-weighted cloud, clients re-assigned between edges."""

from __future__ import annotations

import json

import pytest

from fedphd.common.core.models import count_parameters
from fedphd.common.core.pruning import PrunedUNet2DModel, load_pretrained
from fedphd.common.settings.config import load_config
from tests.conftest import TESTS_DIR
from tests.test_deployment import EVALUATE, launch

pytestmark = pytest.mark.slow

FEDPHD = ["--config", str(TESTS_DIR.parent / "configs" / "fedphd-digits.toml"),
          "--set", "topology.clients=6", "--set", "topology.cloud_rounds=2",
          "--set", "topology.edge_rounds=2"]


def test_fedphd_prunes_reassigns_and_weights_edges(tmp_path, ports):
    out = tmp_path / "fedphd"
    records = launch(out, ports, *FEDPHD)
    pruning = [r for r in records if r["tier"] == "pruning"]
    assert len(pruning) == 1 and pruning[0]["round"] == 0
    kept = pruning[0]["params_after"] / pruning[0]["params_before"]
    assert 0.5 < kept < 0.62

    # The final model is the pruned one, in diffusers format.
    model = load_pretrained(out / "model")
    assert isinstance(model, PrunedUNet2DModel)
    assert count_parameters(model) == pruning[0]["params_after"]
    assert PrunedUNet2DModel.from_pretrained(out / "model" / "unet").config.pruned_shapes

    # Every message carries the pruned model: 4 bytes per remaining parameter, plus the
    # instruction (its architecture JSON lists the pruned shapes: tens of kB).
    edges = [r for r in records if r["tier"] == "edge"]
    for r in edges:
        per_client = r["bytes"]["edge->client"] / len(r["clients"])
        assert 4 * pruning[0]["params_after"] < per_client < 4 * pruning[0]["params_after"] + 65536
        assert per_client < 0.6 * 4 * pruning[0]["params_before"]
        # Each client rebuilt the pruned architecture from JSON and loaded the weights
        # bit-exactly: the digest of its model equals the digest of what the edge sent.
        assert r["digests_checked"] == len(r["clients"]) and r["digest_mismatches"] == []

    cloud = [r for r in records if r["tier"] == "cloud"]
    addresses = {f"127.0.0.1:{ports['edges'] + e}": e for e in range(2)}
    moved = 0
    previous = None
    for r in cloud:
        assert r["digests_checked"] == 2 and r["digest_mismatches"] == []  # both edges
        assignment = {int(c): a for c, a in r["strategy"]["assignment"].items()}
        assert sorted(assignment) == list(range(6))  # every client placed exactly once
        weights = r["strategy"]["cloud_weights"]
        assert sum(weights.values()) == pytest.approx(1.0)
        trained_here = {}
        for e in [x for x in edges if x["cloud_round"] == r["round"]]:
            for name in e["clients"]:
                client = int(name.split()[1])
                # Trained only at the edge it was assigned to: it really reconnected there.
                assert addresses[assignment[client]] == e["edge"]
                assert trained_here.setdefault(client, e["edge"]) == e["edge"]
        if previous is not None:
            moved += sum(previous[c] != assignment[c] for c in assignment)
        previous = assignment
    # Round-robin start (client c on edge c mod 2) differs from FedPhD's choice for some.
    first = {int(c): a for c, a in cloud[0]["strategy"]["assignment"].items()}
    moved += sum(addresses[first[c]] != c % 2 for c in first)
    assert moved > 0


def test_sparse_training_then_pruning(tmp_path, ports):
    out = tmp_path / "sparse"
    records = launch(out, ports, *FEDPHD, "--set", "pruning.sparse_rounds=1",
                     "--set", "pruning.group_lasso=1e-4")
    pruning = [r for r in records if r["tier"] == "pruning"]
    assert [p["round"] for p in pruning] == [1]
    cloud = [r for r in records if r["tier"] == "cloud"]
    # Round 1 trains the dense model with group lasso, round 2 the pruned one.
    assert cloud[1]["bytes"]["cloud->edge"] < 0.65 * cloud[0]["bytes"]["cloud->edge"]
    assert json.loads((out / "model" / "unet" / "config.json").read_text())["pruned_shapes"]


def test_prune_command_reports_the_reference_unet(tmp_path):
    from tests.conftest import fedphd

    result = fedphd("prune", "--preset", "ddpm-cifar10", "--ratio", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["params_before"] == 35_746_307
    assert 0.42 <= 1 - report["params_after"] / report["params_before"] <= 0.45
    assert report["macs_after"] < report["macs_before"]



def test_the_lean_config_runs_end_to_end_on_q4_updates_and_fp16_first_weights(tmp_path, ports):
    config = TESTS_DIR.parent / "configs" / "fedphd-lean-digits.toml"
    shipped = load_config(config)
    assert (shipped.codec.downlink, shipped.codec.uplink, shipped.codec.whole) == (
        "q4", "q4", "fp16")
    out = tmp_path / "lean"
    # Shrunk: 6 clients, 2 cloud rounds, every client every round, 3 local steps (FAST).
    records = launch(out, ports, "--config", str(config), "--set", "topology.clients=6",
                     "--set", "topology.cloud_rounds=2", "--set", "topology.fraction_fit=1.0",
                     *EVALUATE)
    params = next(r for r in records if r["tier"] == "pruning")["params_after"]
    edges = [r for r in records if r["tier"] == "edge"]
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert len(cloud) == 2 and len(edges) == 2 * 2 * shipped.topology.edge_rounds
    for r in edges:
        assert r["digests_checked"] == len(r["clients"]) and r["digest_mismatches"] == []
        # Never fp32 weights to a client: fp16 (2 bytes per parameter) to one that holds
        # nothing, 4-bit updates (half a byte, plus scales) to one that holds a model.
        assert r["bytes"]["edge->client"] / len(r["clients"]) < 2 * params + 65536
        # Answers are always 4-bit updates from the model the client received.
        assert r["bytes"]["client->edge"] / len(r["clients"]) < 0.2 * 4 * params
    for r in cloud:
        assert r["model_updated"] and r["digest_mismatches"] == []
    # Both edges stay connected: fp16 weights in cloud round 1, 4-bit updates in round 2.
    first, second = (r["bytes"]["cloud->edge"] / 2 for r in cloud)
    assert 1.9 * params < first < 2 * params + 65536
    assert second < 0.2 * 4 * params
    assert cloud[-1]["loss"] < edges[0]["loss"]  # the 4-bit updates really trained it
    final = [r for r in records if r["tier"] == "eval"]
    assert final and final[-1]["fd_classifier"] > 0
    # The saved global model is the pruned one, in diffusers format.
    model = load_pretrained(out / "model")
    assert isinstance(model, PrunedUNet2DModel) and count_parameters(model) == params
