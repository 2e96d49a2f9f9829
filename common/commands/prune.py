"""``fedphd prune``: prune a preset U-Net once and report what it saves."""

from __future__ import annotations

import argparse
import json
import time

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.diffusion import save_model
from fedphd.common.core.models import PRESETS, build_unet, unet_config
from fedphd.common.core.pruning import PruningReport, check_ratio, prune_unet, to_pruned_model
from fedphd.common.settings.config import ConfigError, ModelConfig
from fedphd.common.settings.runtime import setup_torch


def format_report(report: PruningReport, preset: str, ratio: float, seconds: float) -> str:
    """A small table: counts before and after and the relative change."""
    rows = [
        ("parameters", report.params_before, report.params_after, report.param_reduction),
        ("MACs", report.macs_before, report.macs_after, report.mac_reduction),
    ]
    lines = [
        f"pruned preset {preset} at ratio {ratio:g} in {seconds:.1f} s",
        f"{'':<11}{'before':>16}{'after':>16}{'change':>10}",
    ]
    lines += [
        f"{name:<11}{before:>16,}{after:>16,}{-reduction:>+9.1%}"
        for name, before, after, reduction in rows
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    ratio = cfg.pruning.ratio if args.ratio is None else args.ratio
    try:
        check_ratio(ratio)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    setup_torch(cfg.training, "cpu")
    model_cfg = ModelConfig(**{**cfg.model.model_dump(), "preset": args.preset or cfg.model.preset})
    model = build_unet(unet_config(model_cfg), seed=cfg.seed)
    started = time.perf_counter()
    report = prune_unet(model, ratio, round_to=args.round_to)
    seconds = time.perf_counter() - started
    if args.out:
        save_model(to_pruned_model(model), cfg.diffusion, args.out)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report, model_cfg.preset, ratio, seconds))
        if args.out:
            print(f"saved to {args.out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prune",
        help="prune a preset U-Net (FedPhD structured pruning) and report the savings",
        description="Structured channel pruning of the initial U-Net with Torch-Pruning "
        "(group L2 magnitude, conv_out kept): prints parameters and MACs before and after, "
        "and can save the pruned model in diffusers format.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="U-Net preset (default: model.preset)"
    )
    parser.add_argument(
        "--ratio", type=float, help="channel pruning ratio in [0, 1) (default: pruning.ratio)"
    )
    parser.add_argument(
        "--round-to",
        type=int,
        metavar="N",
        help="keep every pruned width a multiple of N (default: no rounding)",
    )
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="save the pruned model and its noise schedule here (diffusers format)",
    )
    parser.set_defaults(run=run)
