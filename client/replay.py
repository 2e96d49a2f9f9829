"""Replaying a cloud round: a cloud that resumes from its checkpoint sends its interrupted
round again, and each client trains it again from that round's start, so the resumed run is
bit for bit an uninterrupted one."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedphd.common.wire.keys import CLOUD_ROUND_KEY, ROUND_KEY
from fedphd.common.wire.transport import Scalar

log = logging.getLogger("fedphd.client")


def cpu_copy(value: Any, into: Any = None) -> Any:
    """A deep copy with every tensor cloned to the CPU (snapshots do not hold GPU memory).

    ``into``: an earlier copy that nothing else holds; where it has the same structure, each
    CPU tensor of the same shape and dtype is overwritten in place instead of allocated anew
    (a client snapshots its state every cloud round; fresh buffers each time cost page faults
    as well as the copy)."""
    if isinstance(value, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into.device.type == "cpu"
                and into.shape == value.shape and into.dtype == value.dtype
                and value.layout == torch.strided):
            return into.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        same = isinstance(into, dict) and into.keys() == value.keys()
        return {key: cpu_copy(item, into[key] if same else None) for key, item in value.items()}
    if isinstance(value, list | tuple):
        same = type(into) is type(value) and len(into) == len(value)
        return type(value)(cpu_copy(item, into[index] if same else None)
                           for index, item in enumerate(value))
    return copy.deepcopy(value)


@dataclass
class RoundStart:
    """A client's state when a cloud round began, kept until the next cloud round."""

    cloud_round: int
    state: dict[str, Any]


class RoundReplay:
    """Keeps one snapshot: the state at the start of the latest cloud round."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.start: RoundStart | None = None
        self.last_round = -1  # the ROUND_KEY of the last instruction trained

    def mark(self, config: dict[str, Scalar],
             state: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Called with each instruction before anything changes: snapshots ``state()`` when
        a cloud round begins; returns a copy of the snapshot to go back to when the
        instruction is for a round this client already trained in (the cloud resumed)."""
        step = int(config.get(ROUND_KEY, 0))
        cloud_round = int(config.get(CLOUD_ROUND_KEY, step))
        start, rewind = self.start, None
        if start is None or cloud_round > start.cloud_round:
            # The last cloud round's snapshot is not needed any more: its buffers take the
            # new one.
            self.start = RoundStart(cloud_round, cpu_copy(
                state(), into=None if start is None else start.state))
        elif cloud_round == start.cloud_round and step <= self.last_round:
            log.info("client %d: cloud round %d again (the server resumed): replaying it from "
                     "its start", self.client_id, cloud_round)
            rewind = cpu_copy(start.state)  # the snapshot stays as it is for another replay
        elif cloud_round < start.cloud_round:
            log.warning("client %d: instruction for cloud round %d after round %d: this "
                        "client's state cannot go back that far, it trains on from where it "
                        "is", self.client_id, cloud_round, start.cloud_round)
        self.last_round = step
        return rewind
