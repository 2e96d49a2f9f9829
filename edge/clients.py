"""An edge's clients: who is connected (their declared ids and label histograms), waiting for
the assigned ones, and moving clients a cloud strategy re-assigned to another edge.

Re-assignment is part of the protocol, not of one method: any cloud strategy may put
``{client_id: edge address}`` under ``fedphd.assignment`` in its instruction.
"""

from __future__ import annotations

import json
import logging
import time

from fedphd.common.settings.config import TopologyConfig
from fedphd.common.wire.keys import CLIENT_ID_PROPERTY, LABEL_HIST_PROPERTY, MOVE_KEY
from fedphd.common.wire.transport import (
    BoundedClientManager,
    GetPropertiesIns,
    move_client,
    wait_for_clients,
)

log = logging.getLogger("fedphd.edge")

LEAVE_TIMEOUT = 30.0  # seconds a moved client has to hang up


class EdgeClients:
    """The clients connected to one edge, known by their declared ids."""

    def __init__(self, manager: BoundedClientManager, topology: TopologyConfig,
                 expected: int) -> None:
        self.manager = manager
        self.topology = topology
        self.expected = expected
        self._ids: dict[str, int] = {}  # Flower connection id -> client id
        self._hists: dict[int, list[int]] = {}

    def histograms(self) -> dict[int, list[int]]:
        """Label histogram of every connected client, by client id (after a bounded wait for
        the expected ones)."""
        wait_for_clients(self.manager, self.expected, self.topology.connect_timeout)
        return {client: self._hists[client] for client in self.learn().values()}

    def learn(self) -> dict[str, int]:
        """Ask newly connected clients who they are; forget those that left."""
        connected = dict(self.manager.all())  # a copy: gRPC threads change it
        for cid in set(self._ids) - set(connected):
            del self._ids[cid]
        for cid, proxy in connected.items():
            if cid in self._ids:
                continue
            props = proxy.get_properties(
                GetPropertiesIns(config={}), timeout=self.topology.round_timeout, group_id=None,
            ).properties
            client = int(props[CLIENT_ID_PROPERTY])
            self._ids[cid] = client
            self._hists[client] = json.loads(str(props[LABEL_HIST_PROPERTY]))
        return dict(self._ids)

    def apply_assignment(self, mapping_json: str, here: str, edge_id: int) -> None:
        """Send away the clients assigned elsewhere; expect those assigned to ``here``."""
        mapping = {int(c): address for c, address in json.loads(mapping_json).items()}
        leaving = []
        for cid, client in self.learn().items():
            target = mapping.get(client, here)
            if target != here:
                log.info("edge %d: client %d moves to %s", edge_id, client, target)
                move_client(self.manager.all()[cid], target, MOVE_KEY)
                leaving.append(cid)
        self._wait_until_gone(leaving)
        self.expected = sum(1 for address in mapping.values() if address == here)

    def _wait_until_gone(self, leaving: list[str]) -> None:
        deadline = time.monotonic() + LEAVE_TIMEOUT
        while any(cid in self.manager.all() for cid in leaving):
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients {leaving} did not leave within {LEAVE_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def wait(self, edge_id: int) -> None:
        """All assigned clients, or at least ``min_fit_clients`` once the wait has timed out."""
        topology = self.topology
        if wait_for_clients(self.manager, self.expected, topology.connect_timeout):
            return
        connected = self.manager.num_available()
        if connected < min(self.expected, topology.min_fit_clients):
            raise RuntimeError(
                f"only {connected} of {self.expected} clients connected within "
                f"topology.connect_timeout = {topology.connect_timeout} s"
            )
        log.warning("edge %d: going on with %d of %d clients", edge_id, connected,
                    self.expected)
