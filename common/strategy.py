"""Any Flower strategy, plus the project's features around it.

Aggregation is the chosen strategy's business (``flwr.server.strategy.FedAvg``, ``FedAdam``, a
user's class, or one of the project's algorithms). :class:`ManagedStrategy` wraps it the way
Flower's DP wrappers do and adds what every run needs whatever the aggregation rule:

* ``configure_fit``: the instruction each client needs (architecture JSON, round, local
  training settings, the uplink codec) merged into the inner strategy's ``FitIns.config``, and
  the global model encoded with the downlink codec;
* ``aggregate_fit``: every answer decoded and checked (tensor count, shapes, dtypes, finite
  values, sane metrics) before the inner strategy sees it; a bad answer is dropped with a
  logged reason naming its sender, the round goes on with the others; the accepted answers
  reach the inner strategy sorted by sender, so equal answers give bit-identical models;
* a per-round summary (samples, loss, label histogram, who answered) for the driver's metrics;
* partial sharing: an inner strategy that puts ``fedphd.send_groups`` / ``fedphd.return_groups``
  (U-Net groups ``down``, ``mid``, ``up``; see :mod:`common.unet_groups`) into a client's
  ``FitIns.config`` gets only those tensors on the wire, both ways; its ``aggregate_fit`` then
  receives each answer's returned tensors only, in wire order.

Drivers offer every strategy constructor, where it takes them, the run's context:
``tensor_names`` (state-dict keys in wire order), ``architecture`` (the U-Net's JSON) and
``run_config`` (the whole :class:`~common.config.RunConfig`). A strategy may set
``evaluate_global_model = False`` when the server's model is not a usable model on its own
(e.g. FedDiffuse UDEC): the driver then evaluates at the clients only, through Flower's
``configure_evaluate``/``aggregate_evaluate``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from common import codec
from common.config import CodecConfig, ConfigError
from common.quantization import ErrorFeedback
from common.transport import (
    ClientManager,
    ClientProxy,
    EvaluateIns,
    FitIns,
    FitRes,
    GrpcBridgeClosed,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from common.unet_groups import (
    GROUPS,
    format_groups,
    group_indices,
    is_everything,
    parse_groups,
    select,
    tensor_names,
)

log = logging.getLogger("fedphd.strategy")

# Keys of FitIns.config / FitRes.metrics owned by the project; user strategies keep the rest.
ARCH_KEY = "fedphd.arch"
ROUND_KEY = "fedphd.round"
UPLINK_KEY = "fedphd.uplink"
PER_CHANNEL_KEY = "fedphd.per_channel"
ERROR_FEEDBACK_KEY = "fedphd.error_feedback"
BASE_DIGEST_KEY = "fedphd.base_digest"  # a quantised downlink is an update from this model
RECEIVED_DIGEST_KEY = "received_digest"
# Partial sharing: U-Net groups sent in the instruction, trained, and expected in the answer.
SEND_GROUPS_KEY = "fedphd.send_groups"
TRAIN_GROUPS_KEY = "fedphd.train_groups"
RETURN_GROUPS_KEY = "fedphd.return_groups"


def import_object(dotted: str, field_name: str) -> Any:
    """Import ``package.module.Name``; a failure names the config field that asked for it."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{field_name} = {dotted!r} cannot be imported: {error}") from None


def build_strategy(
    dotted: str, user_kwargs: dict[str, Any], defaults: dict[str, Any], field_name: str,
    context: dict[str, Any] | None = None,
) -> Strategy:
    """Instantiate a ``flwr.server.strategy.Strategy`` subclass by dotted path.

    ``defaults`` (fractions, minimum clients, initial parameters) are passed only where the
    class's constructor accepts them (by name or ``**kwargs``); ``context`` (see
    :func:`run_context`) only to parameters named so, since a ``**kwargs`` constructor usually
    forwards to Flower's; ``user_kwargs`` (from the config) are passed as given.
    """
    cls = import_object(dotted, field_name)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"{field_name} = {dotted!r} is not a flwr.server.strategy.Strategy")
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in defaults.items() if takes_any or k in params}
    kwargs.update({k: v for k, v in (context or {}).items() if k in params})
    kwargs.update(user_kwargs)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(
            f"{field_name} = {dotted!r} rejected its arguments {sorted(kwargs)}: {error}"
        ) from None


