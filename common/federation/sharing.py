"""Partial sharing: which tensors an instruction carries and which its answer must return.

A strategy that puts ``fedphd.send_groups`` / ``fedphd.return_groups`` (U-Net groups ``down``,
``mid``, ``up``; see :mod:`fedphd.common.core.unet_groups`) into a receiver's ``FitIns.config``
gets only those tensors on the wire, both ways. Which groups go where is the strategy's
business (FedDiffuse's modes, in ``server/feddiffuse.py``); this module only turns the keys
into tensor positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedphd.common.core.unet_groups import (
    GROUPS,
    format_groups,
    group_indices,
    is_everything,
    parse_groups,
)
from fedphd.common.wire.keys import RETURN_GROUPS_KEY, SEND_GROUPS_KEY
from fedphd.common.wire.transport import Scalar


@dataclass(frozen=True)
class Layout:
    """Positions (wire order) of the tensors one instruction sends and its answer returns."""

    sent_groups: str
    sent: list[int]
    returned_groups: str
    returned: list[int]

    @classmethod
    def whole(cls, size: int) -> Layout:
        everything = format_groups(GROUPS)
        return cls(everything, list(range(size)), everything, list(range(size)))

    @property
    def returns_everything(self) -> bool:
        return self.returned_groups == format_groups(GROUPS)

    def returned_within_sent(self) -> list[int]:
        """Positions of the returned tensors among the sent ones."""
        if self.returned == self.sent:
            return list(range(len(self.sent)))
        position = {index: at for at, index in enumerate(self.sent)}
        return [position[i] for i in self.returned]


def layout_of(
    config: dict[str, Scalar], size: int, tensor_names: Callable[[], list[str]]
) -> Layout:
    """Which tensors of a ``size``-tensor model an instruction sends and its answer carries."""
    send = parse_groups(config.get(SEND_GROUPS_KEY))  # type: ignore[arg-type]
    back = parse_groups(config.get(RETURN_GROUPS_KEY))  # type: ignore[arg-type]
    if not set(back) <= set(send):
        # A client's update is taken from what it received; it cannot return other parts.
        raise ValueError(f"{RETURN_GROUPS_KEY} {back} is not within {SEND_GROUPS_KEY} {send}")
    if is_everything(send) and is_everything(back):
        return Layout.whole(size)
    names = tensor_names()
    if len(names) != size:
        raise ValueError(f"{len(names)} tensor names for a {size}-tensor model")
    return Layout(format_groups(send), group_indices(names, send),
                  format_groups(back), group_indices(names, back))
