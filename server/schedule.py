"""The hook through which a method changes the global model between cloud rounds.

The cloud drives the rounds; a method whose global model changes on a schedule (FedPhD prunes
it once, after its sparse-training rounds) implements :class:`ModelSchedule`, and
:func:`fedphd.server.methods.model_schedule` picks the run's schedule from its config. The
cloud calls it without knowing which method it is:

* ``instruction_keys()``: extra keys of every instruction while the current model is the
  global one. The cloud reads them whenever it installs a model, so they may change when the
  model does (FedPhD's group-lasso weight is on in sparse rounds only).
* ``before_round(server_round, current, metrics)``: called with ``server_round = 0`` once at
  the start, before the peers connect (a change from the outset is then made while they start
  up), and with ``r >= 1`` before every round ``r`` the cloud runs (in a resumed run after its
  random generators are restored, so a change draws what it drew in the uninterrupted run).
  ``current()`` gives the global model with the latest aggregate loaded (it costs a decode, so
  a schedule calls it only when it changes the model). Returns the new global model, or
  ``None`` to keep the current one; a schedule may write its own line into ``metrics``.
* ``state()`` / ``load_state(state)``: what the checkpoint keeps for ``--resume`` (e.g. that
  the change was made); numbers, strings and containers only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from diffusers import UNet2DModel

from fedphd.common.wire.transport import Scalar
from fedphd.server.metrics_log import MetricsLog


class ModelSchedule(Protocol):
    """A method's changes of the global model over the run (see the module docstring)."""

    def instruction_keys(self) -> dict[str, Scalar]: ...

    def before_round(
        self, server_round: int, current: Callable[[], UNet2DModel], metrics: MetricsLog
    ) -> UNet2DModel | None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class FixedSchedule:
    """The model never changes; every instruction carries the same extra keys (often none)."""

    def __init__(self, keys: dict[str, Scalar] | None = None) -> None:
        self._keys = dict(keys or {})

    def __repr__(self) -> str:
        return f"FixedSchedule({self._keys})"

    def instruction_keys(self) -> dict[str, Scalar]:
        return dict(self._keys)

    def before_round(
        self, server_round: int, current: Callable[[], UNet2DModel], metrics: MetricsLog
    ) -> UNet2DModel | None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore (a checkpoint of another schedule is refused by its config)."""