class HeldModel:
    """A receiver's copy of the last model it was sent: the base of quantised downlinks."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] | None = None
        self.digest = ""

    def decode(self, parameters: Parameters, config: dict[str, Scalar]) -> list[np.ndarray]:
        """Decode an instruction's weights; an update must be from the model held here."""
        base_digest = config.get(BASE_DIGEST_KEY)
        if base_digest is None:
            return codec.decode(parameters)
        if self.arrays is None or base_digest != self.digest:
            raise ValueError("the server sent an update from a model this receiver does not hold")
        return codec.decode(parameters, reference=self.arrays)

    def keep(self, arrays: list[np.ndarray]) -> str:
        """Remember ``arrays`` (as loaded) and return their digest."""
        self.arrays, self.digest = arrays, codec.digest(arrays)
        return self.digest


def encode_reply(
    arrays: list[np.ndarray],
    reference: list[np.ndarray],
    config: dict[str, Scalar],
    feedback: ErrorFeedback,
    rng: np.random.Generator,
) -> Parameters:
    """Encode an answer with the uplink codec the instruction names (update vs ``reference``,
    the model the sender received, for the quantised codecs)."""
    use_feedback = bool(config.get(ERROR_FEEDBACK_KEY, True))
    return codec.encode(
        arrays,
        str(config.get(UPLINK_KEY, "fp32")),
        reference=reference,
        per_channel=bool(config.get(PER_CHANNEL_KEY, True)),
        rng=rng,
        feedback=feedback if use_feedback else None,
    )


def add_to_config(
    instructions: list[tuple[ClientProxy, FitIns]], extra: dict[str, Scalar]
) -> list[tuple[ClientProxy, FitIns]]:
    """The same instructions with ``extra`` merged into every ``FitIns.config``."""
    return [(proxy, FitIns(ins.parameters, {**ins.config, **extra}))
            for proxy, ins in instructions]


def client_strategy_defaults(
    fraction_fit: float, min_fit_clients: int, initial_parameters: Parameters
) -> dict[str, Any]:
    """Constructor arguments the drivers give a strategy (when its constructor takes them).

    ``min_available_clients`` equals ``min_fit_clients`` so that sampling proceeds with whoever
    is connected; the driver itself waits (bounded) for the expected peers before round 1.
    Federated evaluation is off: the driver evaluates where the model is.
    """
    return {
        "fraction_fit": fraction_fit,
        "min_fit_clients": min_fit_clients,
        "min_available_clients": min_fit_clients,
        "fraction_evaluate": 0.0,
        "min_evaluate_clients": 0,
        "initial_parameters": initial_parameters,
        "fit_metrics_aggregation_fn": weighted_loss,
    }


def run_context(run_config: Any, arch_json: str) -> dict[str, Any]:
    """What a driver offers every strategy constructor besides Flower's arguments (each
    passed only where the constructor takes it): the state-dict keys in wire order, the
    architecture JSON and the run's config."""
    return {
        "tensor_names": tensor_names(arch_json),
        "architecture": arch_json,
        "run_config": run_config,
    }


