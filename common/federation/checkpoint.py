"""Cloud checkpoints: what ``fedphd cloud --resume`` continues from.

After every completed cloud round the cloud writes ``RUN/checkpoint.pt`` (to a temporary file,
then an atomic rename, so a crash leaves the previous checkpoint whole): the global model and
its architecture JSON (pruned or not), the state of the run's model schedule (e.g. whether
FedPhD pruned already), the strategy's state, the run's counters, the global random generators
of the process and the config it ran with. It is a ``torch.save`` file of tensors, numbers,
strings and containers only, read back with ``torch.load(weights_only=True)``: no pickled
object is ever loaded.

A strategy's state is its ``state_dict()`` when it has one (with ``load_state_dict(state)``
to restore it), otherwise its data attributes: numbers, strings, numpy arrays, tensors, numpy
generators, Flower ``Parameters`` / ``ArrayRecord`` and lists/tuples/dicts of those (Flower's
FedAdam moments, FedAvgM's momentum, SCAFFOLD's control variate, ...). An attribute that is
itself a strategy (a wrapper's ``strategy``: Flower's DP wrappers, the message-API adapter) is
saved as that strategy's state, recursively. Callables are configuration, not state, and are
skipped; any other attribute is skipped with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedphd.common.federation.strategy_builder import modern_path
from fedphd.common.settings.config import ConfigError, RunConfig
from fedphd.common.wire.transport import (
    Array,
    ArrayRecord,
    MessageStrategy,
    Parameters,
    Strategy,
)

log = logging.getLogger("fedphd.checkpoint")

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 2
# Version 1 (before model schedules) kept FedPhD's "pruned" flag where 2 keeps the schedule's
# state; it still loads, as that schedule's state.
READABLE_FORMATS = (1, FORMAT_VERSION)
# Config fields a resumed run may change: where processes listen, how long they wait, what
# is written and shown, how many rounds there are in all. Everything else shapes the model.
MAY_CHANGE = {
    "name", "output", "tls", "evaluation", "topology.cloud_rounds", "topology.host",
    "topology.cloud_port", "topology.edge_base_port", "topology.round_timeout",
    "topology.connect_timeout", "topology.max_message_mb", "data.root", "data.download",
    "training.device", "training.threads",
}

# Config fields naming a class by dotted path. A checkpoint written before the package was
# ``fedphd`` names e.g. ``server.fedphd.FedPhD``: the class ``fedphd.server.fedphd.FedPhD`` is.
DOTTED_PATHS = ("topology.cloud_strategy", "topology.edge_strategy")

# Constructor arguments the driver passes whenever it builds a strategy: not state.
GIVEN_BY_DRIVER = {"initial_parameters"}


class Unstorable(TypeError):
    """A value a checkpoint cannot hold without pickling an object."""


def _storable_array(value: np.ndarray) -> dict[str, torch.Tensor]:
    if value.dtype.kind not in "biuf":
        raise Unstorable(f"a numpy array of dtype {value.dtype}")
    return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value).copy())}


def _storable_dict(value: dict) -> dict:
    for key in value:
        if not isinstance(key, bool | int | float | str):
            raise Unstorable(f"a dict with a {type(key).__name__} key")
    return {key: to_storable(item) for key, item in value.items()}


def _storable_sequence(value: list | tuple) -> list | tuple:
    items = [to_storable(item) for item in value]
    return items if isinstance(value, list) else tuple(items)


# How each kind of value becomes tensors, numbers, strings and containers.
_STORABLE: list[tuple[type | tuple[type, ...], Any]] = [
    (np.generic, lambda value: value.item()),
    (np.ndarray, _storable_array),
    (torch.Tensor, lambda value: value.detach().cpu().clone()),
    (np.random.Generator, lambda value: {"__np_generator__": value.bit_generator.state}),
    (Parameters, lambda value: {"__parameters__": value.tensor_type,
                                "tensors": list(value.tensors)}),
    (ArrayRecord, lambda value: {"__arrayrecord__": {
        key: _storable_array(array.numpy()) for key, array in value.items()}}),
    ((list, tuple), _storable_sequence),
    (dict, _storable_dict),
]


def to_storable(value: Any) -> Any:
    """``value`` as tensors, numbers, strings and containers (what ``weights_only`` loads)."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    for kind, convert in _STORABLE:
        if isinstance(value, kind):
            return convert(value)
    raise Unstorable(f"a {type(value).__module__}.{type(value).__qualname__}")


def from_storable(value: Any) -> Any:
    """The inverse of :func:`to_storable`."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy()
        if "__np_generator__" in value:
            state = value["__np_generator__"]
            generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
            generator.bit_generator.state = state
            return generator
        if "__parameters__" in value:
            return Parameters(tensors=list(value["tensors"]), tensor_type=value["__parameters__"])
        if "__arrayrecord__" in value:
            return ArrayRecord({key: Array(item["__ndarray__"].numpy())
                                for key, item in value["__arrayrecord__"].items()})
        return {key: from_storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_storable(item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_storable(item) for item in value)
    return value


def transient_attributes(strategy: Any) -> tuple[str, ...]:
    """Attributes a strategy class declares per-round scratch (``transient_state``), not state."""
    return tuple(getattr(type(strategy), "transient_state", ()))


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's state, storable (see the module docstring)."""
    if callable(getattr(strategy, "state_dict", None)):
        return {"explicit": True, "state": to_storable(strategy.state_dict())}
    state = {}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy | MessageStrategy):
            state[name] = {"__strategy__": strategy_state(value)}
            continue
        if callable(value) or name in GIVEN_BY_DRIVER or name in transient_attributes(strategy):
            continue
        try:
            state[name] = to_storable(value)
        except Unstorable as error:
            log.warning("%s.%s (%s) is not saved in the checkpoint; give the strategy "
                        "state_dict()/load_state_dict() to save it", type(strategy).__name__,
                        name, error)
    return {"explicit": False, "state": state}


