"""``fedphd launch``: the whole deployment on this machine, one OS process per role.

Starts the cloud, the edges and the clients as separate ``fedphd`` processes talking gRPC on
the configured host, shows the cloud's progress, and stops every process it started when the
run ends, when one of them fails, on Ctrl-C, or at ``--timeout``. The run folder gets the
resolved ``config.toml``, each process's log under ``logs/``, and whatever the cloud writes
(``metrics.jsonl``, ``model/``, ``samples.png``, ``summary.json``) plus ``summary.md``.
Its gRPC links are mutual TLS: with certificates from ``[tls]``, or with a throwaway CA the
launcher makes in ``tls/`` when none are configured (a server certificate and one certificate
per client and edge); plaintext only with ``tls.insecure = true``. Each edge and client gets
its own certificate on its command line (``--set tls.client_cert=...``): the files named
``client-N.pem``/``edge-N.pem`` next to the CA certificate, as docker/make-certs.sh writes
them, unless ``[tls]`` names one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.data.partition import check_run_partition
from fedphd.common.quality.tracking import check_tracking
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.logs import verbosity_args
from fedphd.common.settings.runtime import progress_bar
from fedphd.common.settings.topology import (
    cloud_address,
    edge_address,
    is_flat,
    server_address_of_client,
)
from fedphd.common.wire.tls import peer_certificate_files, with_run_certificates

log = logging.getLogger("fedphd.launch")

POLL_SECONDS = 0.5


@dataclass
class Role:
    """One process of the deployment."""

    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class Deployment:
    """The processes of one run, all started by this launcher (and only those are stopped)."""

    roles: list[Role] = field(default_factory=list)

    def start(self, logs: Path, env: dict[str, str]) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        for role in self.roles:
            role.log_path = logs / f"{role.name}.log"
            with role.log_path.open("wb") as sink:
                role.process = subprocess.Popen(
                    role.argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # Ctrl-C reaches the launcher only; it stops them
                )

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every live process we started, then SIGKILL what is left after ``grace``."""
        live = [r for r in self.roles if r.process is not None and r.returncode is None]
        for role in live:
            role.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for role in live:
            try:
                role.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                role.process.kill()
                role.process.wait(timeout=10)

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for role in self.roles:
            try:
                role.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


def write_resolved_config(cfg: RunConfig, path: Path) -> Path:
    """The exact configuration every process of the run reads (also the run's record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(cfg.model_dump(exclude_none=True)))
    return path


def own_certificate(cfg: RunConfig, peer: str) -> list[str]:
    """The overrides that give ``peer`` ("client-0", "edge-1") its own certificate and key,
    if the CA's folder has them (each process reads only its own key)."""
    files = peer_certificate_files(cfg.tls, peer)
    if files is None:
        return []
    cert, key = (json.dumps(str(path.resolve())) for path in files)  # TOML strings
    return ["--set", f"tls.client_cert={cert}", "--set", f"tls.client_key={key}"]


def plan_roles(cfg: RunConfig, config_path: Path, out: Path) -> list[Role]:
    """Command lines of the cloud, the edges and the clients."""
    base = [sys.executable, "-m", "fedphd.common.commands.cli", *verbosity_args()]
    common = ["--config", str(config_path)]
    topology = cfg.topology
    roles = [
        Role("cloud", [*base, "cloud", *common, "--listen", cloud_address(topology),
                       "--out", str(out)])
    ]
    if not is_flat(topology):
        roles += [
            Role(f"edge-{e}", [*base, "edge", *common, "--edge-id", str(e),
                               "--cloud", cloud_address(topology),
                               "--listen", edge_address(e, topology),
                               *own_certificate(cfg, f"edge-{e}")])
            for e in range(topology.edges)
        ]
    roles += [
        Role(f"client-{c}", [*base, "client", *common, "--client-id", str(c),
                             "--server", server_address_of_client(c, topology),
                             "--state-dir", str(out / "clients" / f"client-{c}"),
                             *own_certificate(cfg, f"client-{c}")])
        for c in range(topology.clients)
    ]
    return roles


def cloud_rounds_done(metrics_path: Path) -> int:
    if not metrics_path.exists():
        return 0
    with metrics_path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if '"tier": "cloud"' in line)


def last_lines(path: Path | None, count: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-count:])


def quality_lines(evals: list[dict]) -> list[str]:
    """The last evaluation of a run, labelled for what it is."""
    if not evals:
        return []
    last = evals[-1]
    whose = " (mean over the clients' own models)" if last["tier"] == "client-eval" else ""
    line = (f"- final fd_classifier{whose}: {last['fd_classifier']:.4g} (Fréchet distance in "
            "the feature space of a classifier trained on the real data; not FID)")
    if "fid" in last:
        line += f"; FID: {last['fid']:.4g}"
    return [line]


