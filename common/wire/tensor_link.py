"""The tensor link: model tensors on a second gRPC call beside Flower's stream.

Flower's legacy stream carries a model as protobuf messages that its own code copies several
times on each side (building a nested message deep-copies every tensor). For a peer that
declares it speaks the link (``fedphd.tensor_link`` among its properties when it joins), a
server sends the instruction as a Flower message whose ``Parameters`` carry no tensors — only
``fedphd.tensor-link:<codec>`` as their type and a ticket in the config — and the tensors
wait in the server's :class:`TensorDepot`. The receiver of the instruction dials the same
server address (so it crosses the same NAT and firewalls as its Flower link, with the same
TLS / mutual-TLS credentials and message limit) and

* ``Fetch(ticket)`` streams the instruction's tensors to it;
* ``Put`` streams its answer's tensors back: the ticket first, then the tensors.
  Its Flower answer then carries ``fedphd.tensor-link:<codec>`` and no tensors.

**Fetching ahead.** Each instruction also names the ticket of that peer's *next* one
(``fedphd.next_tensor_ticket``, :meth:`TensorDepot.reserve`). The receiver dials
``Fetch(next ticket)`` as soon as it has this instruction's tensors; the server's handler
waits until it offers the next instruction's tensors under that ticket and streams them at
once, while the instruction itself is still on its way over Flower's stream. A hop then
costs one transfer instead of a Flower message, a call set-up and a transfer in turn (on a
WAN: a round trip less per instruction). A waiting fetch holds one of the server's handler
threads, so a server reserves at most as many tickets as peers it was sized for
(``max_waiting``); a peer that leaves loses its reservation, and a fetch ahead that ends
without tensors (released, timed out, refused) falls back to fetching on arrival.

Both methods use identity serialisers: a tensor is the same ``np.save`` blob Flower would put
in its message, handed to gRPC as it is. A tensor of 1 MiB or more is a gRPC message of its
own (no copy); smaller ones travel back to back in frames of up to 1 MiB (:func:`frames`),
because a gRPC message costs tens of microseconds of Python on each side and a U-Net has
hundreds of biases and norms. Frames no larger than that let each side work on one frame
(join, split) while gRPC moves the next: with 4 MiB frames, a 4.4 MB model went in one
frame and both sides waited for each other. A ``.npy`` blob's header says how long it is,
so a frame needs no length prefix and the link moves exactly the blobs' bytes. A ticket is
a random 128-bit token that only its peer's own Flower stream carried; under mutual TLS the
caller's certificate must also be the one its peer joined with. An upload may not exceed the
run's message limit (what one Flower message could carry), and each ticket is fetched and
answered once per instruction. Every byte the link moves is metered on its server's link.

A plain Flower peer never declares the link and gets its tensors inside Flower's messages.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from fedphd.common.wire import npy

log = logging.getLogger("fedphd.tensor_link")

SERVICE = "fedphd.TensorLink"
FETCH = f"/{SERVICE}/Fetch"
PUT = f"/{SERVICE}/Put"
# Where the instruction's Parameters name what they would have carried.
TYPE_PREFIX = "fedphd.tensor-link:"
TICKET_KEY = "fedphd.tensor_ticket"
# The ticket of the peer's next instruction, which it may fetch ahead (see TensorDepot).
NEXT_TICKET_KEY = "fedphd.next_tensor_ticket"
# What the receiver measured of an instruction that came over the link (its Flower message
# plus the tensors), set by the receiver's transport for the code that reports it.
RECEIVED_BYTES_KEY = "fedphd.received_bytes"
# The property a peer declares when it speaks the link.
PROPERTY = "fedphd.tensor_link"
MAX_TENSORS = 100_000  # per upload; the 35.75 M U-Net has 328
RETRIES = 4  # attempts of a call refused as unavailable, within the instruction's time
FRAME_BYTES = 1 << 20  # small tensors travel together in gRPC messages of up to this size
WAIT_POLL_S = 1.0  # how often a fetch ahead checks that its caller is still there
MAX_AHEAD_S = 3600.0  # the longest a fetch ahead waits for its instruction (then: on arrival)
ALONE_BYTES = 1 << 20  # a tensor this large is a message of its own (sent without a copy)


def frames(blobs: Iterable[bytes], limit: int = FRAME_BYTES) -> Iterator[bytes]:
    """``blobs`` as gRPC messages, in order: each large or non-``.npy`` blob alone, runs of
    small ``.npy`` blobs concatenated up to ``limit`` bytes (:func:`split_frame` undoes it)."""
    run: list[bytes] = []
    size = 0
    for blob in blobs:
        small = (len(blob) < min(ALONE_BYTES, limit)
                 and npy.blob_length(blob) == len(blob))
        if run and (not small or size + len(blob) > limit):
            yield run[0] if len(run) == 1 else b"".join(run)
            run, size = [], 0
        if small:
            run.append(blob)
            size += len(blob)
        else:
            yield blob
    if run:
        yield run[0] if len(run) == 1 else b"".join(run)


def split_frame(message: bytes) -> list[bytes]:
    """The blobs of one link message: the ``.npy`` blobs a frame holds back to back, or the
    message itself when it is not exactly such a run (a lone tensor, or bytes that are not
    ``.npy``, which the codec then judges)."""
    ends: list[int] = []
    position = 0
    while position < len(message):
        length = npy.blob_length(message, position)
        if length is None:
            return [message]
        position += length
        ends.append(position)
    if len(ends) <= 1:
        return [message]
    starts = [0, *ends[:-1]]
    return [message[start:end] for start, end in zip(starts, ends, strict=True)]


def received_blobs(messages: Iterable[bytes]) -> list[bytes]:
    """The blobs of a fetch's messages, in order (each split with :func:`split_frame`)."""
    return [blob for message in messages for blob in split_frame(message)]


