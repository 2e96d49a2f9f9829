"""Fréchet distances, the Inception (FID) path, fd_classifier and ``fedphd evaluate``.

No Inception weights exist on this machine, so the FID tests use random weights of the right
shapes, saved the way the real file is (a ``torch.save``-d state dict) and loaded through
pytorch-fid's own ``InceptionV3`` / ``fid_inception_v3``.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from pytorch_fid import inception as fid_inception

from fedphd.common.commands.evaluate import register
from fedphd.common.core.diffusion import make_noise_scheduler, save_model
from fedphd.common.core.models import build_unet, unet_config
from fedphd.common.data.datasets import load_dataset
from fedphd.common.quality import evaluation as evaluate
from fedphd.common.quality import metrics
from fedphd.common.quality.evaluation import evaluate_model
from fedphd.common.quality.metrics import (
    FID_WEIGHTS_FILE,
    InceptionWeightsUnavailable,
    Reference,
    classifier_fd,
    classifier_features,
    feature_statistics,
    fid,
    frechet_distance,
    inception_features,
    resolve_inception_weights,
    train_feature_classifier,
)
from fedphd.common.settings.config import DataConfig, ModelConfig, RunConfig


@pytest.fixture(autouse=True)
def empty_torch_hub(tmp_path, monkeypatch):
    """torch hub's cache points at an empty folder: no test sees real (or downloaded) weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def digits_array(dataset) -> np.ndarray:
    """A digits (sub)set as N x H x W x C in [0, 1], the layout of generated samples."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------- Fréchet distance


def test_distance_of_a_feature_set_to_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 6)) @ np.diag([1, 2, 3, 1, 1, 5])
    stats = feature_statistics(features)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8


def test_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Diagonal covariances commute, so (Σ1 Σ2)^{1/2} is the elementwise sqrt(var1 * var2).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    assert expected == pytest.approx(7.25 + 5.0)  # by hand: (1 + 0 + 6.25) + (4 + 1 + 0)


def test_feature_statistics_and_distance_grow_with_a_known_mean_shift():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(4000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([3, 0, -1])
    mu, sigma = feature_statistics(features)
    assert mu == pytest.approx([3, 0, -1], abs=0.1)
    assert np.diag(sigma) == pytest.approx([1.0, 4.0, 0.25], rel=0.1)
    direction = np.array([1.0, -2.0, 2.0]) / 3.0  # unit length
    values = [frechet_distance(*feature_statistics(features + shift * direction), mu, sigma)
              for shift in (0.5, 1.0, 2.0)]
    # Same covariance on both sides: only ‖shift · direction‖² = shift² remains.
    assert values == pytest.approx([0.25, 1.0, 4.0], rel=1e-6)


def test_feature_statistics_refuses_too_few_rows():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.ones((1, 4)))


# --------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Two random state dicts shaped like pt_inception-2015-12-05: torchvision's Inception v3
    with 1008 classes and no aux head, the network pytorch-fid patches (the FID blocks change
    forward passes only, not parameters)."""
    folder = tmp_path_factory.mktemp("inception")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        )
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                # He init keeps activations O(1) through ~90 ReLU layers (BatchNorm here is
                # the identity), so the random features are well-scaled numbers.
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = network.state_dict()
    first, second = folder / "random-a.pth", folder / "random-b.pth"
    torch.save(state, first)
    state["Conv2d_1a_3x3.conv.weight"] = -state["Conv2d_1a_3x3.conv.weight"]
    torch.save(state, second)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, folder / "other.pth")
    return {"a": first, "b": second, "other": folder / "other.pth"}


