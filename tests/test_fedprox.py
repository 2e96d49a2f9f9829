"""FedProx (FedDM-prox): the proximal term really is in the client's loss."""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedphd.client.client import DiffusionClient, local_data
from fedphd.client.fedprox import proximal_loss, proximal_term, snapshot
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.settings.config import ModelConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, LOCAL_STEPS_KEY, LR_KEY
from fedphd.common.wire.transport import FitIns


def test_gradient_of_the_proximal_term_is_mu_times_the_drift():
    model = torch.nn.Linear(3, 2)
    anchor = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    mu = 0.7
    proximal_term(model, anchor, mu).backward()
    for p, a in zip(model.parameters(), anchor, strict=True):
        assert torch.allclose(p.grad, mu * (p.detach() - a))


def test_proximal_loss_is_zero_at_the_anchor_and_anchored_when_made():
    model = torch.nn.Linear(2, 2)
    term = proximal_loss(model, 1.0)
    assert float(term(model)) == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    assert float(term(model)) == 0.5 * 4  # four weights moved by 1


@functools.lru_cache  # each call trains a client; the tests share the results
def fit_distance(mu: float | None, key: str = "proximal_mu") -> float:
    """How far one client's local training moves the weights, with ``key`` = mu."""
    cfg = load_config(None, ["topology.clients=4", "training.warmup_steps=0"])
    model = build_unet(unet_config(ModelConfig()), seed=0)
    start = model_to_ndarrays(model)
    config = {ARCH_KEY: architecture_to_json(architecture_of(model)), LOCAL_STEPS_KEY: 8,
              LR_KEY: 1e-3}
    if mu is not None:
        config[key] = mu
    client = DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"))
    res = client.fit(FitIns(codec.encode(start, "fp32"), config))
    after = codec.decode(res.parameters)
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, start, strict=True))))


def test_clients_with_proximal_mu_stay_closer_to_the_global_model():
    free, prox_zero, prox = fit_distance(None), fit_distance(0.0), fit_distance(50.0)
    assert free == prox_zero  # mu = 0 is plain local training, same seeds, same result
    assert prox < 0.8 * free


def test_the_message_api_fedprox_key_is_read_too():
    """flwr.serverapp.strategy.FedProx sends ``proximal-mu``: the same term, the same result."""
    assert fit_distance(50.0, "proximal-mu") == fit_distance(50.0)
    assert fit_distance(50.0, "proximal-mu") < 0.8 * fit_distance(None)


def test_fedprox_config_runs_end_to_end(tmp_path, ports):
    """Flower's FedProx strategy at the cloud; its proximal_mu reaches the clients."""
    from tests.conftest import TESTS_DIR
    from tests.test_deployment import launch

    out = tmp_path / "fedprox"
    records = launch(out, ports, "--config", str(TESTS_DIR.parent / "configs/fedprox-digits.toml"),
                     "--set", "topology.cloud_rounds=2")
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [1, 2] and all(r["model_updated"] for r in cloud)
    assert "FedProx" in (out / "logs" / "cloud.log").read_text()
    for client in range(5):
        assert "proximal term, mu = 0.01" in (out / "logs" / f"client-{client}.log").read_text()
