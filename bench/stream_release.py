"""``fedphd edge`` whose connections let go of their last instruction and answer between rounds.

For ``bench.scale --release-streams``: a measurement of a proposed fix, not the product. With
the running sum the edge's aggregation holds no answers, yet two generator frames keep, per
connected client and until its next instruction, the last messages of the link: Flower's
``GrpcBridge.ins_wrapper_iterator`` (its local ``ins_wrapper``, the instruction) and the
project's ``transport._stream`` (its locals ``ins_wrapper`` and ``answer``), ~2 models per
client. This module runs the shipped edge command with both generators replaced by copies that
drop those references once used; nothing else changes.

    python -m bench.stream_release edge --config RUN.toml --cloud HOST:PORT --listen HOST:PORT \
        --edge-id 0
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import grpc
from flwr.server.superlink.fleet.grpc_bidi import grpc_bridge
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge, InsWrapper, ResWrapper

from fedphd.common.commands.cli import main
from fedphd.common.wire import transport


def ins_wrapper_iterator(self: GrpcBridge) -> Iterator[InsWrapper]:
    """Flower's ``GrpcBridge.ins_wrapper_iterator``, without keeping what it yielded."""
    while not self._is_closed():
        with self._cv:
            self._cv.wait_for(lambda: self._status in [grpc_bridge.Status.CLOSED,
                                                      grpc_bridge.Status.INS_WRAPPER_AVAILABLE])
            self._raise_if_closed()
            ins_wrapper = self._ins_wrapper
            self._ins_wrapper = None
            self._transition(grpc_bridge.Status.AWAITING_RES_WRAPPER)
        if ins_wrapper is None:
            raise ValueError("InsWrapper can not be None")
        yield ins_wrapper
        del ins_wrapper


def stream(bridge: GrpcBridge, request_iterator, context: grpc.ServicerContext):
    """``transport._stream``, dropping each instruction once sent and each answer once
    handed to the bridge."""
    answers = transport.TimeoutIterator(iterator=request_iterator, reset_on_next=True)
    for ins_wrapper in bridge.ins_wrapper_iterator():
        message, timeout = ins_wrapper.server_message, ins_wrapper.timeout
        del ins_wrapper
        yield message
        del message
        if timeout is not None:
            answers.set_timeout(timeout)
        try:
            answer = next(answers)
        except StopIteration:
            return
        if answer is answers.get_sentinel():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"Timeout of {timeout}sec was exceeded.")
        bridge.set_res_wrapper(res_wrapper=ResWrapper(client_message=answer))
        del answer


if __name__ == "__main__":
    GrpcBridge.ins_wrapper_iterator = ins_wrapper_iterator
    transport._stream = stream
    sys.exit(main())
