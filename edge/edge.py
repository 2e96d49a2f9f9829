"""``fedphd edge``: an edge aggregator.

One process that is a Flower *client* of the cloud and a Flower *server* of its own clients.
Its client-facing gRPC server starts once; on each cloud instruction the edge loads the global
model, drives ``edge_rounds`` rounds of its own strategy over its clients
(``Server.fit_round``), and answers the cloud with the edge model plus what the cloud needs
to weigh it: samples of its latest round, the label histogram of the cloud period, the
per-round log and the bytes its client link carried.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time

import numpy as np

from common import codec
from common.cli import add_config_args, config_from_args
from common.config import RunConfig
from common.instructions import (
    ARCH_KEY,
    ASSIGNMENT_KEY,
    CLOUD_ROUND_KEY,
    EDGE_ROUNDS_KEY,
    GROUP_LASSO_KEY,
    MOVE_KEY,
    ROUND_KEY,
    client_instruction,
)
from common.limits import max_message_bytes
from common.quantization import ErrorFeedback
from common.rounds import run_fit_round
from common.runtime import seed_everything
from common.strategy import (
    RECEIVED_DIGEST_KEY,
    HeldModel,
    ManagedStrategy,
    add_histograms,
    build_strategy,
    client_strategy_defaults,
    encode_reply,
    run_context,
)
from common.tls import client_root_certificates, describe_tls, server_certificates
from common.topology import clients_of_edge, cloud_address, edge_address
from common.transport import (
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
    TrafficMeter,
    connect_client,
    disconnect_all,
    fit_ins_wire_size,
    fit_res,
    move_client,
    ndarrays_to_parameters,
    new_server,
    ok_status,
    start_flower_server,
    wait_for_clients,
)

log = logging.getLogger("fedphd.edge")


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
        self._client_ids: dict[str, int] = {}  # Flower connection id -> client id
        self._client_hists: dict[int, list[int]] = {}
        self.feedback = ErrorFeedback()  # quantised uplink to the cloud
        self.held = HeldModel()  # the last global model: base of quantised downlinks
        # What each connected client holds, kept across cloud rounds (per-round strategies).
        self._client_models: dict = {}
        self._client_models_arch = ""
        self.rng = np.random.default_rng([cfg.seed, 100 + edge_id])
        self.meter = TrafficMeter()
        self.client_manager = BoundedClientManager(cfg.topology.connect_timeout)
        self.expected_clients = len(clients_of_edge(edge_id, cfg.topology))
        self.message_limit = max_message_bytes(cfg)
        self.grpc_server = start_flower_server(listen, self.client_manager, self.meter,
                                               max_message_length=self.message_limit,
                                               certificates=server_certificates(cfg.tls))
        self.edge_round = 0
        # The state when the latest cloud round began: a resumed cloud sends it again.
        self.round_start: tuple[int, dict] | None = None
        log.info("edge %d: serving clients on %s (%s, expecting %d)", edge_id, listen,
                 describe_tls(cfg.tls), self.expected_clients)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return GetParametersRes(status=ok_status(), parameters=codec.encode([], "fp32"))

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Address and the label histograms of the connected clients (for edge selection)."""
        wait_for_clients(self.client_manager, self.expected_clients,
                         self.cfg.topology.connect_timeout)
        self._learn_clients()
        return GetPropertiesRes(
            status=ok_status(),
            properties={
                "edge_id": self.edge_id,
                "address": self.advertise,
                "clients": json.dumps({
                    str(client): self._client_hists[client]
                    for client in self._client_ids.values()
                }),
            },
        )

    def _learn_clients(self) -> dict[str, int]:
        """Ask newly connected clients who they are; forget those that left."""
        connected = dict(self.client_manager.all())  # a copy: gRPC threads change it
        for cid in set(self._client_ids) - set(connected):
            del self._client_ids[cid]
        for cid, proxy in connected.items():
            if cid in self._client_ids:
                continue
            props = proxy.get_properties(
                GetPropertiesIns(config={}), timeout=self.cfg.topology.round_timeout,
                group_id=None,
            ).properties
            client = int(props["client_id"])
            self._client_ids[cid] = client
            self._client_hists[client] = json.loads(str(props["label_hist"]))
        return dict(self._client_ids)

    def _apply_assignment(self, mapping_json: str) -> None:
        """Send away the clients assigned elsewhere; expect those assigned here."""
        mapping = {int(c): address for c, address in json.loads(mapping_json).items()}
        leaving = []
        for cid, client in self._learn_clients().items():
            target = mapping.get(client, self.advertise)
            if target != self.advertise:
                log.info("edge %d: client %d moves to %s", self.edge_id, client, target)
                move_client(self.client_manager.all()[cid], target, MOVE_KEY)
                leaving.append(cid)
        deadline = time.monotonic() + 30
        while any(cid in self.client_manager.all() for cid in leaving):
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients {leaving} did not leave within 30 s")
            time.sleep(0.05)
        self.expected_clients = sum(1 for a in mapping.values() if a == self.advertise)

    def fit(self, ins: FitIns) -> FitRes:
        try:
            return self._fit(ins)
        except Exception as error:  # noqa: BLE001 - the cloud records it and goes on
            log.exception("edge %d: cloud round failed", self.edge_id)
            return FitRes(
                status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=f"edge failed: {error}"),
                parameters=Parameters(tensors=[], tensor_type=codec.FP32),
                num_examples=0,
                metrics={"edge_id": self.edge_id},
            )

    def _mark_cloud_round(self, cloud_round: int) -> None:
        """Keep what this edge carries between cloud rounds (quantisation residuals and
        models held on both links, the rounding generator) as it was when each cloud round
        began; the same cloud round again (the cloud resumed from its checkpoint) is
        replayed from there, as its clients replay theirs."""
        if self.round_start is not None and cloud_round == self.round_start[0]:
            log.info("edge %d: cloud round %d again (the cloud resumed): replaying it from its "
                     "start", self.edge_id, cloud_round)
            self._set_carried(self.round_start[1])
            return
        self.round_start = (cloud_round, self._carried())

    def _carried(self) -> dict:
        """Copies that share the arrays: held models and residuals are replaced each round,
        never modified, so a snapshot costs no model-sized memory per client."""
        return {"feedback": self.feedback.snapshot(), "held": copy.copy(self.held),
                "rng": copy.deepcopy(self.rng), "client_models": dict(self._client_models),
                "client_models_arch": self._client_models_arch}

    def _set_carried(self, carried: dict) -> None:
        self.feedback, self.held = carried["feedback"].snapshot(), copy.copy(carried["held"])
        self.rng = copy.deepcopy(carried["rng"])
        self._client_models.clear()  # in place: the edge strategy shares this dict
        self._client_models.update(carried["client_models"])
        self._client_models_arch = carried["client_models_arch"]

    def _edge_strategy(
        self, global_parameters: Parameters, arch_json: str, group_lasso: float,
        cloud_round: int,
    ) -> ManagedStrategy:
        # A fresh strategy per cloud round: after a cloud aggregation every edge restarts from
        # the global model, including any server-side optimiser state of its strategy.
        topology = self.cfg.topology
        inner = build_strategy(
            topology.edge_strategy,
            topology.edge_strategy_args,
            client_strategy_defaults(
                topology.fraction_fit, topology.min_fit_clients, global_parameters
            ),
            "topology.edge_strategy",
            run_context(self.cfg, arch_json),
        )
        if arch_json != self._client_models_arch:  # pruned: what clients held is moot
            self._client_models, self._client_models_arch = {}, arch_json
        return ManagedStrategy.with_codecs(
            inner,
            {**client_instruction(self.cfg, arch_json, group_lasso), CLOUD_ROUND_KEY: cloud_round},
            self.cfg.codec, held=self._client_models, link="edge",
        )

    def _wait_for_clients(self) -> None:
        """All assigned clients, or at least ``min_fit_clients`` once the wait has timed out."""
        topology = self.cfg.topology
        if wait_for_clients(self.client_manager, self.expected_clients, topology.connect_timeout):
            return
        connected = self.client_manager.num_available()
        if connected < min(self.expected_clients, topology.min_fit_clients):
            raise RuntimeError(
                f"only {connected} of {self.expected_clients} clients connected within "
                f"topology.connect_timeout = {topology.connect_timeout} s"
            )
        log.warning("edge %d: going on with %d of %d clients", self.edge_id, connected,
                    self.expected_clients)

    def _fit(self, ins: FitIns) -> FitRes:
        received = fit_ins_wire_size(ins)
        cloud_round = int(ins.config[ROUND_KEY])
        log.info("edge %d: cloud round %d begins", self.edge_id, cloud_round)
        self._mark_cloud_round(cloud_round)
        if ASSIGNMENT_KEY in ins.config:
            self._apply_assignment(str(ins.config[ASSIGNMENT_KEY]))
        edge_rounds = int(ins.config.get(EDGE_ROUNDS_KEY, self.cfg.topology.edge_rounds))
        global_arrays = self.held.decode(ins.parameters, ins.config)
        received_digest = self.held.keep(global_arrays)
        global_parameters = ndarrays_to_parameters(global_arrays)
        strategy = self._edge_strategy(
            global_parameters, str(ins.config[ARCH_KEY]),
            float(ins.config.get(GROUP_LASSO_KEY, 0.0)), cloud_round,
        )
        server = new_server(strategy, self.client_manager)
        server.parameters = global_parameters
        self._wait_for_clients()
        records, hist, last = [], [], None
        # Edge rounds are numbered from the cloud round: a restarted edge, or one replaying a
        # cloud round, numbers them as one that never stopped.
        self.edge_round = (cloud_round - 1) * edge_rounds
        for _ in range(edge_rounds):
            self.edge_round += 1
            # Flower samples clients with Python's generator: seeded per round, a replayed
            # round samples the same clients.
            random.seed(f"{self.cfg.seed}-edge-{self.edge_id}-{self.edge_round}")
            outcome = run_fit_round(
                server, strategy, self.meter, self.edge_round, self.cfg.topology.round_timeout
            )
            summary = outcome.summary
            records.append(
                {
                    "tier": "edge",
                    "edge": self.edge_id,
                    "cloud_round": cloud_round,
                    "round": self.edge_round,
                    "loss": summary.loss,
                    "num_examples": summary.num_examples,
                    "clients": summary.senders,
                    "failures": summary.failures,
                    "rejected": summary.rejected,
                    "seconds": round(outcome.seconds, 3),
                    "bytes": {
                        "edge->client": outcome.traffic.down,
                        "client->edge": outcome.traffic.up,
                    },
                    "control_bytes": outcome.traffic.control,
                    "digests_checked": summary.digests_checked,
                    "digest_mismatches": summary.digest_mismatches,
                    "reported_by_clients": {
                        "received": summary.reported_received,
                        "payload": summary.reported_payload,
                    },
                }
            )
            hist = add_histograms(hist, summary.label_hist)
            if outcome.updated:
                last = summary
        if last is None:
            raise RuntimeError(f"none of the {edge_rounds} edge rounds produced an aggregate")
        log.info("edge %d: cloud round %d done, loss %s", self.edge_id, cloud_round, last.loss)
        payload = encode_reply(codec.decode(server.parameters), global_arrays, ins.config,
                               self.feedback, self.rng)
        return fit_res(
            payload,
            # n_e: samples of the edge's latest round (FedPhD's cloud weighting uses it).
            last.num_examples,
            {
                "edge_id": self.edge_id,
                "loss": last.loss if last.loss is not None else float("nan"),
                "label_hist": json.dumps(hist),
                "edge_log": json.dumps(records),
                "bytes_down": sum(r["bytes"]["edge->client"] for r in records),
                "bytes_up": sum(r["bytes"]["client->edge"] for r in records),
                "bytes_received": received,
                RECEIVED_DIGEST_KEY: received_digest,
                "payload_bytes": codec.payload_bytes(payload),
            },
        )

    def shutdown(self) -> None:
        disconnect_all(self.client_manager)
        self.grpc_server.stop(grace=2).wait(5)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    seed_everything(cfg.seed + 100 + args.edge_id)
    listen = args.listen or edge_address(args.edge_id, cfg.topology)
    cloud = args.cloud or cloud_address(cfg.topology)
    root_certificates = client_root_certificates(cfg.tls)  # before serving: fail at start
    edge = EdgeAggregator(cfg, args.edge_id, listen, args.advertise)
    try:
        log.info("edge %d: joining the cloud at %s", args.edge_id, cloud)
        start = time.monotonic()
        connect_client(cloud, edge, max_wait_time=cfg.topology.connect_timeout,
                       max_message_length=edge.message_limit,
                       root_certificates=root_certificates)
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
