"""The one module of the package that imports Flower: gRPC server, gRPC client, message types,
the strategy base classes and Flower's aggregation helper (a ruff rule, TID251, keeps every
other module of the package from importing ``flwr``).

A later Flower migration (e.g. to SuperLink/SuperNode once it has an edge tier) touches this
file only. Everything here is Flower's own machinery; the project adds two things:

* traffic metering — every ``ServerMessage`` sent and ``ClientMessage`` received on a server's
  bidirectional stream is measured with protobuf's ``ByteSize()``, the exact length of the
  serialised message that gRPC puts on the wire (its 5-byte frame header and HTTP/2 headers
  aside), per connected peer;
* a bounded wait for peers, so no server blocks for a day on a client that never comes;
* mutual TLS with identities: who a peer is comes from its certificate.

Mutual TLS needs two hooks into Flower's legacy grpc-bidi stack, which has none of its own:

* Flower's ``generic_create_grpc_server`` hard-codes ``require_client_auth=False``, so when a
  server requires client certificates, :func:`start_flower_server` builds the gRPC server
  itself with the same options (message limits, keepalive, concurrency) and
  ``require_client_auth=True``; gRPC then refuses, in the handshake, a peer without a
  certificate signed by the run's CA.
* Flower's client (``start_client`` -> ``grpc_connection`` -> ``create_channel``) cannot
  present a certificate. :func:`connect_client` sets this thread's certificate in a
  thread-local and a wrapper installed once over the ``create_channel`` that
  ``grpc_connection`` calls builds the channel with it. Thread-local, because several clients
  may run as threads of one process (the benchmarks' client host), each with its own.

Who a peer is: :class:`_IdentifyingServicer` reads the certificate gRPC verified
(``context.auth_context()``), refuses a revoked one at once (``tls.deny``), and hands
:class:`BoundedClientManager` a proxy that carries it. The manager asks the peer its declared
id before it counts as connected, checks it against the certificate and the kind of peer the
server serves, and sets ``proxy.peer_identity``; a refused peer's stream is aborted with
``PERMISSION_DENIED`` and the reason, which :func:`connect_client` raises as
:class:`PeerRefused` (one line, exit status 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
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
    serde,
)
from flwr.compat.client.app import start_client
from flwr.compat.client.grpc_client import connection as _flower_connection
from flwr.proto.transport_pb2 import (  # pylint: disable=no-name-in-module
    ClientMessage,
    ServerMessage,
)
from flwr.server import Server, SimpleClientManager
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.server import evaluate_clients, fit_clients, reconnect_clients
from flwr.server.strategy import Bulyan as LegacyBulyan
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.strategy import QFedAvg as LegacyQFedAvg
from flwr.server.strategy.aggregate import aggregate
from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import (
    FlowerServiceServicer,
    register_client_proxy,
)
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import (
    GrpcBridge,
    GrpcBridgeClosed,
    InsWrapper,
    ResWrapper,
)
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import Status as BridgeStatus
from flwr.server.superlink.fleet.grpc_bidi.grpc_client_proxy import GrpcClientProxy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as MessageStrategy
from flwr.supercore.address import is_port_in_use
from flwr.supercore.grpc import generic_create_grpc_server
from iterators import TimeoutIterator

from fedphd.common.wire import npy, tensor_link
from fedphd.common.wire.keys import CLIENT_ID_PROPERTY, EDGE_ID_PROPERTY, LABEL_HIST_PROPERTY
from fedphd.common.wire.tls import Admission, certified_identity, fingerprint

try:  # the generated service module moved between Flower releases
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
except ImportError:  # pragma: no cover
    from flwr.proto import transport_pb2_grpc

    add_FlowerServiceServicer_to_server = transport_pb2_grpc.add_FlowerServiceServicer_to_server

from flwr.compat.client.client import Client  # noqa: E402

__all__ = [
    "Admission",
    "Array",
    "ArrayRecord",
    "ConfigRecord",
    "Error",
    "Grid",
    "LegacyBulyan",
    "LegacyQFedAvg",
    "Message",
    "MessageStrategy",
    "MessageType",
    "MetricRecord",
    "RecordDict",
    "ensure_task_identity",
    "BoundedClientManager",
    "PeerRefused",
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

def ndarrays_to_parameters(arrays: list[np.ndarray]) -> Parameters:
    """Flower's ``ndarrays_to_parameters`` — the same bytes — with each tensor copied once
    (none where an array is a read-only view of its own blob, e.g. one just decoded; not
    even a pass over the tensors where they are exactly what a live payload decodes to)."""
    known = npy.DECODED.blobs_of(arrays)
    if known is not None:
        parameters = Parameters(tensors=known, tensor_type="numpy.ndarray")
        npy.DECODED.remember(parameters, arrays)
        return parameters
    tensors, views = npy.encode_views(arrays)
    parameters = Parameters(tensors=tensors, tensor_type="numpy.ndarray")
    if views:  # decoding it gives ``arrays`` back
        npy.DECODED.remember(parameters, arrays)
    return parameters


def parameters_to_ndarrays(parameters: Parameters) -> list[np.ndarray]:
    """Flower's ``parameters_to_ndarrays`` without copies: read-only views of the tensors'
    bytes, each header checked (:func:`fedphd.common.wire.npy.load_tensor`)."""
    fp32 = parameters.tensor_type == "numpy.ndarray"
    known = npy.DECODED.recall(parameters) if fp32 else None
    if known is not None:
        return known
    arrays = [npy.load_tensor(index, blob) for index, blob in enumerate(parameters.tensors)]
    if fp32:
        npy.DECODED.remember(parameters, arrays)
    return arrays


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

    def record_bytes(self, down: int = 0, up: int = 0) -> None:
        """Bytes of a message already counted (the tensor link's part of it)."""
        self._add(Traffic(down, up))

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


@dataclass
class _SizedIns(InsWrapper):
    """An instruction whose serialised size its sender computed (see :func:`_grown_size`);
    the sender also meters the answer, which it takes apart anyway."""

    wire_size: int = 0


class _MeteredBridge(GrpcBridge):
    """Flower's per-client bridge, measuring each instruction and each answer."""

    def __init__(self, meter: TrafficMeter) -> None:
        super().__init__()
        self._meter = meter

    def ins_wrapper_iterator(self) -> Iterator[InsWrapper]:
        """Flower's, except that it lets go of each instruction once it was taken (Flower's
        keeps the last one, a whole model, until the next)."""
        while not self._is_closed():
            with self._cv:
                self._cv.wait_for(lambda: self._status in (BridgeStatus.CLOSED,
                                                           BridgeStatus.INS_WRAPPER_AVAILABLE))
                self._raise_if_closed()
                ins_wrapper, self._ins_wrapper = self._ins_wrapper, None
                self._transition(BridgeStatus.AWAITING_RES_WRAPPER)
            if ins_wrapper is None:
                raise ValueError("InsWrapper can not be None")
            yield ins_wrapper
            del ins_wrapper

    def request(self, ins_wrapper: InsWrapper) -> ResWrapper:
        message = ins_wrapper.server_message
        if message.WhichOneof("msg") not in TRAINING_MESSAGES:
            res_wrapper = super().request(ins_wrapper)
            self._meter.record_control(message.ByteSize() + res_wrapper.client_message.ByteSize())
            return res_wrapper
        # Counted before the answer: the instruction was put on the stream even if the
        # client dies before it replies. ``ByteSize()`` walks the whole message, as long as
        # serialising it: a sized instruction's sender computed it from the tensors' lengths.
        sized = isinstance(ins_wrapper, _SizedIns)
        self._meter.record(down=ins_wrapper.wire_size if sized else message.ByteSize())
        res_wrapper = super().request(ins_wrapper)
        if not sized:
            self._meter.record(up=res_wrapper.client_message.ByteSize())
        return res_wrapper


# --- Sizes and messages without copies --------------------------------------------------


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _grown_size(nested: list[int], added: int) -> int:
    """The serialised size of a message once ``added`` bytes of fields are appended to its
    innermost nested message; ``nested``: the sizes now, outermost first. Each level holds
    the next as one length-delimited field (tag of one byte, the length as a varint)."""
    inner = nested[-1] + added
    for outer, before in zip(reversed(nested[:-1]), reversed(nested[1:]), strict=True):
        inner = outer - _varint_size(before) - before + _varint_size(inner) + inner
    return inner


def _tensors_size(tensors: list[bytes]) -> int:
    """Bytes that ``repeated bytes tensors = 1`` adds to a ``Parameters`` message."""
    return sum(1 + _varint_size(len(t)) + len(t) for t in tensors)


def _instruction(kind: str, ins: FitIns | EvaluateIns) -> tuple[ServerMessage, int]:
    """The ``ServerMessage`` that carries ``ins`` and its serialised size, computed.

    Flower's ``ServerMessage(fit_ins=serde.fit_ins_to_proto(ins))`` copies every tensor twice
    (a nested message given to a constructor is deep-copied), ~1 s per 143 MB; here the
    message is built without tensors, measured, and the tensors appended in place once."""
    empty = type(ins)(Parameters([], ins.parameters.tensor_type), ins.config)
    to_proto = serde.fit_ins_to_proto if kind == "fit_ins" else serde.evaluate_ins_to_proto
    message = ServerMessage(**{kind: to_proto(empty)})
    inner = getattr(message, kind)
    tensors = ins.parameters.tensors
    size = _grown_size([message.ByteSize(), inner.ByteSize(), inner.parameters.ByteSize()],
                       _tensors_size(tensors))
    inner.parameters.tensors.extend(tensors)
    return message, size


def _fit_answer(message: ClientMessage) -> tuple[FitRes, int]:
    """The ``FitRes`` a ``ClientMessage`` carries and the message's serialised size, taken
    apart without measuring or copying the tensors more than once."""
    fit = message.fit_res
    tensors = list(fit.parameters.tensors)
    if tensors:  # clearing an absent submessage would make it present
        fit.parameters.ClearField("tensors")
    size = _grown_size([message.ByteSize(), fit.ByteSize(), fit.parameters.ByteSize()],
                       _tensors_size(tensors))
    res = serde.fit_res_from_proto(fit)
    res.parameters.tensors = tensors
    return res, size


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


# --- Message-API strategies --------------------------------------------------------------

# The node id Flower gives the server side (``flwr.common.constant.SUPERLINK_NODE_ID``).
SERVER_NODE_ID = 1


def ensure_task_identity() -> None:
    """Give this process the task identity Flower's ``Message`` constructor reads.

    A ServerApp process gets it from the SuperLink; a FedPhD server drives message-API
    strategies without one, so the run and task ids are 0 and the node is the server's.
    An identity already set (a process that really is a Flower task) is kept."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 0), ("_task_id", 0), ("_node_id", SERVER_NODE_ID)):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, value)


# --- Mutual TLS: who a peer is ------------------------------------------------------------

KIND_PROPERTY = {"client": CLIENT_ID_PROPERTY, "edge": EDGE_ID_PROPERTY}


@dataclass(frozen=True)
class PeerCertificate:
    """What gRPC verified of a peer's certificate in the handshake."""

    identity: tuple[str, int] | None
    fingerprint: str
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        if self.identity is None:
            return f"a certificate naming no peer ({', '.join(self.names) or 'no names'})"
        return f"{self.identity[0]} {self.identity[1]}"


def _auth_strings(context: grpc.ServicerContext, key: str) -> list[str]:
    return [value.decode(errors="replace") for value in context.auth_context().get(key, [])]


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The verified client certificate of this call; None on a link without one."""
    pems = _auth_strings(context, "x509_pem_cert")
    if not pems:
        return None
    names = (_auth_strings(context, "x509_common_name")
             + _auth_strings(context, "x509_subject_alternative_name"))
    return PeerCertificate(certified_identity(names), fingerprint(pems[0]), tuple(names))


class _PeerProxy(GrpcClientProxy):
    """Flower's proxy of a connected peer, with the certificate it joined with; ``refusal``
    is set when the server refuses it (its stream then ends with that reason).

    Instructions with tensors are built in place and sized without serialising them
    (:func:`_instruction`); to a peer that speaks the tensor link (``tensor_link``, set when
    it joined) their tensors go through the server's depot instead
    (:mod:`fedphd.common.wire.tensor_link`), and so do its answers'."""

    def __init__(self, cid: str, bridge: GrpcBridge, certificate: PeerCertificate | None,
                 admission: Admission, meter: TrafficMeter,
                 depot: tensor_link.TensorDepot | None = None) -> None:
        super().__init__(cid, bridge)
        self.certificate = certificate
        self.admission = admission
        self.refusal: str | None = None
        self.meter = meter
        self.depot = depot
        self.tensor_link = False

    def refuse(self, reason: str) -> None:
        self.refusal = reason
        self.bridge.close()

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        if self.tensor_link and self.depot is not None:
            return self._fit_over_link(ins, timeout)
        message, size = _instruction("fit_ins", ins)
        answer = self.bridge.request(_SizedIns(message, timeout, size)).client_message
        res, answer_size = _fit_answer(answer)
        self.meter.record(up=answer_size)
        return res

    def evaluate(self, ins: EvaluateIns, timeout: float | None,
                 group_id: int | None) -> EvaluateRes:
        if not (self.tensor_link and self.depot is not None):
            message, size = _instruction("evaluate_ins", ins)
            answer = self.bridge.request(_SizedIns(message, timeout, size)).client_message
            self.meter.record(up=answer.ByteSize())
            return serde.evaluate_res_from_proto(answer.evaluate_res)
        ticket, linked = self._offer(ins)
        try:
            return super().evaluate(linked, timeout, group_id)
        finally:
            self.depot.close(ticket)

    def _offer(self, ins: FitIns | EvaluateIns) -> tuple[str, FitIns | EvaluateIns]:
        """Put the instruction's tensors in the depot; the instruction that names them."""
        fingerprint = None if self.certificate is None else self.certificate.fingerprint
        ticket = self.depot.offer(self.cid, ins.parameters.tensors, fingerprint)
        parameters = Parameters([], tensor_link.link_type(ins.parameters.tensor_type))
        config = {**ins.config, tensor_link.TICKET_KEY: ticket}
        next_ticket = self.depot.reserve(self.cid, fingerprint)
        if next_ticket is not None:
            config[tensor_link.NEXT_TICKET_KEY] = next_ticket
        return ticket, type(ins)(parameters, config)

    def _fit_over_link(self, ins: FitIns, timeout: float | None) -> FitRes:
        ticket, linked = self._offer(ins)
        try:
            res = super().fit(linked, timeout, None)
            if tensor_link.on_link(res.parameters.tensor_type):
                res.parameters = Parameters(self.depot.claim(ticket),
                                            tensor_link.carried_type(res.parameters.tensor_type))
            return res
        finally:
            self.depot.close(ticket)


class _IdentifyingServicer(FlowerServiceServicer):
    """Flower's servicer, whose ``Join`` refuses revoked certificates at once and registers a
    proxy that carries the peer's certificate; a refused peer's stream ends with
    ``PERMISSION_DENIED`` and the reason (Flower's loop otherwise, unchanged)."""

    def __init__(self, client_manager: ClientManager, meter: TrafficMeter,
                 admission: Admission, depot: tensor_link.TensorDepot | None = None) -> None:
        super().__init__(client_manager, grpc_bridge_factory=lambda: _MeteredBridge(meter))
        self.admission = admission
        self.meter = meter
        self.depot = depot

    def Join(self, request_iterator: Iterator[ClientMessage],  # noqa: N802 - gRPC's name
             context: grpc.ServicerContext) -> Iterator[ServerMessage]:
        certificate = peer_certificate(context)
        if certificate is not None and self.admission.denied(certificate.identity,
                                                             certificate.fingerprint):
            log.warning("refused %s (certificate sha256 %s): it is on tls.deny",
                        certificate.name, certificate.fingerprint)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{certificate.name} is on this server's deny list (tls.deny)")
        proxy = _PeerProxy(uuid.uuid4().hex, self.grpc_bridge_factory(), certificate,
                           self.admission, self.meter, self.depot)
        if not register_client_proxy(self.client_manager, proxy, context):
            return
        try:
            yield from _stream(proxy.bridge, request_iterator, context)
        except GrpcBridgeClosed:
            if proxy.refusal is None:
                raise
            context.abort(grpc.StatusCode.PERMISSION_DENIED, proxy.refusal)
        finally:
            if self.depot is not None:  # its fetch ahead, if one waits, ends
                self.depot.release(proxy.cid)


def _stream(bridge: GrpcBridge, request_iterator: Iterator[ClientMessage],
            context: grpc.ServicerContext) -> Iterator[ServerMessage]:
    """Flower's ``FlowerServiceServicer.Join`` loop: instructions out, answers in."""
    answers = TimeoutIterator(iterator=request_iterator, reset_on_next=True)
    for ins_wrapper in bridge.ins_wrapper_iterator():
        # Each message is let go of once used: a generator's locals live until its next
        # step, i.e. a connection would hold its last instruction and answer (two models
        # inside Flower's messages) until its next round.
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


class Refused(Exception):
    """A peer the server does not let in; the message says why, naming the peer."""


def _declared(properties: dict[str, Scalar], kind: str) -> int | None:
    """The id a peer declared for ``kind`` (None: none); a peer of the other kind is refused."""
    other = "edge" if kind == "client" else "client"
    if KIND_PROPERTY[other] in properties and KIND_PROPERTY[kind] not in properties:
        raise Refused(f"it declared {KIND_PROPERTY[other]} {properties[KIND_PROPERTY[other]]}; "
                      f"this server serves {kind}s")
    value = properties.get(KIND_PROPERTY[kind])
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Refused(f"its {KIND_PROPERTY[kind]} {value!r} is not a number") from None


def _declared_examples(properties: dict[str, Scalar]) -> int | None:
    """The total of the label histogram a peer declared (None: none, or all zero)."""
    if LABEL_HIST_PROPERTY not in properties:
        return None
    try:
        counts = json.loads(str(properties[LABEL_HIST_PROPERTY]))
        total = sum(int(count) for count in counts)
        valid = isinstance(counts, list) and all(int(count) >= 0 for count in counts)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise Refused(f"its {LABEL_HIST_PROPERTY} is not a list of counts")
    return total or None


def establish_identity(properties: dict[str, Scalar], certificate: PeerCertificate | None,
                       admission: Admission) -> PeerIdentity | None:
    """Who a peer is: its certificate's identity when the server requires certificates
    (its declared id must agree), else its declared id; None when it declared none on a
    link without client certificates."""
    kind = admission.kind
    declared = _declared(properties, kind)
    examples = _declared_examples(properties)
    if not admission.certified:
        return None if declared is None else PeerIdentity(kind, declared, False, examples)
    if certificate is None or certificate.identity is None:
        shown = "no certificate" if certificate is None else certificate.name
        raise Refused(f"it presented {shown}; this server needs client-N or edge-N")
    certified_kind, number = certificate.identity
    if certified_kind != kind:
        raise Refused(f"its certificate names {certificate.name}; this server serves {kind}s")
    if declared is not None and declared != number:
        raise Refused(f"its certificate names {certificate.name}, it declared "
                      f"{KIND_PROPERTY[kind]} {declared}")
    return PeerIdentity(kind, number, True, examples)


def fit_ins_wire_size(ins: FitIns) -> int:
    """Bytes of the instruction ``ins`` as its server metered them: the serialised
    ``ServerMessage`` that carried it (computed from the tensors' lengths, not by serialising
    it), plus its tensors when they came over the tensor link (what the link measured)."""
    if tensor_link.RECEIVED_BYTES_KEY in ins.config:
        return int(ins.config[tensor_link.RECEIVED_BYTES_KEY])
    empty = FitIns(Parameters([], ins.parameters.tensor_type), ins.config)
    message = ServerMessage(fit_ins=serde.fit_ins_to_proto(empty))
    return _grown_size([message.ByteSize(), message.fit_ins.ByteSize(),
                        message.fit_ins.parameters.ByteSize()],
                       _tensors_size(ins.parameters.tensors))


def start_flower_server(
    address: str,
    client_manager: ClientManager,
    meter: TrafficMeter,
    max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    certificates: tuple[bytes, bytes, bytes] | None = None,
    admission: Admission | None = None,
    tensor_link_enabled: bool = True,
    peers: int = 0,
) -> grpc.Server:
    """Start Flower's gRPC bidirectional-stream server with metered bridges (non-blocking).

    This is ``flwr.server.superlink.fleet.grpc_bidi.start_grpc_server`` with three changes:
    the servicer builds metered bridges; with an ``admission`` it identifies every peer
    (mutual TLS when ``admission.certified``: see the module docstring); and the same server
    serves the tensor link (:mod:`fedphd.common.wire.tensor_link`) to the peers that declare
    it, unless ``tensor_link_enabled`` is false. ``peers``: how many may connect at once
    (sizes the server's concurrency, :func:`concurrent_rpcs`).
    """
    workers = concurrent_rpcs(peers)
    depot = None
    if admission is None:
        servicer = FlowerServiceServicer(
            client_manager, grpc_bridge_factory=lambda: _MeteredBridge(meter)
        )
    else:
        if tensor_link_enabled:
            depot = tensor_link.TensorDepot(max_message_length, meter, _call_fingerprint,
                                            max_waiting=peers)
        servicer = _IdentifyingServicer(client_manager, meter, admission, depot)
    if certificates is not None and admission is not None and admission.certified:
        server = _mutual_tls_server(servicer, address, max_message_length, certificates,
                                    workers)
    else:
        server = generic_create_grpc_server(
            servicer_and_add_fn=(servicer, add_FlowerServiceServicer_to_server),
            server_address=address,
            max_concurrent_workers=workers,
            max_message_length=max_message_length,
            certificates=certificates,
        )
    if depot is not None:
        tensor_link.add_to_server(server, depot)
    server.start()
    return server


def _call_fingerprint(context: grpc.ServicerContext) -> str | None:
    """The fingerprint of the certificate a tensor-link call presented (None: none)."""
    certificate = peer_certificate(context)
    return None if certificate is None else certificate.fingerprint


MAX_CONCURRENT_WORKERS = 1000  # Flower's default
KEEPALIVE_TIME_MS = 210_000  # Flower's: some clouds drop TCP connections idle for 4 minutes


def concurrent_rpcs(peers: int) -> int:
    """RPCs (and handler threads) a server allows at once: each connected peer's Flower stream
    holds one for as long as it is connected, its fetch ahead on the tensor link another
    while it waits for the next instruction, and a transfer a third, so Flower's fixed 1,000
    would refuse every transfer of an edge with 1,000 clients."""
    return max(MAX_CONCURRENT_WORKERS, 3 * peers + 64)


def _mutual_tls_server(servicer: FlowerServiceServicer, address: str, max_message_length: int,
                       certificates: tuple[bytes, bytes, bytes],
                       workers: int = MAX_CONCURRENT_WORKERS) -> grpc.Server:
    """Flower's ``generic_create_grpc_server`` with ``require_client_auth=True``: the same
    options, and peers must present a certificate signed by the CA of ``certificates``."""
    if is_port_in_use(address):
        sys.exit(f"Port in server address {address} is already in use.")
    options = [
        ("grpc.max_concurrent_streams", max(100, workers)),
        ("grpc.max_send_message_length", max_message_length),
        ("grpc.max_receive_message_length", max_message_length),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         maximum_concurrent_rpcs=workers, options=options)
    add_FlowerServiceServicer_to_server(servicer, server)
    ca, certificate, key = certificates
    credentials = grpc.ssl_server_credentials(((key, certificate),), root_certificates=ca,
                                              require_client_auth=True)
    port = server.add_secure_port(address, credentials)
    server.bound_address = f"{address.rpartition(':')[0]}:{port}"
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
    * Identified peers only: a peer of :func:`start_flower_server` counts as connected once
      the server knows who it is (``proxy.peer_identity``, from its certificate under mutual
      TLS) and accepted it; a refused one never counts.
    """

    def __init__(self, max_wait: float, identify_timeout: float | None = None) -> None:
        super().__init__()
        self.max_wait = max_wait
        # An edge answers once its own clients are connected: as long as a peer wait.
        self.identify_timeout = max_wait if identify_timeout is None else identify_timeout
        self._identities: dict[str, tuple[int, str]] = {}
        self._joining: set[str] = set()  # peers of our servicer being identified
        self._lock = threading.Lock()

    def register(self, client: ClientProxy) -> bool:
        """A peer of this project's servers is identified first, in the background (its
        stream must run for it to answer), and counts as connected only once accepted;
        other proxies (tests register fakes) are registered as by Flower."""
        if not isinstance(client, _PeerProxy):
            return super().register(client)
        with self._lock:
            if client.cid in self.clients or client.cid in self._joining:
                return False
            self._joining.add(client.cid)
        self._changed()
        threading.Thread(target=self._admit, args=(client,), daemon=True,
                         name=f"identify-{client.cid[:8]}").start()
        return True

    def _admit(self, proxy: _PeerProxy) -> None:
        """Identify ``proxy``; add it to the clients, or refuse it with one line."""
        properties = self._properties(proxy)
        try:
            identity = establish_identity(properties, proxy.certificate, proxy.admission)
        except Refused as refusal:
            log.warning("refused a peer: %s", refusal)
            proxy.refuse(str(refusal))
            with self._lock:
                self._joining.discard(proxy.cid)
            self._changed()
            return
        if identity is not None:
            proxy.peer_identity = identity
        # Negotiated per peer: a plain Flower peer never declares it.
        proxy.tensor_link = proxy.depot is not None and bool(
            properties.get(tensor_link.PROPERTY, False))
        if proxy.tensor_link:
            log.info("%s speaks the tensor link: its tensors travel on fedphd.TensorLink",
                     identity.name if identity is not None else f"peer {proxy.cid}")
        with self._lock:  # with unregister's: a peer that left is never added
            if proxy.cid not in self._joining:
                return  # it left while it was being identified
            self._joining.discard(proxy.cid)
            super().register(proxy)

    def _properties(self, proxy: ClientProxy) -> dict[str, Scalar]:
        """What a peer says about itself (nothing when it does not say)."""
        try:
            return dict(proxy.get_properties(GetPropertiesIns(config={}),
                                             timeout=self.identify_timeout,
                                             group_id=None).properties)
        except Exception as error:  # noqa: BLE001 - an unknown peer still may take part
            log.warning("peer %s did not say who it is (%r)", proxy.cid, error)
            return {}

    def unregister(self, client: ClientProxy) -> None:
        with self._lock:
            self._joining.discard(client.cid)
        self._identities.pop(client.cid, None)
        super().unregister(client)
        self._changed()

    @property
    def identifying(self) -> int:
        """Peers connected and being identified (not yet counted as available)."""
        return len(self._joining)

    def _changed(self) -> None:
        """Wake the waits: a peer arrived, was identified, refused or left."""
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        """Flower's wait for ``num_clients`` accepted peers, where a peer being identified
        counts as arrived within ``timeout`` and then has ``identify_timeout`` more to be
        accepted: an edge says who it is once its own clients are connected, so a slow
        client delays its edge's identification, not the cloud's deadline for edges."""
        with self._cv:
            arrived = self._cv.wait_for(
                lambda: len(self.clients) + len(self._joining) >= num_clients, timeout=timeout)
            if arrived:
                self._cv.wait_for(lambda: len(self.clients) >= num_clients or not self._joining,
                                  timeout=self.identify_timeout)
            return len(self.clients) >= num_clients

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
        """``(id, connection id)``: the established identity's number, else the declared id
        (asked once per connection); peers that declare none sort last."""
        established = peer_identity(proxy)
        if established is not None:
            return (established.number, proxy.cid)
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


LINK_TIMEOUT = 1800.0  # seconds for one transfer on the tensor link (a slow WAN, 143 MB)


class _GiveUp(BaseException):
    """A refusal that ends this client's session for good, as on Flower's own link (a
    ``BaseException`` leaves Flower's client loop at once; :func:`connect_client` raises it
    as a one-line ``ConnectionError``)."""


def _failed_fit(error: tensor_link.LinkError) -> FitRes:
    """An error answer for a transfer on the tensor link that failed (logged)."""
    log.warning("%s", error)
    return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, str(error)), Parameters([], ""), 0, {})


class _LinkedClient(Client):
    """A client that speaks the tensor link: it declares it when asked who it is, fetches an
    instruction's tensors from the server that sent a ticket, and uploads its answer's
    tensors there; with a server that sends none (plain Flower) it is ``client`` unchanged.

    The wrapped client sees ``Parameters`` as always, and ``RECEIVED_BYTES_KEY`` in the
    config: the instruction's bytes as its server metered them (Flower message + link)."""

    def __init__(self, client: Client, channel: tensor_link.LinkChannel,
                 max_message_length: int = GRPC_MAX_MESSAGE_LENGTH) -> None:
        self.client = client
        self.channel = channel
        self.max_message_length = max_message_length
        self._ahead: tensor_link.FetchAhead | None = None
        self._fetched_ahead_once = False

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        res = self.client.get_properties(ins)
        return GetPropertiesRes(res.status, {**res.properties, tensor_link.PROPERTY: True})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns) -> FitRes:
        if not tensor_link.on_link(ins.parameters.tensor_type):
            return self.client.fit(ins)
        try:
            ticket, fetched = self._fetch(ins)
        except tensor_link.LinkError as error:
            return _failed_fit(error)
        res = self.client.fit(fetched)
        if res.status.code != Code.OK or not res.parameters.tensors:
            return res
        try:
            self._over_limit_ends_session(self.channel.put, ticket, res.parameters.tensors)
        except tensor_link.LinkError as error:
            return _failed_fit(error)
        linked = Parameters([], tensor_link.link_type(res.parameters.tensor_type))
        return FitRes(res.status, linked, res.num_examples, res.metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        if not tensor_link.on_link(ins.parameters.tensor_type):
            return self.client.evaluate(ins)
        try:
            _, fetched = self._fetch(ins)
        except tensor_link.LinkError as error:
            log.warning("%s", error)
            return EvaluateRes(Status(Code.EVALUATE_NOT_IMPLEMENTED, str(error)), 0.0, 0, {})
        return self.client.evaluate(fetched)

    def _over_limit_ends_session(self, transfer, *args):
        """``transfer(*args, LINK_TIMEOUT)``; one over a message limit ends the session,
        saying why, as on Flower's own link."""
        try:
            return transfer(*args, LINK_TIMEOUT)
        except tensor_link.TooLarge as error:
            raise _GiveUp(message_too_large(self.channel.address, self.max_message_length,
                                            str(error))) from None

    def _fetched_ahead(self, ticket: str) -> list[bytes] | None:
        """The tensors fetched ahead under ``ticket``; None where none were (a fetch ahead
        under another ticket is ended: that instruction will not come)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead.ticket != ticket:
            ahead.cancel()
            return None
        tensors = ahead.result(LINK_TIMEOUT)
        if tensors is not None and not self._fetched_ahead_once:
            self._fetched_ahead_once = True
            log.info("tensor link to %s: each next instruction's tensors are fetched ahead, "
                     "while the instruction travels", self.channel.address)
        return tensors

    def _fetch(self, ins: FitIns | EvaluateIns) -> tuple[str, FitIns | EvaluateIns]:
        """The ticket, and the instruction with its tensors fetched from the link."""
        ticket = ins.config.get(tensor_link.TICKET_KEY)
        if not isinstance(ticket, str):
            raise tensor_link.LinkError("the server sent tensors on the tensor link without "
                                        f"a {tensor_link.TICKET_KEY}")
        # Measured as the server metered it: the Flower message with the ticket in it.
        message_size = _instruction("fit_ins" if isinstance(ins, FitIns) else "evaluate_ins",
                                    ins)[1]
        tensors = self._fetched_ahead(ticket)
        if tensors is None:
            tensors = self._over_limit_ends_session(self.channel.fetch, ticket)
        next_ticket = ins.config.get(tensor_link.NEXT_TICKET_KEY)
        if isinstance(next_ticket, str):
            self._ahead = self.channel.fetch_ahead(next_ticket, LINK_TIMEOUT)
        config = {key: value for key, value in ins.config.items()
                  if key not in (tensor_link.TICKET_KEY, tensor_link.NEXT_TICKET_KEY)}
        config[tensor_link.RECEIVED_BYTES_KEY] = message_size + sum(len(t) for t in tensors)
        parameters = Parameters(tensors, tensor_link.carried_type(ins.parameters.tensor_type))
        return ticket, type(ins)(parameters, config)


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


_OWN_CERTIFICATE = threading.local()  # (certificate chain, key) of this thread's client
_flower_create_channel = _flower_connection.create_channel


def _create_channel(server_address: str, insecure: bool,
                    root_certificates: bytes | None = None,
                    max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
                    interceptors=None) -> grpc.Channel:
    """Flower's ``create_channel``, presenting this thread's client certificate if it has
    one (Flower's own cannot present any)."""
    own = getattr(_OWN_CERTIFICATE, "pair", None)
    if own is None or insecure:
        return _flower_create_channel(server_address, insecure, root_certificates,
                                      max_message_length, interceptors)
    chain, key = own
    credentials = grpc.ssl_channel_credentials(root_certificates, private_key=key,
                                               certificate_chain=chain)
    options = [("grpc.max_send_message_length", max_message_length),
               ("grpc.max_receive_message_length", max_message_length)]
    channel = grpc.secure_channel(server_address, credentials, options=options)
    if interceptors is not None:
        channel = grpc.intercept_channel(channel, *interceptors)
    return channel


def _install_certificate_hook() -> None:
    """Put :func:`_create_channel` where Flower's ``grpc_connection`` looks it up (once)."""
    _flower_connection.create_channel = _create_channel


@contextlib.contextmanager
def _presenting(client_certificate: tuple[bytes, bytes] | None) -> Iterator[None]:
    """This thread's connections present ``client_certificate`` while in the block."""
    _install_certificate_hook()
    before = getattr(_OWN_CERTIFICATE, "pair", None)
    _OWN_CERTIFICATE.pair = client_certificate
    try:
        yield
    finally:
        _OWN_CERTIFICATE.pair = before


class PeerRefused(ConnectionError):
    """The server refused this peer (its certificate, its declared id, a revocation)."""


def _refuse_for_good(error: grpc.RpcError, address: str, max_message_length: int,
                     root_certificates: bytes | None) -> None:
    """Raise for the errors that retrying cannot fix."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ConnectionError(message_too_large(address, max_message_length,
                                                str(error.details()))) from None
    if error.code() == grpc.StatusCode.PERMISSION_DENIED:
        raise PeerRefused(f"the Flower server at {address} refused this peer: "
                          f"{error.details()}") from None
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
    client_certificate: tuple[bytes, bytes] | None = None,
) -> None:
    """Connect ``client`` to a Flower gRPC server and serve it until told to disconnect.

    Flower's bidirectional-stream client does not retry a server that is not up yet (the
    refusal surfaces at the first read), so the retry lives here: an unreachable server is
    tried again with exponential back-off for up to ``max_wait_time`` seconds; a session
    that ran (the server went away later) restarts that clock, so a client rejoins a
    server that comes back. ``client_certificate``: ``(certificate chain, key)`` PEM this
    client presents (mutual TLS).
    """
    quiet_closed_channel_watchers()
    channel = tensor_link.LinkChannel(
        lambda: _link_channel(address, root_certificates, max_message_length,
                              client_certificate), address, frame_limit=max_message_length)
    try:
        with _presenting(client_certificate):
            _connect(address, _LinkedClient(client, channel, max_message_length),
                     max_message_length, root_certificates, max_wait_time)
    except _GiveUp as stop:
        raise ConnectionError(str(stop)) from None
    finally:
        channel.close()


def _link_channel(address: str, root_certificates: bytes | None, max_message_length: int,
                  client_certificate: tuple[bytes, bytes] | None) -> grpc.Channel:
    """A channel for the tensor link: the Flower link's address, credentials and limit."""
    options = [("grpc.max_send_message_length", max_message_length),
               ("grpc.max_receive_message_length", max_message_length)]
    if root_certificates is None:
        return grpc.insecure_channel(address, options=options)
    chain, key = client_certificate if client_certificate is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates, private_key=key,
                                               certificate_chain=chain)
    return grpc.secure_channel(address, credentials, options=options)


