"""Structured (channel) pruning of the diffusers U-Net, as FedPhD does it, and pruned models
that stay config-driven.

Pruning uses Torch-Pruning's dependency graph (DepGraph): channels that must disappear together
(a conv's outputs, the next GroupNorm, the inputs of every consumer, the skip concatenations)
form one group and are ranked together. After pruning, diffusers modules still hold the widths
they were built with, so :func:`sync_module_attributes` rewrites them from the layers.

A pruned model is described by its unpruned ``UNet2DModel`` config plus ``pruned_shapes``: for
each module that differs from the unpruned build, the shapes of its parameters and the values
of its plain attributes. :class:`PrunedUNet2DModel` takes both as config, so the description is
JSON, travels with the instruction and survives ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

# The pruned class lives in a module of its own that imports nothing of this package: a saved
# pruned model ships a copy of that file as its remote code (see fedphd.common.core.diffusion).
from fedphd.common.core.pruned_unet import (  # noqa: F401  (re-exported)
    PrunedShapes,
    PrunedUNet2DModel,
    apply_pruned_shapes,
)


@dataclass(frozen=True)
class PruningReport:
    """Parameter and multiply-accumulate counts of one forward pass, before and after."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def param_reduction(self) -> float:
        """1 - params_after / params_before."""
        return 1.0 - self.params_after / self.params_before

    @property
    def mac_reduction(self) -> float:
        """1 - macs_after / macs_before."""
        return 1.0 - self.macs_after / self.macs_before

    def to_dict(self) -> dict[str, int]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }


# --------------------------------------------------------------------------------------------
# Pruning


def check_ratio(ratio: float) -> float:
    """The channel pruning ratio r must satisfy 0 <= r < 1 (r = 1 would remove every channel)."""
    if not isinstance(ratio, int | float) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"pruning.ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")


def example_inputs(model: UNet2DModel) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(sample, timestep)`` pair of batch 1 at the model's own size, device and dtype.

    Zeros, not random numbers: tracing and op counting depend only on shapes, and the caller's
    random number stream must not move.
    """
    size = model.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    weight = next(model.parameters())
    sample = torch.zeros(
        1, model.config.in_channels, height, width, device=weight.device, dtype=weight.dtype
    )
    return sample, torch.zeros(1, dtype=torch.long, device=weight.device)


def _measure(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass, counted by Torch-Pruning on a copy."""
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, inputs)
    return int(macs), int(params)


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """q/k/v projection -> head count, so Torch-Pruning prunes the same positions in every head.

    A projection of width h·d is viewed as h heads of d dims; pruning position j of every head
    keeps h heads of d' < d dims, so ``attn.heads`` stays right and only the head size shrinks.
    """
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for projection in (module.to_q, module.to_k, module.to_v):
                heads[projection] = module.heads
    return heads


def prune_unet(model: UNet2DModel, ratio: float, *, round_to: int | None = None) -> PruningReport:
    """Prune the channels of a ``UNet2DModel`` in place; return the counts before and after.

    Importance of channel c in a coupled group G (Torch-Pruning's group L2 magnitude)::

        I(c) = mean_{W in G} ||W[c]||_2^2,   normalised by its mean over the group's channels

    where W runs over the conv and linear weights in G and W[c] is the slice channel c owns (an
    output row of a producer, an input column of a consumer). Each group keeps its floor(n·(1 - r))
    most important of n channels. GroupNorm groups and attention heads are channel groups: a
    layer with g groups of s channels keeps floor(s·(1 - r)) positions, the same in every
    group, so GroupNorm's g and the head count stay valid (on the 128/256-channel U-Net with 32
    GroupNorm groups, r = 0.2 keeps 6 of every 8 channels). ``conv_out`` keeps its outputs
    (the image channels). ``round_to`` additionally makes every pruned width a multiple of it.
    Magnitude importance makes the result deterministic.
    """
    ratio = check_ratio(ratio)
    _check_round_to(round_to)
    inputs = example_inputs(model)
    was_training = model.training
    model.eval()  # no dropout while tracing: the forward pass must not draw random numbers
    try:
        macs_before, params_before = _measure(model, inputs)
        _prune_channels(model, inputs, ratio, round_to)
        sync_module_attributes(model)
        macs_after, params_after = _measure(model, inputs)
    finally:
        model.train(was_training)
    return PruningReport(params_before, params_after, macs_before, macs_after)


