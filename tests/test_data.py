"""Data loaders on the bundled digits and on tiny fake data sets written in torchvision's layouts.

Nothing is downloaded: every real-format data set is synthesised in ``tmp_path`` with a handful of
images whose pixel values and labels the assertions know in advance.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import celeba as tv_celeba
from torchvision.datasets import cifar as tv_cifar

from fedphd.common.data.datasets import (
    CELEBA_CLASS_NAMES,
    DatasetNotFoundError,
    LabeledImages,
    LabeledSubset,
    load_dataset,
)
from fedphd.common.settings.config import DataConfig

CELEBA_ATTRIBUTES = (  # noqa: SIM905 (the 40 names as in list_attr_celeba.txt's header)
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
CELEBA_LANDMARKS = [
    f"{part}_{axis}"
    for part in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
    for axis in ("x", "y")
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def config(dataset: str, root: Path | str = "unused") -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), download=False)


def ignore_md5(fpath: str | os.PathLike, md5: str | None = None) -> bool:
    """Stand-in for torchvision's ``check_integrity``: our fake files exist but have other MD5s."""
    return os.path.isfile(fpath)


def assert_images(dataset: LabeledImages, channels: int, size: int) -> list[torch.Tensor]:
    images = [dataset[i][0] for i in range(len(dataset))]
    for image in images:
        assert image.shape == (channels, size, size)
        assert image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
    return images


# --- digits (the offline default) -------------------------------------------------------------


