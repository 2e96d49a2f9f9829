"""Never an empty edge, for real: FedPhD on more edges than its draw fills.

Three edges and four clients of the digits' class pairs, with the digits config's selection
(seed 0, A = 720): the draw alone (``min_clients_per_edge = 0``) leaves an edge without
clients, which the setup shows with the same histograms, edge addresses and seeds the cloud
uses. With the default minimum every edge trains in every cloud round; with the old rule the
emptied edge answers "no clients" at once and the cloud aggregates the others. Neither run
spends a bounded wait on an empty edge or logs a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from bench.harness import free_port_block
from fedphd.client.client import local_data
from fedphd.common.settings.config import load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ASSIGNMENT_KEY, EDGE_ID_METRIC, EDGE_ROUNDS_KEY, ROUND_KEY
from fedphd.common.wire.transport import (
    BoundedClientManager,
    Code,
    FitIns,
    GetPropertiesRes,
    ok_status,
)
from fedphd.edge.clients import EdgeClients, NoClients
from fedphd.edge.edge import EdgeAggregator
from fedphd.server.fedphd import select_edges
from tests.conftest import TESTS_DIR
from tests.test_deployment import launch
from tests.test_strategy import FakeProxy

CONFIG = TESTS_DIR.parent / "configs" / "fedphd-digits.toml"
EDGES, CLIENTS, CLOUD_ROUNDS = 3, 4, 2
SMALL = [f"topology.edges={EDGES}", f"topology.clients={CLIENTS}",
         f"topology.cloud_rounds={CLOUD_ROUNDS}", "topology.edge_rounds=2",
         "training.local_steps=1", "pruning.enabled=false"]
# What a bounded wait for clients, or a failure, leaves in a log.
WAITED = re.compile(r"going on with|did not connect|sampling failed|waiting|timed? ?out",
                    re.IGNORECASE)


def overrides(*extra: str) -> list[str]:
    return ["--config", str(CONFIG)] + [a for o in (*SMALL, *extra) for a in ("--set", o)]


def edge_addresses(ports) -> list[str]:
    """The addresses the edges advertise, as the cloud's FedPhD sorts them."""
    return sorted(f"127.0.0.1:{ports['edges'] + e}" for e in range(EDGES))


def old_draws(ports) -> dict[int, dict[int, str]]:
    """Per cloud round, the assignment FedPhD's draw alone makes (no minimum): the same
    histograms (each client's partition), edges and seeds ``[selection_seed, round]``."""
    cfg = load_config(CONFIG, overrides=SMALL)
    hists = {c: local_data(cfg, c).label_hist for c in range(CLIENTS)}
    args = cfg.topology.cloud_strategy_args
    return {r: select_edges(hists, edge_addresses(ports), args["selection"],
                            args["selection_scale"], np.random.default_rng([0, r]),
                            min_per_edge=0)
            for r in range(1, CLOUD_ROUNDS + 1)}


def emptied(assignment: dict[int, str], ports) -> list[int]:
    """Edge ids without a client in ``assignment``."""
    by_address = {f"127.0.0.1:{ports['edges'] + e}": e for e in range(EDGES)}
    used = {by_address[address] for address in assignment.values()}
    return [e for e in range(EDGES) if e not in used]


def logs(out: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((out / "logs").glob("*.log"))}


def assert_no_traceback(texts: dict[str, str]) -> None:
    for name, text in texts.items():
        assert "Traceback" not in text, f"{name}.log:\n{text[-3000:]}"


@pytest.mark.slow
def test_the_minimum_keeps_every_edge_training(tmp_path, ports):
    draws = old_draws(ports)
    assert any(emptied(a, ports) for a in draws.values())  # the old rule empties an edge
    out = tmp_path / "filled"
    records = launch(out, ports, *overrides())
    texts = logs(out)
    assert_no_traceback(texts)
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == list(range(1, CLOUD_ROUNDS + 1))
    for r in cloud:
        assignment = {int(c): a for c, a in r["strategy"]["assignment"].items()}
        assert emptied(assignment, ports) == []  # every edge kept a client
        assert r["model_updated"] and r["failures"] == 0
        assert sorted(r["participants"]) == [f"edge {e}" for e in range(EDGES)]
    edges = [r for r in records if r["tier"] == "edge"]
    for e in range(EDGES):  # every edge trained in every edge round of every cloud round
        assert [r["round"] for r in edges if r["edge"] == e] == [1, 2, 3, 4]
        assert not WAITED.search(texts[f"edge-{e}"]), texts[f"edge-{e}"][-3000:]
        assert "no clients" not in texts[f"edge-{e}"]