def weighted_loss(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Sample-weighted mean of the clients' training losses (Flower's metrics hook)."""
    pairs = [(n, float(m["loss"])) for n, m in metrics if "loss" in m]
    total = sum(n for n, _ in pairs)
    return {"loss": sum(n * loss for n, loss in pairs) / total} if total else {}


def sender_name(proxy: ClientProxy, res: FitRes | None = None) -> str:
    """A human name for the sender of an answer: its declared id, else its connection id."""
    if res is not None and "client_id" in res.metrics:
        return f"client {res.metrics['client_id']}"
    if res is not None and "edge_id" in res.metrics:
        return f"edge {res.metrics['edge_id']}"
    return f"peer {proxy.cid}"


def check_update(arrays: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """Refuse an update that cannot be averaged into ``reference`` without corrupting it."""
    if len(arrays) != len(reference):
        raise ValueError(f"sent {len(arrays)} tensors, the model has {len(reference)}")
    for index, (array, ref) in enumerate(zip(arrays, reference, strict=True)):
        if array.shape != ref.shape:
            raise ValueError(f"tensor {index} has shape {array.shape}, expected {ref.shape}")
        if array.dtype != ref.dtype:
            raise ValueError(f"tensor {index} has dtype {array.dtype}, expected {ref.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"tensor {index} holds NaN or Inf")


def describe_failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """Why an answer is missing, in words (Flower passes an exception or an error answer)."""
    if isinstance(failure, tuple):
        proxy, res = failure
        return f"{sender_name(proxy, res)} answered with an error: {res.status.message}"
    if isinstance(failure, GrpcBridgeClosed):
        return ("a peer's connection closed before it answered: it stopped or lost the "
                "network, did not answer within topology.round_timeout, or sent a message over "
                "the gRPC message limit (topology.max_message_mb)")
    return f"an answer failed: {failure!r}"


def answer_order(answer: tuple[ClientProxy, FitRes]) -> tuple[str, str]:
    """A fixed order of a round's answers (by sender, then connection), so that the same
    answers aggregate to bit-identical sums whatever order they arrived in."""
    proxy, res = answer
    return sender_name(proxy, res), proxy.cid


def check_metrics(res: FitRes) -> None:
    """Refuse an answer whose numbers would corrupt the aggregate or the round's summary."""
    if not isinstance(res.num_examples, int) or res.num_examples < 0:
        raise ValueError(f"num_examples = {res.num_examples!r} is not a non-negative integer")
    loss = res.metrics.get("loss")
    if loss is not None and (not isinstance(loss, int | float) or isinstance(loss, bool)
                             or np.isinf(loss)):
        raise ValueError(f"loss = {loss!r} is not a number (NaN = unknown is allowed)")
    try:
        hist = json.loads(str(res.metrics.get("label_hist", "[]")))
    except json.JSONDecodeError:
        hist = None
    if not (isinstance(hist, list) and all(isinstance(c, int) and c >= 0 for c in hist)):
        raise ValueError("label_hist is not a JSON list of non-negative integers")


@dataclass(frozen=True)
class Rebuilt:
    """A model as a receiver rebuilds it from a payload, with its digest (computed once)."""

    arrays: list[np.ndarray]
    digest: str

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> Rebuilt:
        return cls(arrays, codec.digest(arrays))


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


@dataclass
class RoundSummary:
    """What the driver records about one fit round."""

    num_examples: int = 0
    loss: float | None = None
    label_hist: list[int] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failures: int = 0
    metrics: list[dict[str, Scalar]] = field(default_factory=list)
    # Sizes the senders measured on their side: instruction bytes received, tensor bytes sent.
    reported_received: int = 0
    reported_payload: int = 0
    # Receivers that reported the digest of the model they rebuilt, and those whose digest
    # differed from what was sent.
    digests_checked: int = 0
    digest_mismatches: list[str] = field(default_factory=list)


def add_histograms(first: list[int], second: list[int]) -> list[int]:
    """Element-wise sum of two label histograms (the shorter one padded with zeros)."""
    size = max(len(first), len(second))
    return [
        (first[i] if i < len(first) else 0) + (second[i] if i < len(second) else 0)
        for i in range(size)
    ]


def summarise(accepted: list[FitRes]) -> RoundSummary:
    """Sample-weighted loss and summed label histograms of the accepted answers."""
    summary = RoundSummary(metrics=[dict(res.metrics) for res in accepted])
    weighted, weight = 0.0, 0
    for res in accepted:
        summary.num_examples += res.num_examples
        if "loss" in res.metrics and not np.isnan(float(res.metrics["loss"])):  # NaN: unknown
            weighted += float(res.metrics["loss"]) * res.num_examples
            weight += res.num_examples
        summary.reported_received += int(res.metrics.get("bytes_received", 0))
        summary.reported_payload += int(res.metrics.get("payload_bytes", 0))
        hist = [int(c) for c in json.loads(str(res.metrics.get("label_hist", "[]")))]
        summary.label_hist = add_histograms(summary.label_hist, hist)
    summary.loss = weighted / weight if weight else None
    return summary