def test_digits_resized_scaled_and_labelled() -> None:
    dataset = load_dataset(config("digits"), image_size=16, channels=1)

    assert len(dataset) == 1797
    assert dataset.labels.shape == (1797,) and dataset.labels.dtype == np.int64
    assert dataset.num_classes == 10 and set(dataset.labels.tolist()) == set(range(10))
    assert dataset.channels == 1 and dataset.image_size == 16
    image, label = dataset[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and label == int(dataset.labels[0])
    everything = torch.stack([dataset[i][0] for i in range(0, len(dataset), 50)])
    assert everything.min() == -1.0  # digits' background (0) maps to -1
    assert 0.5 < everything.max() <= 1.0  # ink (up to 16) reaches the top of the range


def test_digits_replicated_to_three_channels() -> None:
    dataset = load_dataset(config("digits"), image_size=12, channels=3, split="test")
    image, _ = dataset[7]

    assert image.shape == (3, 12, 12)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert len(dataset) == 1797  # no held-out part: "test" is the same offline set


def test_bad_split_and_channels_are_value_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        load_dataset(config("digits"), 8, 1, split="validation")
    with pytest.raises(ValueError, match=r"model\.in_channels"):
        load_dataset(config("digits"), 8, 4)


def test_subset_keeps_labels_and_batches() -> None:
    dataset = load_dataset(config("digits"), image_size=8, channels=1)
    indices = np.array([5, 3, 100, 1796])
    subset = dataset.subset(indices)

    assert isinstance(subset, LabeledSubset) and len(subset) == 4
    assert np.array_equal(subset.labels, dataset.labels[indices])
    assert subset.num_classes == 10
    images, labels = next(iter(DataLoader(subset, batch_size=4)))
    assert images.shape == (4, 1, 8, 8)
    assert labels.tolist() == dataset.labels[indices].tolist()


# --- MNIST / Fashion-MNIST ----------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as torchvision reads it: magic 0x08 (ubyte) << 8 | ndim, big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", dim) for dim in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fake_mnist(root: Path, folder: str) -> dict[str, np.ndarray]:
    """Constant-value 28x28 images; MNIST's existence check wants all four unpacked files."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    labels = {"train": np.array([3, 1, 4, 1, 5, 9]), "t10k": np.array([2, 6, 5])}
    for prefix, split_labels in labels.items():
        values = np.linspace(0, 255, len(split_labels)).round().astype(np.uint8)
        images = np.broadcast_to(values[:, None, None], (len(values), 28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.ascontiguousarray(images))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", split_labels)
    return labels


@pytest.mark.parametrize(
    ("dataset", "folder"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")]
)
def test_mnist_like_from_idx_files(tmp_path: Path, dataset: str, folder: str) -> None:
    labels = make_fake_mnist(tmp_path, folder)

    train = load_dataset(config(dataset, tmp_path), image_size=16, channels=1)
    assert train.labels.tolist() == labels["train"].tolist()
    assert train.num_classes == 10
    images = assert_images(train, channels=1, size=16)
    # Pixel 0 -> -1 and 255 -> +1: the [-1, 1] scaling, not just the clamp.
    assert torch.allclose(images[0], torch.tensor(-1.0))
    assert torch.allclose(images[-1], torch.tensor(1.0))

    test = load_dataset(config(dataset, tmp_path), image_size=8, channels=3, split="test")
    assert test.labels.tolist() == labels["t10k"].tolist()
    rgb = assert_images(test, channels=3, size=8)
    assert torch.equal(rgb[1][0], rgb[1][2])  # grey replicated to RGB


def test_corrupt_mnist_is_reported_not_a_traceback(tmp_path: Path) -> None:
    make_fake_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")

    with pytest.raises(DatasetNotFoundError, match="mnist") as caught:
        load_dataset(config("mnist", tmp_path), 8, 1)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --- CIFAR-10 ------------------------------------------------------------------------------------


def make_fake_cifar(root: Path) -> dict[str, list[int]]:
    """Pickled batches like the real ones: uint8 rows of 3072 (R plane, G plane, B plane)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict[str, list[int]] = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        labels = [number % 10, (number + 3) % 10]
        # Image 0 all black, image 1 pure red: checks channel order and scaling.
        data = np.zeros((2, 3, 32, 32), dtype=np.uint8)
        data[1, 0] = 255
        batch = {"data": data.reshape(2, -1), "labels": labels, "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
        written["test" if name == "test_batch" else "train"].extend(labels)
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 2}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return written


def test_cifar10_from_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_fake_cifar(tmp_path)
    # Only the MD5 comparison is replaced: our fake batches cannot match the real checksums.
    monkeypatch.setattr(tv_cifar, "check_integrity", ignore_md5)

    train = load_dataset(config("cifar10", tmp_path), image_size=16, channels=3)
    assert train.labels.tolist() == written["train"] and len(train) == 10
    assert train.class_names[0] == "airplane" and train.num_classes == 10
    images = assert_images(train, channels=3, size=16)
    assert torch.allclose(images[0], torch.tensor(-1.0))
    red = images[1]
    assert torch.allclose(red[0], torch.tensor(1.0)) and torch.allclose(red[1:], torch.tensor(-1.0))

    test = load_dataset(config("cifar10", tmp_path), image_size=8, channels=1, split="test")
    assert test.labels.tolist() == written["test"]
    grey = assert_images(test, channels=1, size=8)
    assert -1.0 < grey[1].mean() < 0.0  # red -> luminance 0.299 * 255, between black and white


def test_cifar10_with_wrong_checksums_is_reported(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path)  # no monkeypatch: torchvision's MD5 check rejects the files

    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(config("cifar10", tmp_path), 8, 3)
    assert str(tmp_path / "cifar-10-batches-py") in str(caught.value)


# --- CelebA --------------------------------------------------------------------------------------

# (file, split 0/1/2 = train/valid/test, Male, Young) for the rows written below.
CELEBA_ROWS = [
    ("000001.jpg", 0, -1, -1),
    ("000002.jpg", 0, -1, 1),
    ("000003.jpg", 0, 1, -1),
    ("000004.jpg", 0, 1, 1),
    ("000005.jpg", 1, 1, 1),
    ("000006.jpg", 2, -1, 1),
    ("000007.jpg", 2, 1, -1),  # two test rows: torchvision cannot select a 1-row split
]


def make_fake_celeba(root: Path) -> None:
    """Aligned 178x218 faces and the five annotation files, in torchvision's text formats."""
    base = root / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True)
    # Black frame, white centre 140x140: the standard centre crop must keep only the white part.
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[39:179, 19:159] = 255
    attr_lines = [str(len(CELEBA_ROWS)), " ".join(CELEBA_ATTRIBUTES) + " "]
    male, young = CELEBA_ATTRIBUTES.index("Male"), CELEBA_ATTRIBUTES.index("Young")
    for name, _, is_male, is_young in CELEBA_ROWS:
        Image.fromarray(pixels).save(images / name, quality=100)
        values = [-1] * len(CELEBA_ATTRIBUTES)
        values[male], values[young] = is_male, is_young
        attr_lines.append(name + "".join(f" {v:2d}" for v in values))  # real file's padding
    (base / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{name} {split}\n" for name, split, _, _ in CELEBA_ROWS)
    )
    (base / "identity_CelebA.txt").write_text(
        "".join(f"{name} {i + 1}\n" for i, (name, *_) in enumerate(CELEBA_ROWS))
    )
    bbox = [str(len(CELEBA_ROWS)), "image_id x_1 y_1 width height"]
    bbox += [f"{name} 95 71 226 313" for name, *_ in CELEBA_ROWS]
    (base / "list_bbox_celeba.txt").write_text("\n".join(bbox) + "\n")
    landmarks = [str(len(CELEBA_ROWS)), " ".join(CELEBA_LANDMARKS)]
    landmarks += [f"{name} 69 109 106 113 77 142 73 152 108 154" for name, *_ in CELEBA_ROWS]
    (base / "list_landmarks_align_celeba.txt").write_text("\n".join(landmarks) + "\n")