def test_inception_features_come_from_the_given_weights_file(inception_files, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("pytorch-fid tried to fetch its weights")

    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", no_download)
    images = np.random.default_rng(0).random((2, 16, 16, 1))
    first = inception_features(images, inception_files["a"], batch_size=1)
    again = inception_features(images, inception_files["a"])
    other = inception_features(images, inception_files["b"])

    assert first.shape == (2, 2048) and np.isfinite(first).all() and first.std() > 1e-3
    assert np.allclose(first, again)
    assert not np.allclose(first, other)  # the same network with its first kernel negated
    assert fid_inception.load_state_dict_from_url is no_download  # swap undone afterwards


def test_missing_or_wrong_inception_weights_raise_a_clear_error(inception_files, tmp_path):
    with pytest.raises(InceptionWeightsUnavailable) as missing:
        resolve_inception_weights()
    message = str(missing.value)
    assert FID_WEIGHTS_FILE in message and "--inception-weights" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / FID_WEIGHTS_FILE) in message

    with pytest.raises(InceptionWeightsUnavailable, match="does not exist"):
        resolve_inception_weights(tmp_path / "nowhere.pth")
    with pytest.raises(InceptionWeightsUnavailable, match="is not pytorch-fid's Inception"):
        inception_features(np.zeros((2, 8, 8, 3)), inception_files["other"])


def test_fid_uses_torch_hubs_cache_and_caches_real_statistics(inception_files, tmp_path):
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_files["a"])
    assert resolve_inception_weights() == cached

    # dims=64 (pytorch-fid's first block) keeps this cheap; evaluation uses pool3 (2048).
    reference = Reference(DataConfig(), 16, 1, tmp_path / "cache", max_images=6)
    generated = np.random.default_rng(0).random((4, 16, 16, 1))
    value = fid(generated, reference, cached, dims=64)
    stats = list((tmp_path / "cache").glob("inception64-digits-16px-1ch-*-stats.npz"))
    assert math.isfinite(value) and value > 0 and len(stats) == 1
    with np.load(stats[0], allow_pickle=False) as arrays:
        assert arrays["mu"].shape == (64,) and int(arrays["count"]) == 6
    assert fid(generated, reference, inception_files["a"], dims=64) == value  # cached stats
    assert fid(generated, reference, inception_files["b"], dims=64) != value  # new weights


# ---------------------------------------------------------------------------- fd_classifier


def test_classifier_fd_separates_held_out_real_digits_from_noise_and_faded_digits():
    digits = load_dataset(DataConfig(), 16, 1)
    order = np.random.default_rng(0).permutation(len(digits))
    train, held_out = digits.subset(order[:1000]), digits.subset(order[1000:])
    classifier = train_feature_classifier(train, seed=0)

    real = feature_statistics(classifier_features(digits_array(train), classifier))
    held = digits_array(held_out)

    def distance(images: np.ndarray) -> float:
        return frechet_distance(*feature_statistics(classifier_features(images, classifier)),
                                *real)

    near = distance(held)
    faded = distance(0.25 + 0.5 * held)  # the same digits at half contrast
    noise = distance(np.random.default_rng(1).random(held.shape))
    assert near < 0.05 * min(faded, noise), (near, faded, noise)


def test_classifier_fd_is_deterministic_and_cached(tmp_path, monkeypatch):
    images = np.random.default_rng(0).random((32, 16, 16, 1)) ** 3  # dark, sparse: digit-like

    def reference(name: str) -> Reference:
        return Reference(DataConfig(), 16, 1, tmp_path / name, max_images=400)

    first = classifier_fd(images, reference("a"), epochs=3)
    assert classifier_fd(images, reference("b"), epochs=3) == first  # retrained, same seed
    cached = [path.name for path in (tmp_path / "a").iterdir()]
    assert len(cached) == 2
    assert all(name.startswith("classifier-seed0-digits-16px-1ch-") for name in cached)
    assert {name.endswith(".pt") for name in cached} == {True, False}
    assert any(name.endswith("-stats.npz") for name in cached)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(metrics, "train_feature_classifier", forbidden)
    monkeypatch.setattr(metrics, "load_dataset", forbidden)
    assert classifier_fd(images, reference("a"), epochs=3) == first
    with pytest.raises(AssertionError, match="cache was not used"):
        classifier_fd(images, reference("a"), epochs=3, seed=1)  # another key: not cached