class ManagedStrategy(Strategy):
    """Wrap ``inner`` with instructions, codecs, answer validation and round summaries.

    Aggregation is exactly the inner strategy's:
    ``w_{t+1} = inner.aggregate_fit(t, {(k, decode(payload_k)) : k accepted})``.
    """

    def __init__(
        self,
        inner: Strategy,
        instruction: dict[str, Scalar],
        downlink: str = "fp32",
        uplink: str = "fp32",
        per_channel: bool = True,
        error_feedback: bool = True,
        held: dict[str, Rebuilt] | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self._names = names
        self.instruction = {
            **instruction, PER_CHANNEL_KEY: per_channel, ERROR_FEEDBACK_KEY: error_feedback
        }
        self.downlink = downlink
        self.uplink = uplink
        self.last_round = RoundSummary()
        self._reference: list[np.ndarray] = []
        # Per connection: the model a receiver rebuilt this round, and the one it holds.
        self._pending: dict[str, Rebuilt] = {}
        # Shared by a driver that rebuilds its strategy but keeps its connections (an edge).
        self._held: dict[str, Rebuilt] = held if held is not None else {}
        self._wire_cache: dict[tuple[str, str], tuple[Parameters, Rebuilt]] = {}
        # Per connection this round: positions of the tensors sent and expected back.
        self._layout: dict[str, Layout] = {}
        self.last_evaluation: list[tuple[str, float, dict[str, Scalar]]] = []

    @classmethod
    def with_codecs(
        cls,
        inner: Strategy,
        instruction: dict[str, Scalar],
        codecs: CodecConfig,
        held: dict[str, Rebuilt] | None = None,
        names: list[str] | None = None,
        link: str = "cloud",
    ) -> ManagedStrategy:
        """Wrap ``inner`` with the run's ``[codec]`` settings for the links a ``link``
        (``cloud`` or ``edge``) server serves."""
        downlink, uplink = codecs.for_link(link)
        return cls(inner, instruction, downlink=downlink, uplink=uplink,
                   per_channel=codecs.per_channel, error_feedback=codecs.error_feedback,
                   held=held, names=names)

    def __repr__(self) -> str:
        return f"ManagedStrategy({self.inner!r}, downlink={self.downlink}, uplink={self.uplink})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._reference = codec.decode(parameters)
        self._forget_departed(client_manager)
        rng = np.random.default_rng([server_round, len(self._held)])
        # The algorithm may override the run's defaults (e.g. FedDDPM's longer first round),
        # never the protocol's own keys.
        protocol = {ARCH_KEY: self.instruction[ARCH_KEY], ROUND_KEY: server_round,
                    UPLINK_KEY: self.uplink}
        instructions, self._pending, self._layout = [], {}, {}
        for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager):
            layout = self._layout_of(ins.config)
            wire, config, rebuilt = self._downlink_for(proxy.cid, rng, layout)
            # What this receiver rebuilds: the base of its update and of its digest check.
            self._pending[proxy.cid] = rebuilt
            self._layout[proxy.cid] = layout
            merged = {**self.instruction, **ins.config, **protocol, **config}
            instructions.append((proxy, FitIns(parameters=wire, config=merged)))
        return instructions

    def tensor_names(self) -> list[str]:
        """State-dict keys of the model in wire order (from the architecture when not given)."""
        if self._names is None:
            self._names = tensor_names(str(self.instruction[ARCH_KEY]))
        return self._names

    def _layout_of(self, config: dict[str, Scalar]) -> Layout:
        """Which tensors an instruction sends and which its answer must carry."""
        send = parse_groups(config.get(SEND_GROUPS_KEY))  # type: ignore[arg-type]
        back = parse_groups(config.get(RETURN_GROUPS_KEY))  # type: ignore[arg-type]
        if not set(back) <= set(send):
            # A client's update is taken from what it received; it cannot return other parts.
            raise ValueError(f"{RETURN_GROUPS_KEY} {back} is not within {SEND_GROUPS_KEY} {send}")
        if is_everything(send) and is_everything(back):
            return Layout.whole(len(self._reference))
        names = self.tensor_names()
        if len(names) != len(self._reference):
            raise ValueError(f"{len(names)} tensor names for a {len(self._reference)}-tensor model")
        return Layout(format_groups(send), group_indices(names, send),
                      format_groups(back), group_indices(names, back))

    def _downlink_for(
        self, cid: str, rng: np.random.Generator, layout: Layout
    ) -> tuple[Parameters, dict[str, Scalar], Rebuilt]:
        """The global model for one receiver with the downlink codec.

        ``q8``/``q4`` send ``Q(w_global - w_held)``, the update from the model that receiver
        holds (what it rebuilt last time, tracked per connection); a receiver with no known
        model gets full fp32 weights. The error never accumulates: each update is taken from
        the receiver's actual model, not from the previous global one.
        """
        model = select(self._reference, layout.sent)
        held = self._held.get(cid)
        if held is not None and [a.shape for a in held.arrays] != [a.shape for a in model]:
            held = None  # the architecture or the shared part changed: start from full weights
        if held is None or not codec.is_update_codec(self.downlink):
            # The same weights for every such receiver: encoded and hashed once per round.
            name = "fp32" if codec.is_update_codec(self.downlink) else self.downlink
            key = (name, layout.sent_groups)
            if key not in self._wire_cache:
                wire = codec.encode(model, name)
                self._wire_cache[key] = (wire, Rebuilt.of(codec.decode(wire)))
            wire, rebuilt = self._wire_cache[key]
            return wire, {}, rebuilt
        wire = codec.encode(model, self.downlink, reference=held.arrays,
                            per_channel=bool(self.instruction[PER_CHANNEL_KEY]), rng=rng)
        rebuilt = Rebuilt.of(codec.decode(wire, reference=held.arrays))
        return wire, {BASE_DIGEST_KEY: held.digest}, rebuilt

    def _forget_departed(self, client_manager: ClientManager) -> None:
        connected = set(client_manager.all())
        for cid in [cid for cid in self._held if cid not in connected]:
            del self._held[cid]  # in place: the dict may be shared with the driver
        self._wire_cache = {}

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        accepted: list[tuple[ClientProxy, FitRes]] = []
        rejected: dict[str, str] = {}
        # Answers arrive in completion order; float sums depend on order, so sort them.
        for proxy, res in sorted(results, key=answer_order):
            name = sender_name(proxy, res)
            try:
                check_metrics(res)
                arrays = self._decode_answer(proxy.cid, res)
            except ValueError as error:
                log.warning("round %d: rejected the update of %s: %s", server_round, name, error)
                rejected[name] = str(error)
                continue
            decoded = FitRes(
                status=res.status,
                parameters=ndarrays_to_parameters(arrays),
                num_examples=res.num_examples,
                metrics=res.metrics,
            )
            accepted.append((proxy, decoded))
        for failure in failures:
            log.warning("round %d: %s", server_round, describe_failure(failure))
        summary = summarise([res for _, res in accepted])
        summary.senders = [sender_name(proxy, res) for proxy, res in accepted]
        self._remember_held(accepted, results, failures)
        reported = [(proxy, res) for proxy, res in accepted if RECEIVED_DIGEST_KEY in res.metrics]
        summary.digests_checked = len(reported)
        summary.digest_mismatches = [
            sender_name(proxy, res) for proxy, res in reported
            if res.metrics[RECEIVED_DIGEST_KEY] != self._pending[proxy.cid].digest
        ]
        if summary.digest_mismatches:
            log.error("round %d: %s rebuilt a model that differs from the one sent",
                      server_round, summary.digest_mismatches)
        summary.rejected = rejected
        summary.failures = len(failures) + len(rejected)
        self.last_round = summary
        if not accepted:
            return None, {}
        all_failures = list(failures) + [ValueError(reason) for reason in rejected.values()]
        parameters, metrics = self.inner.aggregate_fit(server_round, accepted, all_failures)
        if parameters is None:
            return None, metrics
        return self._as_model_dtypes(server_round, parameters), metrics

    def _decode_answer(self, cid: str, res: FitRes) -> list[np.ndarray]:
        """The tensors an answer carries, checked against the part of the model it must hold
        (an update is decoded from what that sender was sent)."""
        layout = self._layout.get(cid)
        if layout is None:
            raise ValueError("answered without having been sent an instruction this round")
        base = self._pending[cid].arrays
        if layout.returned == layout.sent:
            base_returned = base
        else:
            position = {index: at for at, index in enumerate(layout.sent)}
            base_returned = select(base, [position[i] for i in layout.returned])
        arrays = codec.decode(res.parameters, reference=base_returned)
        try:
            check_update(arrays, select(self._reference, layout.returned))
        except ValueError as error:
            if layout.returned_groups != format_groups(GROUPS):
                raise ValueError(f"{error} (groups {layout.returned_groups} only)") from None
            raise
        return arrays

    def _remember_held(self, accepted, results, failures) -> None:
        """Receivers that answered hold what they were sent; of the others nothing is known."""
        for proxy, _ in results:
            self._held.pop(proxy.cid, None)
        for failure in failures:
            if isinstance(failure, tuple):
                self._held.pop(failure[0].cid, None)
        for proxy, res in accepted:
            if res.metrics.get(RECEIVED_DIGEST_KEY) == self._pending[proxy.cid].digest:
                self._held[proxy.cid] = self._pending[proxy.cid]

    def _as_model_dtypes(self, server_round: int, parameters: Parameters) -> Parameters | None:
        """Keep the global model in the model's own dtypes (numpy maths in e.g. FedAdam
        promotes to float64, which would double every later message)."""
        arrays = codec.decode(parameters)
        try:
            check_update([a.astype(r.dtype) for a, r in zip(arrays, self._reference,
                                                           strict=False)], self._reference)
        except ValueError as error:
            log.error("round %d: %s returned an unusable model (%s); keeping the previous one",
                      server_round, self.inner.__class__.__name__, error)
            return None
        if all(a.dtype == r.dtype for a, r in zip(arrays, self._reference, strict=True)):
            return parameters
        return ndarrays_to_parameters(
            [a.astype(r.dtype) for a, r in zip(arrays, self._reference, strict=True)]
        )

    @property
    def evaluate_global_model(self) -> bool:
        """Whether the server's model is a whole model worth evaluating on the server."""
        return bool(getattr(self.inner, "evaluate_global_model", True))

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The inner strategy's evaluation requests (none for the drivers' default
        ``fraction_evaluate = 0``), with the architecture and only the groups it shares, fp32:
        each client evaluates the shared parts inside its own model."""
        self._reference = codec.decode(parameters)
        requests = []
        for proxy, ins in self.inner.configure_evaluate(server_round, parameters, client_manager):
            layout = self._layout_of({SEND_GROUPS_KEY: ins.config.get(SEND_GROUPS_KEY, ""),
                                      RETURN_GROUPS_KEY: ins.config.get(SEND_GROUPS_KEY, "")})
            wire = codec.encode(select(codec.decode(ins.parameters), layout.sent), "fp32")
            config = {**ins.config, ARCH_KEY: self.instruction[ARCH_KEY],
                      ROUND_KEY: server_round}
            requests.append((proxy, EvaluateIns(parameters=wire, config=config)))
        return requests

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        """Per-client results are kept for the driver's metrics; the inner strategy's
        aggregate (Flower's sample-weighted mean loss) is returned."""
        self.last_evaluation = [
            (sender_name(proxy, res), float(res.loss), dict(res.metrics))
            for proxy, res in results
        ]
        for failure in failures:
            log.warning("round %d: an evaluation failed: %r", server_round, failure)
        if not results:
            return None, {}
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round, parameters)
