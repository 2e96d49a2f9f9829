"""Any Flower strategy, plus the project's features around it.

Aggregation is the chosen strategy's business (``flwr.server.strategy.FedAvg``, ``FedAdam``, a
user's class, or one of the project's algorithms). :class:`ManagedStrategy` wraps it the way
Flower's DP wrappers do and adds what every run needs whatever the aggregation rule:

* ``configure_fit``: the instruction each client needs (architecture JSON, round, local
  training settings, the uplink codec) merged into the inner strategy's ``FitIns.config``, and
  the global model encoded with the downlink codec;
* ``aggregate_fit``: every answer decoded and checked (tensor count, shapes, dtypes, finite
  values, sane metrics, the sender's claimed id against its established identity, its sample
  count against what it declared at join) before the inner strategy sees it; a bad answer is
  dropped with a logged reason naming its sender, the round goes on with the others; the
  accepted answers reach the inner strategy sorted by sender, so equal answers give
  bit-identical models, with every sample count bounded by ``max_examples_factor`` x the
  round's low median (a larger one is clipped, logged and recorded);
* a per-round summary (samples, loss, label histogram, who answered) for the driver's metrics;
* partial sharing: an inner strategy that puts ``fedphd.send_groups`` / ``fedphd.return_groups``
  (U-Net groups ``down``, ``mid``, ``up``; see :mod:`fedphd.common.core.unet_groups`) into a
  client's
  ``FitIns.config`` gets only those tensors on the wire, both ways; its ``aggregate_fit`` then
  receives each answer's returned tensors only, in wire order.

Drivers build the strategy by dotted path (:mod:`fedphd.common.federation.strategy_builder`, either
Flower API) and offer every strategy constructor, where it takes them, the run's context:
``tensor_names`` (state-dict keys in wire order), ``architecture`` (the U-Net's JSON) and
``run_config`` (the whole :class:`~fedphd.common.settings.config.RunConfig`). A strategy may set
``evaluate_global_model = False`` when the server's model is not a usable model on its own
(e.g. FedDiffuse UDEC): the driver then evaluates at the clients only, through Flower's
``configure_evaluate``/``aggregate_evaluate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedphd.common.core.unet_groups import (
    select,
    tensor_names,
)
from fedphd.common.federation import running_mean
from fedphd.common.federation.downlink import Downlink
from fedphd.common.federation.held import Rebuilt
from fedphd.common.federation.sharing import Layout, layout_of
from fedphd.common.federation.summary import RoundSummary, summarise
from fedphd.common.federation.validation import (
    Clipped,
    answer_order,
    bound_examples,
    check_declared_examples,
    check_identity,
    check_metrics,
    check_update,
    describe_failure,
    sender_name,
)
from fedphd.common.settings.config import CodecConfig, TopologyConfig
from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    ARCH_KEY,
    ERROR_FEEDBACK_KEY,
    LOSS_METRIC,
    PER_CHANNEL_KEY,
    RECEIVED_DIGEST_KEY,
    RETURN_GROUPS_KEY,
    ROUND_KEY,
    SEND_GROUPS_KEY,
    UPLINK_KEY,
)
from fedphd.common.wire.transport import (
    ClientManager,
    ClientProxy,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Strategy,
    ndarrays_to_parameters,
)

log = logging.getLogger("fedphd.strategy")


DEFAULT_EXAMPLES_FACTOR = float(TopologyConfig.model_fields["max_examples_factor"].default)


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
    pairs = [(n, float(m[LOSS_METRIC])) for n, m in metrics if LOSS_METRIC in m]
    total = sum(n for n, _ in pairs)
    return {LOSS_METRIC: sum(n * loss for n, loss in pairs) / total} if total else {}


@dataclass
class RoundAggregate:
    """What a fit round's aggregation returns: the new global model (None: unchanged), the
    inner strategy's metrics, and the round's summary for the driver's records."""

    parameters: Parameters | None
    metrics: dict[str, Scalar]
    summary: RoundSummary


EvaluationResult = tuple[str, float, dict[str, Scalar]]  # sender, fd_classifier, metrics


