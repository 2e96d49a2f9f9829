"""The GPU check: what one client step of the reference U-Net costs on a GPU, in fp32 and in
bf16 autocast, pruned and unpruned, and what one transport round costs there; one JSON.

    python -m bench.gpu_check                           # cuda, ddpm-cifar10, batch 128
    python -m bench.gpu_check --device cpu --quick      # tiny U-Net, batch 2, 1 step: < 1 min
    bench/gpu_check.sh                                  # on a GPU machine with no network

Steps: the product's own ``DiffusionTrainer`` (``training.mixed_precision`` "no" / "bf16")
on the model of ``fedphd.common.core.models`` (the config's preset, seeded), and on its copy
pruned by ``fedphd.common.core.pruning.prune_unet`` at ``--ratio`` (0.2), rebuilt as the
``PrunedUNet2DModel`` a client trains. One fixed random batch on the device (the step cost
does not depend on the images, and no data loader is timed); ``--warmup`` untimed steps, then
``--steps`` timed ones, each ending when the trainer returns its loss (a device sync, as in a
client). Peak memory: ``torch.cuda.max_memory_allocated`` over one variant's steps, with only
that variant's model and Adam state on the GPU (null on a CPU).

Transport: ``bench.transport``'s round, the real deployment (``fedphd launch``: cloud, one
edge, one client as processes over Flower's gRPC, fp32, no local steps, the client on
``--device``) against bare grpcio carrying the same bytes; the full check uses the 35.75 M
U-Net (143 MB per message), ``--quick`` the tiny one. Round 1 connects and builds models, so
``--rounds`` counts it and it is not measured.

The JSON is rewritten after each part, so a check stopped at its time limit keeps what it
measured (``complete`` false). Exit status 1 when a part failed; its error is in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import transport
from bench.harness import BenchError, command_line, derive_config, machine_info, progress
from fedphd.common.core.diffusion import DiffusionTrainer, make_noise_scheduler
from fedphd.common.core.models import build_unet, count_parameters, unet_config
from fedphd.common.core.pruning import prune_unet, to_pruned_model
from fedphd.common.settings.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
FULL_CONFIG = REPO / "configs" / "ddpm-cifar10.toml"
QUICK_CONFIG = REPO / "common" / "configs" / "default.toml"
DEFAULT_OUT = REPO / "runs" / "bench" / "gpu_check.json"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # JSON key -> training.mixed_precision
VARIANTS = ("unpruned", "pruned")
TRANSPORT_TIMEOUT = 1800.0  # seconds, bench.transport's own default, when no deadline is set


class Check:
    """The result being built, written to ``path`` after every part."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.failed = False
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)  # never a half-written file, even when killed

    def fail(self, part: str, error: BaseException) -> None:
        """Record a part's failure in one line (plus the traceback's end) and carry on."""
        self.failed = True
        lines = traceback.format_exception(error)
        self.data.setdefault("errors", {})[part] = {
            "error": f"{type(error).__name__}: {error}".splitlines()[0],
            "traceback_tail": "".join(lines[-3:])[-2000:],
        }
        progress(f"{part} failed: {type(error).__name__}: {error}")
        self.write()


# ------------------------------------------------------------------------------ devices


def device_name(device: torch.device, machine: dict[str, Any]) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return machine["cpu"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def check_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    return torch.device(name)


def software(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        # fp32 here is what torch does by default: TF32 in cuDNN convolutions, not in matmuls.
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32} if cuda else None,
    }


# -------------------------------------------------------------------------------- steps