def _prune_channels(
    model: UNet2DModel, inputs: tuple[torch.Tensor, ...], ratio: float, round_to: int | None
) -> None:
    with torch.enable_grad():  # DepGraph traces the autograd graph of one forward pass
        pruner = tp.pruner.BasePruner(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[model.conv_out],
            # Fresh dicts: Torch-Pruning's defaults are shared mutable arguments it updates.
            in_channel_groups={},
            out_channel_groups={},
            num_heads=_attention_heads(model),
        )
        for group in pruner.step(interactive=True):
            # Torch-Pruning's own round_to compares a per-channel-group count with the layer
            # width, which on grouped layers (every GroupNorm here) cancels all pruning.
            rounded = group if round_to is None else _round_group(pruner, group, round_to)
            if rounded is not None:
                rounded.prune()


def _round_group(pruner: tp.pruner.BasePruner, group: Any, round_to: int) -> Any | None:
    """Re-choose a group's pruned channels so the layer keeps a multiple of ``round_to``.

    With g channel groups of s channels keeping k positions each, the width g·k is a multiple
    of m = round_to iff k is a multiple of m / gcd(g, m). k is rounded down to that step, or up
    to one step when it would reach zero; the kept positions are the k with the largest
    importance averaged over the g groups (Torch-Pruning's rule for grouped layers). Returns
    None when nothing is left to prune.
    """
    graph = pruner.DG
    module, handler = group[0].dep.target.module, group[0].dep.handler
    if graph.is_out_channel_pruning_fn(handler):
        channels = graph.get_out_channels(module)
    else:
        channels = graph.get_in_channels(module)
    groups = pruner._get_channel_groups(group)  # the grouping Torch-Pruning used for this group
    size = channels // groups
    kept = size - len(group[0].idxs) // groups
    step = round_to // math.gcd(groups, round_to)
    target = max(step, kept - kept % step)
    if target >= size:
        return None
    importance = pruner.estimate_importance(
        graph.get_pruning_group(module, handler, list(range(channels)))
    )
    if importance is None:
        return group
    keep = set(torch.topk(importance.view(groups, size).mean(0), target).indices.tolist())
    idxs = [g * size + p for g in range(groups) for p in range(size) if p not in keep]
    rounded = graph.get_pruning_group(module, handler, idxs)
    return rounded if graph.check_pruning_group(rounded) else None


# --------------------------------------------------------------------------------------------
# Stale attributes


def sync_module_attributes(model: nn.Module) -> None:
    """Rewrite the widths diffusers modules cached at construction from their pruned layers.

    Torch-Pruning updates ``nn.Conv2d``, ``nn.Linear`` and ``nn.GroupNorm``; the diffusers
    wrappers around them keep the old numbers, and their forward passes read some of them
    (``Downsample2D/Upsample2D.channels`` is asserted, ``Attention.heads`` shapes the views).
    """
    for module in model.modules():
        if isinstance(module, Attention):
            _sync_attention(module)
        elif isinstance(module, Downsample2D | Upsample2D):
            _sync_resample(module)
        elif isinstance(module, ResnetBlock2D):
            _sync_resnet(module)
        elif isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise RuntimeError(
                f"GroupNorm with {module.num_channels} channels cannot form "
                f"{module.num_groups} groups"
            )


def _sync_attention(attn: Attention) -> None:
    """inner_dim = heads · head_dim, with head_dim = to_q width / heads (an integer)."""
    inner_dim = attn.to_q.out_features
    if inner_dim % attn.heads:
        raise RuntimeError(f"attention width {inner_dim} is not a multiple of {attn.heads} heads")
    head_dim = inner_dim // attn.heads
    attn.inner_dim = inner_dim
    attn.inner_kv_dim = attn.to_k.out_features
    attn.query_dim = attn.to_q.in_features
    if not attn.is_cross_attention:
        attn.cross_attention_dim = attn.to_k.in_features
    attn.out_dim = attn.to_out[0].out_features
    attn.scale = head_dim**-0.5 if attn.scale_qk else 1.0
    attn.sliceable_head_dim = attn.heads


def _sync_resample(module: Downsample2D | Upsample2D) -> None:
    conv = getattr(module, "conv", None)
    if isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
        module.channels = conv.in_channels
        module.out_channels = conv.out_channels


def _sync_resnet(block: ResnetBlock2D) -> None:
    block.in_channels = block.conv1.in_channels
    block.out_channels = block.conv2.out_channels
    # A conv-less resampler inside the block sees the block's input width.
    for resampler in (block.upsample, block.downsample):
        if isinstance(resampler, Downsample2D | Upsample2D) and not resampler.use_conv:
            resampler.channels = resampler.out_channels = block.conv1.in_channels


