"""What a finished cloud run leaves in its folder: the model, a grid of samples, a summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from diffusers import UNet2DModel

from fedphd.common.core.diffusion import sample_images, save_model
from fedphd.common.core.images import save_grid
from fedphd.common.core.models import count_parameters
from fedphd.common.federation.strategy import ManagedStrategy
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.transport import TrafficMeter

log = logging.getLogger("fedphd.cloud")  # the cloud's log, as before the driver was split


def finish_run(
    cfg: RunConfig, out: Path, model: UNet2DModel, strategy: ManagedStrategy,
    meter: TrafficMeter, flat: bool,
) -> None:
    """Save ``model`` (diffusers format), its samples when it is a whole model, and
    ``summary.json``."""
    save_model(model, cfg.diffusion, out / "model")
    start = time.perf_counter()
    if strategy.evaluate_global_model:
        images = sample_images(
            model, cfg.diffusion, cfg.output.grid_samples, seed=cfg.seed,
            batch_size=cfg.evaluation.batch_size, show_progress=cfg.output.progress,
        )
        save_grid(images, out / "samples.png")
    else:
        log.info("cloud: %s keeps parts of the model at the clients; the saved model holds "
                 "the shared parts only, each client's own model and samples are in its "
                 "state folder", strategy.inner)
    summary = {
        "name": cfg.name,
        "mode": "flat" if flat else "hierarchical",
        "cloud_rounds": cfg.topology.cloud_rounds,
        "parameters": count_parameters(model),
        "bytes_total_cloud_link": {"down": meter.total.down, "up": meter.total.up},
        "sampling_seconds": round(time.perf_counter() - start, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("cloud: model saved to %s, samples in %s", out / "model", out / "samples.png")
