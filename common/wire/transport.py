"""The one module of the package that imports Flower: gRPC server, gRPC client, message types,
the strategy base classes and Flower's aggregation helper (a ruff rule, TID251, keeps every
other module of the package from importing ``flwr``).

A later Flower migration (e.g. to SuperLink/SuperNode once it has an edge tier) touches this
file only. Everything here is Flower's own machinery; the project adds two things:

* traffic metering — every ``ServerMessage`` sent and ``ClientMessage`` received on a server's
  bidirectional stream is measured with protobuf's ``ByteSize()``, the exact length of the
  serialised message that gRPC puts on the wire (its 5-byte frame header and HTTP/2 headers
  aside), per connected peer;
* a bounded wait for peers, so no server blocks for a day on a client that never comes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
import traceback
from dataclasses import dataclass, field

import grpc
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.compat.client.app import start_client
from flwr.proto.transport_pb2 import ServerMessage  # pylint: disable=no-name-in-module
from flwr.server import Server, SimpleClientManager
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.server import evaluate_clients, fit_clients, reconnect_clients
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.strategy.aggregate import aggregate
from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import FlowerServiceServicer
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import (
    GrpcBridge,
    GrpcBridgeClosed,
    InsWrapper,
    ResWrapper,
)
from flwr.supercore.grpc import generic_create_grpc_server

from fedphd.common.wire.keys import CLIENT_ID_PROPERTY, EDGE_ID_PROPERTY

try:  # the generated service module moved between Flower releases
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
except ImportError:  # pragma: no cover
    from flwr.proto import transport_pb2_grpc

    add_FlowerServiceServicer_to_server = transport_pb2_grpc.add_FlowerServiceServicer_to_server

from flwr.compat.client.client import Client  # noqa: E402

__all__ = [
    "BoundedClientManager",
    "FedAvg",
    "Strategy",
    "aggregate",
    "evaluate_clients",
    "fit_clients",
    "Client",
    "ClientManager",
    "ClientProxy",
    "Code",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "GrpcBridgeClosed",
    "Parameters",
    "Scalar",
    "Server",
    "PeerIdentity",
    "ServerUnreachable",
    "SimpleClientManager",
    "Status",
    "Traffic",
    "TrafficMeter",
    "connect_client",
    "disconnect_all",
    "move_client",
    "fit_ins_wire_size",
    "fit_res",
    "new_server",
    "ok_status",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
    "peer_identity",
    "start_flower_server",
    "wait_for_clients",
]

# gRPC's ceiling; runs pass fedphd.common.wire.limits' limit.
GRPC_MAX_MESSAGE_LENGTH = 2_147_483_647
MAX_RETRY_DELAY = 3.0

log = logging.getLogger("fedphd.transport")


@dataclass
class Traffic:
    """Bytes of serialised training messages (fit and evaluate): ``down`` = server to client,
    ``up`` = client to server; ``control``: both ways, the small messages around them (a
    peer's properties, reconnect orders)."""

    down: int = 0
    up: int = 0
    messages: int = 0
    control: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.down + other.down, self.up + other.up,
                       self.messages + other.messages, self.control + other.control)


@dataclass
class TrafficMeter:
    """Thread-safe byte counters of one server's links, read round by round with :meth:`take`."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _since_take: Traffic = field(default_factory=Traffic)
    _total: Traffic = field(default_factory=Traffic)

    def record(self, down: int = 0, up: int = 0) -> None:
        self._add(Traffic(down, up, 1))

    def record_control(self, size: int) -> None:
        self._add(Traffic(control=size))

    def _add(self, delta: Traffic) -> None:
        with self._lock:
            self._since_take += delta
            self._total += delta

    def carry_over(self, total: Traffic) -> None:
        """Start the totals from an earlier process's (a resumed cloud)."""
        with self._lock:
            self._total = self._total + total

    def take(self) -> Traffic:
        """Traffic since the previous call (the round that just ended), and reset it."""
        with self._lock:
            taken, self._since_take = self._since_take, Traffic()
            return taken

    @property
    def total(self) -> Traffic:
        with self._lock:
            return dataclasses.replace(self._total)


