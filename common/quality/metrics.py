"""Sample-quality metrics: Fréchet distances between real and generated image features.

Both metrics fit a Gaussian to each feature set and report the Fréchet (2-Wasserstein)
distance between the two Gaussians,

    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}),

computed by pytorch-fid's ``calculate_frechet_distance``. They differ in the feature space:

* ``fid`` — pytorch-fid's ``InceptionV3`` pool3 features (2048-d) with the TF-ported weights
  ``pt_inception-2015-12-05-6726825d.pth``: the FID of the literature. The weights are never
  downloaded at run time; they come from a local file or from torch hub's cache, and
  ``InceptionWeightsUnavailable`` says how to get them when neither has them.
* ``fd_classifier`` — the penultimate-layer features (64-d) of a small CNN trained, with a
  fixed seed, on the real training images of the run's data set. Offline and fast, but its
  values are only comparable between runs on the same data set, image size, channel count
  and classifier seed. It is not FID and never reported as FID.

Real-image statistics (and the trained classifier) are computed once per data set and
cached on disk as ``.npz`` arrays and ``torch.save``-d state dicts, read back with
``allow_pickle=False`` / ``weights_only=True``: nothing in the cache is ever unpickled.

Every image array here is ``N x H x W x C`` float in [0, 1] (what ``sample_images`` returns).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedphd.common.data.datasets import load_dataset
from fedphd.common.settings.config import DataConfig
from fedphd.common.settings.runtime import progress_bar

log = logging.getLogger("fedphd.metrics")

# Bump when the classifier, its training or the statistics change: old cache files are then
# ignored instead of being compared with new ones.
CACHE_VERSION = 1
FID_WEIGHTS_FILE = os.path.basename(urlparse(FID_WEIGHTS_URL).path)
FID_DIMS = 2048
DEFAULT_MAX_REAL = 50_000  # real images per statistic, the usual FID reference size
CLASSIFIER_SEED = 0  # fixed, so every run on a data set is scored by the same classifier
CLASSIFIER_EPOCHS = 10
CLASSIFIER_FEATURES = 64

Stats = tuple[np.ndarray, np.ndarray]


class InceptionWeightsUnavailable(RuntimeError):
    """pytorch-fid's Inception weights are not on this machine (or a file is not them)."""