def _connect(address: str, client: Client, max_message_length: int,
             root_certificates: bytes | None, max_wait_time: float) -> None:
    """The retry loop of :func:`connect_client`."""
    backoff = _Backoff(max_wait_time)
    counter = _SessionCounter(client)
    closed = _HandshakeClosures(address, root_certificates)
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
            session = counter.messages > messages_before
            closed.count(error, session)
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The server stopped waiting for this client's answer (its round timeout)
                # and closed the session; the client is still wanted in later rounds.
                log.warning("the server at %s dropped this client: %s; rejoining", address,
                            error.details())
                backoff.restart()
                continue
            if session:
                log.warning("the session with the server at %s ended (%s); rejoining",
                            address, error.details())
                backoff.restart()
            if not backoff.wait():
                hint = "" if root_certificates is not None else PLAINTEXT_HINT
                raise ServerUnreachable(
                    f"cannot reach the Flower server at {address} "
                    f"(gave up after {max_wait_time:.0f} s): {error.details()}{hint}"
                ) from None


HANDSHAKE_CLOSURES = 3  # in a row, before any session: the server refuses this certificate


class _HandshakeClosures:
    """A TLS server that requires client certificates closes the connection of a client whose
    certificate it refuses (none, another CA's, expired) right after the handshake; the
    client sees only "Socket closed". A server that is not up refuses the TCP connection
    instead, so a few such closures in a row, before any session, are a refusal for good."""

    def __init__(self, address: str, root_certificates: bytes | None) -> None:
        self.address = address
        self.tls = root_certificates is not None
        self.in_a_row = 0

    def count(self, error: grpc.RpcError, session: bool) -> None:
        closed = (error.code() == grpc.StatusCode.UNAVAILABLE
                  and "socket closed" in str(error.details()).lower())
        self.in_a_row = self.in_a_row + 1 if self.tls and closed and not session else 0
        if self.in_a_row < HANDSHAKE_CLOSURES:
            return
        own = getattr(_OWN_CERTIFICATE, "pair", None)
        presented = ("this client presented none (tls.client_cert is not set)" if own is None
                     else "this client's tls.client_cert was not accepted")
        raise PeerRefused(
            f"the Flower server at {self.address} closed the TLS connection {self.in_a_row} "
            f"times in a row before a session began: it requires a client certificate signed "
            f"by its CA and {presented}; check that tls.client_cert and tls.client_key were "
            "issued by the run's CA (tls.ca_cert), are not expired and are not revoked"
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