TRAINING_MESSAGES = ("fit_ins", "evaluate_ins")


class _MeteredBridge(GrpcBridge):
    """Flower's per-client bridge, measuring each instruction and each answer."""

    def __init__(self, meter: TrafficMeter) -> None:
        super().__init__()
        self._meter = meter

    def request(self, ins_wrapper: InsWrapper) -> ResWrapper:
        message = ins_wrapper.server_message
        if message.WhichOneof("msg") not in TRAINING_MESSAGES:
            res_wrapper = super().request(ins_wrapper)
            self._meter.record_control(message.ByteSize() + res_wrapper.client_message.ByteSize())
            return res_wrapper
        # Counted before the answer: the instruction was put on the stream even if the
        # client dies before it replies.
        self._meter.record(down=message.ByteSize())
        res_wrapper = super().request(ins_wrapper)
        self._meter.record(up=res_wrapper.client_message.ByteSize())
        return res_wrapper


@dataclass(frozen=True)
class PeerIdentity:
    """Who a connected peer is, as its server established it when it joined.

    ``certified``: taken from the peer's certificate (mutual TLS), not only from its word.
    ``declared_examples``: the total of the label histogram it declared when it joined (None
    when it declared none); its answers may not claim more samples than that.
    """

    kind: str  # "client" | "edge"
    number: int
    certified: bool = False
    declared_examples: int | None = None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.number}"


def peer_identity(proxy: ClientProxy) -> PeerIdentity | None:
    """The identity the server established for ``proxy`` (None: not established, e.g. a
    peer that declared nothing on a link without client certificates)."""
    return getattr(proxy, "peer_identity", None)


def fit_ins_wire_size(ins: FitIns) -> int:
    """Size of the serialised ``ServerMessage`` that carried ``ins`` (what the server metered)."""
    return ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)).ByteSize()


def start_flower_server(
    address: str,
    client_manager: ClientManager,
    meter: TrafficMeter,
    max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    certificates: tuple[bytes, bytes, bytes] | None = None,
) -> grpc.Server:
    """Start Flower's gRPC bidirectional-stream server with metered bridges (non-blocking).

    This is ``flwr.server.superlink.fleet.grpc_bidi.start_grpc_server`` with one change: the
    servicer builds metered bridges.
    """
    servicer = FlowerServiceServicer(
        client_manager, grpc_bridge_factory=lambda: _MeteredBridge(meter)
    )
    server = generic_create_grpc_server(
        servicer_and_add_fn=(servicer, add_FlowerServiceServicer_to_server),
        server_address=address,
        max_message_length=max_message_length,
        certificates=certificates,
    )
    server.start()
    return server


class BoundedClientManager(SimpleClientManager):
    """Flower's ``SimpleClientManager`` with two changes that a long, reproducible run needs.

    * Bounded waits: sampling waits at most ``max_wait`` seconds for the strategy's minimum
      number of peers (Flower's own wait is a day), so a peer that never comes back costs one
      bounded wait, then the round runs with the others or is skipped.
    * Sampling by identity: the candidates are ordered by the peer's declared id
      (``client_id``/``edge_id`` from its properties, asked once per connection) before
      Flower's ``random.sample``, not by connection order, so the same seed picks the same
      peers in the same order whatever order they connected in (or reconnected, after a
      crash).
    """

    def __init__(self, max_wait: float, identify_timeout: float | None = None) -> None:
        super().__init__()
        self.max_wait = max_wait
        # An edge answers once its own clients are connected: as long as a peer wait.
        self.identify_timeout = max_wait if identify_timeout is None else identify_timeout
        self._identities: dict[str, tuple[int, str]] = {}

    def unregister(self, client: ClientProxy) -> None:
        self._identities.pop(client.cid, None)
        super().unregister(client)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion=None) -> list[ClientProxy]:
        self.wait_for(num_clients if min_num_clients is None else min_num_clients,
                      timeout=max(1, int(self.max_wait)))
        connected = dict(self.clients)  # a copy: gRPC threads change it
        available = [cid for cid in connected
                     if criterion is None or criterion.select(connected[cid])]
        if num_clients > len(available):
            log.info("sampling failed: %d peers available, %d requested", len(available),
                     num_clients)
            return []
        # Sorted even when all are taken: the order of the instructions decides which
        # receiver gets which draws of a stochastic-rounding generator.
        available.sort(key=lambda cid: self.identity(connected[cid]))
        return [connected[cid] for cid in random.sample(available, num_clients)]

    def identity(self, proxy: ClientProxy) -> tuple[int, str]:
        """``(declared id, connection id)``; peers that declare none sort last."""
        if proxy.cid not in self._identities:
            declared = 1 << 62
            try:
                properties = proxy.get_properties(GetPropertiesIns(config={}),
                                                  timeout=self.identify_timeout,
                                                  group_id=None).properties
                declared = int(properties.get(CLIENT_ID_PROPERTY,
                                              properties.get(EDGE_ID_PROPERTY, declared)))
            except Exception as error:  # noqa: BLE001 - an unknown peer still takes part
                log.warning("peer %s did not say who it is (%r)", proxy.cid, error)
            self._identities[proxy.cid] = (declared, proxy.cid)
        return self._identities[proxy.cid]


