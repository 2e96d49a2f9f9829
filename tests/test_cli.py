"""The ``fedphd`` program itself, run as a user runs it."""

from PIL import Image

from tests.conftest import fedphd

SUBCOMMANDS = ["cloud", "edge", "client", "launch", "train", "sample", "prune", "evaluate",
               "report"]


def test_help_lists_every_subcommand_and_each_explains_its_options():
    top = fedphd("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        sub = fedphd(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "--config" in sub.stdout and "--set" in sub.stdout


def test_config_errors_stop_with_the_field_named_and_no_traceback():
    result = fedphd("train", "--set", "training.batch_size=0", "--steps", "1")
    assert result.returncode == 2
    assert "training.batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = fedphd("train", "--set", "data.dataset=cifar10", "--set", f'data.root="{tmp_path}"',
                    "--set", "model.preset=ddpm-cifar10", "--steps", "1")
    assert result.returncode != 0
    assert "CIFAR" in result.stderr.upper() and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_train_then_sample_write_png_grids(tmp_path):
    out = tmp_path / "run"
    result = fedphd("train", "--steps", "3", "--out", str(out),
                    "--set", "output.grid_samples=4", "--set", "diffusion.sampling_steps=2")
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "samples.png").size[0] > 16
    grid = tmp_path / "grid.png"
    result = fedphd("sample", "--model", str(out / "model"), "--n", "9", "--steps", "2",
                    "--out", str(grid))
    assert result.returncode == 0, result.stderr
    width, height = Image.open(grid).size
    assert width == height and width >= 3 * 16