def test_classifier_fd_handles_rgb_32px(tmp_path):
    reference = Reference(DataConfig(), 32, 3, tmp_path, max_images=200)
    value = classifier_fd(np.random.default_rng(0).random((8, 32, 32, 3)), reference, epochs=1)
    assert math.isfinite(value) and value > 0
    assert next(tmp_path.glob("classifier-seed0-digits-32px-3ch-*.pt")).is_file()


# ------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the evaluation tests, so the digits classifier is trained once."""
    return tmp_path_factory.mktemp("eval-cache")


def tiny_untrained_unet():
    return build_unet(unet_config(ModelConfig()), seed=0)


def quiet_config() -> RunConfig:
    return RunConfig.model_validate({"output": {"progress": False}})


def test_evaluate_model_without_inception_weights_reports_fd_classifier_only(shared_cache):
    result = evaluate_model(
        tiny_untrained_unet(), make_noise_scheduler(quiet_config().diffusion), quiet_config(),
        "cpu", num_samples=6, steps=2, cache_dir=shared_cache, max_real_images=600,
    )
    assert math.isfinite(result["fd_classifier"]) and result["fd_classifier"] > 0
    assert result["num_samples"] == 6 and result["sampling_steps"] == 2
    assert "fid" not in result and FID_WEIGHTS_FILE in result["fid_unavailable"]


def test_evaluate_model_adds_fid_when_weights_are_given(shared_cache, inception_files,
                                                        monkeypatch):
    calls = []

    def fid_spy(images, reference, weights, **kwargs):
        # The real fid() is tested above; pool3 FID's 2048 x 2048 matrix square root alone
        # takes tens of seconds on a CPU.
        calls.append((images.shape, reference, weights))
        return 42.5

    monkeypatch.setattr(evaluate, "fid", fid_spy)
    result = evaluate_model(
        tiny_untrained_unet(), None, quiet_config(), "cpu", num_samples=3, steps=1,
        cache_dir=shared_cache, inception_weights=inception_files["a"], max_real_images=600,
    )
    assert result["fid"] == 42.5 and "fid_unavailable" not in result
    [(shape, reference, weights)] = calls
    assert shape == (3, 16, 16, 1) and weights == inception_files["a"]
    assert (reference.data.dataset, reference.image_size, reference.channels) == ("digits", 16, 1)
    with pytest.raises(InceptionWeightsUnavailable, match="does not exist"):
        evaluate_model(tiny_untrained_unet(), None, quiet_config(), "cpu",
                       inception_weights=shared_cache / "missing.pth")


def test_evaluate_command_prints_one_json_object(shared_cache, tmp_path, capsys):
    model_dir = save_model(tiny_untrained_unet(), quiet_config().diffusion, tmp_path / "model")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["evaluate", "--model", str(model_dir), "--n", "4", "--steps", "1",
              "--cache-dir", str(shared_cache), "--max-real", "600",
              "--set", "output.progress=false",
              "--set", "training.threads=0"]  # 0 = leave torch's thread count alone

    args = parser.parse_args([*common, "--json"])
    assert args.run(args) == 0
    stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 1
    result = json.loads(stdout)
    assert math.isfinite(result["fd_classifier"]) and "fid_unavailable" in result

    args = parser.parse_args([*common, "--inception-weights", str(tmp_path / "none.pth")])
    assert args.run(args) == 2
    assert FID_WEIGHTS_FILE in capsys.readouterr().err


def test_evaluate_command_reads_the_run_folders_config(shared_cache, tmp_path, capsys):
    save_model(tiny_untrained_unet(), quiet_config().diffusion, tmp_path / "model")
    (tmp_path / "config.toml").write_text(
        '[evaluation]\nnum_samples = 3\n[diffusion]\nsampling_steps = 1\n'
        '[output]\nprogress = false\n[training]\nthreads = 0\n'
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--model", str(tmp_path / "model"), "--json",
                              "--cache-dir", str(shared_cache), "--max-real", "600"])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["num_samples"], result["sampling_steps"]) == (3, 1)
    assert str(tmp_path / "config.toml") in captured.err
