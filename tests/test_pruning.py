"""Structured pruning (FedPhD): savings, exact forward passes, rebuildable pruned models."""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib.metadata import entry_points

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from fedphd.client.fedphd import group_lasso_penalty
from fedphd.common.commands.prune import register
from fedphd.common.core.models import (
    architecture_from_json,
    architecture_of,
    architecture_to_json,
    build_unet,
    count_parameters,
    load_ndarrays,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.core.pruning import (
    PrunedUNet2DModel,
    build_model,
    load_pretrained,
    prune_unet,
    pruned_shapes,
    to_pruned_model,
)
from fedphd.common.settings.config import ConfigError, ModelConfig
from tests.conftest import fedphd


def tiny(seed: int = 0) -> UNet2DModel:
    return build_unet(unet_config(ModelConfig()), seed=seed)


def predict(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """Eval-mode noise prediction on fixed inputs of the model's size."""
    size, channels = model.config.sample_size, model.config.in_channels
    generator = torch.Generator().manual_seed(123)
    sample = torch.randn(batch, channels, size, size, generator=generator)
    timesteps = torch.tensor([3, 700, 42, 999][:batch])
    model.eval()
    with torch.no_grad():
        return model(sample, timesteps).sample


@pytest.fixture(scope="module")
def reference():
    """The 35.75 M reference U-Net pruned once at ratio 0.2 (the CIFAR-10 setting)."""
    model = build_unet(unet_config(ModelConfig(preset="ddpm-cifar10")), seed=0)
    started = time.perf_counter()
    report = prune_unet(model, 0.2)
    return model, report, time.perf_counter() - started


@pytest.fixture(scope="module")
def pruned_tiny() -> PrunedUNet2DModel:
    model = tiny()
    prune_unet(model, 0.3)
    return to_pruned_model(model).eval()


# --- the reference U-Net ---------------------------------------------------------------------


def test_ratio_0_2_removes_42_to_45_percent_of_the_reference_unet(reference):
    model, report, seconds = reference
    assert report.params_before == 35_746_307
    assert report.params_after == count_parameters(model)
    assert 0.42 <= report.param_reduction <= 0.45
    assert report.macs_after < report.macs_before
    assert 0.40 <= report.mac_reduction <= 0.47
    assert seconds < 120


def test_pruned_reference_unet_runs_at_its_size(reference):
    model, _, _ = reference
    out = predict(model)
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all()


def test_attention_heads_resamplers_and_group_norms_stay_consistent(reference):
    model, _, _ = reference
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions
    for attn in attentions:
        width = attn.to_q.out_features
        head_dim = width // attn.heads
        assert attn.heads == 32  # 256 channels / attention_head_dim 8: heads are kept whole
        assert attn.heads * head_dim == width == attn.inner_dim < 256
        assert attn.to_k.out_features == attn.to_v.out_features == attn.to_out[0].in_features
        assert attn.query_dim == attn.to_q.in_features == attn.to_out[0].out_features
        assert attn.scale == pytest.approx(head_dim**-0.5)
    resamplers = [m for m in model.modules() if isinstance(m, Downsample2D | Upsample2D)]
    assert resamplers
    for module in resamplers:
        assert module.channels == module.conv.in_channels < 256
        assert module.out_channels == module.conv.out_channels
    for norm in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_groups == 32 and norm.num_channels % 32 == 0


def test_reference_pruned_architecture_rebuilds_at_the_pruned_size(reference):
    model, report, _ = reference
    arch = architecture_from_json(
        json.dumps({**architecture_of(model), "pruned_shapes": pruned_shapes(model)})
    )
    rebuilt = build_model(arch)
    assert isinstance(rebuilt, PrunedUNet2DModel)
    assert count_parameters(rebuilt) == report.params_after
    rebuilt_shapes = {name: p.shape for name, p in rebuilt.named_parameters()}
    assert rebuilt_shapes == {name: p.shape for name, p in model.named_parameters()}


# --- tiny U-Net: what pruning does and does not change ----------------------------------------


def test_zero_ratio_changes_nothing():
    model = tiny()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    expected = predict(model)
    report = prune_unet(model, 0.0)
    assert report.params_after == report.params_before == count_parameters(model)
    assert report.macs_after == report.macs_before
    assert pruned_shapes(model) == {}
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(predict(model), expected)


def test_pruning_is_deterministic_and_keeps_the_training_mode():
    first, second = tiny(seed=5), tiny(seed=5)
    first.train()
    rng = torch.get_rng_state()
    prune_unet(first, 0.3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream did not move
    assert first.training
    prune_unet(second, 0.3)
    assert pruned_shapes(first) == pruned_shapes(second)
    assert torch.equal(predict(first), predict(second))


def test_round_to_keeps_pruned_widths_multiples_of_it():
    plain, rounded = tiny(), tiny()
    prune_unet(plain, 0.3)
    report = prune_unet(rounded, 0.3, round_to=8)
    assert plain.time_embedding.linear_1.out_features % 8 != 0  # what rounding has to fix
    widths = [m.out_channels for m in rounded.modules() if isinstance(m, nn.Conv2d)]
    widths += [m.out_features for m in rounded.modules() if isinstance(m, nn.Linear)]
    widths.remove(rounded.conv_out.out_channels)
    assert all(width % 8 == 0 for width in widths)
    assert report.param_reduction > 0.5  # rounding must not cancel the pruning
    assert predict(rounded).shape == (2, 1, 16, 16)


# --- pruned models are config-driven ----------------------------------------------------------


def test_architecture_json_rebuilds_a_bit_identical_pruned_model(pruned_tiny):
    arch = architecture_of(pruned_tiny)
    assert arch["pruned_shapes"]
    assert json.loads(json.dumps(arch)) == arch
    rebuilt = PrunedUNet2DModel(**json.loads(json.dumps(arch)))
    rebuilt.load_state_dict(pruned_tiny.state_dict())
    assert torch.equal(predict(rebuilt), predict(pruned_tiny))
    assert architecture_of(rebuilt) == arch


def test_to_pruned_model_keeps_the_pruned_weights_and_outputs():
    model = tiny()
    prune_unet(model, 0.3)
    pruned = to_pruned_model(model)
    assert torch.equal(predict(pruned), predict(model))
    assert pruned_shapes(pruned) == architecture_of(pruned)["pruned_shapes"]


def test_save_pretrained_round_trip_is_bit_identical(pruned_tiny, tmp_path):
    pruned_tiny.save_pretrained(tmp_path)
    loaded = PrunedUNet2DModel.from_pretrained(tmp_path)
    assert torch.equal(predict(loaded), predict(pruned_tiny))
    assert architecture_of(loaded) == architecture_of(pruned_tiny)
    assert torch.equal(predict(load_pretrained(tmp_path)), predict(pruned_tiny))


def test_weights_survive_the_wire_into_a_model_rebuilt_from_json(pruned_tiny):
    arch = architecture_from_json(architecture_to_json(architecture_of(pruned_tiny)))
    receiver = build_model(arch)
    assert not torch.equal(predict(receiver), predict(pruned_tiny))  # fresh weights differ
    load_ndarrays(receiver, model_to_ndarrays(pruned_tiny))
    assert torch.equal(predict(receiver), predict(pruned_tiny))


def test_build_model_gives_a_plain_unet_without_pruned_shapes():
    arch = unet_config(ModelConfig())
    assert type(build_model(arch)) is UNet2DModel
    assert type(build_model({**arch, "pruned_shapes": {}})) is UNet2DModel


def test_pruned_architecture_builds_reproducible_weights(pruned_tiny):
    arch = architecture_of(pruned_tiny)
    torch.manual_seed(7)
    first = build_model(arch)
    torch.manual_seed(7)
    second = build_model(arch)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"pruning\.ratio"):
        prune_unet(tiny(), ratio)


def test_unknown_module_in_pruned_shapes_is_named(pruned_tiny):
    arch = architecture_of(pruned_tiny)
    bad = {**arch["pruned_shapes"], "down_blocks.7.conv9": {"attrs": {"out_channels": 3}}}
    with pytest.raises(ValueError, match=r"down_blocks\.7\.conv9"):
        PrunedUNet2DModel(**{**arch, "pruned_shapes": bad})
    with pytest.raises(ValueError, match=r"down_blocks\.7\.conv9"):
        build_model({**arch, "pruned_shapes": bad})


def test_pruned_shapes_larger_than_the_unpruned_layer_are_refused():
    arch = unet_config(ModelConfig())
    bad = {"conv_in": {"params": {"bias": [1000]}}}
    with pytest.raises(ValueError, match=r"conv_in\.bias"):
        PrunedUNet2DModel(**arch, pruned_shapes=bad)


# --- group lasso ------------------------------------------------------------------------------


def test_group_lasso_penalty_matches_a_hand_computation_and_has_gradient():
    conv = nn.Conv2d(2, 3, kernel_size=2)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24, dtype=torch.float32).view(3, 2, 2, 2) - 10)
    rows = conv.weight.detach().view(3, 8).tolist()
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    lam = 1e-3
    penalty = group_lasso_penalty(nn.Sequential(conv), lam)
    assert penalty.item() == pytest.approx(lam * sum(norms), rel=1e-6)
    penalty.backward()
    # d/dW[c] of lam * ||W[c]|| is lam * W[c] / ||W[c]||
    expected = torch.tensor(
        [[lam * v / n for v in row] for row, n in zip(rows, norms, strict=True)]
    )
    assert torch.allclose(conv.weight.grad.view(3, 8), expected)


