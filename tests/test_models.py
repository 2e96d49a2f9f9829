import numpy as np
import pytest
import torch

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
from fedphd.common.settings.config import ModelConfig


def test_reference_cifar10_unet_has_35_75m_parameters():
    model = build_unet(unet_config(ModelConfig(preset="ddpm-cifar10")))
    assert count_parameters(model) == 35_746_307


def test_celeba_preset_uses_the_cifar_blocks_at_64px():
    arch = unet_config(ModelConfig(preset="celeba64"))
    assert arch["sample_size"] == 64
    assert arch["block_out_channels"] == [128, 256, 256, 256]


def test_overrides_change_the_architecture():
    arch = unet_config(ModelConfig(preset="tiny", in_channels=3, block_out_channels=[16, 32, 32]))
    model = build_unet(arch)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 500])).sample
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="model.block_out_channels"):
        unet_config(ModelConfig(preset="tiny", block_out_channels=[16, 32]))


def test_architecture_json_rebuilds_the_same_model():
    model = build_unet(unet_config(ModelConfig()), seed=3)
    rebuilt = build_unet(architecture_from_json(architecture_to_json(architecture_of(model))))
    load_ndarrays(rebuilt, model_to_ndarrays(model))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, rebuilt(x, t).sample)


def test_seeded_initialisation_is_reproducible():
    arch = unet_config(ModelConfig())
    first, second = build_unet(arch, seed=1), build_unet(arch, seed=1)
    other = build_unet(arch, seed=2)
    a, b, c = model_to_ndarrays(first), model_to_ndarrays(second), model_to_ndarrays(other)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_exported_arrays_are_snapshots_not_views():
    model = build_unet(unet_config(ModelConfig()), seed=0)
    before = model_to_ndarrays(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not np.array_equal(before[0], model_to_ndarrays(model)[0])


def test_loading_refuses_wrong_count_and_shape():
    model = build_unet(unet_config(ModelConfig()))
    arrays = model_to_ndarrays(model)
    with pytest.raises(ValueError, match="expected .* tensors"):
        load_ndarrays(model, arrays[:-1])
    arrays[0] = np.zeros((1, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="expected shape"):
        load_ndarrays(model, arrays)
