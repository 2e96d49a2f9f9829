"""The ``fedphd`` program itself, run as a user runs it."""

import pytest
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
    empty = tmp_path / "empty"
    empty.mkdir()
    result = fedphd("sample", "--model", str(empty), "--n", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"fedphd sample: {empty}")


def test_address_flags_accept_every_documented_form_and_refuse_the_rest():
    from fedphd.common.settings.config import ConfigError
    from fedphd.common.settings.topology import parse_address, parse_addresses

    assert parse_addresses("127.0.0.1:8080", "--server") == ["127.0.0.1:8080"]
    assert parse_addresses(" edge-0:9000, [::1]:9001 ,", "--server") == [
        "edge-0:9000", "[::1]:9001"]
    assert parse_address("0.0.0.0:8080", "--listen") == "0.0.0.0:8080"
    assert parse_address("my_cloud.local:1", "--cloud") == "my_cloud.local:1"
    for bad in ["", "garbage", "http://a:1", "[::1", "[::1]", "[zz]:1", "::1:80", ":80",
                "a:", "a:x", "a:65536", "300.1.1.1:80", "a b:80", "a:1,b"]:
        with pytest.raises(ConfigError, match="^--cloud "):
            parse_addresses(bad, "--cloud")
