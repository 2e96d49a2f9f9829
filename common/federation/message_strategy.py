"""Flower's message-API strategies (``flwr.serverapp.strategy``) in the project's rounds.

Flower teaches strategies on the message API: ``configure_train`` / ``aggregate_train`` over
``Message`` / ``ArrayRecord``. The project's servers speak Flower's legacy gRPC-bidi protocol
(docs/design.md, the transport decision), whose rounds are ``configure_fit`` /
``aggregate_fit`` over ``FitIns`` / ``FitRes``. :class:`MessageStrategyAdapter` is a legacy
``Strategy`` that drives a message-API strategy from those rounds, so
:class:`~fedphd.common.federation.strategy.ManagedStrategy` wraps it like any other strategy
and every project feature (codecs, answer checks, bounded sample counts, partial sharing,
pruning, accounting, checkpoints, evaluation) applies unchanged:

* **Nodes.** Every connection is a node: client or edge ``N`` whose identity the server
  established is node ``1000 + N``; a connection without one gets an id counted from
  ``1_000_000``. The strategy samples from :class:`PeerGrid` (``get_node_ids``), which
  answers from the client manager; the adapter first waits, bounded, for the nodes the
  strategy needs (``min_available_nodes``, ``min_train_nodes``) instead of Flower's unbounded
  wait.
* **configure_fit.** ``configure_train(t, A, ConfigRecord(), grid)`` with ``A`` the global
  model as an ``ArrayRecord`` keyed by state-dict name (wire order); each returned message
  becomes its destination's ``FitIns``: the arrays of its ``ArrayRecord``, in key order, and the
  scalars of its ``ConfigRecord``.
* **aggregate_fit.** ``aggregate_train(t, replies)`` where each accepted answer ``k`` is a
  reply to the message its sender was sent, holding ``ArrayRecord(w_k)`` and
  ``MetricRecord(m_k ∪ {weighted_by_key: n_k})``: ``w_k`` decoded and checked, ``n_k`` already
  bounded, ``m_k`` the numeric metrics every answer of the round carries (strings, JSON and
  the peer-id keys stay out of the strategy's way; Flower requires equal keys). Failed
  answers are error replies. The result is the new global model and the round's metrics.
* **Evaluation** the same way (``configure_evaluate`` / ``aggregate_evaluate``), with the
  answer's ``loss`` in its ``MetricRecord``.

A strategy that raises while aggregating (``InconsistentMessageReplies``, a user's bug) costs
the round, not the run: the error is logged in one line and the global model is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from fedphd.common.wire.keys import CLIENT_ID_METRIC, EDGE_ID_METRIC, LOSS_METRIC
from fedphd.common.wire.transport import (
    Array,
    ArrayRecord,
    ClientManager,
    ClientProxy,
    ConfigRecord,
    Error,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Grid,
    Message,
    MessageStrategy,
    MetricRecord,
    Parameters,
    RecordDict,
    Scalar,
    Strategy,
    ensure_task_identity,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    peer_identity,
)

log = logging.getLogger("fedphd.strategy")

IDENTIFIED_NODE_BASE = 1000
UNIDENTIFIED_NODE_BASE = 1_000_000
# Who a peer is, not a measurement: averaging ids would be noise in the strategy's metrics.
IDENTITY_METRICS = frozenset({CLIENT_ID_METRIC, EDGE_ID_METRIC})
# A strategy's sampling polls ``get_node_ids`` until enough nodes are there (sleeping 1 s
# each time); after the adapter's bounded wait this many polls end it.
MAX_POLLS = 5
FAILED_ANSWER_CODE = 1


class NotEnoughNodes(RuntimeError):
    """The strategy kept waiting for nodes the bounded wait did not bring."""


class PeerGrid(Grid):
    """The ``Grid`` a message-API strategy samples from: the server's connected peers as
    node ids. The project's server sends and receives the messages itself, so the sending
    half of Flower's Grid is not offered."""

    def __init__(self, nodes: dict[int, ClientProxy]) -> None:
        self.nodes = nodes
        self.polls = 0

    def get_node_ids(self) -> Iterable[int]:
        self.polls += 1
        if self.polls > MAX_POLLS:
            raise NotEnoughNodes(f"{len(self.nodes)} nodes connected")
        return sorted(self.nodes)

    def _not_offered(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError(
            "a FedPhD server sends the strategy's messages itself; a strategy may sample "
            "nodes (get_node_ids) but not push or pull messages")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _not_offered

    @property
    def run(self) -> Any:
        return self._not_offered()


def wrapped_chain(strategy: Any) -> Iterable[Any]:
    """``strategy`` and the strategies it wraps (``.strategy``, as Flower's DP wrappers do)."""
    seen = 0
    while strategy is not None and seen < 8:
        yield strategy
        strategy, seen = getattr(strategy, "strategy", None), seen + 1


def chain_attribute(strategy: Any, name: str, default: Any) -> Any:
    """The first of ``strategy``'s wrapped chain that has ``name`` decides it."""
    for link in wrapped_chain(strategy):
        if hasattr(link, name):
            return getattr(link, name)
    return default


def as_array_record(arrays: list[np.ndarray], names: list[str] | None) -> ArrayRecord:
    """``arrays`` keyed by state-dict name (by position when the names do not fit, e.g. a
    partial answer)."""
    keys = names if names is not None and len(names) == len(arrays) else [
        str(i) for i in range(len(arrays))]
    return ArrayRecord({key: Array(np.ascontiguousarray(array))
                        for key, array in zip(keys, arrays, strict=True)})


def from_array_record(record: ArrayRecord, keys: list[str] | None = None) -> list[np.ndarray]:
    """The record's arrays, in ``keys`` order (default: the record's own)."""
    missing = [key for key in (keys or []) if key not in record]
    if missing:
        raise ValueError(f"its ArrayRecord lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    return [record[key].numpy() for key in (keys or list(record.keys()))]


def scalar_config(record: ConfigRecord, receiver: str) -> dict[str, Scalar]:
    """A ConfigRecord's values as Flower config scalars; a list cannot travel in the legacy
    ``FitIns.config`` and is left out with a warning naming its key."""
    config: dict[str, Scalar] = {}
    for key, value in record.items():
        if isinstance(value, list):
            log.warning("the strategy's config %r for %s is a list, which Flower's legacy "
                        "FitIns.config cannot carry; not sent", key, receiver)
            continue
        config[key] = value
    return config


def is_measurement(key: str, value: Any) -> bool:
    """A metric the strategy may average: a number (not a bool) and not a peer id."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and key not in IDENTITY_METRICS)


def shared_measurements(metrics: list[dict[str, Scalar]]) -> list[str]:
    """The numeric metric keys every answer has (Flower refuses replies with unequal keys)."""
    if not metrics:
        return []
    keys = [k for k, v in metrics[0].items() if is_measurement(k, v)]
    return sorted(k for k in keys if all(is_measurement(k, m.get(k)) for m in metrics[1:]))


def scalar_metrics(record: MetricRecord | None) -> dict[str, Scalar]:
    """A strategy's MetricRecord as the round's metrics (numbers; lists are left out)."""
    if record is None:
        return {}
    return {k: v for k, v in record.items() if isinstance(v, int | float)}


class MessageStrategyAdapter(Strategy):
    """Drive ``strategy`` (a ``flwr.serverapp.strategy.Strategy``) from legacy rounds.

    The global model is exactly the message strategy's:
    ``w_{t+1} = strategy.aggregate_train(t, {reply_k(ArrayRecord(w_k), MetricRecord(n_k, m_k))})``.
    """

    # Per-round scratch, rebuilt from the connections: not checkpointed.
    transient_state = ("_node_of", "_sent", "_keys")

    def __init__(
        self,
        strategy: MessageStrategy,
        initial_parameters: Parameters | None = None,
        tensor_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        ensure_task_identity()
        self.strategy = strategy
        self.initial_parameters = initial_parameters
        self.tensor_names = tensor_names
        self._node_of: dict[str, int] = {}
        self._sent: dict[str, Message] = {}  # this round's message per connection
        self._keys: list[str] = []  # the ArrayRecord keys of this round's global model

    def __repr__(self) -> str:
        return f"{type(self.strategy).__name__}(message API)"

    def __getattr__(self, name: str) -> Any:
        # Markers a driver reads (``flat_only``, ``evaluate_global_model``) are the
        # message strategy's; __getattr__ only runs for names the adapter lacks.
        if name.startswith("__") or name == "strategy":
            raise AttributeError(name)
        return getattr(self.__dict__["strategy"], name)

    # --- nodes -------------------------------------------------------------------------

    def node_id(self, proxy: ClientProxy) -> int:
        """A stable node id for a connection (see the module docstring)."""
        if proxy.cid not in self._node_of:
            identity = peer_identity(proxy)
            # len(): a new id per new connection, never one that was given before.
            self._node_of[proxy.cid] = (IDENTIFIED_NODE_BASE + identity.number
                                        if identity is not None
                                        else UNIDENTIFIED_NODE_BASE + len(self._node_of))
        return self._node_of[proxy.cid]

    def _grid(self, client_manager: ClientManager) -> PeerGrid:
        """The connected peers as nodes, after a bounded wait for as many as the strategy
        needs."""
        needed = max(int(chain_attribute(self.strategy, "min_available_nodes", 0)),
                     int(chain_attribute(self.strategy, "min_train_nodes", 0)))
        if client_manager.num_available() < needed:
            client_manager.wait_for(needed, timeout=max(1, int(getattr(
                client_manager, "max_wait", 60))))
        return PeerGrid({self.node_id(proxy): proxy
                         for proxy in client_manager.all().values()})

    # --- Flower's legacy protocol steps ---------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.initial_parameters

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """``configure_train`` on the global model; each message becomes its node's FitIns."""
        return [(proxy, FitIns(wire, config)) for proxy, wire, config
                in self._configure(server_round, parameters, client_manager, train=True)]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """``aggregate_train`` over the answers as replies; its ArrayRecord is the model."""
        weight_key = chain_attribute(self.strategy, "weighted_by_key", "num-examples")
        array_key = chain_attribute(self.strategy, "arrayrecord_key", "arrays")
        shared = shared_measurements([res.metrics for _, res in results])
        replies = [
            Message(RecordDict({
                array_key: as_array_record(parameters_to_ndarrays(res.parameters),
                                           self._keys or None),
                "metrics": MetricRecord({**{k: res.metrics[k] for k in shared},
                                         weight_key: res.num_examples}),
            }), reply_to=self._sent[proxy.cid])
            for proxy, res in results if proxy.cid in self._sent
        ]
        replies += self._error_replies(failures)
        try:
            record, metrics = self.strategy.aggregate_train(server_round, replies)
            arrays = None if record is None else from_array_record(
                record, self._keys if len(record) == len(self._keys) else None)
        except Exception as error:  # noqa: BLE001 - a user's strategy: the round, not the run
            log.debug("aggregate_train failed", exc_info=True)
            log.error("round %d: %s.aggregate_train failed (%s: %s); keeping the previous "
                      "model", server_round, type(self.strategy).__name__,
                      type(error).__name__, error)
            return None, {}
        finally:
            self._sent = {}
        return (None if arrays is None else ndarrays_to_parameters(arrays),
                scalar_metrics(metrics))

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return [(proxy, EvaluateIns(wire, config)) for proxy, wire, config
                in self._configure(server_round, parameters, client_manager, train=False)]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        weight_key = chain_attribute(self.strategy, "weighted_by_key", "num-examples")
        shared = shared_measurements([res.metrics for _, res in results])
        replies = [
            Message(RecordDict({"metrics": MetricRecord({
                **{k: res.metrics[k] for k in shared if k != LOSS_METRIC},
                LOSS_METRIC: float(res.loss), weight_key: res.num_examples})}),
                reply_to=self._sent[proxy.cid])
            for proxy, res in results if proxy.cid in self._sent
        ]
        replies += self._error_replies(failures)
        try:
            metrics = scalar_metrics(self.strategy.aggregate_evaluate(server_round, replies))
        except Exception as error:  # noqa: BLE001 - as in aggregate_fit
            log.error("round %d: %s.aggregate_evaluate failed (%s: %s)", server_round,
                      type(self.strategy).__name__, type(error).__name__, error)
            return None, {}
        finally:
            self._sent = {}
        loss = metrics.get(LOSS_METRIC)
        return (None if loss is None else float(loss)), metrics

    def evaluate(self, server_round: int, parameters: Parameters):
        """Server-side evaluation is the driver's (the message API's ``evaluate_fn`` belongs
        to ``Strategy.start``, which a FedPhD server does not call)."""
        return None

    # --- helpers ------------------------------------------------------------------------

    def _configure(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager,
        train: bool,
    ) -> list[tuple[ClientProxy, Parameters, dict[str, Scalar]]]:
        """The strategy's messages of this step as (receiver, tensors, config scalars)."""
        record = as_array_record(parameters_to_ndarrays(parameters), self.tensor_names)
        self._keys = list(record.keys())
        grid = self._grid(client_manager)
        self._sent = {}
        step = self.strategy.configure_train if train else self.strategy.configure_evaluate
        try:
            messages = list(step(server_round, record, ConfigRecord(), grid))
        except NotEnoughNodes as error:
            log.warning("round %d: %s wants more nodes than are connected (%s); no round",
                        server_round, type(self.strategy).__name__, error)
            return []
        unknown = [m.metadata.dst_node_id for m in messages
                   if m.metadata.dst_node_id not in grid.nodes]
        if unknown:
            log.warning("round %d: %s addressed nodes that are not connected: %s",
                        server_round, type(self.strategy).__name__, unknown)
        # Strategies send one record to every node: each distinct one is converted once.
        encoded: dict[int, Parameters] = {}
        configured = []
        for message in messages:
            proxy = grid.nodes.get(message.metadata.dst_node_id)
            if proxy is None:
                continue
            self._sent[proxy.cid] = message
            content = message.content
            config: dict[str, Scalar] = {}
            for config_record in content.config_records.values():
                config.update(scalar_config(config_record, f"node {message.metadata.dst_node_id}"))
            configured.append((proxy, self._tensors(content, encoded), config))
        return configured

    def _tensors(self, content: RecordDict, encoded: dict[int, Parameters]) -> Parameters:
        """A message's ArrayRecord as Flower ``Parameters`` (in the global model's key order
        when it holds the same keys), converted once per distinct record."""
        record = next(iter(content.array_records.values()), ArrayRecord())
        if id(record) not in encoded:
            keys = self._keys if set(record.keys()) == set(self._keys) else None
            encoded[id(record)] = ndarrays_to_parameters(from_array_record(record, keys))
        return encoded[id(record)]

    def _error_replies(self, failures: list) -> list[Message]:
        """Failed answers of known senders as error replies (as Flower hands them over)."""
        replies = []
        for failure in failures:
            if isinstance(failure, tuple) and failure[0].cid in self._sent:
                proxy, res = failure
                reason = getattr(getattr(res, "status", None), "message", "") or "failed"
                replies.append(Message(Error(code=FAILED_ANSWER_CODE, reason=reason),
                                       reply_to=self._sent[proxy.cid]))
        return replies