class FrechetDistanceError(ValueError):
    """The matrix square root came out complex: too few samples for the feature width."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedphd/evaluation`` (``~/.cache/fedphd/evaluation`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedphd" / "evaluation"


# --------------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: np.ndarray) -> Stats:
    """``μ = (1/N) Σ_i f_i`` and the unbiased covariance ``Σ = 1/(N−1) Σ_i (f_i−μ)(f_i−μ)ᵀ``.

    The same estimators as pytorch-fid (``np.mean``, ``np.cov(rowvar=False)``), in float64.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an N x D feature array with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``, by pytorch-fid's implementation.

    Raises ``FrechetDistanceError`` where pytorch-fid finds a large imaginary part in
    ``(Σ1 Σ2)^{1/2}`` (rank-deficient covariances: fewer samples than feature dimensions).
    """
    # pytorch-fid prints (to stdout) when it regularises a singular product, and SciPy warns;
    # stdout may be carrying `fedphd evaluate --json`, so both go to the debug log instead.
    notes = io.StringIO()
    with contextlib.redirect_stdout(notes), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
        except ValueError as error:
            raise FrechetDistanceError(
                f"the Fréchet distance is undefined here ({error}): the covariances of "
                f"{len(mu1)}-dimensional features are too rank-deficient; use more samples"
            ) from None
    for note in [notes.getvalue().strip(), *(str(w.message) for w in caught)]:
        if note:
            log.debug("pytorch-fid: %s", note)
    return float(value)


# ----------------------------------------------------------------------------- real images


@dataclass(frozen=True)
class Reference:
    """The real images generated ones are compared with, and where their statistics live.

    ``max_images`` caps the real set with a fixed random subset of the training split (all of
    it when smaller); it is part of every cache key, as are the data set, size and channels.
    """

    data: DataConfig
    image_size: int
    channels: int
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_images: int = DEFAULT_MAX_REAL

    def cache_path(self, kind: str, suffix: str, **identity: object) -> Path:
        """``<cache_dir>/<kind>-<dataset>-<size>px-<C>ch-<hash><suffix>``; the hash covers
        everything that changes the cached content (``identity`` adds metric settings)."""
        key: dict[str, object] = {
            "version": CACHE_VERSION, "kind": kind, "dataset": self.data.dataset,
            "image_size": self.image_size, "channels": self.channels,
            "max_images": self.max_images, **identity,
        }
        if self.data.dataset != "digits":  # the bundled digits do not depend on data.root
            key["root"] = str(Path(self.data.root).expanduser().resolve())
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{kind}-{self.data.dataset}-{self.image_size}px-{self.channels}ch-{digest}"
        return Path(self.cache_dir) / f"{name}{suffix}"

    def dataset(self) -> Dataset:
        """The training split, or a seeded random ``max_images`` subset of it."""
        images = load_dataset(self.data, self.image_size, self.channels, "train")
        if len(images) <= self.max_images:
            return images
        chosen = np.random.default_rng(0).choice(len(images), self.max_images, replace=False)
        return images.subset(np.sort(chosen))


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as sink:
            write(sink)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _save_stats(path: Path, stats: Stats, count: int) -> None:
    _atomic_write(path, lambda sink: np.savez(sink, mu=stats[0], sigma=stats[1], count=count))


def _load_stats(path: Path) -> Stats:
    with np.load(path, allow_pickle=False) as arrays:
        return arrays["mu"], arrays["sigma"]


def _cached_stats(path: Path, compute: Callable[[], np.ndarray]) -> Stats:
    """Statistics from ``path``, or of ``compute()``'s features (then saved to ``path``)."""
    if path.is_file():
        log.debug("real statistics from %s", path)
        return _load_stats(path)
    features = compute()
    stats = feature_statistics(features)
    _save_stats(path, stats, len(features))
    log.info("real statistics of %d images cached in %s", len(features), path)
    return stats


# ------------------------------------------------------------------------ feature extraction


def _check_images(images: np.ndarray, channels: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(
            f"expected N x H x W x {channels} images in [0, 1], got shape {images.shape}"
        )
    if len(images) < 2:
        raise ValueError("a Fréchet distance needs at least 2 generated images")
    return images


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """``N x H x W x C`` [0, 1] arrays as ``B x C x H x W`` float tensors."""
    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2).clamp(0.0, 1.0)