def test_celeba_male_young_classes_and_crop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fake_celeba(tmp_path)
    # Only the MD5 comparison is replaced: our annotation files cannot match the real checksums.
    monkeypatch.setattr(tv_celeba, "check_integrity", ignore_md5)
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append("x") or real_open(*a, **k))

    train = load_dataset(config("celeba", tmp_path), image_size=16, channels=3)
    assert opened == []  # labels came from the attribute table, no image was decoded
    assert train.labels.tolist() == [0, 1, 2, 3]  # 2 * Male + Young for rows 1..4
    names = ["female-old", "female-young", "male-old", "male-young"]
    assert train.class_names == CELEBA_CLASS_NAMES == names
    images = assert_images(train, channels=3, size=16)
    # Centre crop 140 keeps only the white square; resizing the full frame would show black.
    assert all(image.min() > 0.8 for image in images)

    test = load_dataset(config("celeba", tmp_path), image_size=8, channels=1, split="test")
    assert test.labels.tolist() == [1, 2]  # female-young, male-old
    assert_images(test, channels=1, size=8)


# --- ImageFolder ---------------------------------------------------------------------------------


def test_imagefolder_classes_from_subfolders(tmp_path: Path) -> None:
    for cls, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / cls).mkdir()
        for number, size in enumerate([(20, 12), (9, 30)]):  # non-square on purpose
            Image.new("RGB", size, (value, value, value)).save(tmp_path / cls / f"{number}.png")

    dataset = load_dataset(config("imagefolder", tmp_path), image_size=10, channels=3)
    assert dataset.class_names == ["cats", "dogs"] and dataset.num_classes == 2
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    images = assert_images(dataset, channels=3, size=10)
    assert torch.allclose(images[0], torch.tensor(-1.0))
    assert torch.allclose(images[3], torch.tensor(1.0))


# --- missing data sets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [
        ("mnist", "MNIST/raw"),
        ("fashionmnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("celeba", "celeba"),
    ],
)
def test_missing_torchvision_data_set_explains_itself(
    tmp_path: Path, dataset: str, folder: str
) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(config(dataset, tmp_path), 8, 1)

    message = str(caught.value)
    assert repr(dataset) in message
    assert str(tmp_path / folder) in message
    assert "data.download = true" in message
    assert caught.value.__cause__ is None  # torchvision's traceback is not chained in


@pytest.mark.parametrize("layout", ["missing", "empty", "class folder without images"])
def test_missing_imagefolder_explains_itself(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "class folder without images":
        (root / "cats").mkdir()
        (root / "cats" / "notes.txt").write_text("not an image")

    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(config("imagefolder", root), 8, 3)
    assert "imagefolder" in str(caught.value) and str(root) in str(caught.value)


def test_unreadable_image_is_named_when_the_folder_loads(tmp_path: Path) -> None:
    """Every file is decoded once at load: a corrupt one stops the process at start, named,
    not at the first training round."""
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "good.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG truncated")

    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(config("imagefolder", tmp_path), 8, 3)
    message = str(caught.value)
    assert f"image {tmp_path / 'cats' / 'broken.png'} could not be read" in message
    assert "\n" not in message and caught.value.__cause__ is None


def test_an_image_spoilt_after_loading_is_named_at_first_use(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    for name in ("0.png", "1.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "cats" / name)
    dataset = load_dataset(config("imagefolder", tmp_path), 8, 3)
    (tmp_path / "cats" / "1.png").write_bytes(b"overwritten")  # e.g. a disk copy going on

    assert dataset[0][0].shape == (3, 8, 8)
    with pytest.raises(DatasetNotFoundError, match="could not be read") as caught:
        dataset[1]
    assert f"({tmp_path / 'cats' / '1.png'})" in str(caught.value)