def new_server(strategy, client_manager: ClientManager | None = None) -> Server:
    """A Flower ``Server`` over a ``SimpleClientManager`` (the driver calls ``fit_round``)."""
    # Not `client_manager or ...`: a manager with no clients yet has len() 0 and is falsy.
    if client_manager is None:
        client_manager = SimpleClientManager()
    return Server(client_manager=client_manager, strategy=strategy)


def wait_for_clients(client_manager: ClientManager, count: int, timeout: float) -> bool:
    """Wait until ``count`` clients are connected, at most ``timeout`` seconds."""
    return client_manager.wait_for(count, timeout=max(1, int(timeout)))


class _SessionCounter(Client):
    """Passes every message to ``client`` and counts them: an attempt that delivered one had
    a session with the server (a refused or failed connection delivers none)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages = 0

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        self.messages += 1
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        self.messages += 1
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns) -> FitRes:
        self.messages += 1
        return self.client.fit(ins)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        self.messages += 1
        return self.client.evaluate(ins)


def _is_closed_channel_watcher(args: threading.ExceptHookArgs) -> bool:
    """grpc's connectivity-polling thread (Flower subscribes one per channel) can outlive its
    channel by a moment and then raises ``ValueError: ... Channel closed!``, a harmless race
    inside grpc."""
    frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
    return (args.exc_type is ValueError and "Channel closed" in str(args.exc_value)
            and any(frame.name == "_poll_connectivity" for frame in frames))


def quiet_closed_channel_watchers() -> None:
    """Keep grpc's closed-channel race out of the user's terminal (a debug line instead of a
    traceback); any other exception in a thread goes to the hook that was there before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_closed_channels", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if _is_closed_channel_watcher(args):
            log.debug("grpc stopped watching a closed channel: %s", args.exc_value)
            return
        previous(args)

    hook.quiets_closed_channels = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class _Backoff:
    """Exponential back-off within a deadline that a live session restarts."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait
        self.restart()

    def restart(self) -> None:
        self.deadline, self.delay = time.monotonic() + self.max_wait, 0.2

    def wait(self) -> bool:
        """Sleep before the next try; False when that would pass the deadline."""
        if time.monotonic() + self.delay > self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, MAX_RETRY_DELAY)
        return True


def _refuse_for_good(error: grpc.RpcError, address: str, max_message_length: int,
                     root_certificates: bytes | None) -> None:
    """Raise for the errors that retrying cannot fix."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ConnectionError(message_too_large(address, max_message_length,
                                                str(error.details()))) from None
    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise error
    if "handshake failed" in str(error.details()).lower():
        # A certificate that does not verify stays so: no point in retrying.
        raise ConnectionError(tls_failure_message(address, root_certificates,
                                                  str(error.details()))) from None


