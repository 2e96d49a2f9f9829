"""A saved model is a diffusers pipeline folder that plain diffusers loads, pruned ones through
the code they carry; the project's own loader reads it and the older flat folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from fedphd.common.core.diffusion import (
    is_saved_model,
    load_model,
    make_noise_scheduler,
    sample_images,
    save_model,
)
from fedphd.common.core.models import architecture_of, build_unet, unet_config
from fedphd.common.core.pruning import PrunedUNet2DModel, prune_unet, to_pruned_model
from fedphd.common.settings.config import DiffusionConfig, ModelConfig

# A schedule unlike diffusers' defaults, so a scheduler that lost it would show.
CFG = DiffusionConfig(num_train_timesteps=500, beta_end=0.03, beta_schedule="scaled_linear")
SAMPLE_STEPS = 2

# Runs where the project cannot be imported: `python -S` skips site-packages' .pth files (the
# editable install's finder is one) and PYTHONPATH brings back only the installed libraries.
ELSEWHERE = r'''
import json
import sys
from pathlib import Path

try:
    import fedphd  # noqa: F401
except ImportError as error:
    refused = str(error)
else:
    sys.exit("fedphd is importable: this process is not isolated")

import numpy as np
import torch
from diffusers import AutoModel, DDIMPipeline, DDPMPipeline, DiffusionPipeline

plain, pruned, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])  # str: AutoModel needs it
sample = torch.from_numpy(np.load(out / "sample.npy"))
timesteps = torch.from_numpy(np.load(out / "timesteps.npy"))


def predict(unet):
    with torch.no_grad():
        return unet.eval()(sample, timesteps).sample.numpy()


def kind(obj):
    return f"{type(obj).__module__}.{type(obj).__name__}"


report = {"import_fedphd": refused}
ddim = DDIMPipeline.from_pretrained(plain)
report["ddim_scheduler"] = kind(ddim.scheduler)
report["ddim_schedule"] = {key: ddim.scheduler.config[key]
                           for key in ("num_train_timesteps", "beta_end", "beta_schedule")}
np.save(out / "plain_ddim_unet.npy", predict(ddim.unet))
images = ddim(batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0,
              num_inference_steps=int(sys.argv[4]), output_type="np").images
np.save(out / "plain_ddim_images.npy", images)
ddpm = DDPMPipeline.from_pretrained(plain)
report["ddpm_scheduler"] = kind(ddpm.scheduler)
np.save(out / "plain_ddpm_unet.npy", predict(ddpm.unet))

unet = AutoModel.from_pretrained(f"{pruned}/unet", trust_remote_code=True)
report["auto_unet"] = kind(unet)
np.save(out / "pruned_auto_unet.npy", predict(unet))
pipeline = DiffusionPipeline.from_pretrained(pruned, trust_remote_code=True)
report["pipeline"] = kind(pipeline)
report["pipeline_unet"] = kind(pipeline.unet)
np.save(out / "pruned_pipeline_unet.npy", predict(pipeline.unet))
report["fedphd_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "fedphd")
(out / "report.json").write_text(json.dumps(report))
'''


def tiny(seed: int = 0) -> UNet2DModel:
    return build_unet(unet_config(ModelConfig()), seed=seed).eval()


@pytest.fixture(scope="module")
def pruned_in_place() -> UNet2DModel:
    """A plain ``UNet2DModel`` pruned in place, as the cloud's model is before it is wrapped
    (pruned once for the module: saving never changes it)."""
    model = tiny(1)
    prune_unet(model, 0.3)
    return model


def predict(model: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(sample, timesteps).sample.numpy()


def fixed_inputs(model: UNet2DModel) -> tuple[torch.Tensor, torch.Tensor]:
    size, channels = model.config.sample_size, model.config.in_channels
    sample = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(7))
    return sample, torch.tensor([3, 420])


def isolated_env(home: Path) -> dict[str, str]:
    """Only the installed libraries on the path; diffusers' remote-code cache in ``home``."""
    libraries = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_MODULES_CACHE": str(home / "hf" / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONPATH": os.pathsep.join(libraries),
    }


