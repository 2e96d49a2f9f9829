"""FedDM-quant on the real deployment: quantised updates, a codec per link."""

from __future__ import annotations

import pytest

from tests.conftest import TESTS_DIR
from tests.test_deployment import assert_model_trained, launch

pytestmark = pytest.mark.slow


def test_each_link_takes_its_own_codec_and_training_goes_on(tmp_path, ports):
    out = tmp_path / "per-link"
    records = launch(out, ports, "--set", "topology.edges=1", "--set", "topology.clients=2",
                     "--set", "topology.cloud_rounds=2", "--set", "topology.edge_rounds=2",
                     "--set", "codec.edge_uplink=q8", "--set", "codec.cloud_uplink=q4")
    edges = [r for r in records if r["tier"] == "edge"]
    cloud = [r for r in records if r["tier"] == "cloud"]
    # The tiny U-Net's 182 small tensors carry relatively more per-tensor headers and scales
    # than the reference U-Net (25.2 %, tests/test_codec.py): 27.3 % / 14.9 % here.
    for r in edges:  # client -> edge: 8-bit updates; edge -> client: fp32 weights
        assert 0.2 * r["bytes"]["edge->client"] < r["bytes"]["client->edge"]
        assert r["bytes"]["client->edge"] <= 0.28 * r["bytes"]["edge->client"]
        assert not r["rejected"] and r["digest_mismatches"] == []
    for r in cloud:  # edge -> cloud: 4-bit updates; cloud -> edge: fp32 weights every round
        assert r["bytes"]["edge->cloud"] <= 0.155 * r["bytes"]["cloud->edge"]
        assert r["bytes"]["cloud->edge"] > 0.99 * cloud[0]["bytes"]["cloud->edge"]
        assert r["model_updated"]
    assert cloud[-1]["loss"] < edges[0]["loss"]
    assert_model_trained(out, [])  # the quantised updates really moved the global model


@pytest.mark.parametrize(("bits", "limit"), [(8, 0.28), (4, 0.155)])
def test_feddm_quant_configs_quantise_both_directions(tmp_path, ports, bits, limit):
    out = tmp_path / f"q{bits}"
    config = TESTS_DIR.parent / "configs" / f"feddm-quant{bits}-digits.toml"
    records = launch(out, ports, "--config", str(config), "--set", "topology.cloud_rounds=3")
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert all(r["model_updated"] and r["digest_mismatches"] == [] for r in cloud)
    assert all(r["digests_checked"] == 5 for r in cloud)
    full = cloud[0]["bytes"]["cloud->client"]  # round 1: clients hold nothing, fp32 weights
    for r in cloud[1:]:  # then updates from the model each client holds
        assert r["bytes"]["cloud->client"] <= limit * full
    for r in cloud:
        assert r["bytes"]["client->cloud"] <= limit * full