def connect_client(
    address: str,
    client: Client,
    max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    root_certificates: bytes | None = None,
    max_wait_time: float = 120.0,
) -> None:
    """Connect ``client`` to a Flower gRPC server and serve it until told to disconnect.

    Flower's bidirectional-stream client does not retry a server that is not up yet (the
    refusal surfaces at the first read), so the retry lives here: an unreachable server is
    tried again with exponential back-off for up to ``max_wait_time`` seconds; a session
    that ran (the server went away later) restarts that clock, so a client rejoins a
    server that comes back.
    """
    quiet_closed_channel_watchers()
    backoff = _Backoff(max_wait_time)
    counter = _SessionCounter(client)
    while True:
        messages_before = counter.messages
        try:
            start_client(
                server_address=address,
                client=counter,
                grpc_max_message_length=max_message_length,
                root_certificates=root_certificates,
                insecure=root_certificates is None,
                transport="grpc-bidi",
            )
            return
        except grpc.RpcError as error:
            _refuse_for_good(error, address, max_message_length, root_certificates)
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The server stopped waiting for this client's answer (its round timeout)
                # and closed the session; the client is still wanted in later rounds.
                log.warning("the server at %s dropped this client: %s; rejoining", address,
                            error.details())
                backoff.restart()
                continue
            if counter.messages > messages_before:
                log.warning("the session with the server at %s ended (%s); rejoining",
                            address, error.details())
                backoff.restart()
            if not backoff.wait():
                hint = "" if root_certificates is not None else PLAINTEXT_HINT
                raise ServerUnreachable(
                    f"cannot reach the Flower server at {address} "
                    f"(gave up after {max_wait_time:.0f} s): {error.details()}{hint}"
                ) from None


class ServerUnreachable(ConnectionError):
    """No server answered at the address for the whole wait (another may: a fallback)."""


LIMIT_FIELD = "topology.max_message_mb"


def message_too_large(address: str, limit: int, details: str) -> str:
    """What a process says when gRPC refused a message over the run's message limit."""
    return (
        f"a message on the link to the Flower server at {address} exceeds the gRPC message "
        f"limit ({details}; this process allows {limit / 2**20:.1f} MiB). The limit is 2 x the "
        f"model's fp32 size + 32 MiB unless {LIMIT_FIELD} is set: raise it with "
        f"--set {LIMIT_FIELD}=N (MiB), the same on every process of the run"
    )


PLAINTEXT_HINT = (
    " (this process connects in plaintext, tls.insecure = true; a server that serves TLS "
    "closes such connections at once)"
)


def tls_failure_message(address: str, root_certificates: bytes | None, details: str) -> str:
    """Say which side of a failed TLS handshake to check."""
    if root_certificates is None:
        return f"TLS handshake with the Flower server at {address} failed: {details}"
    return (
        f"TLS handshake with the Flower server at {address} failed: {details}. Check that "
        f"the server serves TLS (not tls.insecure = true), that its certificate was signed by "
        f"the CA in tls.ca_cert, and that it names the host dialled ({address.rsplit(':', 1)[0]})"
    )


def ok_status() -> Status:
    return Status(code=Code.OK, message="ok")


def fit_res(parameters: Parameters, num_examples: int, metrics: dict[str, Scalar]) -> FitRes:
    return FitRes(status=ok_status(), parameters=parameters, num_examples=num_examples,
                  metrics=metrics)


def disconnect_all(client_manager: ClientManager, timeout: float = 10.0) -> None:
    """Tell every connected client to disconnect for good (they exit their connect loop)."""
    proxies = list(client_manager.all().values())
    reconnect_clients(
        client_instructions=[(proxy, ReconnectIns(seconds=None)) for proxy in proxies],
        max_workers=None,
        timeout=timeout,
    )


def move_client(proxy: ClientProxy, address: str, move_key: str, timeout: float = 30.0) -> None:
    """Tell a connected client to reconnect to another server, then release it.

    Flower's ``ReconnectIns`` carries no address, so the address goes first in a
    ``get_properties`` instruction (``{move_key: address}``); the reconnect then ends the
    client's session here and its connect loop joins ``address``.
    """
    proxy.get_properties(GetPropertiesIns(config={move_key: address}), timeout=timeout,
                         group_id=None)
    # The client hangs up as told, sometimes before its goodbye reaches the bridge.
    with contextlib.suppress(GrpcBridgeClosed):
        proxy.reconnect(ReconnectIns(seconds=None), timeout=timeout, group_id=None)
