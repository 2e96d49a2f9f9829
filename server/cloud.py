"""``fedphd cloud``: the cloud server that holds the global model.

A Flower gRPC server whose peers are the edge aggregators (or the clients themselves in flat
mode, ``topology.edges = 0``). It builds the initial model, drives ``cloud_rounds`` rounds of
``topology.cloud_strategy`` through Flower's ``Server.fit_round``, writes one JSON line per
round (and per edge round) to ``metrics.jsonl``, and leaves the final model in diffusers
format with a PNG grid of samples.

After every completed cloud round it writes ``checkpoint.pt`` (:mod:`common.checkpoint`);
``fedphd cloud --resume`` continues a crashed run from there. Edges and clients need no
restart: they reconnect by themselves and replay the interrupted round from its start.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from common import codec
from common.checkpoint import (
    CloudCheckpoint,
    restore_random_state,
    restore_strategy,
    strategy_state,
)
from common.cli import add_config_args, config_from_args
from common.config import ConfigError, RunConfig
from common.diffusion import make_noise_scheduler, sample_images, save_model
from common.evaluate import evaluate_model
from common.images import save_grid
from common.instructions import EDGE_ROUNDS_KEY, GROUP_LASSO_KEY, client_instruction
from common.limits import max_message_bytes, release_free_memory, rss_bytes
from common.models import (
    architecture_from_json,
    architecture_of,
    architecture_to_json,
    build_unet,
    count_parameters,
    load_ndarrays,
    model_to_ndarrays,
    unet_config,
)
from common.pruning import prune_unet, to_pruned_model
from common.rounds import RoundOutcome, run_fit_round
from common.runtime import progress_bar, seed_everything, setup_torch
from common.strategy import (
    ARCH_KEY,
    ManagedStrategy,
    Rebuilt,
    build_strategy,
    client_strategy_defaults,
    run_context,
)
from common.tls import describe_tls, server_certificates
from common.topology import cloud_address, is_flat
from common.transport import (
    BoundedClientManager,
    Parameters,
    Traffic,
    TrafficMeter,
    disconnect_all,
    ndarrays_to_parameters,
    new_server,
    start_flower_server,
    wait_for_clients,
)
from common.unet_groups import tensor_names

log = logging.getLogger("fedphd.cloud")

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON lines, flushed per line so a watcher (the launcher) sees progress."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far (a resumed run cuts the lines of an unfinished round)."""
        return self._file.tell()

    @staticmethod
    def truncate(path: Path, offset: int) -> None:
        """Drop what was written after ``offset``: the lines of rounds a resumed run redoes."""
        if path.exists() and path.stat().st_size > offset:
            with path.open("r+b") as handle:
                handle.truncate(offset)

    def close(self) -> None:
        self._file.close()


def round_bytes(outcome: RoundOutcome, flat: bool) -> dict[str, int]:
    """Bytes per link and direction in one cloud round, as measured by each link's server."""
    if flat:
        return {"cloud->client": outcome.traffic.down, "client->cloud": outcome.traffic.up}
    return {
        "cloud->edge": outcome.traffic.down,
        "edge->cloud": outcome.traffic.up,
        "edge->client": sum(int(m.get("bytes_down", 0)) for m in outcome.summary.metrics),
        "client->edge": sum(int(m.get("bytes_up", 0)) for m in outcome.summary.metrics),
    }


def rss_after_round() -> int:
    """Resident memory once the round's freed buffers went back to the OS."""
    release_free_memory()
    return rss_bytes()


def numbers_only(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of an answer (ids and explanations are logged elsewhere)."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
            and key != "client_id"}