# --------------------------------------------------------------------------------------------
# Describing and rebuilding pruned models


def _unet_arguments(model: UNet2DModel) -> dict[str, Any]:
    """The model's ``UNet2DModel`` arguments: its config without private keys or pruning."""
    return {
        key: (list(value) if isinstance(value, tuple) else value)
        for key, value in dict(model.config).items()
        if not key.startswith("_") and key != "pruned_shapes"
    }


def _plain(value: Any) -> bool:
    """Whether an attribute is plain JSON data (numbers, strings, flat lists of them)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, list | tuple) and all(_plain(item) for item in value)


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _tensor_shapes(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str
) -> dict[str, list[int]]:
    shapes = {}
    for name, tensor in tensors.items():
        if name not in reference:
            raise ValueError(f"{where}.{name} does not exist in the unpruned U-Net")
        if tensor.shape != reference[name].shape:
            shapes[name] = list(tensor.shape)
    return shapes


def _module_record(module: nn.Module, reference: nn.Module, name: str) -> dict[str, Any]:
    """What differs between a module and its unpruned twin (the idea of ``tp.state_dict``,
    which pickles whole ``__dict__`` objects, reduced to JSON: shapes and plain values)."""
    attrs = {
        key: _json_value(value)
        for key, value in vars(module).items()
        if not key.startswith("_")
        and key != "training"
        and _plain(value)
        and key in vars(reference)
        and _json_value(vars(reference)[key]) != _json_value(value)
    }
    record = {
        "params": _tensor_shapes(
            dict(module.named_parameters(recurse=False)),
            dict(reference.named_parameters(recurse=False)),
            name,
        ),
        "buffers": _tensor_shapes(
            dict(module.named_buffers(recurse=False)),
            dict(reference.named_buffers(recurse=False)),
            name,
        ),
        "attrs": attrs,
    }
    return {section: entries for section, entries in record.items() if entries}


def pruned_shapes(model: UNet2DModel) -> PrunedShapes:
    """JSON description of how ``model`` differs from the unpruned build of its config.

    The unpruned twin is built on the meta device: shapes only, no memory, no random numbers.
    """
    with torch.device("meta"):
        reference = UNet2DModel(**_unet_arguments(model))
    twins = dict(reference.named_modules())
    shapes: PrunedShapes = {}
    for name, module in model.named_modules():
        if name not in twins:
            raise ValueError(f"module {name!r} does not exist in the unpruned U-Net")
        record = _module_record(module, twins[name], name)
        if record:
            shapes[name] = record
    return shapes


def to_pruned_model(model: UNet2DModel) -> PrunedUNet2DModel:
    """The same weights in a :class:`PrunedUNet2DModel` whose config describes their shapes."""
    weight = next(model.parameters())
    pruned = PrunedUNet2DModel(**_unet_arguments(model), pruned_shapes=pruned_shapes(model))
    pruned.load_state_dict(model.state_dict())
    if weight.dtype != torch.float32:  # a plain .to(dtype) on float32 makes diffusers warn
        pruned.to(dtype=weight.dtype)
    return pruned.to(weight.device).train(model.training)


def build_model(arch: dict[str, Any]) -> UNet2DModel:
    """One entry point for architecture dicts: pruned when ``arch["pruned_shapes"]`` is set."""
    if arch.get("pruned_shapes"):
        return PrunedUNet2DModel(**arch)
    return UNet2DModel(**{key: value for key, value in arch.items() if key != "pruned_shapes"})


def load_pretrained(directory: str | Path) -> UNet2DModel:
    """``from_pretrained`` with the class the saved config names (pruned or not).

    ``directory`` is a U-Net folder (``config.json`` and weights) or a diffusers pipeline
    folder (``model_index.json``), whose ``unet/`` is loaded. The pruned class is this
    package's own, so no ``trust_remote_code`` is needed for the code shipped beside it.
    """
    directory = Path(directory)
    if (directory / "model_index.json").is_file():
        directory = directory / "unet"
    config = json.loads((directory / "config.json").read_text())
    cls = PrunedUNet2DModel if config.get("_class_name") == "PrunedUNet2DModel" else UNet2DModel
    # safetensors only: a pickled .bin checkpoint placed in the folder is never loaded.
    return cls.from_pretrained(str(directory), use_safetensors=True)

