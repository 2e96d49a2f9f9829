"""Any Flower strategy, plus the project's features around it.

Aggregation is the chosen strategy's business (``flwr.server.strategy.FedAvg``, ``FedAdam``, a
user's class, or one of the project's algorithms). :class:`ManagedStrategy` wraps it the way
Flower's DP wrappers do and adds what every run needs whatever the aggregation rule:

* ``configure_fit``: the instruction each client needs (architecture JSON, round, local
  training settings, the uplink codec) merged into the inner strategy's ``FitIns.config``, and
  the global model encoded with the downlink codec;
* ``aggregate_fit``: every answer decoded and checked (tensor count, shapes, finite values)
  before the inner strategy sees it; a bad answer is dropped with a logged reason naming its
  sender, the round goes on with the others;
* a per-round summary (samples, loss, label histogram, who answered) for the driver's metrics.
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
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
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


def import_object(dotted: str, field_name: str) -> Any:
    """Import ``package.module.Name``; a failure names the config field that asked for it."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{field_name} = {dotted!r} cannot be imported: {error}") from None


def build_strategy(
    dotted: str, user_kwargs: dict[str, Any], defaults: dict[str, Any], field_name: str
) -> Strategy:
    """Instantiate a ``flwr.server.strategy.Strategy`` subclass by dotted path.

    ``defaults`` (fractions, minimum clients, initial parameters) are passed only where the
    class's constructor accepts them; ``user_kwargs`` (from the config) are passed as given.
    """
    cls = import_object(dotted, field_name)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"{field_name} = {dotted!r} is not a flwr.server.strategy.Strategy")
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in defaults.items() if takes_any or k in params}
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


@dataclass(frozen=True)
class Rebuilt:
    """A model as a receiver rebuilds it from a payload, with its digest (computed once)."""

    arrays: list[np.ndarray]
    digest: str

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> Rebuilt:
        return cls(arrays, codec.digest(arrays))


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
        if "loss" in res.metrics:
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
    ) -> None:
        super().__init__()
        self.inner = inner
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
        self._wire_cache: dict[str, tuple[Parameters, Rebuilt]] = {}

    @classmethod
    def with_codecs(
        cls,
        inner: Strategy,
        instruction: dict[str, Scalar],
        codecs: CodecConfig,
        held: dict[str, Rebuilt] | None = None,
    ) -> ManagedStrategy:
        """Wrap ``inner`` with the run's ``[codec]`` settings."""
        return cls(inner, instruction, downlink=codecs.downlink, uplink=codecs.uplink,
                   per_channel=codecs.per_channel, error_feedback=codecs.error_feedback,
                   held=held)

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
        extra = {**self.instruction, ROUND_KEY: server_round, UPLINK_KEY: self.uplink}
        instructions, self._pending = [], {}
        for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager):
            wire, config, rebuilt = self._downlink_for(proxy.cid, rng)
            # What this receiver rebuilds: the base of its update and of its digest check.
            self._pending[proxy.cid] = rebuilt
            instructions.append(
                (proxy, FitIns(parameters=wire, config={**ins.config, **extra, **config}))
            )
        return instructions

    def _downlink_for(
        self, cid: str, rng: np.random.Generator
    ) -> tuple[Parameters, dict[str, Scalar], Rebuilt]:
        """The global model for one receiver with the downlink codec.

        ``q8``/``q4`` send ``Q(w_global - w_held)``, the update from the model that receiver
        holds (what it rebuilt last time, tracked per connection); a receiver with no known
        model gets full fp32 weights. The error never accumulates: each update is taken from
        the receiver's actual model, not from the previous global one.
        """
        held = self._held.get(cid)
        if held is not None and [a.shape for a in held.arrays] != [
            a.shape for a in self._reference
        ]:
            held = None  # the architecture changed (pruning): start from full weights
        if held is None or not codec.is_update_codec(self.downlink):
            # The same weights for every such receiver: encoded and hashed once per round.
            name = "fp32" if codec.is_update_codec(self.downlink) else self.downlink
            if name not in self._wire_cache:
                wire = codec.encode(self._reference, name)
                self._wire_cache[name] = (wire, Rebuilt.of(codec.decode(wire)))
            wire, rebuilt = self._wire_cache[name]
            return wire, {}, rebuilt
        wire = codec.encode(self._reference, self.downlink, reference=held.arrays,
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
        for proxy, res in results:
            name = sender_name(proxy, res)
            try:
                base = self._pending.get(proxy.cid)
                arrays = codec.decode(res.parameters, reference=base and base.arrays)
                check_update(arrays, self._reference)
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
            log.warning("round %d: an answer failed: %r", server_round, failure)
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

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        # Federated evaluation is not part of the training loop; sample quality is measured
        # where the model is (cloud, or clients for partial-sharing methods).
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round, parameters)
