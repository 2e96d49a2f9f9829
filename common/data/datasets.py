"""Training images for every role: one loader per data set, all returning ``LabeledImages``.

Images come out as float32 ``C x H x W`` tensors in [-1, 1] (the range DDPM trains in), resized
to ``model.sample_size`` and converted to ``model.in_channels``. Labels are available as a NumPy
array without decoding any image, so partitioning a 50 000-image set over clients is instant.

A missing or unreadable data set raises ``DatasetNotFoundError`` with a message that says which
data set, which folder was searched and how to get the files; torchvision's own errors (and stack
traces) never reach the user. An ``imagefolder`` (a client's own ``--data-dir``) is decoded once
when it loads, so a corrupt file stops the process at start, by name, before it joins a run;
the large torchvision sets are read at first use, and a bad file is named then.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from fedphd.common.settings.config import DataConfig

SPLITS = ("train", "test")
SUPPORTED_CHANNELS = (1, 3)
CELEBA_CROP = 140  # the usual CelebA-64 preprocessing: centre 140x140 face crop, then resize
CELEBA_CLASS_NAMES = ["female-old", "female-young", "male-old", "male-young"]
DIGITS_MAX_VALUE = 16.0  # scikit-learn's digits are integers 0..16


class DatasetNotFoundError(RuntimeError):
    """A data set is missing, incomplete or corrupt; the message says how to get it."""


class LabeledImages(Dataset):
    """Images in [-1, 1] with integer labels that can be read without decoding any image.

    ``source[i][0]`` must be the already-transformed image tensor; whatever label the source
    returns is ignored in favour of ``labels[i]`` (e.g. CelebA returns 40 attributes, but the
    pseudo-class derived from them is what partitioning and conditioning need).
    """

    def __init__(
        self,
        source: Dataset,
        labels: np.ndarray,
        class_names: Sequence[str],
        channels: int,
        image_size: int,
        name: str = "",
        folder: str = "",
    ) -> None:
        count = len(source)  # type: ignore[arg-type]  # every source here is sized
        if count != len(labels):
            raise ValueError(f"{count} images but {len(labels)} labels")
        self.source = source
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels = channels
        self.image_size = image_size
        self.name = name
        self.folder = folder

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)  # NumPy integers from partitions index every source the same way
        try:
            image = self.source[index][0]
        except (OSError, SyntaxError, ValueError) as error:
            # A truncated JPEG or PNG would otherwise surface as a PIL traceback mid-training
            # (PIL raises SyntaxError for some broken PNGs).
            file = _file_of(self.source, index)
            raise DatasetNotFoundError(
                f"{self.name} image {index}{f' ({file})' if file else ''} in {self.folder} "
                f"could not be read ({_one_line(error)}); "
                "the data set is corrupt: copy it again"
            ) from None
        return image, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledSubset:
        """The images at ``indices`` (e.g. one client's partition), keeping label access."""
        return LabeledSubset(self, indices)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (PIL's and torchvision's may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _file_of(source: Dataset, index: int) -> str | None:
    """The file behind image ``index`` where the source knows it (ImageFolder, CelebA)."""
    if isinstance(source, datasets.ImageFolder):
        return str(source.samples[index][0])
    if isinstance(source, datasets.CelebA):  # file names in img_align_celeba/
        return str(Path(source.root) / source.base_folder / "img_align_celeba"
                   / source.filename[index])
    return None  # the other sets live in one binary file each: the index is all there is


class LabeledSubset(Subset):
    """A ``torch.utils.data.Subset`` of ``LabeledImages`` that still exposes labels and metadata."""

    def __init__(self, dataset: LabeledImages, indices: Sequence[int] | np.ndarray) -> None:
        index_array = np.asarray(indices, dtype=np.int64).reshape(-1)
        super().__init__(dataset, index_array.tolist())
        self.labels = dataset.labels[index_array]
        self.num_classes = dataset.num_classes
        self.class_names = dataset.class_names
        self.channels = dataset.channels
        self.image_size = dataset.image_size
        self.name = dataset.name


@dataclass(frozen=True)
class _Source:
    """How to find one torchvision data set and what to tell the user when it is missing."""

    title: str
    subfolder: str
    how_to_get: str


_SOURCES = {
    "mnist": _Source(
        "MNIST",
        "MNIST/raw",
        "copy the four unpacked MNIST idx files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) into {folder}",
    ),
    "fashionmnist": _Source(
        "Fashion-MNIST",
        "FashionMNIST/raw",
        "copy the four unpacked Fashion-MNIST idx files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) into {folder}",
    ),
    "cifar10": _Source(
        "CIFAR-10",
        "cifar-10-batches-py",
        "copy the CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) "
        "into {folder}",
    ),
    "celeba": _Source(
        "CelebA",
        "celeba",
        "copy img_align_celeba/ and list_attr_celeba.txt, list_eval_partition.txt, "
        "identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt "
        "into {folder} (downloading needs the gdown package and is often rate-limited)",
    ),
}


def _not_found(dataset: str, folder: Path, reason: str, download: bool) -> DatasetNotFoundError:
    source = _SOURCES[dataset]
    action = "could not be downloaded" if download else "was not found or is incomplete/corrupt"
    return DatasetNotFoundError(
        f"data set {dataset!r} ({source.title}) {action} in {folder} (torchvision: {reason}). "
        "To get it: "
        "set data.download = true on a machine with internet access, or "
        + source.how_to_get.format(folder=folder)
    )


def _open_torchvision(dataset: str, root: str, download: bool, factory: Callable[[], Any]) -> Any:
    """Run a torchvision constructor, turning any failure to read the files into our error."""
    folder = Path(root) / _SOURCES[dataset].subfolder
    try:
        return factory()
    # The constructor only finds, downloads and parses files, so every exception it raises
    # (RuntimeError for "not found", OSError, pickle/parse errors for corrupt files) means
    # "the data set is unusable"; the user needs our message, not torchvision's traceback.
    except Exception as error:
        raise _not_found(dataset, folder, str(error) or type(error).__name__, download) from None


class _ConvertMode:
    """Convert a PIL image to ``mode`` ("L" or "RGB"); a class, not a lambda, so it pickles."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


def _to_tensor_in_range(channels: int) -> list[Callable]:
    # ToTensor gives [0, 1]; (x - 0.5) / 0.5 maps it onto DDPM's [-1, 1].
    return [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]


def _square_transform(image_size: int, channels: int) -> transforms.Compose:
    """Resize the short side, then centre-crop: non-square images (imagefolder) come out square."""
    return transforms.Compose(
        [
            _ConvertMode("L" if channels == 1 else "RGB"),
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            *_to_tensor_in_range(channels),
        ]
    )


def _celeba_transform(image_size: int, channels: int) -> transforms.Compose:
    return transforms.Compose(
        [
            _ConvertMode("L" if channels == 1 else "RGB"),
            transforms.CenterCrop(CELEBA_CROP),
            transforms.Resize(image_size),
            *_to_tensor_in_range(channels),
        ]
    )


@functools.lru_cache(maxsize=4)
def _digits_tensors(image_size: int, channels: int) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits  # only the offline data set needs scikit-learn

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / DIGITS_MAX_VALUE
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
    images = (images.clamp(0.0, 1.0) * 2.0 - 1.0).repeat(1, channels, 1, 1).contiguous()
    return images, np.asarray(digits.target, dtype=np.int64)


def _load_digits(image_size: int, channels: int) -> LabeledImages:
    images, labels = _digits_tensors(image_size, channels)
    return LabeledImages(
        TensorDataset(images),
        labels,
        [str(digit) for digit in range(10)],
        channels,
        image_size,
        name="digits",
        folder="(bundled with scikit-learn)",
    )


def _load_mnist_like(cfg: DataConfig, image_size: int, channels: int, split: str) -> LabeledImages:
    cls = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
    source = _open_torchvision(
        cfg.dataset,
        cfg.root,
        cfg.download,
        lambda: cls(
            cfg.root,
            train=split == "train",
            transform=_square_transform(image_size, channels),
            download=cfg.download,
        ),
    )
    labels = np.asarray(source.targets, dtype=np.int64)
    return LabeledImages(
        source, labels, source.classes, channels, image_size, cfg.dataset, source.raw_folder
    )


def _load_cifar10(cfg: DataConfig, image_size: int, channels: int, split: str) -> LabeledImages:
    source = _open_torchvision(
        "cifar10",
        cfg.root,
        cfg.download,
        lambda: datasets.CIFAR10(
            cfg.root,
            train=split == "train",
            transform=_square_transform(image_size, channels),
            download=cfg.download,
        ),
    )
    folder = str(Path(cfg.root) / _SOURCES["cifar10"].subfolder)
    labels = np.asarray(source.targets, dtype=np.int64)
    return LabeledImages(source, labels, source.classes, channels, image_size, "cifar10", folder)


def _celeba_labels(attr: torch.Tensor, attr_names: list[str]) -> np.ndarray:
    """Four pseudo-classes 2 * Male + Young, read from the attribute table (no image decoding)."""
    missing = [name for name in ("Male", "Young") if name not in attr_names]
    if missing:
        raise ValueError(f"list_attr_celeba.txt has no {' or '.join(missing)} column")
    male = attr[:, attr_names.index("Male")].numpy().astype(np.int64)
    young = attr[:, attr_names.index("Young")].numpy().astype(np.int64)
    return 2 * male + young


def _load_celeba(cfg: DataConfig, image_size: int, channels: int, split: str) -> LabeledImages:
    folder = Path(cfg.root) / _SOURCES["celeba"].subfolder

    def build() -> tuple[Any, np.ndarray]:
        source = datasets.CelebA(
            cfg.root,
            split=split,
            target_type="attr",
            transform=_celeba_transform(image_size, channels),
            download=cfg.download,
        )
        return source, _celeba_labels(source.attr, list(source.attr_names))

    source, labels = _open_torchvision("celeba", cfg.root, cfg.download, build)
    return LabeledImages(
        source, labels, CELEBA_CLASS_NAMES, channels, image_size, "celeba", str(folder)
    )


def _load_imagefolder(cfg: DataConfig, image_size: int, channels: int) -> LabeledImages:
    root = Path(cfg.root)
    try:
        source = datasets.ImageFolder(str(root), transform=_square_transform(image_size, channels))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise DatasetNotFoundError(
            f"data set 'imagefolder' has no usable images in {root} ({error}). To get it: put "
            f"one subfolder per class holding .png/.jpg images into {root} (data.root), e.g. "
            f"{root / 'cats' / '0001.png'}; data.download does not apply to imagefolder"
        ) from None
    _check_images(source.samples, root)
    labels = np.asarray(source.targets, dtype=np.int64)
    return LabeledImages(
        source, labels, source.classes, channels, image_size, "imagefolder", str(root)
    )


def _check_images(samples: Sequence[tuple[str, int]], root: Path) -> None:
    """Decode every image once, so that a corrupt file stops the process now, by name,
    instead of failing a training round later with a traceback in the client's log."""
    for path, _label in samples:
        try:
            with Image.open(path) as image:
                image.load()
        # PIL raises OSError (truncated, unidentified), SyntaxError (broken PNG chunks) or
        # ValueError/struct errors for garbage; any of them means "this file is unusable".
        except Exception as error:  # noqa: BLE001
            raise DatasetNotFoundError(
                f"data set 'imagefolder' in {root}: image {path} could not be read "
                f"({_one_line(error)}); remove or replace that file"
            ) from None


def load_dataset(
    cfg: DataConfig, image_size: int, channels: int, split: str = "train"
) -> LabeledImages:
    """Load ``cfg.dataset`` as ``image_size`` x ``image_size`` images with ``channels`` channels.

    ``digits`` is the offline stand-in (scikit-learn's 1797 bundled 8x8 digits, upsampled); it
    has no held-out part, so both splits return all images. ``imagefolder`` likewise reads the
    whole of ``cfg.root`` for either split. The others use the data set's own train/test split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"model.in_channels must be 1 or 3 for image data sets, got {channels}")
    if image_size < 1:
        raise ValueError(f"model.sample_size must be positive, got {image_size}")
    if cfg.dataset == "digits":
        return _load_digits(image_size, channels)
    if cfg.dataset in ("mnist", "fashionmnist"):
        return _load_mnist_like(cfg, image_size, channels, split)
    if cfg.dataset == "cifar10":
        return _load_cifar10(cfg, image_size, channels, split)
    if cfg.dataset == "celeba":
        return _load_celeba(cfg, image_size, channels, split)
    if cfg.dataset == "imagefolder":
        return _load_imagefolder(cfg, image_size, channels)
    raise ValueError(f"data.dataset {cfg.dataset!r} is not supported")