@pytest.mark.slow
def test_an_emptied_edge_answers_no_clients_at_once(tmp_path, ports):
    draws = old_draws(ports)
    out = tmp_path / "emptied"
    records = launch(out, ports, *overrides("topology.min_clients_per_edge=0"))
    texts = logs(out)
    assert_no_traceback(texts)
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == list(range(1, CLOUD_ROUNDS + 1))
    empty_rounds = 0
    for r in cloud:
        assignment = {int(c): a for c, a in r["strategy"]["assignment"].items()}
        assert assignment == draws[r["round"]]  # the draw the setup predicted
        empty = emptied(assignment, ports)
        empty_rounds += bool(empty)
        # The cloud aggregated the edges that had clients; the empty ones are its failures.
        assert r["model_updated"] and r["failures"] == len(empty)
        assert sorted(r["participants"]) == [f"edge {e}" for e in range(EDGES)
                                             if e not in empty]
        for e in empty:
            message = f"edge {e} has no clients this round: none is assigned to it"
            assert f"edge {e} answered with an error: {message}" in texts["cloud"]
            assert message in texts[f"edge-{e}"]
            assert not [x for x in records if x["tier"] == "edge" and x["edge"] == e
                        and x["cloud_round"] == r["round"]]  # no edge round ran there
    assert empty_rounds > 0
    for e in range(EDGES):  # no bounded wait on any edge, the empty one included
        assert not WAITED.search(texts[f"edge-{e}"]), texts[f"edge-{e}"][-3000:]


# --- the edge's wait for its clients, without processes ----------------------------------

class ConnectedClient(FakeProxy):
    """A connected client that says who it is and what it holds."""

    def __init__(self, client_id: int) -> None:
        super().__init__(f"conn-{client_id}")
        self.client_id = client_id

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(ok_status(), {"client_id": self.client_id,
                                              "label_hist": json.dumps([1, 2])})


def edge_clients(expected: list[int], connected: list[int]) -> EdgeClients:
    topology = load_config(overrides=["topology.connect_timeout=1"]).topology
    manager = BoundedClientManager(topology.connect_timeout)
    for client in connected:
        manager.register(ConnectedClient(client))
    return EdgeClients(manager, topology, expected, edge_id=2)


def test_an_edge_assigned_no_client_says_so():
    clients = edge_clients([1, 3], [])
    clients.apply_assignment(json.dumps({"1": "elsewhere:1", "3": "elsewhere:1"}), "here:2")
    assert clients.expected_ids == []
    with pytest.raises(NoClients, match="^edge 2 has no clients this round: none is assigned "
                                        "to it$"):
        clients.wait()


def test_an_edge_whose_clients_stay_away_names_them():
    with pytest.raises(NoClients) as raised:
        edge_clients([1, 3], []).wait()
    assert str(raised.value) == ("edge 2 has no clients this round: clients 1, 3 (of clients "
                                 "1, 3) did not connect within topology.connect_timeout = "
                                 "1.0 s")


def test_a_short_wait_names_the_missing_clients(caplog):
    clients = edge_clients([1, 3], [1])
    with caplog.at_level(logging.WARNING, logger="fedphd.edge"):
        clients.wait()  # goes on with client 1 (topology.min_fit_clients = 1)
    assert [r.getMessage() for r in caplog.records] == [
        "edge 2: going on with 1 of 2 clients; client 3 (of clients 1, 3) did not connect "
        "within topology.connect_timeout = 1.0 s"]
    assert clients.histograms() == {1: [1, 2]}  # a histogram for each connected client


# --- the edge aggregator's answers, with its gRPC server but no client --------------------

@pytest.fixture
def lonely_edge():
    """Edge 0 of 2 (expecting clients 0 and 2), serving on a free port, no client there."""
    cfg = load_config(overrides=["tls.insecure=true", "topology.connect_timeout=1"])
    edge = EdgeAggregator(cfg, 0, f"127.0.0.1:{free_port_block(1)}")
    yield edge
    edge.shutdown()


def test_an_edge_assigned_no_client_answers_the_cloud_at_once(lonely_edge, caplog):
    away = json.dumps({"0": "127.0.0.1:1", "2": "127.0.0.1:1"})
    with caplog.at_level(logging.INFO, logger="fedphd"):
        res = lonely_edge.fit(FitIns(codec.encode([], "fp32"),
                                     {ROUND_KEY: 1, ASSIGNMENT_KEY: away}))
    assert res.status.code != Code.OK and res.num_examples == 0
    assert res.status.message == "edge 0 has no clients this round: none is assigned to it"
    assert res.metrics[EDGE_ID_METRIC] == 0  # the cloud names the edge
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the edge's log
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        res.status.message]


class HeldNothing:
    """The part of a strategy an edge asks after its rounds: what its clients hold."""

    def held_models(self) -> dict:
        return {}


def test_an_edge_whose_clients_left_skips_its_rounds_without_waiting(lonely_edge, caplog):
    with caplog.at_level(logging.WARNING, logger="fedphd.edge"):
        rounds = lonely_edge._run_edge_rounds(HeldNothing(), codec.encode([], "fp32"),
                                              {EDGE_ROUNDS_KEY: 3}, cloud_round=1)
    # Not one edge round was tried: each would have waited for clients in Flower's sampling.
    assert rounds.records == [] and rounds.last is None
    assert [r.getMessage() for r in caplog.records] == [
        "edge 0: 0 clients connected (topology.min_fit_clients = 1), clients 0, 2 left: the "
        "last 3 edge round(s) of this cloud round are skipped"]
