"""Client training overhead: the client's local-training path against a bare PyTorch loop on
the same model, batch, data and optimiser; and pruned (0.2) against unpruned step time.

- project: ``DiffusionClient.fit`` — what a client does per round between receiving and
  sending (decode and load the weights, ``DiffusionTrainer`` steps over its ``DataLoader``
  with diffusers' noise schedule, warm-up, clipping, then copy and encode the answer); timed
  around the call, gRPC excluded.
- bare: the same ε-MSE DDPM maths written directly: images in one tensor, random batches by
  index, ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``, Adam, gradient clipping; same initial weights,
  batch size, learning rate and thread count.
- pruned: the same client path on the model pruned by ``fedphd.common.core.pruning.prune_unet`` at
  ``--ratio`` (Torch-Pruning, as FedPhD's cloud does), step time from the client's own
  ``train_seconds``.

Runs alternate (project, bare, pruned, project, ...) so that load from other processes hits
all of them alike; figures are medians over ``--repeats``.

    python -m bench.training_overhead            # tiny U-Net, digits, CPU
    python -m bench.training_overhead --quick    # fewer steps, < 1 min
    python -m bench.training_overhead --preset ddpm-cifar10   # 35.75 M U-Net on this CPU
    python -m bench.training_overhead --config configs/ddpm-cifar10.toml \\
        --set training.device=cuda                # the 35.75 M U-Net where a GPU is

``--preset NAME`` builds that U-Net (``model.preset``) on the default config's digits,
resized to its image size; for a preset other than ``tiny`` it defaults to what a CPU can do
in minutes: batch 8, 1 warm-up step, 2 repeats of 3 steps, and no bare loop (the question
there is pruning's gain; add ``--bare`` to time it too).

The last line of stdout is ``ratio: <project samples/s / bare samples/s>``; without the bare
loop it is ``pruned_speedup: <unpruned / pruned step time>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import (
    DEFAULT_CONFIG,
    REPO,
    command_line,
    derive_config,
    machine_info,
    machine_line,
    median,
    print_ratio,
    progress,
)
from fedphd.client.client import DiffusionClient, LocalData, local_data
from fedphd.common.core.diffusion import make_noise_scheduler
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    count_parameters,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.core.pruning import prune_unet, to_pruned_model
from fedphd.common.federation.instructions import client_instruction
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.runtime import seed_everything, setup_torch
from fedphd.common.wire import codec
from fedphd.common.wire.keys import LOCAL_STEPS_KEY
from fedphd.common.wire.transport import FitIns


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------- project path


@dataclass
class ClientPath:
    """A real client and the instruction a server would send it (weights + training keys)."""

    client: DiffusionClient
    instruction: FitIns
    batch: int
    train_cpu: list[float]  # process CPU seconds of each fit's training steps

    def __post_init__(self) -> None:
        # CPU seconds as well as wall seconds: on a shared machine another process's load
        # stretches wall time, while one thread's CPU time per step barely moves.
        local, train = self.client.local, self.client.local.train

        def timed_train(*args, **kwargs):
            start = time.process_time()
            try:
                return train(*args, **kwargs)
            finally:
                self.train_cpu.append(time.process_time() - start)

        local.train = timed_train

    @classmethod
    def build(cls, cfg: RunConfig, model: torch.nn.Module, data: LocalData,
              device: torch.device) -> ClientPath:
        arch_json = architecture_to_json(architecture_of(model))
        config = client_instruction(cfg, arch_json)
        parameters = codec.encode(model_to_ndarrays(model), "fp32")
        client = DiffusionClient(cfg, 0, data, device)
        return cls(client, FitIns(parameters, config),
                   min(cfg.training.batch_size, len(data.dataset)), [])

    def fit(self, steps: int) -> tuple[float, float]:
        """Wall seconds of one ``fit`` and the client's own training seconds within it (the
        CPU seconds of those steps go to :attr:`train_cpu`)."""
        ins = FitIns(self.instruction.parameters,
                     {**self.instruction.config, LOCAL_STEPS_KEY: steps})
        start = time.perf_counter()
        res = self.client.fit(ins)
        seconds = time.perf_counter() - start
        if res.num_examples == 0:
            raise RuntimeError(f"the client's fit failed: {res.status.message}")
        return seconds, float(res.metrics["train_seconds"])


# ---------------------------------------------------------------------------- bare loop


class BareLoop:
    """The DDPM ε-MSE training step with nothing around it."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, data: LocalData,
                 device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).train()
        self.images = torch.stack([data.dataset[i][0] for i in range(len(data.dataset))])
        self.images = self.images.to(device)
        self.batch = min(cfg.training.batch_size, len(self.images))
        self.grad_clip = cfg.training.grad_clip
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.training.lr)
        # The schedule's ᾱ_t as a plain tensor: the same numbers diffusers uses.
        alphas = make_noise_scheduler(cfg.diffusion).alphas_cumprod
        self.alphas_cumprod = alphas.to(device=device, dtype=torch.float32)
        self.generator = torch.Generator(device=device).manual_seed(cfg.training.seed)

    def step(self) -> None:
        count, timesteps = len(self.images), len(self.alphas_cumprod)
        index = torch.randint(0, count, (self.batch,), generator=self.generator,
                              device=self.device)
        x0 = self.images[index]
        t = torch.randint(0, timesteps, (self.batch,), generator=self.generator,
                          device=self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(self.model(noisy, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def run(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start


# -------------------------------------------------------------------------- measurement


def pruned_model(cfg: RunConfig, ratio: float) -> tuple[torch.nn.Module, dict[str, int]]:
    """The initial model pruned as FedPhD's cloud prunes it, and the before/after counts."""
    model = build_unet(unet_config(cfg.model), seed=cfg.seed)
    report = prune_unet(model, ratio)
    return to_pruned_model(model), report.to_dict()


def measure(cfg: RunConfig, steps: int, warmup: int, repeats: int, ratio: float,
            device: torch.device, with_bare: bool = True) -> dict[str, Any]:
    data = local_data(cfg, 0)
    arch = unet_config(cfg.model)
    full = build_unet(arch, seed=cfg.seed)
    parameters = count_parameters(full)
    project = ClientPath.build(cfg, full, data, device)
    bare = BareLoop(cfg, build_unet(arch, seed=cfg.seed), data, device) if with_bare else None
    progress(f"pruning {parameters:,} parameters at ratio {ratio}")
    small, pruning = pruned_model(cfg, ratio)
    pruned = ClientPath.build(cfg, small, data, device)
    progress(f"{parameters:,} parameters, batch {project.batch}, "
             f"{len(data.dataset)} images, {torch.get_num_threads()} threads, "
             f"pruned: {count_parameters(small):,} parameters")
    # Warm-up: the client builds its model and optimiser on its first instruction.
    project.fit(warmup), pruned.fit(warmup)
    if bare is not None:
        bare.run(warmup)
    runs: dict[str, list[float]] = {"fit": [], "train": [], "pruned_train": [],
                                    "train_cpu": [], "pruned_train_cpu": []}
    if bare is not None:
        runs["bare"] = []
    for repeat in range(1, repeats + 1):
        fit_seconds, train_seconds = project.fit(steps)
        runs["fit"].append(fit_seconds)
        runs["train"].append(train_seconds)
        if bare is not None:
            runs["bare"].append(bare.run(steps))
        runs["pruned_train"].append(pruned.fit(steps)[1])
        runs["train_cpu"].append(project.train_cpu[-1])
        runs["pruned_train_cpu"].append(pruned.train_cpu[-1])
        bare_line = f"bare {runs['bare'][-1]:.2f} s, " if bare is not None else ""
        progress(f"repeat {repeat}/{repeats}: client fit {fit_seconds:.2f} s, {bare_line}"
                 f"pruned {runs['pruned_train'][-1]:.2f} s for {steps} steps")
    samples = steps * project.batch
    throughput = {name: samples / median(values) for name, values in runs.items()}
    result = {
        "parameters": parameters, "batch": project.batch, "steps": steps,
        "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
        "images": len(data.dataset), "seconds": runs,
        "samples_per_s": throughput,
        "ms_per_step": {name: 1000 * median(values) / steps for name, values in runs.items()},
        "pruning": {"ratio": ratio, **pruning},
        "pruned_speedup": median(runs["train"]) / median(runs["pruned_train"]),
        "pruned_speedup_cpu": median(runs["train_cpu"]) / median(runs["pruned_train_cpu"]),
    }
    if bare is not None:
        result["ratio"] = throughput["fit"] / throughput["bare"]
        result["ratio_train_only"] = throughput["train"] / throughput["bare"]
    return result


def render(result: dict[str, Any], cfg: RunConfig) -> str:
    m, rate = result["ms_per_step"], result["samples_per_s"]
    pruning = result["pruning"]
    lines = [
        f"# Client training overhead ({cfg.model.preset} U-Net, {result['parameters']:,} "
        f"parameters, batch {result['batch']}, {result['device']}, "
        f"{result['threads']} thread(s))",
        "",
        machine_line(result["machine"]),
        f"command: {result['command']}",
        "",
        f"| path | samples/s | ms per step | (median of {result['repeats']} × "
        f"{result['steps']} steps) |",
        "|---|---|---|---|",
        f"| client `fit` (load, train, encode) | {rate['fit']:.1f} | {m['fit']:.1f} | |",
        f"| of which `DiffusionTrainer` steps | {rate['train']:.1f} | {m['train']:.1f} | |",
    ]
    if "ratio" in result:
        lines += [
            f"| bare PyTorch loop | {rate['bare']:.1f} | {m['bare']:.1f} | |",
            "",
            f"project / bare throughput = {result['ratio']:.3f} (trainer steps only: "
            f"{result['ratio_train_only']:.3f})",
        ]
    return "\n".join([
        *lines,
        "",
        "| model | parameters | MACs per image | s per step | images/s | CPU s per step |",
        "|---|---|---|---|---|---|",
        f"| unpruned | {pruning['params_before']:,} | {pruning['macs_before']:,} | "
        f"{m['train'] / 1000:.3f} | {rate['train']:.2f} | {m['train_cpu'] / 1000:.3f} |",
        f"| pruned, ratio {pruning['ratio']} | {pruning['params_after']:,} | "
        f"{pruning['macs_after']:,} | {m['pruned_train'] / 1000:.3f} | "
        f"{rate['pruned_train']:.2f} | {m['pruned_train_cpu'] / 1000:.3f} |",
        "",
        f"pruned step speed-up: {result['pruned_speedup']:.2f}× wall, "
        f"{result['pruned_speedup_cpu']:.2f}× CPU time, for "
        f"{1 - pruning['macs_after'] / pruning['macs_before']:.0%} fewer MACs",
    ])


# Defaults for a big preset on a CPU: one step takes seconds (batch 8), so a handful of them.
BIG_PRESET_DEFAULTS = {"batch": 8, "steps": 3, "repeats": 2, "warmup": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training_overhead",
        description="Client local-training throughput vs a bare PyTorch loop; pruned vs not.",
    )
    parser.add_argument("--quick", action="store_true", help="10 steps x 2 repeats (< 1 min)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="run config (default: the packaged digits/tiny default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--preset", choices=["tiny", "ddpm-cifar10", "celeba64"],
                        help="U-Net preset (model.preset) on the config's data; a big one "
                        "defaults to batch 8, 1 warm-up, 2 x 3 steps and no bare loop")
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the bare PyTorch loop (default: yes, except with a "
                        "big --preset)")
    parser.add_argument("--steps", type=int, help="steps per timed run (default 50; quick 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, help="timed runs per path (default 5; quick 2)")
    parser.add_argument("--ratio", type=float, default=0.2, help="pruning ratio (default 0.2)")
    parser.add_argument("--out", type=Path, help="result folder")
    args = parser.parse_args(argv)
    big = args.preset not in (None, "tiny")
    defaults = BIG_PRESET_DEFAULTS if big else {
        "steps": 10 if args.quick else 50, "repeats": 2 if args.quick else 5, "warmup": 3}
    steps = args.steps or defaults["steps"]
    repeats = args.repeats or defaults["repeats"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    with_bare = not big if args.bare is None else args.bare
    # The preset and its batch come first: the user's --set still has the last word.
    overrides = ([f"model.preset={args.preset}"] if args.preset else []) + (
        [f"training.batch_size={BIG_PRESET_DEFAULTS['batch']}"] if big else [])
    cfg = derive_config(args.config, overrides + args.overrides)
    seed_everything(cfg.seed)
    device = setup_torch(cfg.training)
    result = measure(cfg, steps, warmup, repeats, args.ratio, device, with_bare)
    result.update(machine=machine_info(), command=command_line(), config=str(args.config),
                  preset=cfg.model.preset)
    name = "training-overhead-quick" if args.quick else "training-overhead"
    if args.preset:
        name += f"-{args.preset}"
    out = args.out or REPO / "runs" / "bench" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_overhead.json").write_text(json.dumps(result, indent=2))
    table = render(result, cfg)
    (out / "training_overhead.md").write_text(table + "\n")
    print(table)
    if with_bare:
        print_ratio(result["ratio"])
    else:
        print(f"pruned_speedup: {result['pruned_speedup']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