def _dataset_batches(dataset: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    """A data set's [-1, 1] training tensors mapped back onto [0, 1], in order."""
    for images, _labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield ((images + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def _extract(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    total: int,
    device: torch.device | str,
    desc: str,
    show_progress: bool,
) -> np.ndarray:
    """Run ``encode`` over every batch on ``device``; features as an ``N x D`` float64 array."""
    chunks = []
    with progress_bar(total, desc, show_progress) as bar:
        for batch in batches:
            chunks.append(encode(batch.to(device)).double().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(chunks, axis=0)


# ---------------------------------------------------------------------------------- Inception


def hub_weights_path() -> Path:
    """Where torch hub keeps pytorch-fid's download (``$TORCH_HOME/hub/checkpoints/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _how_to_get_weights() -> str:
    return (
        f"Download {FID_WEIGHTS_URL} on a machine with internet access, then either copy it to "
        f"{hub_weights_path()} (torch hub's cache, which pytorch-fid reads; set TORCH_HOME to "
        "move it) or pass its path with --inception-weights FILE "
        "(evaluate_model(..., inception_weights=FILE))."
    )


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file to use: ``path`` when given, else torch hub's cached copy.

    Only checks that the file exists; nothing is downloaded. Raises
    ``InceptionWeightsUnavailable`` (saying where to put which file) when there is none.
    """
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsUnavailable(
            f"Inception weights file {path} does not exist. " + _how_to_get_weights()
        )
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    raise InceptionWeightsUnavailable(
        f"FID needs pytorch-fid's Inception weights {FID_WEIGHTS_FILE} (about 92 MB); they are "
        f"not in torch hub's cache ({cached}) and no weights file was given, and they are "
        "never downloaded at run time. " + _how_to_get_weights()
    )


_LOADER_SWAP = threading.Lock()


@contextlib.contextmanager
def _pytorch_fid_reads(path: Path) -> Iterator[None]:
    """Make pytorch-fid's ``load_state_dict_from_url(FID_WEIGHTS_URL)`` read ``path`` instead.

    ``fid_inception_v3()`` builds the patched torchvision Inception and fills it through that
    one module-level name; swapping only it keeps the library's architecture and its strict
    ``load_state_dict``, loads with ``weights_only=True`` and leaves no way to download.
    """

    def load_local(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        if url != FID_WEIGHTS_URL:
            raise InceptionWeightsUnavailable(f"pytorch-fid asked for {url}, not {FID_WEIGHTS_URL}")
        return torch.load(path, map_location="cpu", weights_only=True)

    with _LOADER_SWAP:
        original = fid_inception.load_state_dict_from_url
        fid_inception.load_state_dict_from_url = load_local
        try:
            yield
        finally:
            fid_inception.load_state_dict_from_url = original


@functools.lru_cache(maxsize=2)
def _inception(path: str, stamp: tuple[int, int], device: str, dims: int) -> InceptionV3:
    # ``stamp`` (mtime, size) makes a replaced file load again instead of hitting the cache.
    try:
        with _pytorch_fid_reads(Path(path)):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except InceptionWeightsUnavailable:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InceptionWeightsUnavailable(
            f"{path} is not pytorch-fid's Inception weights file ({reason}). "
            + _how_to_get_weights()
        ) from None
    return model.to(device).eval()


def load_fid_inception(
    weights: str | Path, device: torch.device | str = "cpu", dims: int = FID_DIMS
) -> InceptionV3:
    """pytorch-fid's ``InceptionV3`` with the weights in ``weights``, in eval mode, returning
    the block of ``dims`` features (2048 = pool3, the FID standard; 64/192/768 = earlier).

    Built by pytorch-fid itself (``InceptionV3`` → ``fid_inception_v3``); only the file it
    reads is redirected. A file that is missing or holds other tensors raises
    ``InceptionWeightsUnavailable``.
    """
    path = resolve_inception_weights(weights)
    info = path.stat()
    return _inception(
        str(path.resolve()), (info.st_mtime_ns, info.st_size), str(device), _check_dims(dims)
    )


@functools.lru_cache(maxsize=4)
def _sha256(path: str, stamp: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_digest(path: Path) -> str:
    info = path.stat()
    return _sha256(str(path.resolve()), (info.st_mtime_ns, info.st_size))[:16]


def _inception_encoder(model: InceptionV3) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            # pytorch-fid reads every image with PIL's .convert("RGB"): grey is replicated.
            images = images.expand(-1, 3, -1, -1)
        # InceptionV3 resizes to 299 x 299 and maps [0, 1] to [-1, 1] itself.
        features = model(images)[0]
        if features.shape[2:] != (1, 1):
            # The blocks before pool3 are feature maps; pytorch-fid's get_activations
            # averages them over space the same way.
            features = F.adaptive_avg_pool2d(features, (1, 1))
        return features.flatten(1)

    return encode


def _check_dims(dims: int) -> int:
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}")
    return dims


def inception_features(
    images: np.ndarray,
    weights: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 50,
    dims: int = FID_DIMS,
    show_progress: bool = False,
) -> np.ndarray:
    """Inception features (``N x dims``; pool3 by default) of ``N x H x W x C`` images in
    [0, 1] (C = 1 or 3)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected N x H x W x 1 or 3 images in [0, 1], got {images.shape}")
    encode = _inception_encoder(load_fid_inception(weights, device, dims))
    return _extract(encode, _array_batches(images, batch_size), len(images), device,
                    "inception features", show_progress)


def real_inception_statistics(
    reference: Reference,
    weights: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 50,
    dims: int = FID_DIMS,
    show_progress: bool = False,
) -> Stats:
    """Inception ``(μ, Σ)`` of the real images, computed once per data set, weights file
    (by content) and ``dims``."""
    weights = resolve_inception_weights(weights)
    path = reference.cache_path(f"inception{dims}", "-stats.npz",
                                weights=_weights_digest(weights), dims=dims)

    def compute() -> np.ndarray:
        dataset = reference.dataset()
        encode = _inception_encoder(load_fid_inception(weights, device, dims))
        return _extract(encode, _dataset_batches(dataset, batch_size), len(dataset), device,
                        "inception features (real)", show_progress)

    return _cached_stats(path, compute)


def fid(
    images: np.ndarray,
    reference: Reference,
    weights: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 50,
    dims: int = FID_DIMS,
    show_progress: bool = False,
) -> float:
    """FID: the Fréchet distance of Inception statistics (pool3 unless ``dims`` says
    otherwise), generated vs real.

    With fewer samples than ``dims`` the covariance is rank-deficient: the value is biased
    upwards (FID falls as N grows), so compare runs only at equal N; papers use 10k-50k.
    Computing ``(Σ_r Σ_g)^{1/2}`` for 2048 x 2048 matrices takes tens of seconds on a CPU.
    """
    images = _check_images(images, reference.channels)
    if len(images) <= dims:
        log.warning("FID from %d samples of %d-d features is biased upwards; compare runs "
                    "only at equal sample counts", len(images), dims)
    real = real_inception_statistics(reference, weights, device=device, batch_size=batch_size,
                                     dims=dims, show_progress=show_progress)
    generated = feature_statistics(
        inception_features(images, weights, device=device, batch_size=batch_size, dims=dims,
                           show_progress=show_progress)
    )
    return frechet_distance(*generated, *real)


# ------------------------------------------------------------------ classifier feature space


class FeatureClassifier(nn.Module):
    """A small CNN for the offline stand-in: three 3x3 conv stages → global average pool →
    ``embed`` (the penultimate layer, ``CLASSIFIER_FEATURES`` wide) → ReLU → class logits.

    The features are ``embed``'s output before the ReLU: dense (no dead units), so their
    covariance is better conditioned than that of rectified activations. Input: images in
    [0, 1] of any size ≥ 4 pixels, mapped to [-1, 1] inside.
    """

    def __init__(self, channels: int, num_classes: int, features: int = CLASSIFIER_FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Linear(128, features)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(features, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> FeatureClassifier:
        """Rebuild from a saved state dict (its shapes give channels, width and classes)."""
        model = cls(
            channels=state["body.0.weight"].shape[1],
            num_classes=state["head.1.weight"].shape[0],
            features=state["embed.weight"].shape[0],
        )
        model.load_state_dict(state)
        return model


def train_feature_classifier(
    dataset: Dataset,
    *,
    seed: int = CLASSIFIER_SEED,
    epochs: int = CLASSIFIER_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> FeatureClassifier:
    """Train a ``FeatureClassifier`` with cross-entropy and Adam on a labelled data set of
    [-1, 1] images (``LabeledImages`` or a subset). Deterministic in ``seed`` on one device
    and thread count: the initial weights and the batch order both come from it."""
    channels, num_classes = dataset.channels, dataset.num_classes
    if num_classes < 2:
        log.warning("data set has %d class: fd_classifier uses untrained features", num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(channels, max(num_classes, 2)).to(device)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    correct = seen = 0
    with progress_bar(epochs * len(loader), "fd_classifier training", show_progress) as bar:
        for epoch in range(epochs):
            for images, labels in loader:
                logits = model(((images + 1.0) / 2.0).to(device))
                labels = labels.to(device)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if epoch == epochs - 1:
                    correct += int((logits.argmax(1) == labels).sum())
                    seen += len(labels)
                bar.update(1)
    log.info("fd_classifier: trained %d epochs, last-epoch accuracy %.3f",
             epochs, correct / max(seen, 1))
    return model.eval()


def _classifier_identity(seed: int, epochs: int) -> tuple[str, dict[str, object]]:
    return f"classifier-seed{seed}", {"seed": seed, "epochs": epochs}


def load_or_train_classifier(
    reference: Reference,
    *,
    seed: int = CLASSIFIER_SEED,
    epochs: int = CLASSIFIER_EPOCHS,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> FeatureClassifier:
    """The data set's feature classifier: from the cache, else trained on the real training
    images and cached (``torch.save`` of the state dict; read with ``weights_only=True``)."""
    kind, identity = _classifier_identity(seed, epochs)
    path = reference.cache_path(kind, ".pt", **identity)
    if path.is_file():
        log.debug("fd_classifier from %s", path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureClassifier.from_state_dict(state).to(device).eval()
    model = train_feature_classifier(
        reference.dataset(), seed=seed, epochs=epochs, device=device, show_progress=show_progress
    )
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    _atomic_write(path, lambda sink: torch.save(state, sink))
    # Statistics cached for an earlier classifier under this key no longer describe this one.
    reference.cache_path(kind, "-stats.npz", **identity).unlink(missing_ok=True)
    log.info("fd_classifier cached in %s", path)
    return model


def classifier_features(
    images: np.ndarray,
    classifier: FeatureClassifier,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    show_progress: bool = False,
) -> np.ndarray:
    """Penultimate-layer features (``N x 64``) of ``N x H x W x C`` images in [0, 1]."""
    return _extract(classifier.features, _array_batches(np.asarray(images), batch_size),
                    len(images), device, "classifier features", show_progress)


def real_classifier_statistics(
    reference: Reference,
    classifier: FeatureClassifier,
    *,
    seed: int = CLASSIFIER_SEED,
    epochs: int = CLASSIFIER_EPOCHS,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    show_progress: bool = False,
) -> Stats:
    """Classifier-feature ``(μ, Σ)`` of the real images, cached next to the classifier."""
    kind, identity = _classifier_identity(seed, epochs)
    path = reference.cache_path(kind, "-stats.npz", **identity)

    def compute() -> np.ndarray:
        dataset = reference.dataset()
        return _extract(classifier.features, _dataset_batches(dataset, batch_size), len(dataset),
                        device, "classifier features (real)", show_progress)

    return _cached_stats(path, compute)


def classifier_fd(
    images: np.ndarray,
    reference: Reference,
    *,
    seed: int = CLASSIFIER_SEED,
    epochs: int = CLASSIFIER_EPOCHS,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    show_progress: bool = False,
) -> float:
    """``fd_classifier``: the Fréchet distance of classifier-feature statistics, generated vs
    real. Not FID: the feature space is a small CNN trained on this data set only."""
    images = _check_images(images, reference.channels)
    classifier = load_or_train_classifier(
        reference, seed=seed, epochs=epochs, device=device, show_progress=show_progress
    )
    real = real_classifier_statistics(
        reference, classifier, seed=seed, epochs=epochs, device=device,
        batch_size=batch_size, show_progress=show_progress,
    )
    generated = feature_statistics(
        classifier_features(images, classifier, device=device, batch_size=batch_size,
                            show_progress=show_progress)
    )
    return frechet_distance(*generated, *real)
