"""Transport overhead: one cloud→edge→client→edge→cloud round of the project with no local
steps, against bare grpcio carrying the same bytes over the same hops on loopback.

The project round is the real deployment (``fedphd launch``: cloud, one edge, one client as
separate processes over Flower's gRPC transport), fp32 both ways, ``training.local_steps=0``;
its time is the cloud's ``seconds`` for the round in ``metrics.jsonl`` (Flower's
``fit_round``: encode, four transfers, decode, load, aggregate). Round 1 also waits for the
client to connect and build its model, and the rounds after it are slower while the processes
warm up (fresh heap pages, gRPC's flow-control windows growing), so the first ``--warmup``
rounds are not measured (median of the rest). The reference is ``bench.bare_grpc``: three
processes, two unary calls nested, payloads of exactly the sizes the project metered on each
link, the same number of untimed warm-up calls first (median of ``--repeats`` calls). The
result also gives the ratio measured the way this bench did before 2026-12-02 (project rounds
2.., bare calls after one warm-up call, the first 5): ``ratio_one_warmup``.

    python -m bench.transport            # the 35.75 M ddpm-cifar10 U-Net (143 MB per message)
    python -m bench.transport --quick    # the 1.1 M tiny U-Net, 20 rounds, < 2 min
    python -m bench.transport --plain-client   # the client: examples/plain_client.py
    python -m bench.transport --set training.device=cuda   # where a GPU is

``--plain-client`` puts a stock-Flower client (``examples/plain_client.py``, which does not
speak the tensor link) in place of ``fedphd client``: its hop carries the tensors inside
Flower's messages, the cloud-edge hop still on the link.

The last line of stdout is ``ratio: <project round time / bare grpcio time>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import bare_grpc
from bench.harness import (
    REPO,
    BenchError,
    child_env,
    command_line,
    derive_config,
    free_port_block,
    launch,
    logs_tail,
    loopback_overrides,
    machine_info,
    machine_line,
    median,
    megabytes,
    print_ratio,
    progress,
    tier,
    write_config,
)
from fedphd.common.commands.launcher import Deployment, Role
from fedphd.common.quality.report import read_metrics
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.topology import cloud_address, edge_address

FULL_CONFIG = REPO / "configs" / "ddpm-cifar10.toml"
QUICK_CONFIG = REPO / "common" / "configs" / "default.toml"
LINKS = ("cloud->edge", "edge->client", "client->edge", "edge->cloud")
EXAMPLE = REPO / "examples" / "plain_client.py"
POLL_SECONDS = 0.5
ONE_WARMUP_CALLS = 5  # the bench's bare calls before 2026-12-02, after one warm-up call


def round_overrides(rounds: int) -> list[str]:
    """One edge, one client, fp32, nothing but the round trip: no local steps, no evaluation,
    a one-image one-step sample grid at the end."""
    return [
        # The data set only sizes the client's share; with no local steps nothing trains on
        # it, so the offline digits stand in for CIFAR-10 (--set data.dataset=cifar10 to use it).
        "data.dataset=digits", "partition.method=iid",
        "training.local_steps=0", "training.device=cpu",
        "topology.edges=1", "topology.clients=1", f"topology.cloud_rounds={rounds}",
        "topology.edge_rounds=1", "topology.fraction_fit=1.0", "topology.min_fit_clients=1",
        'topology.cloud_strategy="flwr.server.strategy.FedAvg"',
        'topology.edge_strategy="flwr.server.strategy.FedAvg"',
        "topology.cloud_strategy_args={}", "topology.edge_strategy_args={}",
        "topology.connect_timeout=300", "topology.round_timeout=900",
        "pruning.enabled=false", 'codec.downlink="fp32"', 'codec.uplink="fp32"',
        "evaluation.final=false", "evaluation.every_cloud_rounds=0",
        "output.grid_samples=1", "diffusion.sampling_steps=1", "output.progress=false",
    ]


def project_round(config: Path, out: Path, rounds: int, extra: list[str],
                  timeout: float, plain_client: bool = False,
                  warmup: int = 1) -> dict[str, Any]:
    """Run the deployment; the median steady-state cloud round and the bytes of each link."""
    cfg = derive_config(config, [*round_overrides(rounds), *loopback_overrides(), *extra],
                        drop=[("partition", "pairs")])
    resolved = write_config(cfg, out / "bench-config.toml")
    client = "a stock-Flower client" if plain_client else "fedphd client"
    progress(f"project: {cfg.model.preset} U-Net, {rounds} cloud rounds, no local steps, "
             f"{client}")
    if plain_client:
        records = run_with_plain_client(cfg, resolved, out / "run", timeout)
    else:
        records = launch(resolved, out / "run", timeout=timeout, label="transport").records
    cloud = tier(records, "cloud")
    steady = [r for r in cloud if r["round"] > warmup]
    if not steady:
        raise BenchError(f"the run has no cloud round after the {warmup} warm-up round(s); "
                         "use more --rounds or fewer --warmup")
    edge = [r for r in tier(records, "edge") if r["cloud_round"] > warmup]
    after_first = [r["seconds"] for r in cloud if r["round"] >= 2]
    return {
        "preset": cfg.model.preset,
        "warmup_rounds": warmup,
        "rounds_measured": [r["round"] for r in steady],
        "round_seconds": [r["seconds"] for r in steady],
        "round_median_s": median(r["seconds"] for r in steady),
        "round_median_after_first_s": median(after_first),
        "edge_round_median_s": median(r["seconds"] for r in edge) if edge else None,
        "first_round_s": cloud[0]["seconds"],
        "bytes": {link: steady[-1]["bytes"][link] for link in LINKS},
        "run": str(out / "run"),
        "client": client,
    }


def run_with_plain_client(cfg: RunConfig, config: Path, run_dir: Path,
                          timeout: float) -> list[dict[str, Any]]:
    """``fedphd cloud`` and ``fedphd edge`` with ``examples/plain_client.py`` as the client."""
    topology = cfg.topology
    cli = [sys.executable, "-m", "fedphd.common.commands.cli"]
    roles = [
        Role("cloud", [*cli, "cloud", "--config", str(config), "--listen",
                       cloud_address(topology), "--out", str(run_dir)]),
        Role("edge-0", [*cli, "edge", "--config", str(config), "--edge-id", "0", "--cloud",
                        cloud_address(topology), "--listen", edge_address(0, topology)]),
        Role("plain-client-0", [sys.executable, str(EXAMPLE), "--server",
                                edge_address(0, topology), "--client-id", "0", "--insecure",
                                "--images", "64", "--wait", str(topology.connect_timeout),
                                "--timesteps", str(cfg.diffusion.num_train_timesteps)]),
    ]
    # As ``launch`` does: the cloud appends to a metrics.jsonl it finds (a previous run's
    # rounds would be measured again).
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    deployment = Deployment(roles)
    deployment.start(run_dir / "logs", child_env())
    deadline = time.monotonic() + timeout
    try:
        while roles[0].returncode is None:
            failed = [r for r in roles[1:] if r.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                what = f"{failed[0].name} exited with {failed[0].returncode}" if failed else \
                    f"no result within {timeout:.0f} s"
                raise BenchError(f"transport (plain client): {what}\n{logs_tail(run_dir)}")
            time.sleep(POLL_SECONDS)
        if roles[0].returncode != 0:
            raise BenchError(f"transport (plain client): the cloud exited with "
                             f"{roles[0].returncode}\n{logs_tail(run_dir)}")
        deployment.wait_all(timeout=120)
    finally:
        deployment.stop()
    return read_metrics(run_dir / "metrics.jsonl")


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                                env=child_env())


def bare_round(sizes: dict[str, int], repeats: int, out: Path,
               warmup: int = 1) -> dict[str, Any]:
    """The same four transfers through bare grpcio processes (relay = edge, echo = client):
    ``warmup`` (>= 1) untimed calls, then ``repeats`` timed ones."""
    echo_port, relay_port = free_port_block(1), free_port_block(1)
    module = [sys.executable, "-m", "bench.bare_grpc"]
    echo = _start([*module, "echo", "--port", str(echo_port),
                   "--reply-bytes", str(sizes["client->edge"])], out / "bare-echo.log")
    relay = _start([*module, "relay", "--port", str(relay_port),
                    "--to", f"127.0.0.1:{echo_port}",
                    "--forward-bytes", str(sizes["edge->client"]),
                    "--reply-bytes", str(sizes["edge->cloud"])], out / "bare-relay.log")
    try:
        progress(f"bare grpcio: {warmup} + {repeats} round trips of "
                 f"{megabytes(sum(sizes.values()))} through relay and echo processes")
        # One connection, one untimed call, then every call timed: the first ``warmup - 1``
        # timed ones are this bench's warm-up, the first five its measure before 2026-12-02.
        timed = bare_grpc.timed_calls(f"127.0.0.1:{relay_port}", sizes["cloud->edge"],
                                      warmup - 1 + repeats)
        seconds, one_warmup = timed[warmup - 1:], timed[:ONE_WARMUP_CALLS]
    finally:
        for process in (relay, echo):
            process.terminate()
            process.wait(timeout=30)
    return {"warmup_calls": warmup, "round_seconds": seconds,
            "round_median_s": median(seconds),
            "one_warmup_seconds": one_warmup, "one_warmup_median_s": median(one_warmup)}


def render(result: dict[str, Any]) -> str:
    project, bare = result["project"], result["bare"]
    sizes = project["bytes"]
    rows = [f"| project: cloud→edge→client→edge→cloud (Flower gRPC) | "
            f"{project['round_median_s']:.3f} s | rounds {project['rounds_measured']} |"]
    if project["edge_round_median_s"] is not None:
        rows.append(f"| of which the edge↔client round | {project['edge_round_median_s']:.3f} s "
                    "| same rounds |")
    rows.append(f"| bare grpcio relay, same bytes, same hops | {bare['round_median_s']:.3f} s | "
                f"{len(bare['round_seconds'])} calls after {bare['warmup_calls']} untimed |")
    lines = [
        f"# Transport overhead ({project['preset']} U-Net, fp32, no local steps, "
        f"{project['client']})",
        "",
        machine_line(result["machine"]),
        f"command: {result['command']}",
        "",
        "| link | bytes per round |",
        "|---|---|",
        *[f"| {link} | {sizes[link]:,} |" for link in LINKS],
        f"| all four transfers | {sum(sizes.values()):,} |",
        "",
        "| path | round time (median) | measured |",
        "|---|---|---|",
        *rows,
        "",
        f"project / bare = {result['ratio']:.2f} (first project round, with connection and "
        f"model build: {project['first_round_s']:.2f} s)",
        "",
        f"measured as before 2026-12-02 (project rounds 2.., bare: the first "
        f"{len(bare['one_warmup_seconds'])} calls after one untimed): "
        f"{project['round_median_after_first_s']:.3f} s / {bare['one_warmup_median_s']:.3f} s "
        f"= {result['ratio_one_warmup']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport",
        description="One project round with no local steps vs bare grpcio, same bytes, same hops.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny U-Net, 20 rounds of which 5 warm up (< 2 min); default: "
                        "ddpm-cifar10, 6 rounds of which 1 warms up")
    parser.add_argument("--config", type=Path, help="base config (default by --quick)")
    parser.add_argument("--plain-client", action="store_true",
                        help="the client is examples/plain_client.py (stock Flower, no tensor "
                        "link) instead of fedphd client")
    parser.add_argument("--rounds", type=int, help="cloud rounds, warm-up rounds included")
    parser.add_argument("--warmup", type=int,
                        help="rounds not measured, and untimed bare calls (default: 5 with "
                        "--quick, else 1, fewer where --rounds leaves none measured; at "
                        "least 1: round 1 waits for the client)")
    parser.add_argument("--repeats", type=int,
                        help="timed bare grpcio calls (default: the measured rounds' count)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override, after the bench's")
    parser.add_argument("--out", type=Path, help="result folder (default runs/bench/transport)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    config = args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG)
    # Medians of 15 (tiny, ~0.08 s each) and 5 (143 MB, ~1.5 s each) measured rounds. A tiny
    # round is still getting faster at round 6 (0.40, 0.20, 0.21, 0.17, 0.14 s, then ~0.08),
    # so its first 5 are left out, and the bare relay is warmed up with as many calls; a
    # 143 MB round is steady from round 2.
    rounds = args.rounds or (20 if args.quick else 6)
    # The default leaves at least one round measured (e.g. a smoke run's --rounds 2).
    default_warmup = min(5 if args.quick else 1, rounds - 1)
    warmup = max(1, args.warmup if args.warmup is not None else default_warmup)
    repeats = args.repeats or max(1, rounds - warmup)
    name = "transport" + ("-quick" if args.quick else "") + ("-plain" if args.plain_client else "")
    out = args.out or REPO / "runs" / "bench" / name
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    project = project_round(config, out, rounds, args.overrides, args.timeout,
                            plain_client=args.plain_client, warmup=warmup)
    bare = bare_round(project["bytes"], repeats, out, warmup)
    result = {
        "machine": machine_info(), "command": command_line(), "config": str(config),
        "project": project, "bare": bare,
        "ratio": project["round_median_s"] / bare["round_median_s"],
        "ratio_one_warmup": project["round_median_after_first_s"] / bare["one_warmup_median_s"],
        "bench_seconds": round(time.monotonic() - start, 1),
    }
    (out / "transport.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (out / "transport.md").write_text(table + "\n")
    print(table)
    print_ratio(result["ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
