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
        self._sent: list[np.ndarray] = []  # the model receivers rebuild (their update base)
        self.sent_digest = ""

    @classmethod
    def with_codecs(
        cls, inner: Strategy, instruction: dict[str, Scalar], codecs: CodecConfig
    ) -> ManagedStrategy:
        """Wrap ``inner`` with the run's ``[codec]`` settings."""
        return cls(inner, instruction, downlink=codecs.downlink, uplink=codecs.uplink,
                   per_channel=codecs.per_channel, error_feedback=codecs.error_feedback)

    def __repr__(self) -> str:
        return f"ManagedStrategy({self.inner!r}, downlink={self.downlink}, uplink={self.uplink})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._reference = codec.decode(parameters)
        wire = codec.encode(self._reference, self.downlink)
        # What a receiver must reconstruct; it reports the digest of the model it rebuilt.
        self._sent = codec.decode(wire)
        self.sent_digest = codec.digest(self._sent)
        extra = {**self.instruction, ROUND_KEY: server_round, UPLINK_KEY: self.uplink}
        return [
            (proxy, FitIns(parameters=wire, config={**ins.config, **extra}))
            for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager)
        ]

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
                arrays = codec.decode(res.parameters, reference=self._sent)
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
        reported = [(proxy, res) for proxy, res in accepted if RECEIVED_DIGEST_KEY in res.metrics]
        summary.digests_checked = len(reported)
        summary.digest_mismatches = [
            sender_name(proxy, res) for proxy, res in reported
            if res.metrics[RECEIVED_DIGEST_KEY] != self.sent_digest
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
