"""The reference for ``bench.transport``: bare grpcio carrying raw bytes over the same hops.

Three processes, like the deployment: the caller (cloud) sends ``down_edge`` bytes in one
unary call to the relay (edge), which sends ``down_client`` bytes in one unary call to the
echo server (client), which answers ``up_client`` bytes; the relay then answers the caller
``up_edge`` bytes. Four transfers over two loopback links, no protobuf message, no tensor
serialisation, no Flower: only what gRPC itself costs. Payloads are made once per process.

    python -m bench.bare_grpc echo  --port P --reply-bytes N
    python -m bench.bare_grpc relay --port P --to 127.0.0.1:Q --forward-bytes N --reply-bytes M
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent import futures

import grpc

SERVICE = "bench.Bytes"
METHOD = f"/{SERVICE}/Send"
MAX_MESSAGE = 2**31 - 1
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
           ("grpc.max_receive_message_length", MAX_MESSAGE)]


def _identity(data: bytes) -> bytes:
    return data


def payload(size: int) -> bytes:
    # Random bytes: incompressible, should any layer of the stack try.
    return os.urandom(size)


def serve(port: int, handle) -> grpc.Server:
    """A unary bytes-to-bytes method on ``127.0.0.1:port`` (no protobuf, identity codecs)."""
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Send": grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=_identity, response_serializer=_identity),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def connect(
    address: str, timeout: float = 60.0
) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable]:
    channel = grpc.insecure_channel(address, options=OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    call = channel.unary_unary(METHOD, request_serializer=_identity,
                               response_deserializer=_identity)
    return channel, call


def run_echo(port: int, reply_bytes: int) -> None:
    reply = payload(reply_bytes)
    server = serve(port, lambda request, context: reply)
    server.wait_for_termination()


def run_relay(port: int, target: str, forward_bytes: int, reply_bytes: int) -> None:
    forward, reply = payload(forward_bytes), payload(reply_bytes)
    _channel, call = connect(target)

    def handle(request: bytes, context) -> bytes:
        call(forward)  # the edge's round with its client, then its own answer
        return reply

    server = serve(port, handle)
    server.wait_for_termination()


def timed_calls(address: str, size: int, repeats: int) -> list[float]:
    """Seconds per round trip through the relay, after one untimed call that opens the
    connections and warms up both servers."""
    channel, call = connect(address)
    request = payload(size)
    try:
        call(request)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(request)
            seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["echo", "relay"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", help="relay: the echo server's address")
    parser.add_argument("--forward-bytes", type=int, default=0)
    parser.add_argument("--reply-bytes", type=int, required=True)
    args = parser.parse_args()
    if args.role == "echo":
        run_echo(args.port, args.reply_bytes)
    else:
        run_relay(args.port, args.to, args.forward_bytes, args.reply_bytes)


if __name__ == "__main__":
    main()
