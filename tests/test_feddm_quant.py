"""FedDM-quant on the real deployment: quantised updates on every uplink."""

from __future__ import annotations

import pytest

from tests.test_deployment import launch

pytestmark = pytest.mark.slow


def test_quantised_uplinks_shrink_the_traffic_and_training_goes_on(tmp_path, ports):
    out = tmp_path / "q8"
    records = launch(out, ports, "--set", "topology.edges=1", "--set", "topology.clients=2",
                     "--set", "topology.cloud_rounds=2", "--set", "topology.edge_rounds=2",
                     "--set", "codec.uplink=q8")
    edges = [r for r in records if r["tier"] == "edge"]
    cloud = [r for r in records if r["tier"] == "cloud"]
    # The tiny U-Net's 182 small tensors carry relatively more per-tensor headers and scales
    # than the reference U-Net (25.2 %, tests/test_codec.py): 27.3 % here.
    for r in edges:  # client -> edge: 8-bit updates; edge -> client: fp32 weights
        assert r["bytes"]["client->edge"] <= 0.28 * r["bytes"]["edge->client"]
        assert not r["rejected"] and r["digest_mismatches"] == []
    for r in cloud:  # edge -> cloud too
        assert r["bytes"]["edge->cloud"] <= 0.28 * r["bytes"]["cloud->edge"]
        assert r["model_updated"]
    assert cloud[-1]["loss"] < edges[0]["loss"]
