"""Scale: one edge serving 50 to 1,000 clients (tiny U-Net) — round time and edge memory.

The cloud and the edge are the real ``fedphd cloud`` / ``fedphd edge`` processes; the clients
are the product's ``DiffusionClient`` objects, ``--clients-per-process`` of them per
``bench.client_host`` process (one thread and one gRPC connection each, lean: a model only
while answering, see that module), because one process per client (~300 MB each before any
model) does not fit a small machine at these counts. The edge is a separate process whatever
the hosting of clients, so its memory is what a real edge would use for the same number of
connections and answers.

The edge's FedAvg folds each answer into a running sum as it arrives
(:mod:`fedphd.common.federation.running_mean`); ``--list-path`` runs the edge with
``ListFedAvg`` instead, which holds every answer until the round ends (the path of every
strategy that is not a weighted mean), for comparison.

Figures per client count: the cloud round time (median of rounds 2.., round 1 includes
waiting for every client to connect), the edge round within it, the edge process's peak
resident memory (``VmHWM`` from /proc, polled while it runs) and its resident memory after
the rounds, and the client hosts' summed peak.

    python -m bench.scale                         # 50, 200, 500, 1000 clients, 250 per process
    python -m bench.scale --quick                 # 6 clients, 3 per process (< 2 min)
    python -m bench.scale --clients 200 --list-path   # the edge holding every answer
    python -m bench.scale --clients 50 --clients-per-process 1 --keep-models  # as shipped
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    DEFAULT_CONFIG,
    REPO,
    BenchError,
    child_env,
    command_line,
    derive_config,
    logs_tail,
    loopback_overrides,
    machine_info,
    machine_line,
    median,
    mib,
    process_memory,
    progress,
    tier,
    write_config,
)
from fedphd.common.commands.launcher import Deployment, Role
from fedphd.common.quality.report import read_metrics
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.topology import cloud_address, edge_address

POLL_SECONDS = 0.5
# Budget when deciding whether a client count fits in memory, from this benchmark's own
# measurements on the tiny preset: an interpreter with torch, diffusers and Flower imported
# holds ~900 MiB; a client hosted as shipped ~43 MiB at its peak (U-Net, gradients, Adam
# state, the model it received, message copies and activations while it trains), a lean one
# ~0.7 MiB (its data, random streams and connection: 1,212 MiB for 50, 1,317 MiB for 200);
# the edge ~17 MiB per client on the list path (every answer of a round at once) and ~0.2
# MiB per connection with the running sum, the tensor link and connections that let go of
# their last messages (1,241 MiB at 50 clients, 1,271 MiB at 200; 2026-12-01). Rounded up.
PROCESS_MIB = 950
CLIENT_MIB = 45
LEAN_CLIENT_MIB = 2
EDGE_PER_CLIENT_MIB = 17
EDGE_PER_CONNECTION_MIB = 1
LIST_FEDAVG = "fedphd.common.federation.running_mean.ListFedAvg"
# Room left for everything else on the (shared) machine while a size runs.
MARGIN_MIB = 2048
# Stop a run before the machine runs out of memory (it is shared).
MIN_AVAILABLE_MIB = 1500
# Many client threads in one process: fewer malloc arenas keep freed activation memory
# reusable across threads instead of stranded in per-thread arenas, and buffers of 1 MiB and
# more (model copies, messages) go back to the system when freed instead of fragmenting the
# heap. This changes the client hosts' memory only; the cloud and the edge run as shipped.
HOST_ENV = ["env", "MALLOC_ARENA_MAX=2", "MALLOC_MMAP_THRESHOLD_=1048576"]


def scale_overrides(clients: int, rounds: int, local_steps: int) -> list[str]:
    return [
        "topology.edges=1", f"topology.clients={clients}", f"topology.cloud_rounds={rounds}",
        "topology.edge_rounds=1", "topology.fraction_fit=1.0", "topology.min_fit_clients=1",
        "topology.connect_timeout=900", "topology.round_timeout=900",
        "partition.method=iid", f"training.local_steps={local_steps}", "training.threads=1",
        "evaluation.final=false", "evaluation.every_cloud_rounds=0",
        "output.grid_samples=1", "diffusion.sampling_steps=1", "output.progress=false",
    ]


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf


def memory_needed_mib(clients: int, per_process: int, list_path: bool = True,
                      keep_models: bool = True) -> float:
    hosts = math.ceil(clients / per_process)
    edge = EDGE_PER_CLIENT_MIB if list_path else EDGE_PER_CONNECTION_MIB
    client = CLIENT_MIB if keep_models else LEAN_CLIENT_MIB
    return 2 * PROCESS_MIB + clients * edge + hosts * PROCESS_MIB + clients * client


def plan(cfg: RunConfig, config: Path, run_dir: Path, per_process: int,
         keep_models: bool = False) -> list[Role]:
    """Cloud, edge, then the client hosts (their ids in blocks of ``per_process``)."""
    topology = cfg.topology
    base = [sys.executable, "-m"]
    edge_program = "fedphd.common.commands.cli"
    roles = [
        Role("cloud", [*base, "fedphd.common.commands.cli", "cloud", "--config", str(config),
                       "--listen", cloud_address(topology), "--out", str(run_dir)]),
        Role("edge-0", [*base, edge_program, "edge", "--config", str(config),
                        "--edge-id", "0",
                        "--cloud", cloud_address(topology),
                        "--listen", edge_address(0, topology)]),
    ]
    for first in range(0, topology.clients, per_process):
        count = min(per_process, topology.clients - first)
        roles.append(Role(f"clients-{first}-{first + count - 1}", [
            *HOST_ENV, *base, "bench.client_host", "--config", str(config),
            "--server", edge_address(0, topology), "--first", str(first), "--count", str(count),
            *(["--keep-models"] if keep_models else []),
        ]))
    return roles


class MemoryWatch:
    """Peak and latest resident memory of the edge and the summed client hosts."""

    def __init__(self) -> None:
        self.edge_peak = 0
        self.edge_latest = 0
        self.hosts_peak = 0

    def sample(self, edge: Role, hosts: list[Role]) -> None:
        memory = process_memory(edge.process.pid) if edge.returncode is None else {}
        if memory:
            self.edge_peak = max(self.edge_peak, memory.get("VmHWM", 0))
            self.edge_latest = memory.get("VmRSS", self.edge_latest)
        total = sum(process_memory(h.process.pid).get("VmRSS", 0) for h in hosts
                    if h.returncode is None)
        self.hosts_peak = max(self.hosts_peak, total)


def run_deployment(roles: list[Role], run_dir: Path, rounds: int, timeout: float,
                   label: str) -> MemoryWatch:
    """Start every role, watch memory until the cloud is done, stop whatever is left."""
    deployment = Deployment(roles)
    cloud, edge, hosts = roles[0], roles[1], roles[2:]
    watch = MemoryWatch()
    deployment.start(run_dir / "logs", child_env())
    start, reported = time.monotonic(), 0
    try:
        while cloud.returncode is None:
            failed = [r for r in roles[1:] if r.returncode not in (None, 0)]
            if failed:
                raise BenchError(f"{label}: {failed[0].name} exited with "
                                 f"{failed[0].returncode}\n{logs_tail(run_dir)}")
            if time.monotonic() - start > timeout:
                raise BenchError(f"{label}: no result within {timeout:.0f} s\n"
                                 f"{logs_tail(run_dir)}")
            watch.sample(edge, hosts)
            if available_mib() < MIN_AVAILABLE_MIB:
                raise BenchError(f"{label}: stopped, less than {MIN_AVAILABLE_MIB} MiB of "
                                 "memory left on the machine")
            reported = _report_rounds(run_dir, reported, label)
            time.sleep(POLL_SECONDS)
        if cloud.returncode != 0:
            raise BenchError(f"{label}: the cloud exited with {cloud.returncode}\n"
                             f"{logs_tail(run_dir)}")
        deployment.wait_all(timeout=120)
        _report_rounds(run_dir, reported, label)
        return watch
    finally:
        deployment.stop()


def _report_rounds(run_dir: Path, reported: int, label: str) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return reported
    cloud = [json.loads(line) for line in path.read_text().splitlines()
             if '"tier": "cloud"' in line]
    for record in cloud[reported:]:
        progress(f"{label}: cloud round {record['round']} done in {record['seconds']:.1f} s")
    return len(cloud)


def measure(clients: int, per_process: int, rounds: int, local_steps: int, out: Path,
            timeout: float, extra: list[str], list_path: bool = False,
            keep_models: bool = False) -> dict[str, Any]:
    label = f"{clients} clients" + (" (list path)" if list_path else "")
    hosts = math.ceil(clients / per_process)
    needed = memory_needed_mib(clients, per_process, list_path, keep_models)
    available = available_mib()
    if needed + MARGIN_MIB > available:
        progress(f"{label}: skipped, needs ~{needed:,.0f} MiB, {available:,.0f} MiB available")
        return {"clients": clients, "processes": hosts, "skipped":
                f"needs ~{needed:,.0f} MiB of memory, {available:,.0f} MiB available"}
    strategy = [f"topology.edge_strategy={LIST_FEDAVG}"] if list_path else []
    cfg = derive_config(DEFAULT_CONFIG, [*scale_overrides(clients, rounds, local_steps),
                                         *loopback_overrides(), *strategy, *extra])
    run_dir = out / f"clients-{clients}{'-list' if list_path else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    config = write_config(cfg, run_dir / "config.toml")
    progress(f"{label}: cloud, edge and {hosts} client processes ({per_process} per process)")
    start = time.monotonic()
    watch = run_deployment(plan(cfg, config, run_dir, per_process, keep_models), run_dir,
                           rounds, timeout, label)
    records = read_metrics(run_dir / "metrics.jsonl")
    cloud = tier(records, "cloud")
    steady = [r for r in cloud if r["round"] >= 2] or cloud
    edge = [r for r in tier(records, "edge") if r["cloud_round"] >= 2] or tier(records, "edge")
    return {
        "clients": clients, "processes": hosts, "local_steps": local_steps,
        "aggregation": edge[-1].get("aggregation", "list") if edge else "",
        "participants": len(steady[-1]["participants"]) if steady else 0,
        "edge_clients_answered": len(edge[-1]["clients"]) if edge else 0,
        "round_seconds": [r["seconds"] for r in cloud],
        "round_median_s": median(r["seconds"] for r in steady),
        "edge_round_median_s": median(r["seconds"] for r in edge),
        "first_round_s": cloud[0]["seconds"],
        "edge_peak_rss": watch.edge_peak, "edge_rss_after": watch.edge_latest,
        "client_hosts_peak_rss": watch.hosts_peak,
        "bytes_edge_client_per_round": steady[-1]["bytes"]["edge->client"]
        + steady[-1]["bytes"]["client->edge"],
        "wall_seconds": round(time.monotonic() - start, 1),
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["sizes"]:
        if "skipped" in r:
            rows.append(f"| {r['clients']} | {r['processes']} | skipped: {r['skipped']} "
                        "| | | | | | |")
            continue
        rows.append(
            f"| {r['clients']} | {r['processes']} | {r['edge_clients_answered']} "
            f"| {r['round_median_s']:.2f} s | {r['edge_round_median_s']:.2f} s "
            f"| {r['first_round_s']:.1f} s | {mib(r['edge_peak_rss'])} "
            f"| {mib(r['edge_rss_after'])} | {mib(r['client_hosts_peak_rss'])} "
            f"| {r['bytes_edge_client_per_round'] / 1e6:,.0f} MB | {r['aggregation']} |"
        )
    return "\n".join([
        f"# Scale: one edge, tiny U-Net, {result['local_steps']} local step(s) per round, "
        f"fp32, {result['rounds']} cloud rounds",
        "",
        machine_line(result["machine"]),
        f"command: {result['command']}",
        "",
        "| clients | client processes | answers per edge round | cloud round (median, "
        "rounds 2..) | of which edge round | round 1 (incl. connecting) | edge peak RSS "
        "| edge RSS after rounds | client processes' peak RSS (sum) | edge↔client bytes "
        "per round | edge aggregation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description="One edge with many clients: round time, "
                                     "edge memory.")
    parser.add_argument("--quick", action="store_true", help="6 clients, 3 per process")
    parser.add_argument("--clients",
                        help="comma-separated client counts (default 50,200,500,1000)")
    parser.add_argument("--clients-per-process", type=int, help="default 250 (quick: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="cloud rounds (default 2)")
    parser.add_argument("--list-path", action="store_true",
                        help="the edge holds every answer until the round ends (ListFedAvg)")
    parser.add_argument("--list-path-at", default="",
                        help="comma-separated client counts also measured with --list-path")
    parser.add_argument("--keep-models", action="store_true",
                        help="client hosts keep each client's model (the product's client)")
    parser.add_argument("--local-steps", type=int, default=1, help="per client (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override, after the bench's")
    parser.add_argument("--out", type=Path, help="result folder (default runs/bench/scale)")
    parser.add_argument("--timeout", type=float, default=3600, help="per client count")
    args = parser.parse_args(argv)
    sizes = [int(c) for c in
             (args.clients or ("6" if args.quick else "50,200,500,1000")).split(",")]
    per_process = args.clients_per_process or (3 if args.quick else 250)
    points = [(clients, args.list_path) for clients in sizes] + [
        (int(c), True) for c in args.list_path_at.split(",") if c and not args.list_path]
    out = args.out or REPO / "runs" / "bench" / ("scale-quick" if args.quick else "scale")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info(), "command": command_line(),
                              "rounds": args.rounds, "local_steps": args.local_steps,
                              "clients_per_process": per_process, "sizes": []}
    for clients, list_path in points:
        result["sizes"].append(measure(clients, per_process, args.rounds, args.local_steps,
                                       out, args.timeout, args.overrides, list_path,
                                       args.keep_models))
        (out / "scale.json").write_text(json.dumps(result, indent=2))
        (out / "scale.md").write_text(render(result) + "\n")  # what finished so far
    table = render(result)
    (out / "scale.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