def on_link(tensor_type: str) -> bool:
    """Whether a payload's tensors travel on the link (its Parameters carry none)."""
    return tensor_type.startswith(TYPE_PREFIX)


def link_type(tensor_type: str) -> str:
    return TYPE_PREFIX + tensor_type


def carried_type(tensor_type: str) -> str:
    """The codec's tensor type of a payload on the link."""
    return tensor_type[len(TYPE_PREFIX):]


class LinkError(ConnectionError):
    """A transfer on the tensor link that failed; the message says which and why."""


class TooLarge(LinkError):
    """The server refused an upload over its message limit (retrying cannot help)."""


@dataclass
class _Ticket:
    """One instruction's tensors on their way down and its answer's on their way up."""

    peer: str  # the connection the ticket was issued to, for logs
    fingerprint: str | None  # the certificate that peer joined with (mutual TLS)
    down: list[bytes] | None  # None: reserved for the peer's next instruction
    up: list[bytes] | None = None
    fetched: bool = False
    offered: threading.Event = field(default_factory=threading.Event)


class Meter(Protocol):
    """What the depot tells its server's traffic meter."""

    def record_bytes(self, down: int = 0, up: int = 0) -> None: ...

    def record_control(self, size: int) -> None: ...


class TensorDepot:
    """A server's tickets: the tensors of instructions in flight and the answers uploaded.

    Every byte the link moves is recorded on ``meter``: a fetched tensor as instruction bytes
    (down), an uploaded one and its ticket as answer bytes (up), a fetch's ticket as control.
    """

    def __init__(self, max_upload: int, meter: Meter,
                 fingerprint_of: Callable[[grpc.ServicerContext], str | None],
                 max_waiting: int = 0) -> None:
        self.max_upload = max_upload
        self.frame_limit = min(FRAME_BYTES, max_upload)
        self._meter = meter
        self._fingerprint_of = fingerprint_of
        self.max_waiting = max_waiting
        self._tickets: dict[str, _Ticket] = {}
        self._reserved: dict[str, str] = {}  # peer -> the ticket of its next instruction
        self._lock = threading.Lock()

    def offer(self, peer: str, tensors: list[bytes], fingerprint: str | None) -> str:
        """A ticket for ``peer`` to fetch ``tensors`` with and upload its answer under: the
        one reserved for its next instruction, if any (a fetch waiting on it starts now)."""
        stale = None
        with self._lock:
            ticket = self._reserved.pop(peer, None)
            entry = None if ticket is None else self._tickets.get(ticket)
            if entry is not None and entry.fingerprint != fingerprint:
                stale, entry = self._tickets.pop(ticket), None  # reserved for another
            if entry is None:
                ticket = secrets.token_hex(16)
                entry = _Ticket(peer, fingerprint, None)
                self._tickets[ticket] = entry
            entry.down = list(tensors)
        entry.offered.set()
        if stale is not None:
            stale.offered.set()  # its waiting fetch ends without tensors
        return ticket

    def reserve(self, peer: str, fingerprint: str | None) -> str | None:
        """The ticket ``peer``'s next instruction will carry, for it to fetch ahead: its
        ``Fetch`` waits until that instruction's tensors are offered, so they flow while
        the instruction itself travels on Flower's stream. None when as many fetches may
        already wait as the server keeps threads for (the peer then fetches on arrival)."""
        with self._lock:
            if peer in self._reserved:
                return self._reserved[peer]
            if len(self._reserved) >= self.max_waiting:
                return None
            ticket = secrets.token_hex(16)
            self._tickets[ticket] = _Ticket(peer, fingerprint, None)
            self._reserved[peer] = ticket
        return ticket

    def release(self, peer: str) -> None:
        """Drop ``peer``'s reserved ticket (it left); a fetch waiting on it ends."""
        with self._lock:
            ticket = self._reserved.pop(peer, None)
            entry = None if ticket is None else self._tickets.pop(ticket, None)
        if entry is not None:
            entry.offered.set()

    def claim(self, ticket: str) -> list[bytes]:
        """The tensors uploaded under ``ticket`` (the answer said they are there)."""
        with self._lock:
            entry = self._tickets.get(ticket)
        if entry is None or entry.up is None:
            raise LinkError("the answer says its tensors are on the tensor link, but none "
                            "were uploaded under its instruction's ticket")
        return entry.up

    def close(self, ticket: str) -> None:
        """Forget a ticket (its instruction was answered, failed or timed out)."""
        with self._lock:
            self._tickets.pop(ticket, None)

    def _entry(self, ticket: str, context: grpc.ServicerContext) -> _Ticket:
        with self._lock:
            entry = self._tickets.get(ticket)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown or expired tensor-link ticket")
        if entry.fingerprint is not None and self._fingerprint_of(context) != entry.fingerprint:
            log.warning("refused a tensor-link call for %s's ticket from another certificate",
                        entry.peer)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "this ticket was issued to a peer with another certificate")
        return entry

    def fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``Fetch``: the instruction's tensors, in :func:`frames`."""
        self._meter.record_control(len(request))
        ticket = request.decode(errors="replace")
        entry = self._entry(ticket, context)
        if not self._wait_offered(ticket, entry, context):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          "no instruction was offered under this ticket while the call lasted")
        with self._lock:
            if entry.fetched:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "this ticket's tensors were already fetched")
            entry.fetched = True
        for message in frames(entry.down, self.frame_limit):
            # Metered as it is handed to gRPC: the bytes of a peer that hangs up midway count.
            self._meter.record_bytes(down=len(message))
            yield message

    def _wait_offered(self, ticket: str, entry: _Ticket,
                      context: grpc.ServicerContext) -> bool:
        """Wait (a fetch ahead) until ``entry``'s tensors are offered, the caller hangs up,
        its deadline passes or :data:`MAX_AHEAD_S` do; whether they were offered."""
        give_up = time.monotonic() + MAX_AHEAD_S
        while not entry.offered.wait(WAIT_POLL_S):
            remaining = context.time_remaining()
            if (not context.is_active() or (remaining is not None and remaining <= 0)
                    or time.monotonic() > give_up):
                return False
        if not context.is_active():  # it ended while waiting: a fetch on arrival gets them
            return False
        with self._lock:
            return entry.down is not None and self._tickets.get(ticket) is entry

    def put(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """``Put``: the ticket, then the answer's tensors, in :func:`frames`."""
        ticket = next(requests, b"")
        self._meter.record_bytes(up=len(ticket))
        entry = self._entry(ticket.decode(errors="replace"), context)
        if entry.down is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "no instruction was sent under this ticket yet")
        if entry.up is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "an answer was already uploaded under this ticket")
        received: list[bytes] = []
        total = 0
        for message in requests:
            total += len(message)
            self._meter.record_bytes(up=len(message))
            if total > self.max_upload:
                self._too_large(context)
            received.extend(split_frame(message))
            if len(received) > MAX_TENSORS:
                self._too_large(context)
        entry.up = received
        return b"ok"

    def _too_large(self, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the upload exceeds this server's limit of "
                      f"{self.max_upload / 2**20:.1f} MiB or {MAX_TENSORS} tensors")


