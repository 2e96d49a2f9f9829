"""``fedphd edge``: an edge aggregator.

One process that is a Flower *client* of the cloud and a Flower *server* of its own clients.
Its client-facing gRPC server starts once; on each cloud instruction the edge loads the global
model, drives ``edge_rounds`` rounds of its own strategy over its clients
(:func:`fedphd.common.federation.rounds.run_fit_round`), and answers the cloud with the edge
model plus what the cloud needs to weigh it: samples of its latest round, the label histogram
of the cloud period, the per-round log and the bytes its client link carried.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.models import architecture_to_json, unet_config
from fedphd.common.federation.held import Rebuilt, encode_reply
from fedphd.common.federation.instructions import client_instruction
from fedphd.common.federation.rounds import RoundOutcome, round_record, run_fit_round
from fedphd.common.federation.strategy import (
    ManagedStrategy,
    client_strategy_defaults,
    run_context,
)
from fedphd.common.federation.strategy_builder import build_strategy
from fedphd.common.federation.summary import RoundSummary, add_histograms
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.runtime import seed_everything
from fedphd.common.settings.topology import clients_of_edge, cloud_address, edge_address
from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    ADDRESS_PROPERTY,
    ARCH_KEY,
    ASSIGNMENT_KEY,
    BYTES_DOWN_METRIC,
    BYTES_RECEIVED_METRIC,
    BYTES_UP_METRIC,
    CLOUD_ROUND_KEY,
    EDGE_CLIENTS_PROPERTY,
    EDGE_ID_METRIC,
    EDGE_ID_PROPERTY,
    EDGE_LOG_METRIC,
    EDGE_ROUNDS_KEY,
    FORWARDED_TO_CLIENTS,
    LABEL_HIST_METRIC,
    LOSS_METRIC,
    PAYLOAD_BYTES_METRIC,
    RECEIVED_DIGEST_KEY,
    ROUND_KEY,
)
from fedphd.common.wire.limits import max_message_bytes
from fedphd.common.wire.tls import (
    client_certificate,
    client_root_certificates,
    describe_tls,
    server_admission,
    server_certificates,
)
from fedphd.common.wire.transport import (
    BoundedClientManager,
    Client,
    Code,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Status,
    Strategy,
    TrafficMeter,
    connect_client,
    disconnect_all,
    fit_ins_wire_size,
    fit_res,
    ndarrays_to_parameters,
    new_server,
    ok_status,
    start_flower_server,
)
from fedphd.edge.carried import Carried, CloudRoundStart
from fedphd.edge.clients import EdgeClients, NoClients, client_names

log = logging.getLogger("fedphd.edge")


class NoAggregate(RuntimeError):  # noqa: N818 - reads as the answer it becomes
    """No edge round of a cloud round produced an aggregate (every answer failed or was
    rejected, each already logged in one line): the cloud is told so, without a traceback."""


@dataclass
class EdgeRounds:
    """What one cloud round's edge rounds produced: their records, the label histogram of the
    period, and the summary of the latest round that produced an aggregate."""

    records: list[dict[str, Any]] = field(default_factory=list)
    label_hist: list[int] = field(default_factory=list)
    last: RoundSummary | None = None
    parameters: Parameters | None = None  # the edge model after the last round

    def add(self, record: dict[str, Any], outcome: RoundOutcome) -> None:
        self.records.append(record)
        self.label_hist = add_histograms(self.label_hist, outcome.summary.label_hist)
        if outcome.updated:
            self.last = outcome.summary

    def link_bytes(self, link: str) -> int:
        return sum(record["bytes"][link] for record in self.records)


class EdgeAggregator(Client):
    """Flower client of the cloud whose ``fit`` runs federated rounds over its own clients."""

    def __init__(
        self, cfg: RunConfig, edge_id: int, listen: str, advertise: str | None = None
    ) -> None:
        self.cfg = cfg
        self.edge_id = edge_id
        self.listen = listen
        # The address clients are told to use when they are moved here.
        self.advertise = advertise or listen
        self.carried = Carried(rng=np.random.default_rng([cfg.seed, 100 + edge_id]))
        self.round_start = CloudRoundStart()
        self.meter = TrafficMeter()
        self.client_manager = BoundedClientManager(cfg.topology.connect_timeout)
        self.clients = EdgeClients(self.client_manager, cfg.topology,
                                   clients_of_edge(edge_id, cfg.topology), edge_id)
        self.message_limit = max_message_bytes(cfg)
        self.grpc_server = start_flower_server(listen, self.client_manager, self.meter,
                                               max_message_length=self.message_limit,
                                               certificates=server_certificates(cfg.tls),
                                               admission=server_admission(cfg.tls, "client"),
                                               tensor_link_enabled=cfg.topology.tensor_link,
                                               peers=cfg.topology.clients)
        self.edge_round = 0
        log.info("edge %d: serving clients on %s (%s, expecting %d)", edge_id, listen,
                 describe_tls(cfg.tls), self.clients.expected)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return GetParametersRes(status=ok_status(), parameters=codec.encode([], "fp32"))

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Address and the label histograms of the connected clients (for edge selection)."""
        hists = self.clients.histograms()
        return GetPropertiesRes(
            status=ok_status(),
            properties={
                EDGE_ID_PROPERTY: self.edge_id,
                ADDRESS_PROPERTY: self.advertise,
                EDGE_CLIENTS_PROPERTY: json.dumps({str(c): h for c, h in hists.items()}),
            },
        )

    def fit(self, ins: FitIns) -> FitRes:
        try:
            return self._fit(ins)
        except (NoClients, NoAggregate) as error:
            # Foreseen, not a fault of the edge: one line here and at the cloud, no traceback.
            log.warning("%s", error)
            return self._error_answer(str(error))
        except Exception as error:  # noqa: BLE001 - the cloud records it and goes on
            log.exception("edge %d: cloud round failed", self.edge_id)
            return self._error_answer(f"edge failed: {error}")

    def _error_answer(self, message: str) -> FitRes:
        """An error-status answer: Flower counts it among the round's failures, the cloud
        logs its message in one line and aggregates the other edges."""
        return FitRes(
            status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=message),
            parameters=Parameters(tensors=[], tensor_type=codec.FP32),
            num_examples=0,
            metrics={EDGE_ID_METRIC: self.edge_id},
        )

    def _fit(self, ins: FitIns) -> FitRes:
        received = fit_ins_wire_size(ins)
        cloud_round = int(ins.config[ROUND_KEY])
        log.info("edge %d: cloud round %d begins", self.edge_id, cloud_round)
        self._begin_cloud_round(cloud_round)
        if ASSIGNMENT_KEY in ins.config:
            self.clients.apply_assignment(str(ins.config[ASSIGNMENT_KEY]), self.advertise)
        # Before anything is built: an edge without clients answers the cloud at once.
        self.clients.wait()
        global_arrays = self.carried.held.decode(ins.parameters, ins.config)
        # Hashed while the edge rounds run, on cores they leave idle: read when the edge
        # answers, after all its rounds.
        received_digest = self.carried.held.keep_soon(global_arrays, idle=True)
        global_parameters = codec.fp32_message(global_arrays, ins.parameters)
        strategy = self._edge_strategy(global_parameters, ins.config, cloud_round,
                                       Rebuilt(global_arrays, received_digest))
        rounds = self._run_edge_rounds(strategy, global_parameters, ins.config, cloud_round)
        if rounds.last is None:
            raise NoAggregate(f"edge {self.edge_id}: no edge round produced an aggregate "
                              f"({len(rounds.records)} ran; their failures are logged above)")
        log.info("edge %d: cloud round %d done, loss %s", self.edge_id, cloud_round,
                 rounds.last.loss)
        return self._answer(rounds, global_arrays, ins.config, received,
                            received_digest.result())

    def _begin_cloud_round(self, cloud_round: int) -> None:
        rewind = self.round_start.enter(cloud_round, self.carried)
        if rewind is not None:
            log.info("edge %d: cloud round %d again (the cloud resumed): replaying it from its "
                     "start", self.edge_id, cloud_round)
            self.carried = rewind

    def _edge_strategy(
        self, global_parameters: Parameters, config: dict, cloud_round: int,
        received: Rebuilt,
    ) -> ManagedStrategy:
        # A fresh strategy per cloud round: after a cloud aggregation every edge restarts from
        # the global model, including any server-side optimiser state of its strategy.
        topology = self.cfg.topology
        arch_json = str(config[ARCH_KEY])
        inner = edge_strategy(self.cfg, arch_json, global_parameters)
        carried = self.carried
        if arch_json != carried.client_models_arch:  # pruned: what clients held is moot
            carried.client_models, carried.client_models_arch = {}, arch_json
        forwarded = {key: config[key] for key in FORWARDED_TO_CLIENTS if key in config}
        return ManagedStrategy.with_codecs(
            inner,
            {**client_instruction(self.cfg, arch_json, forwarded), CLOUD_ROUND_KEY: cloud_round},
            self.cfg.codec, held=carried.client_models, link="edge",
            max_examples_factor=topology.max_examples_factor, forwarded=received,
        )

    def _run_edge_rounds(
        self, strategy: ManagedStrategy, global_parameters: Parameters, config: dict,
        cloud_round: int,
    ) -> EdgeRounds:
        edge_rounds = int(config.get(EDGE_ROUNDS_KEY, self.cfg.topology.edge_rounds))
        server = new_server(strategy, self.client_manager)
        server.parameters = global_parameters
        rounds = EdgeRounds()
        # Edge rounds are numbered from the cloud round: a restarted edge, or one replaying a
        # cloud round, numbers them as one that never stopped.
        self.edge_round = (cloud_round - 1) * edge_rounds
        try:
            for done in range(edge_rounds):
                if not self.clients.enough():  # all left: Flower's sampling would wait
                    self._skip_rounds(edge_rounds - done)
                    break
                self.edge_round += 1
                rounds.add(*self._edge_round(server, strategy, cloud_round))
        finally:
            # What the clients hold now: the base of the next cloud round's downlinks.
            self.carried.client_models = strategy.held_models()
        rounds.parameters = server.parameters
        return rounds

    def _skip_rounds(self, count: int) -> None:
        missing = set(self.clients.expected_ids) - set(self.clients.learn().values())
        log.warning("edge %d: %d clients connected (topology.min_fit_clients = %d), %s left: "
                    "the last %d edge round(s) of this cloud round are skipped", self.edge_id,
                    self.client_manager.num_available(), self.cfg.topology.min_fit_clients,
                    client_names(missing), count)

    def _edge_round(
        self, server, strategy: ManagedStrategy, cloud_round: int
    ) -> tuple[dict[str, Any], RoundOutcome]:
        # Flower samples clients with Python's generator: seeded per round, a replayed
        # round samples the same clients.
        random.seed(f"{self.cfg.seed}-edge-{self.edge_id}-{self.edge_round}")
        outcome = run_fit_round(server, strategy, self.meter, self.edge_round,
                                self.cfg.topology.round_timeout)
        link_bytes = {"edge->client": outcome.traffic.down, "client->edge": outcome.traffic.up}
        record = round_record("edge", self.edge_round, outcome, link_bytes,
                              peers_key="clients", reported_key="reported_by_clients",
                              edge=self.edge_id, cloud_round=cloud_round)
        return record, outcome

    def _answer(
        self, rounds: EdgeRounds, global_arrays: list, config: dict, received: int,
        received_digest: str,
    ) -> FitRes:
        """The edge model as an update from the global one, with what the cloud weighs it by."""
        last = rounds.last
        payload = encode_reply(codec.decode(rounds.parameters), global_arrays, config,
                               self.carried.feedback, self.carried.rng)
        return fit_res(
            payload,
            # n_e: samples of the edge's latest round (a cloud strategy may weigh edges by it).
            last.num_examples,
            {
                EDGE_ID_METRIC: self.edge_id,
                LOSS_METRIC: last.loss if last.loss is not None else float("nan"),
                LABEL_HIST_METRIC: json.dumps(rounds.label_hist),
                EDGE_LOG_METRIC: json.dumps(rounds.records),
                BYTES_DOWN_METRIC: rounds.link_bytes("edge->client"),
                BYTES_UP_METRIC: rounds.link_bytes("client->edge"),
                BYTES_RECEIVED_METRIC: received,
                RECEIVED_DIGEST_KEY: received_digest,
                PAYLOAD_BYTES_METRIC: codec.payload_bytes(payload),
            },
        )

    def shutdown(self) -> None:
        disconnect_all(self.client_manager)
        self.grpc_server.stop(grace=2).wait(5)


