"""A channel-pruned diffusers ``UNet2DModel`` that rebuilds its pruned widths from its config.

This file is self-contained on purpose (the standard library, torch and diffusers only, never
the package it lives in): a saved pruned model carries a verbatim copy of it beside its weights
(``unet/pruned_unet.py``), and ``config.json`` names it in ``auto_map``, so anyone with
diffusers loads the model without FedPhD installed::

    from diffusers import AutoModel, DiffusionPipeline
    unet = AutoModel.from_pretrained("run/model/unet", trust_remote_code=True)
    pipeline = DiffusionPipeline.from_pretrained("run/model", trust_remote_code=True)

A pruned model is described by its unpruned ``UNet2DModel`` config plus ``pruned_shapes``: for
each module that differs from the unpruned build, the shapes of its parameters and buffers and
the values of its plain attributes (see :data:`PrunedShapes`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

PrunedShapes = dict[str, dict[str, dict[str, Any]]]
"""``{module name: {"params": {name: shape}, "buffers": {name: shape}, "attrs": {name: value}}}``
(only non-empty sections, only modules that differ from the unpruned build)."""

_SECTIONS = ("params", "buffers", "attrs")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"pruned_shapes names module {name!r}, which this U-Net does not have"
        ) from None


def _shrunk(tensor: torch.Tensor, shape: list[int], where: str) -> torch.Tensor:
    """The leading ``shape`` block of ``tensor``: deterministic in the build seed, so a pruned
    architecture built without loading weights is still reproducible."""
    fits = len(shape) == tensor.dim() and all(
        0 <= n <= m for n, m in zip(shape, tensor.shape, strict=True)
    )
    if not fits:
        raise ValueError(f"{where}: shape {list(shape)} does not fit in {list(tensor.shape)}")
    return tensor.detach()[tuple(slice(0, n) for n in shape)].clone()


def _apply_record(module: nn.Module, name: str, record: dict[str, Any]) -> None:
    unknown = set(record) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"pruned_shapes[{name!r}] has unknown sections {sorted(unknown)}")
    params = dict(module.named_parameters(recurse=False))
    for key, shape in record.get("params", {}).items():
        if key not in params:
            raise ValueError(f"module {name!r} has no parameter {key!r}")
        new = _shrunk(params[key], shape, f"{name}.{key}")
        setattr(module, key, nn.Parameter(new, requires_grad=params[key].requires_grad))
    buffers = dict(module.named_buffers(recurse=False))
    for key, shape in record.get("buffers", {}).items():
        if key not in buffers:
            raise ValueError(f"module {name!r} has no buffer {key!r}")
        setattr(module, key, _shrunk(buffers[key], shape, f"{name}.{key}"))
    for key, value in record.get("attrs", {}).items():
        if key.startswith("_") or key not in vars(module):
            raise ValueError(f"module {name!r} has no attribute {key!r}")
        setattr(module, key, tuple(value) if isinstance(vars(module)[key], tuple) else value)


def apply_pruned_shapes(model: nn.Module, shapes: PrunedShapes) -> None:
    """Re-shape the listed modules of an unpruned build (see :data:`PrunedShapes`)."""
    for name, record in shapes.items():
        _apply_record(_submodule(model, name), name, record)


def _with_unet_arguments(init: Any) -> Any:
    """Declare every ``UNet2DModel`` argument (keyword-only) plus ``pruned_shapes`` as the
    signature of ``init``.

    diffusers' config machinery (``register_to_config``, ``from_config``) reads the signature
    to know what belongs in the config; deriving it from the installed ``UNet2DModel`` keeps
    the two in step across diffusers versions.
    """
    base = inspect.signature(UNet2DModel.__init__)
    parameters = [
        p if p.name == "self" else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in base.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    parameters.append(
        inspect.Parameter("pruned_shapes", inspect.Parameter.KEYWORD_ONLY, default=None)
    )
    init.__signature__ = base.replace(parameters=parameters)
    return init


class PrunedUNet2DModel(UNet2DModel):
    """A ``UNet2DModel`` whose config also records its pruned shapes.

    ``PrunedUNet2DModel(**config)`` builds the unpruned U-Net and shrinks the modules listed in
    ``pruned_shapes`` (to the leading block of their fresh weights), so ``load_state_dict``,
    ``save_pretrained`` and ``from_pretrained`` work as for any diffusers model.
    """

    @register_to_config
    @_with_unet_arguments
    def __init__(self, *, pruned_shapes: PrunedShapes | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        apply_pruned_shapes(self, pruned_shapes or {})

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """The config minus ``auto_map``: it says where diffusers finds this class (written
        again at every save, see below), it is no argument, so it is neither passed on, nor
        warned about as unexpected, nor kept in the loaded model's config."""
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)


# save_pretrained then writes "auto_map": {"AutoModel": "pruned_unet.PrunedUNet2DModel"} (this
# module's file name and the class), what diffusers' AutoModel reads to find remote code.
PrunedUNet2DModel.register_for_auto_class("AutoModel")