def _identity(data: bytes) -> bytes:
    return data


def add_to_server(server: grpc.Server, depot: TensorDepot) -> None:
    """Serve ``Fetch`` and ``Put`` on ``server`` (before it starts), beside Flower's service."""
    handlers = {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            depot.fetch, request_deserializer=_identity, response_serializer=_identity),
        "Put": grpc.stream_unary_rpc_method_handler(
            depot.put, request_deserializer=_identity, response_serializer=_identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class LinkChannel:
    """The receiver's side: one channel to its server's address, dialled on first use."""

    def __init__(self, connect: Callable[[], grpc.Channel], address: str,
                 frame_limit: int = FRAME_BYTES) -> None:
        self._connect = connect
        self.address = address
        self.frame_limit = min(frame_limit, FRAME_BYTES)
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _stubs(self) -> tuple[Callable, Callable]:
        with self._lock:
            if self._channel is None:
                self._channel = self._connect()
            channel = self._channel
        return (channel.unary_stream(FETCH, request_serializer=_identity,
                                     response_deserializer=_identity),
                channel.stream_unary(PUT, request_serializer=_identity,
                                     response_deserializer=_identity))

    def fetch(self, ticket: str, timeout: float | None) -> list[bytes]:
        """The tensors of the instruction that carried ``ticket``."""
        return self._retried("fetch", lambda fetch, _: received_blobs(
            fetch(ticket.encode(), timeout=timeout)), timeout)

    def fetch_ahead(self, ticket: str, timeout: float | None) -> FetchAhead:
        """Start fetching the tensors of the instruction that will carry ``ticket`` (the
        server's :meth:`TensorDepot.reserve`), in a thread of its own."""
        return FetchAhead(self, ticket, timeout)

    def put(self, ticket: str, tensors: Iterable[bytes], timeout: float | None) -> None:
        """Upload an answer's tensors under its instruction's ticket."""
        # Framed before the call: framing as gRPC takes each frame made the 35.75 M U-Net's
        # round slower (1.37-1.43 s against 1.14 s, bench.transport).
        messages = [ticket.encode(), *frames(tensors, self.frame_limit)]
        self._retried("upload", lambda _, put: put(iter(messages), timeout=timeout), timeout)

    def _retried(self, what: str, call: Callable, timeout: float | None):
        """``call`` with the stubs, tried again (like the Flower link) while the server is
        unavailable or at its limit of concurrent calls; any other refusal is final."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.2
        for attempt in range(1, RETRIES + 1):
            try:
                return call(*self._stubs())
            except grpc.RpcError as error:
                busy = (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        and "concurrent rpc limit" in str(error.details()).lower())
                retry = ((error.code() == grpc.StatusCode.UNAVAILABLE or busy)
                         and attempt < RETRIES
                         and (deadline is None or time.monotonic() + delay < deadline))
                if not retry:
                    refused = (TooLarge if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                               and not busy else LinkError)
                    raise refused(f"tensor-link {what} at {self.address} failed: "
                                  f"{error.code().name}: {error.details()}") from None
                log.warning("tensor-link %s at %s: %s; trying again", what, self.address,
                            error.details())
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class FetchAhead:
    """A fetch of an instruction's tensors started before the instruction arrived: the
    server's handler waits until it offers them and then streams them while the
    instruction travels on Flower's stream; received and split in this object's thread."""

    def __init__(self, channel: LinkChannel, ticket: str, timeout: float | None) -> None:
        self.ticket = ticket
        self._channel = channel
        self._timeout = timeout
        self._call = None
        self._cancelled = False
        self._blobs: list[bytes] | None = None  # stays None if the call fails
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fetch-ahead")
        self._thread.start()

    def _run(self) -> None:
        fetch, _ = self._channel._stubs()
        try:
            with self._lock:
                if self._cancelled:
                    return
                self._call = fetch(self.ticket.encode(), timeout=self._timeout)
            self._blobs = received_blobs(self._call)
        except grpc.RpcError:
            return  # a fetch on arrival gets the tensors, or says why it cannot

    def result(self, timeout: float | None) -> list[bytes] | None:
        """The tensors; None when the fetch ahead did not get them (the call ended before
        the server offered any, or failed): a fetch on arrival then gets them, or says why
        it cannot."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel()
            raise LinkError(f"tensor-link fetch at {self._channel.address} did not finish "
                            f"within {timeout} s")
        return self._blobs

    def cancel(self) -> None:
        """End the fetch (its instruction will not come: another ticket arrived)."""
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()
