"""Strategies by dotted path, from the config: either Flower API, nested, checked at start.

``topology.cloud_strategy`` / ``edge_strategy`` name a class of either Flower strategy API:

* a ``flwr.server.strategy.Strategy`` (``configure_fit`` / ``aggregate_fit``) is used as is;
* a ``flwr.serverapp.strategy.Strategy`` (``configure_train`` / ``aggregate_train`` over
  messages) is driven by :class:`~fedphd.common.federation.message_strategy.MessageStrategyAdapter`.

An argument in ``*_strategy_args`` that is itself a table ``{ path = "...", args = {...} }`` is
a nested strategy, built the same way (recursively) and passed as the object: Flower's
wrappers (``DifferentialPrivacyServerSideFixedClipping(strategy=...)``, ...) are configured
without code. A nested strategy is of its wrapper's API.

Everything a constructor cannot work without is checked before the run starts, so a
configuration mistake is one line at start (exit status 2), never a traceback mid-run:
required arguments the config does not give, and what Flower's classes need that no TOML
value can be (QFedAvg's ``evaluate_fn``; Bulyan's aggregation rule's ``to_keep``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from fedphd.common.federation.message_strategy import MessageStrategyAdapter
from fedphd.common.settings.config import ConfigError
from fedphd.common.wire.keys import LOSS_METRIC
from fedphd.common.wire.transport import MessageStrategy, Strategy

log = logging.getLogger("fedphd.strategy")

# Import roots of the package before it was installed as ``fedphd`` (configs and checkpoints
# written then name e.g. ``server.fedphd.FedPhD``).
OLD_ROOTS = ("common.", "server.", "edge.", "client.")

LEGACY, MESSAGE = "flwr.server.strategy.Strategy", "flwr.serverapp.strategy.Strategy"
# The drivers' defaults are named for the legacy API; the message API's names for them.
MESSAGE_DEFAULT_NAMES = {
    "fraction_fit": "fraction_train",
    "min_fit_clients": "min_train_nodes",
    "min_available_clients": "min_available_nodes",
    "fraction_evaluate": "fraction_evaluate",
    "min_evaluate_clients": "min_evaluate_nodes",
}
# Message-API defaults of the project's answers (e.g. QFedAvg reads the training loss here).
MESSAGE_DEFAULTS = {"train_loss_key": LOSS_METRIC}
NESTED_KEYS = {"path", "args"}


def modern_path(dotted: str) -> str:
    """``dotted`` with a pre-``fedphd`` root mapped (``server.x.Y`` -> ``fedphd.server.x.Y``)."""
    return f"fedphd.{dotted}" if dotted.startswith(OLD_ROOTS) else dotted


def import_object(dotted: str, field_name: str) -> Any:
    """Import ``package.module.Name``; a failure names the config field that asked for it.

    A path of the old layout (``server.fedphd.FedPhD``) that does not import as written is
    taken as its ``fedphd.`` equivalent, with a warning saying what to write instead."""
    try:
        return _import(dotted)
    except (ImportError, AttributeError, ValueError) as error:
        if modern_path(dotted) != dotted:
            try:
                found = _import(modern_path(dotted))
            except (ImportError, AttributeError, ValueError):
                pass
            else:
                log.warning("%s = %r is the old layout's path; write %r", field_name, dotted,
                            modern_path(dotted))
                return found
        raise ConfigError(f"{field_name} = {dotted!r} cannot be imported: {error}") from None


def _import(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def strategy_api(cls: Any) -> str | None:
    """Which Flower strategy API ``cls`` implements (None: neither)."""
    if not inspect.isclass(cls):
        return None
    if issubclass(cls, Strategy):
        return LEGACY
    return MESSAGE if issubclass(cls, MessageStrategy) else None


def build_strategy(
    dotted: str, user_kwargs: dict[str, Any], defaults: dict[str, Any], field_name: str,
    context: dict[str, Any] | None = None,
) -> Strategy:
    """The strategy ``dotted`` names, as a legacy ``Strategy`` the drivers can wrap.

    ``defaults`` (fractions, minimum clients, initial parameters; legacy names, mapped for a
    message-API class) are passed only where the class's constructor accepts them (by name or
    ``**kwargs``); ``context`` (see :func:`~fedphd.common.federation.strategy.run_context`)
    only to parameters named so, since a ``**kwargs`` constructor usually forwards to
    Flower's; ``user_kwargs`` (from the config) as given, nested strategies built.
    """
    built = instantiate(dotted, user_kwargs, defaults, context or {},
                        field_name, f"{field_name}_args")
    if isinstance(built, MessageStrategy):
        return MessageStrategyAdapter(built, defaults.get("initial_parameters"),
                                      (context or {}).get("tensor_names"))
    return built


def instantiate(
    dotted: Any, user_kwargs: Any, defaults: dict[str, Any], context: dict[str, Any],
    path_field: str, args_field: str, api: str | None = None,
) -> Any:
    """Build the strategy ``dotted`` names (``api``: the one a wrapper requires)."""
    if not isinstance(dotted, str):
        raise ConfigError(f"{path_field} must be a dotted path string, not {dotted!r}")
    if not isinstance(user_kwargs, dict):
        raise ConfigError(f"{args_field} must be a table of arguments, not {user_kwargs!r}")
    cls = import_object(dotted, path_field)
    kind = strategy_api(cls)
    if kind is None:
        raise ConfigError(f"{path_field} = {dotted!r} is neither a {LEGACY} nor a {MESSAGE}")
    if api is not None and kind != api:
        raise ConfigError(f"{path_field} = {dotted!r} is a {kind}, but the strategy it is given "
                          f"to wraps a {api}: use the {api.rsplit('.', 1)[0]} class")
    kwargs = constructor_defaults(cls, kind, defaults, context)
    for key, value in user_kwargs.items():
        kwargs[key] = (instantiate(value["path"], value.get("args", {}), defaults, context,
                                   f"{args_field}.{key}.path", f"{args_field}.{key}.args",
                                   api=kind)
                       if is_nested_strategy(value, f"{args_field}.{key}") else value)
    check_arguments(cls, kwargs, path_field, args_field, dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(
            f"{path_field} = {dotted!r} rejected its arguments {sorted(kwargs)}: {error}"
        ) from None


def is_nested_strategy(value: Any, field: str) -> bool:
    """Whether an argument is a strategy table ``{ path = ..., args = {...} }``."""
    if not (isinstance(value, dict) and "path" in value):
        return False
    unknown = sorted(set(value) - NESTED_KEYS)
    if unknown:
        raise ConfigError(f"{field} = {{ path = ..., args = {{...}} }} names a nested strategy; "
                          f"unknown keys {unknown}")
    return True


def constructor_defaults(
    cls: type, kind: str, defaults: dict[str, Any], context: dict[str, Any]
) -> dict[str, Any]:
    """The drivers' defaults and context that ``cls``'s constructor takes."""
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if kind == MESSAGE:
        # Only by name: a message-API **kwargs does not take legacy names.
        named = {MESSAGE_DEFAULT_NAMES[k]: v for k, v in defaults.items()
                 if k in MESSAGE_DEFAULT_NAMES}
        kwargs = {k: v for k, v in {**named, **MESSAGE_DEFAULTS}.items() if k in params}
    else:
        kwargs = {k: v for k, v in defaults.items() if takes_any or k in params}
    kwargs.update({k: v for k, v in context.items() if k in params})
    return kwargs


def check_arguments(
    cls: type, kwargs: dict[str, Any], path_field: str, args_field: str, dotted: str
) -> None:
    """Refuse, in one line, a constructor call that could only fail (now or mid-run)."""
    params = inspect.signature(cls.__init__).parameters
    missing = [name for name, p in list(params.items())[1:]
               if p.default is inspect.Parameter.empty and name not in kwargs
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    if missing:
        raise ConfigError(f"{path_field} = {dotted!r} needs {', '.join(missing)}: give "
                          f"{'it' if len(missing) == 1 else 'them'} in {args_field}")
    for need in NEEDS:
        problem = need(cls, kwargs, args_field)
        if problem:
            raise ConfigError(f"{path_field} = {dotted!r} {problem}")


def _needs_evaluate_fn(cls: type, kwargs: dict[str, Any], args_field: str) -> str | None:
    """Flower's legacy QFedAvg evaluates the global model on the server in every
    ``aggregate_fit`` (its q-fair weights use that loss): without ``evaluate_fn`` it fails
    after round 1 with a NameError."""
    from fedphd.common.wire.transport import LegacyQFedAvg

    if issubclass(cls, LegacyQFedAvg) and not callable(kwargs.get("evaluate_fn")):
        return ("needs evaluate_fn, a Python callable (it evaluates the global model on the "
                "server every round to weight the q-fair update), which a TOML config cannot "
                "give: subclass it with an evaluate_fn, or use flwr.serverapp.strategy.QFedAvg")
    return None


def _needs_rule_arguments(cls: type, kwargs: dict[str, Any], args_field: str) -> str | None:
    """Flower's legacy Bulyan passes its extra keyword arguments to its first aggregation
    rule (Krum by default, which needs ``to_keep``): without them it fails with a TypeError
    when it first aggregates."""
    from fedphd.common.wire.transport import LegacyBulyan

    if not issubclass(cls, LegacyBulyan):
        return None
    rule = kwargs.get("first_aggregation_rule") or inspect.signature(
        cls.__init__).parameters["first_aggregation_rule"].default
    given = {"results", "num_malicious", *kwargs}
    missing = [name for name, p in inspect.signature(rule).parameters.items()
               if p.default is inspect.Parameter.empty and name not in given]
    if missing:
        return (f"needs {', '.join(missing)} for its first aggregation rule "
                f"({rule.__name__}): give {'them' if len(missing) > 1 else 'it'} in {args_field}"
                + (" (to_keep = 0: Krum)" if "to_keep" in missing else ""))
    return None


NEEDS: list[Callable[[type, dict[str, Any], str], str | None]] = [
    _needs_evaluate_fn, _needs_rule_arguments,
]