def test_group_lasso_penalty_leaves_conv_out_alone():
    model = tiny()
    base = group_lasso_penalty(model, 1e-5).item()
    with torch.no_grad():
        model.conv_out.weight.mul_(10)
    assert group_lasso_penalty(model, 1e-5).item() == base
    with torch.no_grad():
        model.conv_in.weight.mul_(10)
    assert group_lasso_penalty(model, 1e-5).item() > base


def _train(lam: float) -> float:
    """Fit a small conv net to a fixed target; return the sum of its channel norms."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))
    data, target = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(data), target) + group_lasso_penalty(net, lam)
        loss.backward()
        optimizer.step()
    return float(net[0].weight.detach().flatten(1).norm(dim=1).sum())


def test_sparse_training_shrinks_channel_norms():
    assert _train(lam=0.05) < 0.9 * _train(lam=0.0)


# --- the prune command ------------------------------------------------------------------------


def _run_prune(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedphd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prune", *argv])
    return args.run(args)


def test_prune_command_prints_the_counts_as_json(capsys):
    assert _run_prune("--preset", "tiny", "--ratio", "0.3", "--json") == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"params_before", "params_after", "macs_before", "macs_after"}
    assert counts["params_after"] < counts["params_before"]
    assert counts["macs_after"] < counts["macs_before"]


def test_prune_command_saves_a_loadable_model_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _run_prune("--set", "pruning.ratio=0.3", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "MACs" in text
    loaded = load_pretrained(out)
    assert isinstance(loaded, PrunedUNet2DModel)
    expected = tiny()
    prune_unet(expected, 0.3)
    assert torch.equal(predict(loaded), predict(expected))


def test_prune_command_refuses_a_bad_ratio_as_a_config_error():
    with pytest.raises(ConfigError, match=r"pruning\.ratio"):
        _run_prune("--ratio", "1.2")


@pytest.mark.skipif(
    "prune" not in {e.name for e in entry_points(group="fedphd.commands")},
    reason="fedphd.commands has no 'prune' entry point yet (pyproject.toml)",
)
def test_real_prune_command_runs():
    result = fedphd("prune", "--preset", "tiny", "--ratio", "0.3", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["params_after"] < counts["params_before"]
