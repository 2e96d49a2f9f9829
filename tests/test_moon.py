"""MOON: the model-contrastive term really changes the clients' gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fedphd.client.moon import MoonTerm, contrastive_loss, frozen_copy
from fedphd.common.core.diffusion import ddpm_loss, make_noise_scheduler
from fedphd.common.core.models import build_unet, unet_config
from fedphd.common.settings.config import DiffusionConfig, ModelConfig
from tests.conftest import TESTS_DIR


def test_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    same, orthogonal = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0 / 0.5)))
    assert float(contrastive_loss(z, same, orthogonal, 0.5)) == pytest.approx(expected)


def gradients(with_moon: bool) -> dict[str, torch.Tensor]:
    model = build_unet(unet_config(ModelConfig()), seed=0)
    global_model = frozen_copy(model)
    previous = frozen_copy(model)
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    term = MoonTerm(model, global_model, previous, mu=1.0, tau=0.5) if with_moon else None
    loss = ddpm_loss(model, make_noise_scheduler(DiffusionConfig()), images,
                     torch.Generator().manual_seed(2))
    if term is not None:
        loss = loss + term(model)
        term.close()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_moon_term_changes_the_gradients_below_the_bottleneck_only():
    plain, moon = gradients(False), gradients(True)
    # The representation is the bottleneck: layers before it get a new gradient...
    assert not torch.allclose(plain["conv_in.weight"], moon["conv_in.weight"])
    assert not torch.allclose(plain["mid_block.resnets.0.conv1.weight"],
                              moon["mid_block.resnets.0.conv1.weight"])
    # ...layers after it do not.
    assert torch.allclose(plain["conv_out.weight"], moon["conv_out.weight"])


def test_moon_config_runs_end_to_end(tmp_path, ports):
    from tests.test_deployment import launch

    out = tmp_path / "moon"
    records = launch(out, ports, "--config", str(TESTS_DIR.parent / "configs/moon-digits.toml"),
                     "--set", "topology.cloud_rounds=2")
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert all(r["model_updated"] for r in cloud)
    for client in range(5):
        assert "MOON term, mu = 1" in (out / "logs" / f"client-{client}.log").read_text()
