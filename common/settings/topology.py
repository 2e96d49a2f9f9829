"""Who connects where: the static part of a deployment, derived from the config alone so that
every process (on any machine) agrees on it without talking first."""

from __future__ import annotations

from fedphd.common.settings.config import TopologyConfig


def is_flat(cfg: TopologyConfig) -> bool:
    """Flat mode: clients talk to the cloud directly (FedAvg, FedProx, FedDM, FedDiffuse)."""
    return cfg.edges == 0


def edge_of_client(client_id: int, cfg: TopologyConfig) -> int:
    """Initial assignment: clients are dealt round-robin to the edges."""
    if is_flat(cfg):
        raise ValueError("topology.edges = 0: clients have no edge in flat mode")
    return client_id % cfg.edges


def clients_of_edge(edge_id: int, cfg: TopologyConfig) -> list[int]:
    return [c for c in range(cfg.clients) if edge_of_client(c, cfg) == edge_id]


def cloud_address(cfg: TopologyConfig) -> str:
    return f"{cfg.host}:{cfg.cloud_port}"


def edge_address(edge_id: int, cfg: TopologyConfig) -> str:
    return f"{cfg.host}:{cfg.edge_base_port + edge_id}"


def server_address_of_client(client_id: int, cfg: TopologyConfig) -> str:
    """Where a client connects at start: its edge, or the cloud in flat mode."""
    if is_flat(cfg):
        return cloud_address(cfg)
    return edge_address(edge_of_client(client_id, cfg), cfg)
