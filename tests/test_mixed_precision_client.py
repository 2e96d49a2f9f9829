"""``training.mixed_precision`` seen from the protocol: a real ``DiffusionClient`` fits in bf16
on this CPU, its answer trains the model (the fixed-noise loss of the weights it sends falls),
is finite, and has exactly the format of an fp32 client's answer; and the client moves its
model to the device once, not per step.

Few steps on purpose: this CPU has no fast bf16 kernels (an autocast step costs ~10x fp32's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from fedphd.client.client import DiffusionClient, local_data
from fedphd.common.core.diffusion import AUTOCAST_DTYPES, ddpm_loss, make_noise_scheduler
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    load_ndarrays,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.federation.instructions import client_instruction
from fedphd.common.settings.config import RunConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import LOCAL_STEPS_KEY, LOSS_METRIC, ROUND_KEY
from fedphd.common.wire.transport import Code, FitIns, FitRes

STEPS = 4
# A high learning rate and no warm-up, so that four steps move the loss well clear of noise.
SETTINGS = ["topology.clients=4", "training.batch_size=8", "training.lr=3e-3",
            "training.warmup_steps=1"]


def config(precision: str) -> RunConfig:
    return load_config(None, [*SETTINGS, f"training.mixed_precision={precision}"])


def initial_model(cfg: RunConfig) -> torch.nn.Module:
    return build_unet(unet_config(cfg.model), seed=cfg.seed)


def instruction(cfg: RunConfig, steps: int = STEPS, round_number: int = 1) -> FitIns:
    """What a server sends: the run's initial weights, fp32 on the wire, and its keys."""
    model = initial_model(cfg)
    keys = client_instruction(cfg, architecture_to_json(architecture_of(model)))
    return FitIns(codec.encode(model_to_ndarrays(model), "fp32"),
                  {**keys, LOCAL_STEPS_KEY: steps, ROUND_KEY: round_number})


def new_client(cfg: RunConfig, state_dir: Path) -> DiffusionClient:
    return DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"), state_dir)


def fit(precision: str, state_dir: Path) -> tuple[FitRes, list[torch.dtype]]:
    """One bf16/fp32 fit and the dtypes the U-Net's first convolution produced meanwhile."""
    cfg = config(precision)
    client = new_client(cfg, state_dir)
    seen: list[torch.dtype] = []
    original = client.local.rebuild

    def rebuild_and_watch(arch_json: str) -> None:
        # The client builds its model on the first instruction: watch that model.
        original(arch_json)
        client.local.model.conv_in.register_forward_hook(
            lambda _m, _i, out: seen.append(out.dtype))

    client.local.rebuild = rebuild_and_watch
    res = client.fit(instruction(cfg))
    assert res.status.code == Code.OK, res.status.message
    return res, seen


def fixed_noise_loss(cfg: RunConfig, arrays: list[np.ndarray], images: torch.Tensor) -> float:
    """The fp32 DDPM loss of these weights with the same noise and timesteps every call."""
    model = initial_model(cfg)
    load_ndarrays(model, arrays)
    model.eval()
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(ddpm_loss(model, make_noise_scheduler(cfg.diffusion), images, generator))


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict[str, tuple[FitRes, list[torch.dtype]]]:
    """A bf16 client's answer and an fp32 client's, to the same instruction."""
    return {precision: fit(precision, tmp_path_factory.mktemp(precision))
            for precision in ("bf16", "no")}


def test_a_bf16_client_trains_in_bf16_and_its_answer_lowers_the_loss(answers):
    res, seen = answers["bf16"]
    assert len(seen) == STEPS and set(seen) == {AUTOCAST_DTYPES["bf16"]}
    cfg = config("bf16")
    sent = codec.decode(res.parameters)
    assert all(np.isfinite(array).all() for array in sent)
    assert np.isfinite(res.metrics[LOSS_METRIC])
    # Judged on the weights sent, on images and noise the client did not draw in that order.
    data = local_data(cfg, 0).dataset
    images = torch.stack([data[i][0] for i in range(32)])
    before = fixed_noise_loss(cfg, model_to_ndarrays(initial_model(cfg)), images)
    after = fixed_noise_loss(cfg, sent, images)
    assert after < 0.8 * before, (before, after)


def test_a_bf16_answer_has_exactly_the_format_of_an_fp32_answer(answers):
    (low, seen_low), (full, seen_full) = answers["bf16"], answers["no"]
    assert set(seen_full) == {torch.float32} and set(seen_low) == {torch.bfloat16}
    assert low.parameters.tensor_type == full.parameters.tensor_type
    assert len(low.parameters.tensors) == len(full.parameters.tensors)
    low_arrays, full_arrays = codec.decode(low.parameters), codec.decode(full.parameters)
    assert [(a.dtype, a.shape) for a in low_arrays] == [(a.dtype, a.shape) for a in full_arrays]
    assert {a.dtype for a in low_arrays} == {np.dtype(np.float32)}
    # Raw bytes per tensor too: the same header, so the same length.
    assert [len(t) for t in low.parameters.tensors] == [len(t) for t in full.parameters.tensors]
    assert low.num_examples == full.num_examples
    assert sorted(low.metrics) == sorted(full.metrics)
    assert {k: type(v) for k, v in low.metrics.items()} == \
        {k: type(v) for k, v in full.metrics.items()}
    # Different training, so different weights: the bf16 answer is not the fp32 one relabelled.
    assert any(not np.array_equal(a, b) for a, b in zip(low_arrays, full_arrays, strict=True))


def test_the_model_goes_to_the_device_once_not_per_step(tmp_path, monkeypatch):
    """``Module.to`` on the client's U-Net: once when the first instruction builds it, never
    again in later rounds however many steps they take (batches travel, the model stays)."""
    cfg = config("no")
    client = new_client(cfg, tmp_path)
    # Built first: building the server's model is not the client's business.
    rounds = [instruction(cfg, steps, number) for number, steps in enumerate((1, 1, 3), 1)]
    moves: list[str] = []
    original_to = torch.nn.Module.to

    def counting_to(module: torch.nn.Module, *args, **kwargs):
        if isinstance(module, UNet2DModel):
            moves.append(type(module).__name__)
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", counting_to)
    for number, ins in enumerate(rounds):
        res = client.fit(ins)
        assert res.status.code == Code.OK, res.status.message
        if number == 0:
            assert moves == ["UNet2DModel"]  # the model the first instruction built
    assert moves == ["UNet2DModel"]