def edge_strategy(cfg: RunConfig, arch_json: str, global_parameters: Parameters) -> Strategy:
    """``topology.edge_strategy`` for one cloud round, starting from the global model."""
    topology = cfg.topology
    return build_strategy(
        topology.edge_strategy,
        topology.edge_strategy_args,
        client_strategy_defaults(topology.fraction_fit, topology.min_fit_clients,
                                 global_parameters),
        "topology.edge_strategy",
        run_context(cfg, arch_json),
    )


def check_edge_strategy(cfg: RunConfig) -> None:
    """Build the edge strategy once at start (for the configured, unpruned model), so a
    configuration it refuses stops the edge now, in one line, not at its first cloud round."""
    edge_strategy(cfg, architecture_to_json(unet_config(cfg.model)), ndarrays_to_parameters([]))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_edge_strategy(cfg)
    seed_everything(cfg.seed + 100 + args.edge_id)
    listen = args.listen or edge_address(args.edge_id, cfg.topology)
    cloud = args.cloud or cloud_address(cfg.topology)
    root_certificates = client_root_certificates(cfg.tls)  # before serving: fail at start
    own_certificate = client_certificate(cfg.tls, "edge", args.edge_id, "--edge-id")
    edge = EdgeAggregator(cfg, args.edge_id, listen, args.advertise)
    try:
        log.info("edge %d: joining the cloud at %s", args.edge_id, cloud)
        start = time.monotonic()
        connect_client(cloud, edge, max_wait_time=cfg.topology.connect_timeout,
                       max_message_length=edge.message_limit,
                       root_certificates=root_certificates,
                       client_certificate=own_certificate)
        seconds = time.monotonic() - start
        log.info("edge %d: released by the cloud after %.0f s", args.edge_id, seconds)
    finally:
        edge.shutdown()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "edge",
        help="run an edge aggregator (client of the cloud, server of its clients)",
        description="Serve clients on --listen, join the cloud at --cloud, and on each cloud "
        "instruction run topology.edge_rounds rounds of topology.edge_strategy.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--cloud", metavar="HOST:PORT", help="cloud address (default: from topology)"
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to serve clients on (default: topology.host:edge_base_port+ID)",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address clients can reach this edge at, sent to clients moved here "
        "(default: --listen; set it when listening on 0.0.0.0)",
    )
    parser.add_argument("--edge-id", type=int, required=True, metavar="ID", help="edge number")
    parser.set_defaults(run=run)
