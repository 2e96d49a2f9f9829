"""An edge's clients: who is connected (their ids and label histograms), waiting for the
assigned ones, and moving clients a cloud strategy re-assigned to another edge.

Re-assignment is part of the protocol, not of one method: any cloud strategy may put
``{client_id: edge address}`` under ``fedphd.assignment`` in its instruction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from fedphd.common.settings.config import TopologyConfig
from fedphd.common.wire.keys import CLIENT_ID_PROPERTY, LABEL_HIST_PROPERTY, MOVE_KEY
from fedphd.common.wire.transport import (
    BoundedClientManager,
    ClientProxy,
    GetPropertiesIns,
    move_client,
    peer_identity,
    wait_for_clients,
)

log = logging.getLogger("fedphd.edge")

LEAVE_TIMEOUT = 30.0  # seconds a moved client has to hang up


class NoClients(RuntimeError):  # noqa: N818 - reads as the answer it becomes
    """Too few of this edge's clients are connected for an edge round. Not a fault of the
    edge: it answers the cloud at once with this one-line reason (an error-status answer the
    cloud logs and skips), rather than spend bounded waits on clients that are not there."""


def client_names(ids: Iterable[int]) -> str:
    """``client 3`` / ``clients 1, 4`` (``no client`` for none), for log lines."""
    ids = sorted(ids)
    if not ids:
        return "no client"
    return f"client{'s' if len(ids) > 1 else ''} {', '.join(str(i) for i in ids)}"


class EdgeClients:
    """The clients connected to one edge, known by their ids, and the ids it expects."""

    def __init__(self, manager: BoundedClientManager, topology: TopologyConfig,
                 expected: Iterable[int], edge_id: int) -> None:
        self.manager = manager
        self.topology = topology
        self.edge_id = edge_id
        # The start-up assignment, then whatever the cloud assigned here last.
        self.expected_ids = sorted(expected)
        self._ids: dict[str, int] = {}  # Flower connection id -> client id
        self._hists: dict[int, list[int]] = {}

    @property
    def expected(self) -> int:
        return len(self.expected_ids)

    def histograms(self) -> dict[int, list[int]]:
        """Label histogram of every connected client, by client id (after a bounded wait for
        the expected ones)."""
        if not wait_for_clients(self.manager, self.expected, self.topology.connect_timeout):
            log.warning("edge %d: %s", self.edge_id, self._shortfall())
        return {client: self._hists[client] for client in self.learn().values()}

    def learn(self) -> dict[str, int]:
        """Ask newly connected clients who they are; forget those that left."""
        connected = dict(self.manager.all())  # a copy: gRPC threads change it
        for cid in set(self._ids) - set(connected):
            del self._ids[cid]
        for cid, proxy in connected.items():
            if cid not in self._ids:
                self._identify(cid, proxy)
        return dict(self._ids)

    def _identify(self, cid: str, proxy: ClientProxy) -> None:
        """Its id (the one established when it joined, where there is one) and histogram; a
        client that cannot say is left out (and asked again next time), not fatal."""
        try:
            props = proxy.get_properties(
                GetPropertiesIns(config={}), timeout=self.topology.round_timeout, group_id=None,
            ).properties
            identity = peer_identity(proxy)
            client = identity.number if identity is not None else int(props[CLIENT_ID_PROPERTY])
            hist = json.loads(str(props[LABEL_HIST_PROPERTY]))
        except Exception as error:  # noqa: BLE001 - one peer must not stop the edge
            log.warning("edge %d: connection %s did not say which client it is (%r)",
                        self.edge_id, cid, error)
            return
        self._ids[cid] = client
        self._hists[client] = hist

    def apply_assignment(self, mapping_json: str, here: str) -> None:
        """Send away the clients assigned elsewhere; expect those assigned to ``here``."""
        mapping = {int(c): address for c, address in json.loads(mapping_json).items()}
        leaving = []
        for cid, client in self.learn().items():
            target = mapping.get(client, here)
            if target != here:
                log.info("edge %d: client %d moves to %s", self.edge_id, client, target)
                move_client(self.manager.all()[cid], target, MOVE_KEY)
                leaving.append(cid)
        self._wait_until_gone(leaving)
        self.expected_ids = sorted(c for c, address in mapping.items() if address == here)

    def _wait_until_gone(self, leaving: list[str]) -> None:
        deadline = time.monotonic() + LEAVE_TIMEOUT
        while any(cid in self.manager.all() for cid in leaving):
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients {leaving} did not leave within {LEAVE_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def wait(self) -> None:
        """All expected clients, or at least ``min_fit_clients`` once the wait has timed out.

        An edge expecting none (the assignment gave it none) does not wait at all; one that
        has too few clients raises :class:`NoClients` naming those that did not come."""
        topology = self.topology
        if wait_for_clients(self.manager, self.expected, topology.connect_timeout):
            if self.manager.num_available() == 0:
                raise NoClients(f"edge {self.edge_id} has no clients this round: none is "
                                "assigned to it")
            return
        connected = len(self.learn())
        if connected == 0:
            raise NoClients(f"edge {self.edge_id} has no clients this round: "
                            f"{self._shortfall()}")
        if connected < min(self.expected, topology.min_fit_clients):
            raise NoClients(f"edge {self.edge_id} has too few clients this round ({connected}, "
                            f"topology.min_fit_clients = {topology.min_fit_clients}): "
                            f"{self._shortfall()}")
        log.warning("edge %d: going on with %d of %d clients; %s", self.edge_id, connected,
                    self.expected, self._shortfall())

    def enough(self) -> bool:
        """Whether an edge round can run now without waiting for clients (Flower's sampling
        would wait for ``min_fit_clients``)."""
        return self.manager.num_available() >= self.topology.min_fit_clients

    def _shortfall(self) -> str:
        """Which expected clients are missing, in words."""
        missing = set(self.expected_ids) - set(self.learn().values())
        return (f"{client_names(missing)} (of {client_names(self.expected_ids)}) did not "
                f"connect within topology.connect_timeout = {self.topology.connect_timeout} s")