def write_summary(cfg: RunConfig, out: Path, seconds: float) -> Path:
    """A short Markdown summary of a finished run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cloud = [r for r in records if r.get("tier") == "cloud"]
    evals = [r for r in records if r.get("tier") in ("eval", "client-eval")]
    totals = cloud[-1]["bytes_cumulative"] if cloud else {}
    lines = [
        f"# Run {cfg.name}",
        "",
        f"- mode: {'flat' if is_flat(cfg.topology) else 'hierarchical'}, "
        f"{cfg.topology.edges} edges, {cfg.topology.clients} clients",
        f"- cloud rounds: {len(cloud)} x {cfg.topology.edge_rounds} edge rounds",
        f"- strategies: cloud {cfg.topology.cloud_strategy}, edge {cfg.topology.edge_strategy}",
        f"- wall time: {seconds:.0f} s",
        f"- final loss: {cloud[-1]['loss'] if cloud else 'n/a'}",
        *quality_lines(evals),
        "",
        "| round | loss | " + " | ".join(totals) + " |",
        "|---|---|" + "---|" * len(totals),
    ]
    for record in cloud:
        loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
        sizes = " | ".join(str(record["bytes"].get(link, 0)) for link in totals)
        lines.append(f"| {record['round']} | {loss} | {sizes} |")
    lines += ["", "Bytes are serialised message sizes per link and direction.", ""]
    if (out / "samples.png").is_file():
        lines += ["![samples](samples.png)", ""]
    else:
        lines += ["Parts of the model stay with the clients: each client's own model and "
                  "samples are in clients/client-N/.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def record_wall_time(path: Path, seconds: float) -> None:
    """Add the run's wall time to the cloud's summary.json."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["wall_seconds"] = round(seconds, 1)
    path.write_text(json.dumps(summary, indent=2))


def launch(cfg: RunConfig, out: Path, timeout: float) -> int:
    """Run the deployment to completion; 0 when the cloud finished and wrote its results."""
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    # TLS on this machine too: a throwaway CA for the run unless [tls] says otherwise.
    cfg = with_run_certificates(cfg, out / "tls")
    config_path = write_resolved_config(cfg, out / "config.toml")
    deployment = Deployment(plan_roles(cfg, config_path, out))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    deployment.start(out / "logs", env)
    cloud = deployment.roles[0]
    bar = progress_bar(cfg.topology.cloud_rounds, "cloud rounds", cfg.output.progress)
    try:
        while cloud.returncode is None:
            failed = [r for r in deployment.roles[1:] if r.returncode not in (None, 0)]
            if failed:
                log.error("%s exited with %s; stopping the run. Its log ends with:\n%s",
                          failed[0].name, failed[0].returncode, last_lines(failed[0].log_path))
                return 1
            if time.monotonic() - start > timeout:
                log.error("the run exceeded --timeout %.0f s; stopping it", timeout)
                return 1
            bar.update(cloud_rounds_done(metrics_path) - bar.n)
            time.sleep(POLL_SECONDS)
        bar.update(cloud_rounds_done(metrics_path) - bar.n)
        bar.close()  # before the lines below, so a terminal's bar is not redrawn under them
        if cloud.returncode != 0:
            log.error("the cloud exited with %s. Its log ends with:\n%s", cloud.returncode,
                      last_lines(cloud.log_path))
            return 1
        # Edges and clients leave once the cloud has disconnected them.
        deployment.wait_all(timeout=30)
        seconds = time.monotonic() - start
        record_wall_time(out / "summary.json", seconds)
        summary = write_summary(cfg, out, seconds)
        print(f"run finished in {time.monotonic() - start:.0f} s: {summary}")
        samples = out / "samples.png"
        print(f"model: {out / 'model'}  samples: "
              f"{samples if samples.is_file() else out / 'clients'}  metrics: {metrics_path}")
        return 0
    finally:
        bar.close()
        deployment.stop()


def _exit_on_sigterm(signum, _frame) -> None:
    # SIGTERM (docker stop, a CI timeout, kill) would end Python without running `finally`,
    # leaving the started processes behind; as an exception, the launcher stops them first.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cfg = config_from_args(args)
    check_run_partition(cfg)  # an impossible split stops here, before any process starts
    check_tracking(cfg.output)  # so does output.report_to without its optional package
    out = Path(args.out or cfg.output.dir)
    return launch(cfg, out, args.timeout)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "launch",
        help="run cloud, edges and clients as local processes (the main job)",
        description="Start the cloud, topology.edges edges and topology.clients clients as "
        "separate processes on this machine, wait for the run, stop them all, and leave "
        "metrics.jsonl, model/, samples.png and summary.md in --out.",
    )
    add_config_args(parser)
    parser.add_argument("--out", metavar="DIR", help="run folder (default: output.dir)")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, metavar="SECONDS",
        help="stop everything and fail after this long (default 3600)",
    )
    parser.set_defaults(run=run)
