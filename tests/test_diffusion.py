import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

from fedphd.common.core.diffusion import (
    AUTOCAST_DTYPES,
    DiffusionTrainer,
    endless_batches,
    load_model,
    make_noise_scheduler,
    sample_images,
    save_model,
)
from fedphd.common.core.models import build_unet, unet_config
from fedphd.common.data.datasets import load_dataset
from fedphd.common.settings.config import DataConfig, DiffusionConfig, ModelConfig, TrainingConfig


def tiny_model(seed: int = 0) -> UNet2DModel:
    return build_unet(unet_config(ModelConfig()), seed=seed)


def test_training_on_digits_lowers_the_loss():
    torch.manual_seed(0)
    data = load_dataset(DataConfig(), 16, 1)
    cfg = TrainingConfig(lr=1e-3, batch_size=32, warmup_steps=5, seed=0)
    trainer = DiffusionTrainer(
        tiny_model(), make_noise_scheduler(DiffusionConfig()), cfg, torch.device("cpu")
    )
    losses = trainer.train(endless_batches(data, 32, 0, torch.device("cpu")), 60)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert trainer.steps_done == 60
    assert last < 0.6 * first, (first, last)


def test_warmup_ramps_the_learning_rate():
    cfg = TrainingConfig(lr=1e-3, warmup_steps=10)
    trainer = DiffusionTrainer(
        tiny_model(), make_noise_scheduler(DiffusionConfig()), cfg, torch.device("cpu")
    )
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-4
    batch = torch.randn(4, 1, 16, 16)
    for _ in range(12):
        trainer.train_step(batch)
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3


def test_gradients_are_clipped():
    cfg = TrainingConfig(lr=1e-3, grad_clip=1e-6, warmup_steps=0)
    model = tiny_model()
    trainer = DiffusionTrainer(model, make_noise_scheduler(DiffusionConfig()), cfg,
                               torch.device("cpu"))
    norms = []

    def record(_optimizer, _args, _kwargs):
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    trainer.optimizer.register_step_pre_hook(record)
    trainer.train_step(torch.randn(4, 1, 16, 16))
    assert norms[0] <= 1e-6 * 1.01


def test_ddim_samples_have_the_right_shape_and_are_finite():
    images = sample_images(tiny_model(), DiffusionConfig(), 5, seed=1, batch_size=3, steps=4)
    assert images.shape == (5, 16, 16, 1)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_sampling_is_deterministic_in_the_seed():
    model, cfg = tiny_model(), DiffusionConfig()
    a = sample_images(model, cfg, 2, seed=7, steps=3)
    b = sample_images(model, cfg, 2, seed=7, steps=3)
    c = sample_images(model, cfg, 2, seed=8, steps=3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_saved_model_reloads_in_diffusers_and_gives_the_same_output(tmp_path):
    cfg = DiffusionConfig(beta_end=0.03)
    model = tiny_model(seed=4).eval()  # from_pretrained returns a model in eval mode
    save_model(model, cfg, tmp_path / "model")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "model", subfolder="unet")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, reloaded(x, t).sample)
    # The noise schedule is saved in scheduler/ beside unet/ and loads with its class.
    schedule = DDPMScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler")
    assert schedule.config.beta_end == 0.03
    _, scheduler = load_model(tmp_path / "model")
    assert scheduler.config.num_train_timesteps == cfg.num_train_timesteps
    # And diffusers' own pipeline runs it.
    pipeline = DDIMPipeline(unet=reloaded, scheduler=make_noise_scheduler(cfg))
    out = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_in_the_low_dtype_and_keeps_fp32_weights(precision):
    """The forward pass runs in bf16/fp16 (seen by a hook), the loss falls, the weights (the
    answer) stay finite fp32, and fp16's loss scale is part of the trainer's state. Few
    steps: this CPU has no fast bf16/fp16 kernels (a step costs ~10x fp32's)."""
    data = load_dataset(DataConfig(), 16, 1)
    cfg = TrainingConfig(lr=3e-3, batch_size=16, warmup_steps=1, seed=0,
                         mixed_precision=precision)
    model = tiny_model()
    seen: list[torch.dtype] = []
    model.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = DiffusionTrainer(model, make_noise_scheduler(DiffusionConfig()), cfg,
                               torch.device("cpu"))
    losses = trainer.train(endless_batches(data, 16, 0, torch.device("cpu")), 6)
    assert set(seen) == {AUTOCAST_DTYPES[precision]}
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    state = trainer.state_dict()
    assert bool(state["scaler"]) == (precision == "fp16")
    again = DiffusionTrainer(tiny_model(), make_noise_scheduler(DiffusionConfig()), cfg,
                             torch.device("cpu"))
    again.load_state_dict(state)
    assert again.scaler.state_dict() == state["scaler"]


def test_without_mixed_precision_the_forward_pass_is_fp32():
    model = tiny_model()
    seen: list[torch.dtype] = []
    model.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = DiffusionTrainer(model, make_noise_scheduler(DiffusionConfig()),
                               TrainingConfig(), torch.device("cpu"))
    trainer.train_step(torch.randn(4, 1, 16, 16))
    assert seen == [torch.float32] and not trainer.scaler.is_enabled()