def restore_strategy(strategy: Any, saved: dict[str, Any]) -> None:
    """Put a state from :func:`strategy_state` back into a freshly built strategy."""
    if saved["explicit"]:
        strategy.load_state_dict(from_storable(saved["state"]))
        return
    for name, value in saved["state"].items():
        if isinstance(value, dict) and "__strategy__" in value:
            restore_strategy(getattr(strategy, name), value["__strategy__"])
        else:
            setattr(strategy, name, from_storable(value))


def random_state() -> dict[str, Any]:
    """The process-wide generators (Python's, numpy's legacy one, torch's CPU one)."""
    return {
        "python": random.getstate(),
        "numpy": to_storable(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }


def restore_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(from_storable(state["numpy"]))
    torch.set_rng_state(state["torch"])


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (config sections to dotted field names)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("cloud_strategy_args", "edge_strategy_args"):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(config: RunConfig) -> dict[str, Any]:
    """The config's fields by dotted name, class paths in the current layout."""
    flat = flatten(config.model_dump())
    for name in DOTTED_PATHS:
        flat[name] = modern_path(flat[name])
    return flat


def changed_fields(saved: RunConfig, current: RunConfig) -> list[str]:
    """Fields that differ between two configs and that a resumed run must keep."""
    before, after = _comparable(saved), _comparable(current)
    return sorted(
        name for name in before.keys() | after.keys()
        if before.get(name) != after.get(name)
        and name not in MAY_CHANGE and name.split(".")[0] not in MAY_CHANGE
    )


def _schedule_state(data: dict[str, Any]) -> dict[str, Any]:
    """The schedule's state; a version-1 file's ``pruned`` flag is the state of FedPhD's
    pruning schedule (and ignored by a schedule that never changes the model)."""
    if "schedule" in data:
        return dict(data["schedule"])
    return {"pruned": bool(data["pruned"])}


@dataclass
class CloudCheckpoint:
    """The cloud's state after a completed cloud round."""

    completed_round: int
    architecture: str
    model: list[np.ndarray]
    schedule: dict[str, Any]  # the model schedule's state()
    strategy: dict[str, Any]
    cumulative_bytes: dict[str, int]
    held: dict[int, dict[str, Any]]  # per peer id: the model it holds (q8/q4 downlinks)
    link_total: tuple[int, int, int]  # the cloud link's bytes down, up and messages so far
    metrics_offset: int  # bytes of metrics.jsonl written when the round was complete
    config: dict[str, Any]
    random: dict[str, Any] = field(default_factory=random_state)

    def save(self, folder: Path) -> Path:
        """Write ``folder/checkpoint.pt`` atomically."""
        path = folder / CHECKPOINT_FILE
        partial = path.with_suffix(".partial")
        torch.save({
            "format": FORMAT_VERSION,
            "completed_round": self.completed_round,
            "architecture": self.architecture,
            "model": [torch.from_numpy(np.ascontiguousarray(a).copy()) for a in self.model],
            "schedule": self.schedule,
            "strategy": self.strategy,
            "cumulative_bytes": dict(self.cumulative_bytes),
            "held": {peer: {"arrays": [torch.from_numpy(np.ascontiguousarray(a).copy())
                                       for a in held["arrays"]], "digest": held["digest"]}
                     for peer, held in self.held.items()},
            "link_total": tuple(self.link_total),
            "metrics_offset": self.metrics_offset,
            "config": self.config,
            "random": self.random,
        }, partial)
        with partial.open("rb") as handle:  # on disk before it replaces the previous one
            os.fsync(handle.fileno())
        partial.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path) -> CloudCheckpoint:
        path = folder / CHECKPOINT_FILE
        if not path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {path} (a cloud writes one after "
                              "each completed cloud round; is --out the run's folder?)")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
            if data.get("format") not in READABLE_FORMATS:
                raise ValueError(f"format {data.get('format')!r}, expected one of "
                                 f"{READABLE_FORMATS}")
            return cls(
                completed_round=int(data["completed_round"]),
                architecture=str(data["architecture"]),
                model=[tensor.numpy() for tensor in data["model"]],
                schedule=_schedule_state(data),
                strategy=data["strategy"],
                cumulative_bytes=dict(data["cumulative_bytes"]),
                held={int(peer): {"arrays": [t.numpy() for t in held["arrays"]],
                                  "digest": str(held["digest"])}
                      for peer, held in data["held"].items()},
                link_total=tuple(data["link_total"]),
                metrics_offset=int(data["metrics_offset"]),
                config=data["config"],
                random=data["random"],
            )
        except Exception as error:  # noqa: BLE001 - any damage: say which file, stop
            raise ConfigError(f"--resume: {path} cannot be read: {error}") from None

    def check_config(self, current: RunConfig) -> None:
        """A resumed run continues the same run: refuse a config that changes the model."""
        saved = RunConfig.model_validate(self.config)
        changed = changed_fields(saved, current)
        if changed:
            raise ConfigError(
                "--resume: the config differs from the checkpointed run's in "
                f"{', '.join(changed)}; resume with the run's config (only addresses, "
                "timeouts, output, evaluation and topology.cloud_rounds may change)"
            )
        if current.topology.cloud_rounds < self.completed_round:
            raise ConfigError(
                f"--resume: topology.cloud_rounds = {current.topology.cloud_rounds}, but the "
                f"checkpoint has {self.completed_round} completed rounds"
            )