class ManagedStrategy(Strategy):
    """Wrap ``inner`` with instructions, codecs, answer validation and round summaries.

    Aggregation is exactly the inner strategy's:
    ``w_{t+1} = inner.aggregate_fit(t, {(k, decode(payload_k), min(n_k, cap)) : k accepted})``
    with ``cap = max_examples_factor x`` the low median of the accepted ``n_k`` (drivers pass
    the run's ``topology.max_examples_factor``; the config's default when not given).
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
        max_examples_factor: float | None = None,
        forwarded: Rebuilt | None = None,
        whole: str = "fp32",
    ) -> None:
        super().__init__()
        self.inner = inner
        self._names = names
        self.max_examples_factor = (DEFAULT_EXAMPLES_FACTOR if max_examples_factor is None
                                    else max_examples_factor)
        self.instruction = {
            **instruction, PER_CHANNEL_KEY: per_channel, ERROR_FEEDBACK_KEY: error_feedback
        }
        self.downlink = downlink
        self.uplink = uplink
        # ``held``: what each connection holds, handed over by a driver that rebuilds its
        # strategy but keeps its connections (an edge, every cloud round); copied.
        # ``forwarded``: the model this server was itself sent (an edge), whose digest is
        # known when it is what goes down.
        self._wire = Downlink(downlink, per_channel, held, forwarded, whole=whole)
        self._reference: list[np.ndarray] = []
        # Per connection this round: positions of the tensors sent and expected back.
        self._layout: dict[str, Layout] = {}

    @classmethod
    def with_codecs(
        cls,
        inner: Strategy,
        instruction: dict[str, Scalar],
        codecs: CodecConfig,
        held: dict[str, Rebuilt] | None = None,
        names: list[str] | None = None,
        link: str = "cloud",
        max_examples_factor: float | None = None,
        forwarded: Rebuilt | None = None,
    ) -> ManagedStrategy:
        """Wrap ``inner`` with the run's ``[codec]`` settings for the links a ``link``
        (``cloud`` or ``edge``) server serves."""
        downlink, uplink = codecs.for_link(link)
        return cls(inner, instruction, downlink=downlink, uplink=uplink,
                   per_channel=codecs.per_channel, error_feedback=codecs.error_feedback,
                   held=held, names=names, max_examples_factor=max_examples_factor,
                   forwarded=forwarded, whole=codecs.whole)

    def __repr__(self) -> str:
        return f"ManagedStrategy({self.inner!r}, downlink={self.downlink}, uplink={self.uplink})"

    def held_models(self) -> dict[str, Rebuilt]:
        """What each connected receiver holds (a copy), for a driver that carries it over."""
        return self._wire.held_models()

    def hold(self, cid: str, rebuilt: Rebuilt) -> None:
        """Record that connection ``cid`` holds ``rebuilt`` (a peer recognised after a resume)."""
        self._wire.hold(cid, rebuilt)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._reference = codec.decode(parameters)
        self._wire.begin_round(set(client_manager.all()))
        rng = np.random.default_rng([server_round, len(self._wire.held_models())])
        # The algorithm may override the run's defaults (e.g. FedDDPM's longer first round),
        # never the protocol's own keys.
        protocol = {ARCH_KEY: self.instruction[ARCH_KEY], ROUND_KEY: server_round,
                    UPLINK_KEY: self.uplink}
        instructions, self._layout = [], {}
        for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager):
            layout = self._layout_of(ins.config)
            wire, config = self._wire.encode_for(
                proxy.cid, select(self._reference, layout.sent), layout, rng)
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
        return layout_of(config, len(self._reference), self.tensor_names)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's protocol step; drivers call :meth:`aggregate_round` for the summary too."""
        aggregate = self.aggregate_round(server_round, results, failures)
        return aggregate.parameters, aggregate.metrics

    def aggregate_round(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> RoundAggregate:
        """Check and decode every answer, aggregate the accepted ones with the inner strategy,
        and summarise the round."""
        accepted, rejected = self._accept(server_round, results)
        accepted, clipped = bound_examples(accepted, self.max_examples_factor)
        summary = self._settle(server_round, accepted, results, failures, rejected, clipped)
        if not accepted:
            return RoundAggregate(None, {}, summary)
        all_failures = list(failures) + [ValueError(reason) for reason in rejected.values()]
        parameters, metrics = self.inner.aggregate_fit(server_round, accepted, all_failures)
        if parameters is not None:
            parameters = self._as_model_dtypes(server_round, parameters)
        return RoundAggregate(parameters, metrics, summary)

    def _settle(
        self, server_round: int, accepted: list[tuple[ClientProxy, FitRes]],
        results: list[tuple[ClientProxy, FitRes]], failures: list, rejected: dict[str, str],
        clipped: list[Clipped],
    ) -> RoundSummary:
        """Log the round's clipped claims and failures, record what each receiver holds, and
        summarise the round (both aggregation paths)."""
        for clip in clipped:
            log.warning("round %d: %s claimed %d samples; counted as %d "
                        "(topology.max_examples_factor = %g x the round's median)",
                        server_round, clip.sender, clip.claimed, clip.counted,
                        self.max_examples_factor)
        for failure in failures:
            log.warning("round %d: %s", server_round, describe_failure(failure))
        self._wire.settle(accepted, results, failures)
        summary = self._summary(server_round, accepted, rejected, failures)
        summary.clipped = clipped_record(clipped)
        return summary

    def _accept(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[tuple[ClientProxy, FitRes]], dict[str, str]]:
        """The answers that pass every check, decoded to plain fp32 payloads, in a fixed order
        (answers arrive in completion order; float sums depend on order), and the reasons
        the others were rejected, by sender."""
        accepted: list[tuple[ClientProxy, FitRes]] = []
        rejected: dict[str, str] = {}
        for proxy, res in sorted(results, key=answer_order):
            arrays = self.accept_answer(server_round, proxy, res)
            if isinstance(arrays, str):
                rejected[sender_name(proxy, res)] = arrays
                continue
            accepted.append((proxy, FitRes(status=res.status,
                                           parameters=ndarrays_to_parameters(arrays),
                                           num_examples=res.num_examples, metrics=res.metrics)))
        return accepted, rejected

    def accept_answer(
        self, server_round: int, proxy: ClientProxy, res: FitRes
    ) -> list[np.ndarray] | str:
        """One answer's tensors decoded to its model dtypes after every check, or why it was
        rejected (logged). Safe in worker threads: it only reads this round's state."""
        try:
            check_identity(proxy, res)
            check_metrics(res)
            check_declared_examples(proxy, res)
            return self._decode_answer(proxy.cid, res)
        except ValueError as error:
            log.warning("round %d: rejected the update of %s: %s", server_round,
                        sender_name(proxy, res), error)
            return str(error)

    def _summary(
        self, server_round: int, accepted: list[tuple[ClientProxy, FitRes]],
        rejected: dict[str, str], failures: list,
    ) -> RoundSummary:
        summary = summarise([res for _, res in accepted])
        summary.senders = [sender_name(proxy, res) for proxy, res in accepted]
        summary.examples = {sender_name(proxy, res): res.num_examples for proxy, res in accepted}
        reported = [(proxy, res) for proxy, res in accepted if RECEIVED_DIGEST_KEY in res.metrics]
        summary.digests_checked = len(reported)
        summary.digest_mismatches = [
            sender_name(proxy, res) for proxy, res in reported
            if not self._wire.sent_to(proxy.cid).matches(res.metrics[RECEIVED_DIGEST_KEY])
        ]
        if summary.digest_mismatches:
            log.error("round %d: %s rebuilt a model that differs from the one sent",
                      server_round, summary.digest_mismatches)
        summary.rejected = rejected
        summary.failures = len(failures) + len(rejected)
        return summary

    def _decode_answer(self, cid: str, res: FitRes) -> list[np.ndarray]:
        """The tensors an answer carries, checked against the part of the model it must hold
        (an update is decoded from what that sender was sent)."""
        layout, sent = self._layout.get(cid), self._wire.sent_to(cid)
        if layout is None or sent is None:
            raise ValueError("answered without having been sent an instruction this round")
        base_returned = select(sent.arrays, layout.returned_within_sent())
        arrays = codec.decode(res.parameters, reference=base_returned)
        try:
            check_update(arrays, select(self._reference, layout.returned))
        except ValueError as error:
            if not layout.returns_everything:
                raise ValueError(f"{error} (groups {layout.returned_groups} only)") from None
            raise
        return arrays

    def _as_model_dtypes(self, server_round: int, parameters: Parameters) -> Parameters | None:
        """Keep the global model in the model's own dtypes (numpy maths in e.g. FedAdam
        promotes to float64, which would double every later message)."""
        return self._model_message(server_round, codec.decode(parameters), parameters)

    def _model_message(self, server_round: int, arrays: list[np.ndarray],
                       parameters: Parameters | None = None) -> Parameters | None:
        """The aggregate ``arrays`` as the global model's message, in the model's dtypes,
        after the checks every answer passed (None: unusable, the previous model stays);
        ``parameters``: their message when they were decoded from one (kept as it is where
        the dtypes already match)."""
        try:
            check_update([a.astype(r.dtype, copy=False) for a, r in zip(arrays, self._reference,
                                                                       strict=False)],
                         self._reference)
        except ValueError as error:
            log.error("round %d: %s returned an unusable model (%s); keeping the previous one",
                      server_round, self.inner.__class__.__name__, error)
            return None
        if all(a.dtype == r.dtype for a, r in zip(arrays, self._reference, strict=True)):
            return ndarrays_to_parameters(arrays) if parameters is None else parameters
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
        """The inner strategy's aggregate (Flower's sample-weighted mean loss); the driver
        records the per-client results (:func:`evaluation_results`)."""
        for failure in failures:
            log.warning("round %d: an evaluation failed: %r", server_round, failure)
        if not results:
            return None, {}
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round, parameters)

    def folds_answers(self) -> bool:
        """Whether this round's answers may be folded into a running sum as they arrive
        (:mod:`fedphd.common.federation.running_mean`; call after ``configure_fit``): the
        inner strategy is a weighted mean and every peer returns the same tensors."""
        returned = {tuple(layout.returned) for layout in self._layout.values()}
        return running_mean.folds_answers(self.inner) and len(returned) <= 1

    def new_running_mean(self, expected: int) -> running_mean.RunningMean:
        """The running sum of a round of ``expected`` instructions, bounded like the list."""
        return running_mean.RunningMean(expected, self.max_examples_factor)

    def aggregate_folded(
        self,
        server_round: int,
        folded: running_mean.RunningMean,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
        rejected: dict[str, str],
    ) -> RoundAggregate:
        """:meth:`aggregate_round` for answers already checked and folded (``results``:
        their metadata only): the same records, the same model as the inner strategy's."""
        accepted, clipped, mean = folded.finish()
        summary = self._settle(server_round, accepted, results, failures, rejected, clipped)
        if mean is None:
            return RoundAggregate(None, {}, summary)
        all_failures = list(failures) + [ValueError(reason) for reason in rejected.values()]
        arrays, metrics = running_mean.weighted_mean_result(self.inner, mean, accepted,
                                                            all_failures)
        # The mean's arrays are checked as they are, not re-decoded from their message.
        parameters = None if arrays is None else self._model_message(server_round, arrays)
        return RoundAggregate(parameters, metrics, summary)


def clipped_record(clipped: list[Clipped]) -> dict[str, dict[str, int]]:
    """The round record's ``clipped``: per sender, the samples it claimed and those counted."""
    return {clip.sender: {"claimed": clip.claimed, "counted": clip.counted} for clip in clipped}


def evaluation_results(results: list[tuple[ClientProxy, EvaluateRes]]) -> list[EvaluationResult]:
    """Each client's evaluation of its own model: sender, score (the answer's loss) and
    metrics."""
    return [(sender_name(proxy, res), float(res.loss), dict(res.metrics))
            for proxy, res in results]
