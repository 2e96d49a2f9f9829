"""The cloud's bounded waits for its peers (edges, or clients in flat mode), and what each
peer holds across a restart of the cloud."""

from __future__ import annotations

import logging
import time
from typing import Any

from fedphd.common.federation.held import Rebuilt
from fedphd.common.federation.strategy import ManagedStrategy
from fedphd.common.settings.config import TopologyConfig
from fedphd.common.wire import codec
from fedphd.common.wire.transport import BoundedClientManager, wait_for_clients

log = logging.getLogger("fedphd.cloud")  # the cloud's log, as before the driver was split


class Peers:
    """Who the cloud waits for before a round, and how long."""

    def __init__(
        self, topology: TopologyConfig, flat: bool, client_manager: BoundedClientManager
    ) -> None:
        self.topology = topology
        self.flat = flat
        self.client_manager = client_manager
        self.expected = topology.clients if flat else topology.edges
        self.kind = "clients" if flat else "edges"
        # Peers connected when the previous round began: the ones worth waiting for.
        self.last_round = self.expected
        # From a checkpoint: held models by the peer's declared id, until it is connected.
        self.held_by_peer: dict[int, Rebuilt] = {}

    def wait_at_start(self, resumed: bool) -> bool:
        """Whether enough peers came to begin (all of them; a resumed cloud: any)."""
        if self._wait_at_start(resumed):
            return True
        log.error(
            "cloud: only %d of %d %s connected within topology.connect_timeout = %s s; "
            "missing: %s (see their logs: one that failed at start says why)",
            self.client_manager.num_available(), self.expected, self.kind,
            self.topology.connect_timeout, self.missing(),
        )
        return False

    def missing(self) -> str:
        """The expected peers (clients or edges 0..N-1) not connected now, by their ids: a
        client that stopped at start (e.g. its data could not be read) is named, not just
        counted. Connected peers are known by the id the client manager established."""
        connected = {self.client_manager.identity(proxy)[0]
                     for proxy in self.client_manager.all().values()}
        kind = self.kind.rstrip("s")
        absent = [f"{kind} {peer}" for peer in range(self.expected) if peer not in connected]
        return ", ".join(absent) or "none"

    def _wait_at_start(self, resumed: bool) -> bool:
        """All expected peers within topology.connect_timeout. A resumed cloud waits longer
        and goes on with whoever came: its peers first finish the interrupted round (each
        edge round or local training bounded by topology.round_timeout), then reconnect."""
        topology = self.topology
        if not resumed:
            return wait_for_clients(self.client_manager, self.expected, topology.connect_timeout)
        rounds = 1 if self.flat else topology.edge_rounds
        timeout = topology.connect_timeout + rounds * topology.round_timeout
        log.info("cloud: waiting up to %.0f s for %d %s to finish the interrupted round and "
                 "reconnect", timeout, self.expected, self.kind)
        wait_for_clients(self.client_manager, self.expected, timeout)
        self.last_round = self.client_manager.num_available()
        return self.last_round > 0

    def before_round(self, server_round: int, strategy: ManagedStrategy) -> float:
        """Before a round: wait (up to topology.connect_timeout) for the peers that were there
        when the previous round began, e.g. an edge restarting after a crash; one missing
        then is not waited for again, it joins whichever round it reconnects before.
        Returns the seconds waited."""
        wanted = min(self.expected, self.last_round)
        start = time.perf_counter()
        if not wait_for_clients(self.client_manager, wanted, self.topology.connect_timeout):
            log.warning("cloud round %d: %d of %d %s connected after "
                        "topology.connect_timeout = %s s (missing: %s); going on with them",
                        server_round, self.client_manager.num_available(), self.expected,
                        self.kind, self.topology.connect_timeout, self.missing())
        self.last_round = self.client_manager.num_available()
        if self.held_by_peer:
            self._recognise(strategy)
        return time.perf_counter() - start

    def expect_held(self, saved: dict[int, dict[str, Any]]) -> None:
        """From a checkpoint: what each peer, by its declared id, holds once it reconnects."""
        self.held_by_peer = {int(peer): Rebuilt(list(held["arrays"]), str(held["digest"]))
                             for peer, held in saved.items()}

    def _recognise(self, strategy: ManagedStrategy) -> None:
        """After a resume: the peers that reconnected hold what the checkpoint says (they
        rewound to the start of the round), so q8/q4 downlinks go on as updates."""
        for cid, proxy in dict(self.client_manager.all()).items():
            peer = self.client_manager.identity(proxy)[0]
            if peer in self.held_by_peer:
                strategy.hold(cid, self.held_by_peer.pop(peer))

    def held_now(self, strategy: ManagedStrategy) -> dict[int, dict[str, Any]]:
        """What each peer holds, by its declared id: connections do not outlive a restart.
        Only q8/q4 downlinks are updates from it; other codecs send whole weights."""
        if not codec.is_update_codec(strategy.downlink):
            return {}
        connected = dict(self.client_manager.all())
        held = {}
        for cid, rebuilt in strategy.held_models().items():
            if cid in connected:
                peer = self.client_manager.identity(connected[cid])[0]
                held[peer] = {"arrays": rebuilt.arrays, "digest": rebuilt.digest}
        return held
