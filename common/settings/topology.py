"""Who connects where: the static part of a deployment, derived from the config alone so that
every process (on any machine) agrees on it without talking first."""

from __future__ import annotations

import ipaddress
import re

from fedphd.common.settings.config import ConfigError, TopologyConfig


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


# ----------------------------------------------------------------------------- addresses

MAX_PORT = 65535
ADDRESS_FORMS = "HOST:PORT or [IPV6]:PORT"
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")


def parse_address(value: str, flag: str) -> str:
    """``value`` as a gRPC target ``host:port``, or a ``ConfigError`` naming ``flag``.

    Checked before a role loads anything: Flower's own complaint about a bad target comes
    only once the data and model are loaded, spans several lines and never names the flag.
    """
    address = value.strip()
    problem = _address_problem(address)
    if problem is not None:
        raise ConfigError(f"{flag} {value!r}: {problem}")
    return address


def parse_addresses(value: str, flag: str) -> list[str]:
    """A comma-separated list of addresses, in order. A list that names none is refused:
    falling back to the config's default silently would dial a server nobody asked for."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"{flag} {value!r} names no address; give HOST:PORT[,HOST:PORT...]")
    for part in parts:
        problem = _address_problem(part)
        if problem is not None:
            whose = "" if part == value.strip() else f"{part!r} "
            raise ConfigError(f"{flag} {value!r}: {whose}{problem}")
    return parts


def _address_problem(address: str) -> str | None:
    """What is wrong with one ``host:port`` (None: nothing)."""
    if not address:
        return f"names no address; give {ADDRESS_FORMS}"
    if "://" in address:
        scheme = address.split("://", 1)[0]
        return f"a URL scheme ({scheme}://) is not an address; give {ADDRESS_FORMS}"
    if address.startswith("["):
        return _bracketed_problem(address)
    host, colon, port = address.rpartition(":")
    if not colon:
        return f"has no port; give {ADDRESS_FORMS}, e.g. 127.0.0.1:8080"
    if ":" in host:
        return "an IPv6 address needs brackets: [ADDRESS]:PORT, e.g. [::1]:8080"
    return _host_problem(host) or _port_problem(port)


def _bracketed_problem(address: str) -> str | None:
    host, bracket, rest = address[1:].partition("]")
    if not bracket or "[" in host:
        return "has an unbalanced '['; an IPv6 address is written [ADDRESS]:PORT"
    if not rest.startswith(":"):
        return f"has no port after ']'; give [ADDRESS]:PORT, e.g. [{host or '::1'}]:8080"
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"{host!r} in brackets is not an IPv6 address"
    return _port_problem(rest[1:])


def _host_problem(host: str) -> str | None:
    if not host:
        return "has no host before ':PORT'"
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is not an IPv4 address"
        return None
    if not all(_HOST_LABEL.match(label) for label in labels):
        return f"host {host!r} is not a host name or IP address"
    return None


def _port_problem(port: str) -> str | None:
    if not (port.isascii() and port.isdigit()):
        return f"port {port!r} is not a number"
    if not 1 <= int(port) <= MAX_PORT:
        return f"port {int(port)} is outside 1..{MAX_PORT}"
    return None