def _maybe_json(value):
    """Strategy metrics are Flower scalars; structured ones arrive as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


class CloudServer:
    """Holds the global model and drives the cloud rounds."""

    def __init__(self, cfg: RunConfig, listen: str, out: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.listen = listen
        self.out = out
        self.resume = resume
        self.flat = is_flat(cfg.topology)
        self.expected_peers = cfg.topology.clients if self.flat else cfg.topology.edges
        self.meter = TrafficMeter()
        self.client_manager = BoundedClientManager(cfg.topology.connect_timeout)
        self.model: UNet2DModel | None = None
        self.strategy: ManagedStrategy | None = None
        self.server = None
        self.pruned = False
        self.completed_round = 0
        self.cumulative: dict[str, int] = {}
        # The model each connected peer holds (the base of q8/q4 downlinks), by connection.
        self.held: dict[str, Rebuilt] = {}
        # From a checkpoint: held models by the peer's declared id, until it is connected.
        self.held_by_peer: dict[int, Rebuilt] = {}
        # Peers connected when the previous round began: the ones worth waiting for.
        self.peers_last_round = self.expected_peers

    def _strategy(self, arch_json: str, initial: Parameters, group_lasso: float):
        topology = self.cfg.topology
        if self.flat:
            defaults = client_strategy_defaults(
                topology.fraction_fit, topology.min_fit_clients, initial
            )
            instruction = client_instruction(self.cfg, arch_json, group_lasso)
        else:
            # Every connected edge takes part in every cloud round (the driver waits for
            # missing ones, bounded, before each round).
            defaults = client_strategy_defaults(1.0, 1, initial)
            instruction = {
                ARCH_KEY: arch_json,
                EDGE_ROUNDS_KEY: topology.edge_rounds,
                GROUP_LASSO_KEY: group_lasso,
            }
        inner = build_strategy(
            topology.cloud_strategy, topology.cloud_strategy_args,
            defaults, "topology.cloud_strategy", run_context(self.cfg, arch_json),
        )
        if getattr(inner, "flat_only", False) and not self.flat:
            raise ConfigError(
                f"topology.cloud_strategy = {topology.cloud_strategy!r} talks to clients "
                f"directly: set topology.edges = 0 (flat mode), got {topology.edges}"
            )
        return ManagedStrategy.with_codecs(inner, instruction, self.cfg.codec,
                                           held=self.held, names=tensor_names(arch_json))

    def _install(self, model: UNet2DModel, group_lasso: float = 0.0) -> None:
        """Make ``model`` the global model: its architecture travels with every instruction.

        The strategy is rebuilt too, so a strategy with server-side state (e.g. FedAdam's
        moments) starts from the new architecture's weights.
        """
        self.model = model
        arch_json = architecture_to_json(architecture_of(model))
        parameters = ndarrays_to_parameters(model_to_ndarrays(model))
        self.strategy = self._strategy(arch_json, parameters, group_lasso)
        self.server = new_server(self.strategy, self.client_manager)
        self.server.parameters = parameters

    def _prune(self, metrics: MetricsLog, server_round: int) -> None:
        """FedPhD's structured pruning of the global model, done once at the cloud."""
        model = self.model
        if server_round > 0:  # after sparse training: prune the trained global model
            load_ndarrays(model, codec.decode(self.server.parameters))
        report = prune_unet(model, self.cfg.pruning.ratio)
        self._install(to_pruned_model(model))
        self.pruned = True
        metrics.write({"tier": "pruning", "round": server_round,
                       "ratio": self.cfg.pruning.ratio, **report.to_dict()})
        log.info("cloud: pruned at ratio %s: %d -> %d parameters, %d -> %d MACs",
                 self.cfg.pruning.ratio, report.params_before, report.params_after,
                 report.macs_before, report.macs_after)

    def run(self) -> int:
        cfg = self.cfg
        seed_everything(cfg.seed)
        device = self.device = setup_torch(cfg.training)
        pruning = cfg.pruning
        sparse = pruning.group_lasso if pruning.enabled and pruning.sparse_rounds > 0 else 0.0
        checkpoint = self._load_checkpoint() if self.resume else None
        if checkpoint is None:
            self._install(build_unet(unet_config(cfg.model), seed=cfg.seed), group_lasso=sparse)
        else:
            self._install_checkpoint(checkpoint, sparse)
        message_limit = max_message_bytes(cfg)
        grpc_server = start_flower_server(self.listen, self.client_manager, self.meter,
                                          max_message_length=message_limit,
                                          certificates=server_certificates(cfg.tls))
        peers = "clients" if self.flat else "edges"
        log.info(
            "cloud: %d-parameter U-Net, %s on %s (%s, messages up to %.1f MiB), "
            "waiting for %d %s",
            count_parameters(self.model), self.strategy.inner.__class__.__name__, self.listen,
            describe_tls(cfg.tls), message_limit / 2**20, self.expected_peers, peers,
        )
        if checkpoint is not None:
            MetricsLog.truncate(self.out / METRICS_FILE, checkpoint.metrics_offset)
        metrics = MetricsLog(self.out / METRICS_FILE)
        try:
            if pruning.enabled and pruning.sparse_rounds == 0 and not self.pruned:
                self._prune(metrics, 0)
            if not self._wait_at_start(checkpoint is not None):
                log.error(
                    "cloud: only %d of %d %s connected within topology.connect_timeout = %s s",
                    self.client_manager.num_available(), self.expected_peers, peers,
                    cfg.topology.connect_timeout,
                )
                return 1
            if checkpoint is not None:
                # Last: building models above draws from the generators too.
                restore_random_state(checkpoint.random)
            self._train(metrics)
            load_ndarrays(self.model, codec.decode(self.server.parameters))
            self._finish(self.model.to(device), self.meter)
        finally:
            metrics.close()
            disconnect_all(self.client_manager)
            grpc_server.stop(grace=2).wait(5)
        return 0

    def _load_checkpoint(self) -> CloudCheckpoint:
        checkpoint = CloudCheckpoint.load(self.out)
        checkpoint.check_config(self.cfg)
        return checkpoint

    def _install_checkpoint(self, checkpoint: CloudCheckpoint, sparse: float) -> None:
        """The global model, strategy state and counters of the last completed round."""
        model = build_unet(architecture_from_json(checkpoint.architecture))
        load_ndarrays(model, checkpoint.model)
        self.pruned = checkpoint.pruned
        self._install(model, group_lasso=0.0 if self.pruned else sparse)
        restore_strategy(self.strategy.inner, checkpoint.strategy)
        self.completed_round = checkpoint.completed_round
        self.cumulative = dict(checkpoint.cumulative_bytes)
        self.held_by_peer = {int(peer): Rebuilt(list(held["arrays"]), str(held["digest"]))
                             for peer, held in checkpoint.held.items()}
        self.meter.carry_over(Traffic(*checkpoint.link_total))
        log.info("cloud: resuming after cloud round %d of %d (checkpoint in %s)",
                 self.completed_round, self.cfg.topology.cloud_rounds, self.out)

    def _save_checkpoint(self, metrics: MetricsLog, server_round: int) -> None:
        total = self.meter.total
        CloudCheckpoint(
            completed_round=server_round,
            architecture=architecture_to_json(architecture_of(self.model)),
            model=codec.decode(self.server.parameters),
            pruned=self.pruned,
            strategy=strategy_state(self.strategy.inner),
            cumulative_bytes=self.cumulative,
            held=self._held_by_peer_now(),
            link_total=(total.down, total.up, total.messages),
            metrics_offset=metrics.offset(),
            config=self.cfg.model_dump(mode="json"),
        ).save(self.out)

    def _held_by_peer_now(self) -> dict[int, dict[str, Any]]:
        """What each peer holds, by its declared id: connections do not outlive a restart.
        Only q8/q4 downlinks are updates from it; other codecs send whole weights."""
        if not codec.is_update_codec(self.strategy.downlink):
            return {}
        connected = dict(self.client_manager.all())
        held = {}
        for cid, rebuilt in self.held.items():
            if cid in connected:
                peer = self.client_manager.identity(connected[cid])[0]
                held[peer] = {"arrays": rebuilt.arrays, "digest": rebuilt.digest}
        return held

    def _recognise_peers(self) -> None:
        """After a resume: the peers that reconnected hold what the checkpoint says (they
        rewound to the start of the round), so q8/q4 downlinks go on as updates."""
        for cid, proxy in dict(self.client_manager.all()).items():
            peer = self.client_manager.identity(proxy)[0]
            if peer in self.held_by_peer:
                self.held[cid] = self.held_by_peer.pop(peer)

    def _wait_at_start(self, resumed: bool) -> bool:
        """All expected peers within topology.connect_timeout. A resumed cloud waits longer
        and goes on with whoever came: its peers first finish the interrupted round (each
        edge round or local training bounded by topology.round_timeout), then reconnect."""
        topology = self.cfg.topology
        if not resumed:
            return wait_for_clients(self.client_manager, self.expected_peers,
                                    topology.connect_timeout)
        rounds = 1 if self.flat else topology.edge_rounds
        timeout = topology.connect_timeout + rounds * topology.round_timeout
        log.info("cloud: waiting up to %.0f s for %d %s to finish the interrupted round and "
                 "reconnect", timeout, self.expected_peers, "clients" if self.flat else "edges")
        wait_for_clients(self.client_manager, self.expected_peers, timeout)
        self.peers_last_round = self.client_manager.num_available()
        return self.peers_last_round > 0

    def _wait_for_peers(self, server_round: int) -> float:
        """Before a round: wait (up to topology.connect_timeout) for the peers that were there
        when the previous round began, e.g. an edge restarting after a crash; one missing
        then is not waited for again, it joins whichever round it reconnects before.
        Returns the seconds waited."""
        wanted = min(self.expected_peers, self.peers_last_round)
        start = time.perf_counter()
        if not wait_for_clients(self.client_manager, wanted, self.cfg.topology.connect_timeout):
            log.warning("cloud round %d: %d of %d %s connected after "
                        "topology.connect_timeout = %s s; going on with them", server_round,
                        self.client_manager.num_available(), self.expected_peers,
                        "clients" if self.flat else "edges", self.cfg.topology.connect_timeout)
        self.peers_last_round = self.client_manager.num_available()
        if self.held_by_peer:
            self._recognise_peers()
        return time.perf_counter() - start

    def _train(self, metrics: MetricsLog) -> None:
        cumulative = self.cumulative
        rounds = self.cfg.topology.cloud_rounds
        pruning = self.cfg.pruning
        # With sparse training, pruning follows the last group-lasso round.
        prune_at = pruning.sparse_rounds + 1 if pruning.enabled and pruning.sparse_rounds else 0
        bar = progress_bar(rounds, "cloud rounds", self.cfg.output.progress)
        bar.update(self.completed_round)
        for server_round in range(self.completed_round + 1, rounds + 1):
            if server_round == prune_at and not self.pruned:
                self._prune(metrics, server_round - 1)
            waited = self._wait_for_peers(server_round)
            # Flower samples peers with Python's generator: seeded per round.
            random.seed(f"{self.cfg.seed}-cloud-{server_round}")
            outcome = run_fit_round(
                self.server, self.strategy, self.meter, server_round,
                self.cfg.topology.round_timeout,
            )
            for edge_metrics in outcome.summary.metrics:
                for record in json.loads(str(edge_metrics.get("edge_log", "[]"))):
                    metrics.write(record)
            per_link = round_bytes(outcome, self.flat)
            for link, count in per_link.items():
                cumulative[link] = cumulative.get(link, 0) + count
            record = {
                "tier": "cloud",
                "round": server_round,
                "loss": outcome.summary.loss,
                "num_examples": outcome.summary.num_examples,
                "participants": outcome.summary.senders,
                "failures": outcome.summary.failures,
                "rejected": outcome.summary.rejected,
                "model_updated": outcome.updated,
                "seconds": round(outcome.seconds, 3),
                # Before the round, for peers that were there in the previous one.
                "waited_seconds": round(waited, 3),
                "bytes": per_link,
                "bytes_cumulative": dict(cumulative),
                # Properties and reconnect orders on the cloud's link, not in "bytes".
                "control_bytes": outcome.traffic.control,
                "strategy": {k: _maybe_json(v) for k, v in outcome.strategy_metrics.items()},
                "digests_checked": outcome.summary.digests_checked,
                "digest_mismatches": outcome.summary.digest_mismatches,
                # Resident memory after the round: it must not grow round after round.
                "rss_mb": round(rss_after_round() / 2**20, 1),
                "reported_by_peers": {
                    "received": outcome.summary.reported_received,
                    "payload": outcome.summary.reported_payload,
                },
            }
            metrics.write(record)
            log.info("cloud round %d: loss %s, bytes %s", server_round, record["loss"], per_link)
            if self._evaluates_after(server_round):
                self._evaluate(metrics, server_round)
            self._save_checkpoint(metrics, server_round)
            self.completed_round = server_round
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.summary.loss or float('nan'):.4f}")
        bar.close()

    def _evaluates_after(self, server_round: int) -> bool:
        evaluation = self.cfg.evaluation
        every = evaluation.every_cloud_rounds
        last = server_round == self.cfg.topology.cloud_rounds
        return (every > 0 and server_round % every == 0) or (last and evaluation.final)

    def _evaluate(self, metrics: MetricsLog, server_round: int) -> None:
        """Sample quality: of the global model at the cloud (an ``eval`` line), and of the
        clients' own models where the strategy asks them (a ``client-eval`` line)."""
        self._evaluate_at_clients(metrics, server_round)
        if self.strategy.evaluate_global_model:
            self._evaluate_global(metrics, server_round)

    def _evaluate_at_clients(self, metrics: MetricsLog, server_round: int) -> None:
        """Flower's evaluate round (a no-op for strategies with ``fraction_evaluate = 0``)."""
        self.meter.take()
        result = self.server.evaluate_round(server_round, timeout=self.cfg.topology.round_timeout)
        traffic = self.meter.take()
        per_client = self.strategy.last_evaluation
        self.strategy.last_evaluation = []
        if result is None or not per_client:
            return
        scores = [score for _, score, _ in per_client]
        record = {
            "tier": "client-eval",
            "round": server_round,
            "fd_classifier": float(sum(scores) / len(scores)),
            "per_client": {name: {"fd_classifier": score, **numbers_only(extra)}
                           for name, score, extra in per_client},
            "failures": len(result[2][1]),
            "bytes": {"evaluate-down": traffic.down, "evaluate-up": traffic.up},
        }
        metrics.write(record)
        log.info("cloud round %d: clients' own models, mean fd_classifier %.4g over %d",
                 server_round, record["fd_classifier"], len(scores))

    def _evaluate_global(self, metrics: MetricsLog, server_round: int) -> None:
        load_ndarrays(self.model, codec.decode(self.server.parameters))
        result = evaluate_model(self.model, make_noise_scheduler(self.cfg.diffusion), self.cfg,
                                self.device, show_progress=False)
        metrics.write({"tier": "eval", "round": server_round, **result})
        log.info("cloud round %d: fd_classifier %.4g%s", server_round, result["fd_classifier"],
                 f", fid {result['fid']:.4g}" if "fid" in result else "")

    def _finish(self, model, meter: TrafficMeter) -> None:
        cfg = self.cfg
        save_model(model, cfg.diffusion, self.out / "model")
        start = time.perf_counter()
        if self.strategy.evaluate_global_model:
            images = sample_images(
                model, cfg.diffusion, cfg.output.grid_samples, seed=cfg.seed,
                batch_size=cfg.evaluation.batch_size, show_progress=cfg.output.progress,
            )
            save_grid(images, self.out / "samples.png")
        else:
            log.info("cloud: %s keeps parts of the model at the clients; the saved model holds "
                     "the shared parts only, each client's own model and samples are in its "
                     "state folder", self.strategy.inner)
        summary = {
            "name": cfg.name,
            "mode": "flat" if self.flat else "hierarchical",
            "cloud_rounds": cfg.topology.cloud_rounds,
            "parameters": count_parameters(model),
            "bytes_total_cloud_link": {"down": meter.total.down, "up": meter.total.up},
            "sampling_seconds": round(time.perf_counter() - start, 2),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("cloud: model saved to %s, samples in %s", self.out / "model",
                 self.out / "samples.png")


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