def test_saved_models_load_in_plain_diffusers_as_in_the_project(tmp_path, pruned_in_place):
    plain, pruned = tmp_path / "plain" / "model", tmp_path / "pruned" / "model"
    source = pruned_in_place
    save_model(tiny(), CFG, plain)
    save_model(source, CFG, pruned)

    # The folders are what diffusers' own pipeline save writes, code beside the pruned weights.
    for folder in (plain, pruned):
        assert (folder / "model_index.json").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert not (folder / "config.json").exists()
    index = json.loads((pruned / "model_index.json").read_text())
    assert index["unet"] == ["pruned_unet", "PrunedUNet2DModel"]
    config = json.loads((pruned / "unet" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "pruned_unet.PrunedUNet2DModel"}
    assert config["pruned_shapes"]
    code = (pruned / "unet" / "pruned_unet.py").read_text()
    assert "fedphd" not in code.replace("FedPhD", "")  # no import of the project, not a word
    assert not (plain / "unet" / "pruned_unet.py").exists()

    # The project's own loader (no trust_remote_code) is the reference.
    own_plain, plain_schedule = load_model(plain)
    own_pruned, _ = load_model(pruned)
    assert isinstance(own_pruned, PrunedUNet2DModel)
    # auto_map is saving business: it never enters the architecture that travels on the wire.
    assert architecture_of(own_pruned) == architecture_of(to_pruned_model(source))
    sample, timesteps = fixed_inputs(own_plain)
    assert np.array_equal(predict(own_pruned, sample, timesteps),
                          predict(source, sample, timesteps))
    work = tmp_path / "elsewhere"
    work.mkdir()
    np.save(work / "sample.npy", sample.numpy())
    np.save(work / "timesteps.npy", timesteps.numpy())
    (work / "load.py").write_text(ELSEWHERE)

    result = subprocess.run(
        [sys.executable, "-S", str(work / "load.py"), str(plain), str(pruned), str(work),
         str(SAMPLE_STEPS)],
        capture_output=True, text=True, timeout=180, cwd=work, env=isolated_env(work),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())

    # DDIMPipeline converted the saved DDPM schedule, and kept it.
    assert report["ddim_scheduler"].endswith(".DDIMScheduler")
    assert report["ddim_schedule"] == {"num_train_timesteps": 500, "beta_end": 0.03,
                                       "beta_schedule": "scaled_linear"}
    assert report["ddpm_scheduler"].endswith(".DDPMScheduler")
    # The pruned class came from the shipped file, not from the project.
    assert report["auto_unet"].startswith("diffusers_modules.")
    assert report["auto_unet"].endswith(".pruned_unet.PrunedUNet2DModel")
    assert report["pipeline"] == "diffusers.pipelines.ddpm.pipeline_ddpm.DDPMPipeline"
    assert report["pipeline_unet"] == report["auto_unet"]
    assert report["import_fedphd"] == "No module named 'fedphd'"
    assert report["fedphd_modules"] == []

    expected_plain = predict(own_plain, sample, timesteps)
    expected_pruned = predict(own_pruned, sample, timesteps)
    assert not np.allclose(expected_plain, expected_pruned)  # two different models compared
    for name, expected in (("plain_ddim_unet", expected_plain), ("plain_ddpm_unet", expected_plain),
                           ("pruned_auto_unet", expected_pruned),
                           ("pruned_pipeline_unet", expected_pruned)):
        np.testing.assert_allclose(np.load(work / f"{name}.npy"), expected, rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    # Sampling there gives the images the project's own DDIM sampling gives here.
    images = sample_images(own_plain, CFG, 2, seed=0, steps=SAMPLE_STEPS,
                           noise_scheduler=plain_schedule)
    np.testing.assert_allclose(np.load(work / "plain_ddim_images.npy"), images, rtol=1e-4,
                               atol=1e-5)


def save_flat(model: UNet2DModel, directory: Path) -> None:
    """The flat layout ``save_model`` wrote before: U-Net and scheduler side by side."""
    model.save_pretrained(directory)
    make_noise_scheduler(CFG).save_pretrained(directory)


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned"])
def test_an_old_flat_model_folder_still_loads(tmp_path, pruned_in_place, pruned):
    model = to_pruned_model(pruned_in_place).eval() if pruned else tiny(3)
    save_flat(model, tmp_path / "model")
    assert not (tmp_path / "model" / "model_index.json").exists()
    assert is_saved_model(tmp_path / "model")

    loaded, schedule = load_model(tmp_path / "model")
    assert type(loaded) is type(model)
    assert architecture_of(loaded) == architecture_of(model)
    sample, timesteps = fixed_inputs(model)
    assert np.array_equal(predict(loaded, sample, timesteps), predict(model, sample, timesteps))
    assert schedule.config.beta_schedule == "scaled_linear"
    assert schedule.config.num_train_timesteps == 500


def test_saving_over_an_old_flat_folder_replaces_it(tmp_path):
    """A client's state folder from before keeps working and loses the stale flat files."""
    folder = tmp_path / "model"
    save_flat(tiny(3), folder)
    (folder / "notes.txt").write_text("someone else's file")
    newer = tiny(4)
    save_model(newer, CFG, folder)
    for stale in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        assert not (folder / stale).exists(), stale
    assert (folder / "notes.txt").is_file()
    loaded, _ = load_model(folder)
    sample, timesteps = fixed_inputs(newer)
    assert np.array_equal(predict(loaded, sample, timesteps), predict(newer, sample, timesteps))


def test_a_folder_without_a_model_is_refused_by_name(tmp_path):
    assert not is_saved_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_model(tmp_path)
