"""Sample quality during a run: of the global model at the cloud (``eval`` lines) and of the
clients' own models where the strategy asks them (``client-eval`` lines)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedphd.common.core.diffusion import make_noise_scheduler, sample_images
from fedphd.common.federation.rounds import EvaluationOutcome, run_evaluate_round
from fedphd.common.quality.evaluation import evaluate_model
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import CLIENT_ID_METRIC
from fedphd.common.wire.transport import Scalar, TrafficMeter
from fedphd.server.global_model import GlobalModel
from fedphd.server.metrics_log import MetricsLog

log = logging.getLogger("fedphd.cloud")  # the cloud's log, as before the driver was split


def numbers_only(metrics: dict[str, Scalar]) -> dict[str, float]:
    """The numeric metrics of an answer (ids and explanations are logged elsewhere)."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
            and key != CLIENT_ID_METRIC}


def client_eval_record(server_round: int, outcome: EvaluationOutcome) -> dict[str, Any]:
    """The ``client-eval`` line: the mean score and each client's (``outcome.results`` is
    not empty)."""
    scores = [score for _, score, _ in outcome.results]
    return {
        "tier": "client-eval",
        "round": server_round,
        "fd_classifier": float(sum(scores) / len(scores)),
        "per_client": {name: {"fd_classifier": score, **numbers_only(extra)}
                       for name, score, extra in outcome.results},
        "failures": outcome.failures,
        "bytes": {"evaluate-down": outcome.traffic.down, "evaluate-up": outcome.traffic.up},
    }


class CloudEvaluation:
    """When and where the run's models are evaluated (``[evaluation]``)."""

    def __init__(
        self, cfg: RunConfig, device: torch.device, global_model: GlobalModel,
        meter: TrafficMeter,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.global_model = global_model
        self.meter = meter

    def due_after(self, server_round: int) -> bool:
        evaluation = self.cfg.evaluation
        every = evaluation.every_cloud_rounds
        last = server_round == self.cfg.topology.cloud_rounds
        return (every > 0 and server_round % every == 0) or (last and evaluation.final)

    def run(self, metrics: MetricsLog, server_round: int) -> None:
        self._at_clients(metrics, server_round)
        if self.global_model.strategy.evaluate_global_model:
            self._at_cloud(metrics, server_round)

    def _at_clients(self, metrics: MetricsLog, server_round: int) -> None:
        """Flower's evaluate round (nobody is asked with ``fraction_evaluate = 0``)."""
        outcome = run_evaluate_round(
            self.global_model.server, self.global_model.strategy, self.meter, server_round,
            self.cfg.topology.round_timeout,
        )
        if outcome is None or not outcome.results:
            return
        record = client_eval_record(server_round, outcome)
        metrics.write(record)
        log.info("cloud round %d: clients' own models, mean fd_classifier %.4g over %d",
                 server_round, record["fd_classifier"], len(outcome.results))

    def _at_cloud(self, metrics: MetricsLog, server_round: int) -> None:
        model = self.global_model.trained()
        result = evaluate_model(model,
                                make_noise_scheduler(self.cfg.diffusion), self.cfg,
                                self.device, show_progress=False)
        metrics.write({"tier": "eval", "round": server_round, **result})
        log.info("cloud round %d: fd_classifier %.4g%s", server_round, result["fd_classifier"],
                 f", fid {result['fid']:.4g}" if "fid" in result else "")
        if metrics.tracker is not None:
            self._track_samples(metrics, model, server_round)

    def _track_samples(self, metrics: MetricsLog, model: torch.nn.Module,
                       server_round: int) -> None:
        """A grid of the round's model for the experiment tracker (the same seed every
        round, so the grids show one set of noises denoised by ever better models)."""
        images = sample_images(model.to(self.device), self.cfg.diffusion,
                               self.cfg.output.grid_samples, seed=self.cfg.seed,
                               steps=self.cfg.evaluation.sampling_steps)
        metrics.tracker.grid("samples/round", images, server_round)