def build_models(cfg: RunConfig, ratio: float) -> tuple[dict[str, torch.nn.Module], dict]:
    """The config's seeded U-Net and its copy pruned at ``ratio`` as the cloud prunes it
    (on the CPU), as the class a client rebuilds from the instruction."""
    unpruned = build_unet(unet_config(cfg.model), seed=cfg.seed)
    start = time.perf_counter()
    small = copy.deepcopy(unpruned)
    report = prune_unet(small, ratio)
    pruned = to_pruned_model(small)
    info = {"ratio": ratio, **report.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
    return {"unpruned": unpruned, "pruned": pruned}, info


def time_steps(trainer: DiffusionTrainer, images: torch.Tensor, warmup: int,
               steps: int) -> tuple[list[float], float]:
    """Seconds of each timed step and the last loss. ``train_step`` returns the loss as a
    Python float, so each step has finished on the device when it returns."""
    loss = float("nan")
    for _ in range(warmup):
        loss = trainer.train_step(images)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = trainer.train_step(images)
        seconds.append(time.perf_counter() - start)
    return seconds, loss


def measure_variant(model: torch.nn.Module, cfg: RunConfig, precision: str,
                    device: torch.device, batch: int, warmup: int,
                    steps: int) -> dict[str, Any]:
    """One precision on one model: a fresh trainer (fresh Adam state), as a new client has."""
    training = cfg.training.model_copy(update={"mixed_precision": PRECISIONS[precision]})
    scheduler = make_noise_scheduler(cfg.diffusion)
    reset_peak(device)
    trainer = DiffusionTrainer(model, scheduler, training, device)
    shape = (batch, model.config.in_channels, *_size(model.config.sample_size))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    images = torch.rand(shape, generator=generator, device=device) * 2 - 1
    seconds, loss = time_steps(trainer, images, warmup, steps)
    step = statistics.median(seconds)
    result = {
        "step_seconds": step,
        "step_seconds_all": [round(s, 6) for s in seconds],
        "images_per_second": batch / step,
        "peak_memory_bytes": peak_memory(device),
        "loss": loss,
    }
    del trainer, images
    gc.collect()
    return result


def _size(sample_size: int | list[int]) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


def measure_steps(check: Check, cfg: RunConfig, device: torch.device, batch: int,
                  warmup: int, steps: int, ratio: float) -> None:
    models, pruning = build_models(cfg, ratio)
    check.data["pruning"] = pruning
    check.data["parameters"] = {name: count_parameters(m) for name, m in models.items()}
    progress(f"{cfg.model.preset}: {check.data['parameters']['unpruned']:,} parameters, "
             f"pruned {ratio}: {check.data['parameters']['pruned']:,} ({pruning['seconds']} s)")
    results = check.data["steps"]
    for variant in VARIANTS:
        model = models[variant]
        for precision in PRECISIONS:
            result = measure_variant(model, cfg, precision, device, batch, warmup, steps)
            results[precision][variant] = result
            peak = result["peak_memory_bytes"]
            progress(f"{precision} {variant}: {result['step_seconds'] * 1000:.1f} ms/step, "
                     f"{result['images_per_second']:.1f} images/s"
                     + (f", peak {peak / 2**30:.2f} GiB" if peak is not None else ""))
            check.write()
        model.to("cpu")  # only the variant being measured holds GPU memory
    for variants in results.values():
        if all(variants.get(v) for v in VARIANTS):
            variants["pruned_speedup"] = (variants["unpruned"]["step_seconds"]
                                          / variants["pruned"]["step_seconds"])
    fp32, bf16 = results["fp32"], results["bf16"]
    check.data["bf16_speedup"] = {v: fp32[v]["step_seconds"] / bf16[v]["step_seconds"]
                                  for v in VARIANTS}
    check.write()


# ---------------------------------------------------------------------------- transport


def measure_transport(check: Check, quick: bool, device: torch.device, rounds: int,
                      repeats: int, timeout: float, work: Path) -> None:
    """``bench.transport``'s project round and its bare grpcio reference."""
    config = transport.QUICK_CONFIG if quick else transport.FULL_CONFIG
    if timeout < 30:
        raise BenchError(f"only {timeout:.0f} s left before the deadline for the round")
    project = transport.project_round(config, work, rounds, [f"training.device={device}"],
                                      timeout)
    bare = transport.bare_round(project["bytes"], repeats, work)
    check.data["transport"] = {
        "preset": project["preset"],
        "round_seconds": project["round_median_s"],
        "bare_round_seconds": bare["round_median_s"],
        "ratio": project["round_median_s"] / bare["round_median_s"],
        "edge_round_seconds": project["edge_round_median_s"],
        "first_round_seconds": project["first_round_s"],
        "rounds_measured": project["rounds_measured"],
        "round_seconds_all": project["round_seconds"],
        "bare_round_seconds_all": bare["round_seconds"],
        "bytes": project["bytes"],
        "client_device": str(device),
    }
    check.write()
    progress(f"transport: project round {project['round_median_s']:.3f} s, bare grpcio "
             f"{bare['round_median_s']:.3f} s, ratio {check.data['transport']['ratio']:.2f}")


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description="Client step time (fp32/bf16 x pruned/unpruned) and one transport round.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny U-Net, batch 2, 1 step, tiny transport round (a CPU test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON file written")
    parser.add_argument("--batch-size", type=int, help="default 128 (--quick: 2)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (20; --quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (5; --quick: 1)")
    parser.add_argument("--ratio", type=float, default=0.2, help="pruning ratio (0.2)")
    parser.add_argument("--rounds", type=int, help="cloud rounds, the first unmeasured (3; "
                                                   "--quick: 2)")
    parser.add_argument("--repeats", type=int, help="bare grpcio calls (3; --quick: 2)")
    parser.add_argument("--deadline", type=float,
                        help="seconds from start the whole check must end by: the transport "
                             "round gets what is left (default: no deadline)")
    parser.add_argument("--skip-transport", action="store_true", help="steps only")
    parser.add_argument("--work", type=Path,
                        help="the transport run's folder (default: beside --out)")
    args = parser.parse_args(argv)
    # name: (default, --quick default, smallest allowed); round 1 of --rounds is not measured
    sizes = {"batch_size": (128, 2, 1), "steps": (20, 1, 1), "warmup": (5, 1, 0),
             "rounds": (3, 2, 2), "repeats": (3, 2, 1)}
    for name, (default, quick, smallest) in sizes.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, quick if args.quick else default)
        elif value < smallest:
            parser.error(f"--{name.replace('_', '-')} must be at least {smallest}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = check_device(args.device)
    config = QUICK_CONFIG if args.quick else FULL_CONFIG
    cfg = derive_config(config, [f"training.batch_size={args.batch_size}",
                                 f"training.device={device}"])
    if device.type == "cpu" and cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)  # as a CPU client sets it
    machine = machine_info()
    check = Check(args.out, {
        "complete": False,
        "command": command_line(),
        "config": str(config.relative_to(REPO)),
        "device": str(device),
        "device_name": device_name(device, machine),
        **software(device),
        "machine": machine,
        "preset": cfg.model.preset,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "threads": torch.get_num_threads(),
        "steps": {precision: {} for precision in PRECISIONS},
        "transport": None,
    })
    progress(f"gpu check on {check.data['device_name']} ({device}), torch {torch.__version__}")
    try:
        measure_steps(check, cfg, device, args.batch_size, args.warmup, args.steps, args.ratio)
    except Exception as error:  # noqa: BLE001  (recorded; the transport part still runs)
        check.fail("steps", error)
    if not args.skip_transport:
        remaining = (TRANSPORT_TIMEOUT if args.deadline is None
                     else args.deadline - (time.monotonic() - start))
        work = args.work or args.out.parent / (args.out.stem + "-transport")
        try:
            measure_transport(check, args.quick, device, args.rounds, args.repeats,
                              remaining, work)
        except Exception as error:  # noqa: BLE001
            check.fail("transport", error)
    check.data["seconds"] = round(time.monotonic() - start, 1)
    check.data["complete"] = not check.failed and not args.skip_transport
    check.write()
    progress(f"wrote {args.out} in {check.data['seconds']} s")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
