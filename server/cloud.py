"""``fedphd cloud``: the cloud server that holds the global model.

A Flower gRPC server whose peers are the edge aggregators (or the clients themselves in flat
mode, ``topology.edges = 0``). It builds the initial model, drives ``cloud_rounds`` rounds of
``topology.cloud_strategy`` (:func:`fedphd.common.federation.rounds.run_fit_round`), writes one
JSON line per round (and per edge round) to ``metrics.jsonl``, and leaves the final model in
diffusers format with a PNG grid of samples.

The driver names no method: what a method changes about the global model between rounds
comes through the run's :class:`~fedphd.server.schedule.ModelSchedule`
(:func:`fedphd.server.methods.model_schedule`), what it does within a round through its
strategy.

After every completed cloud round it writes ``checkpoint.pt``
(:mod:`fedphd.server.checkpointing`); ``fedphd cloud --resume`` continues a crashed run from
there. Edges and clients need no restart: they reconnect by themselves and replay the
interrupted round from its start.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from grpc import Server as GrpcServer

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.models import build_unet, count_parameters, unet_config
from fedphd.common.federation.checkpoint import CloudCheckpoint, restore_random_state
from fedphd.common.federation.rounds import RoundOutcome, run_fit_round
from fedphd.common.quality.tracking import check_tracking, open_tracker, track_png
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.runtime import progress_bar, seed_everything, setup_torch
from fedphd.common.settings.topology import cloud_address, is_flat
from fedphd.common.wire.limits import max_message_bytes
from fedphd.common.wire.tls import describe_tls, server_admission, server_certificates
from fedphd.common.wire.transport import (
    BoundedClientManager,
    TrafficMeter,
    disconnect_all,
    start_flower_server,
)
from fedphd.server.checkpointing import Checkpointing, Progress
from fedphd.server.evaluation import CloudEvaluation
from fedphd.server.finish import finish_run
from fedphd.server.global_model import GlobalModel
from fedphd.server.methods import model_schedule
from fedphd.server.metrics_log import METRICS_FILE, MetricsLog
from fedphd.server.peers import Peers
from fedphd.server.round_records import cloud_record, edge_records, round_bytes

log = logging.getLogger("fedphd.cloud")


class CloudServer:
    """Drives the cloud rounds of one run."""

    def __init__(self, cfg: RunConfig, listen: str, out: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.listen = listen
        self.out = out
        self.resume = resume
        self.flat = is_flat(cfg.topology)
        self.meter = TrafficMeter()
        self.client_manager = BoundedClientManager(cfg.topology.connect_timeout)
        self.schedule = model_schedule(cfg)
        self.global_model = GlobalModel(cfg, self.flat, self.client_manager)
        self.peers = Peers(cfg.topology, self.flat, self.client_manager)
        self.progress = Progress()
        self.checkpoints = Checkpointing(cfg, out, self.global_model, self.schedule,
                                         self.peers, self.meter, self.progress)

    def run(self) -> int:
        cfg = self.cfg
        check_tracking(cfg.output)  # a missing optional package fails before anything starts
        seed_everything(cfg.seed)
        device = setup_torch(cfg.training)
        checkpoint = self.checkpoints.load() if self.resume else None
        if checkpoint is None:
            initial = build_unet(unet_config(cfg.model), seed=cfg.seed)
            self.global_model.install(initial, self.schedule.instruction_keys())
        else:
            self.checkpoints.install(checkpoint)
        grpc_server = self._serve()
        if checkpoint is not None:
            MetricsLog.truncate(self.out / METRICS_FILE, checkpoint.metrics_offset)
        metrics = MetricsLog(self.out / METRICS_FILE, open_tracker(
            cfg.output, self.out, checkpoint.completed_round if checkpoint else 0,
            cfg.topology.edge_rounds))
        try:
            return self._run_rounds(metrics, checkpoint, CloudEvaluation(
                cfg, device, self.global_model, self.meter))
        finally:
            metrics.close()
            disconnect_all(self.client_manager)
            grpc_server.stop(grace=2).wait(5)

    def _serve(self) -> GrpcServer:
        """Start serving the peers (they may connect while the run prepares)."""
        cfg = self.cfg
        message_limit = max_message_bytes(cfg)
        grpc_server = start_flower_server(self.listen, self.client_manager, self.meter,
                                          max_message_length=message_limit,
                                          certificates=server_certificates(cfg.tls),
                                          admission=server_admission(
                                              cfg.tls, "client" if self.flat else "edge"),
                                          tensor_link_enabled=cfg.topology.tensor_link,
                                          peers=cfg.topology.clients + cfg.topology.edges)
        log.info(
            "cloud: %d-parameter U-Net, %s on %s (%s, messages up to %.1f MiB), "
            "waiting for %d %s",
            count_parameters(self.global_model.model),
            self.global_model.strategy.inner.__class__.__name__, self.listen,
            describe_tls(cfg.tls), message_limit / 2**20, self.peers.expected, self.peers.kind,
        )
        return grpc_server

    def _run_rounds(
        self, metrics: MetricsLog, checkpoint: CloudCheckpoint | None,
        evaluation: CloudEvaluation,
    ) -> int:
        # Round 0: a change of the model from the outset, made while the peers connect.
        self._follow_schedule(0, metrics)
        if not self.peers.wait_at_start(checkpoint is not None):
            return 1
        if checkpoint is not None:
            # Last: building models above draws from the generators too.
            restore_random_state(checkpoint.random)
        self._train(metrics, evaluation)
        model = self.global_model.trained().to(evaluation.device)
        finish_run(self.cfg, self.out, model, self.global_model.strategy, self.meter, self.flat)
        track_png(metrics.tracker, "samples", self.out / "samples.png",
                  self.cfg.topology.cloud_rounds)
        return 0

    def _follow_schedule(self, server_round: int, metrics: MetricsLog) -> None:
        """The schedule's change of the global model before ``server_round``, if any."""
        model = self.schedule.before_round(server_round, self.global_model.trained, metrics)
        if model is not None:
            self.global_model.install(model, self.schedule.instruction_keys())

    def _train(self, metrics: MetricsLog, evaluation: CloudEvaluation) -> None:
        rounds = self.cfg.topology.cloud_rounds
        bar = progress_bar(rounds, "cloud rounds", self.cfg.output.progress)
        bar.update(self.progress.completed_round)
        for server_round in range(self.progress.completed_round + 1, rounds + 1):
            outcome = self._round(metrics, server_round)
            if evaluation.due_after(server_round):
                evaluation.run(metrics, server_round)
            self.checkpoints.save(metrics, server_round)
            self.progress.completed_round = server_round
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.summary.loss or float('nan'):.4f}")
        bar.close()

    def _round(self, metrics: MetricsLog, server_round: int) -> RoundOutcome:
        """One cloud round and its lines (its edges' rounds first)."""
        self._follow_schedule(server_round, metrics)
        waited = self.peers.before_round(server_round, self.global_model.strategy)
        # Flower samples peers with Python's generator: seeded per round.
        random.seed(f"{self.cfg.seed}-cloud-{server_round}")
        outcome = run_fit_round(
            self.global_model.server, self.global_model.strategy, self.meter, server_round,
            self.cfg.topology.round_timeout,
        )
        for record in edge_records(outcome):
            metrics.write(record)
        per_link = round_bytes(outcome, self.flat)
        self.progress.add_bytes(per_link)
        record = cloud_record(server_round, outcome, per_link, waited, self.progress.cumulative)
        metrics.write(record)
        log.info("cloud round %d: loss %s, bytes %s", server_round, record["loss"], per_link)
        return outcome


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out or cfg.output.dir)
    listen = args.listen or cloud_address(cfg.topology)
    return CloudServer(cfg, listen, out, resume=args.resume).run()


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cloud",
        help="run the cloud server that holds the global model",
        description="Serve edges (or clients in flat mode) on --listen, run "
        "topology.cloud_rounds rounds of topology.cloud_strategy, write metrics.jsonl, "
        "the final model (diffusers format) and samples.png into --out.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to serve on (default: topology.host:topology.cloud_port)",
    )
    parser.add_argument("--out", metavar="DIR", help="run folder (default: output.dir)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.pt (written after every "
        "completed cloud round) after a crash; the config must be the run's (addresses, "
        "timeouts, output, evaluation and topology.cloud_rounds may change). Edges and "
        "clients keep running and reconnect by themselves",
    )
    parser.set_defaults(run=run)
