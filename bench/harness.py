"""What every benchmark shares: the machine it ran on, free ports, running the real ``fedphd``
program and reading what its runs leave behind.

Benchmarks drive the product through its command line
(``python -m fedphd.common.commands.cli ...``), the way
a user does, and read their figures from the run folder's ``metrics.jsonl``; nothing here
re-implements a role.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedphd.common.commands.launcher import write_resolved_config
from fedphd.common.quality.report import read_metrics
from fedphd.common.settings.config import RunConfig, apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "common" / "configs" / "default.toml"
POLL_SECONDS = 1.0


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and ends with the relevant log lines."""


def progress(message: str) -> None:
    """Progress goes to stderr: stdout carries the tables and the final ``ratio:`` line."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def print_ratio(value: float) -> None:
    """The line outside checks read: it must be the last line of stdout."""
    print(f"ratio: {value:.4f}", flush=True)


def median(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise BenchError("no measurements to take the median of")
    return float(statistics.median(values))


# ------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _gpu_name() -> str | None:
    import torch  # late: only benchmarks that already use torch ask

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def machine_info() -> dict[str, Any]:
    """What a published figure needs next to it: machine, date, software versions."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_gib(), 1),
        "gpu": _gpu_name(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Other work on a shared machine slows every timing; the load says how much there was.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("load_average")
    load_text = f"; load average at start {load[0]:.1f}" if load else ""
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB{gpu}; "
            f"date: {info['date']}; python {info['python']}, torch {info['torch']}{load_text}")


def command_line() -> str:
    """The command that produced the figures, as typed from the repository root."""
    module = Path(sys.argv[0]).with_suffix("").name
    return " ".join(["python -m", f"bench.{module}", *sys.argv[1:]])


# ---------------------------------------------------------------------------------- ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_block(count: int) -> int:
    """First of ``count`` consecutive free loopback ports (edge ``i`` listens on base + i)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + count < 65535 and all(_port_is_free(base + i) for i in range(count)):
            return base
    raise BenchError("no block of free loopback ports found")


def loopback_overrides() -> list[str]:
    """Fresh ports per run, so benchmarks never collide with each other or with tests, and
    plaintext gRPC: every link is on this machine's loopback, and the bare grpcio reference of
    ``bench.transport`` is plaintext too (configs with a ``[tls]`` table refuse plaintext
    unless asked)."""
    overrides = [f"topology.cloud_port={free_port_block(1)}",
                 f"topology.edge_base_port={free_port_block(8)}"]
    if "tls" in RunConfig.model_fields:
        overrides.append("tls.insecure=true")
    return overrides


# -------------------------------------------------------------------------------- configs


def derive_config(path: Path, overrides: Sequence[str],
                  drop: Sequence[tuple[str, str]] = ()) -> RunConfig:
    """A config file with keys removed (``drop``: ``--set`` cannot unset a key) and
    ``section.key=value`` overrides applied, validated as every role validates it."""
    data = tomllib.loads(Path(path).read_text())
    for section, key in drop:
        data.get(section, {}).pop(key, None)
    apply_overrides(data, list(overrides))
    return config_from_dict(data, source=str(path))


def write_config(cfg: RunConfig, path: Path) -> Path:
    """The resolved config every process of a benchmark run reads (the launcher's writer)."""
    return write_resolved_config(cfg, path)


def set_args(overrides: Sequence[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


# ------------------------------------------------------------------------------ processes


def fedphd_argv(*args: str) -> list[str]:
    """The real command line, run with this interpreter from the repository root."""
    return [sys.executable, "-m", "fedphd.common.commands.cli", *args]


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def tail(path: Path, count: int = 20) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-count:])


def logs_tail(run_dir: Path, count: int = 12) -> str:
    """The end of every process log of a run, for a failure message."""
    parts = [f"--- {log.name}\n{tail(log, count)}"
             for log in sorted((run_dir / "logs").glob("*.log"))]
    return "\n".join(parts)


def _announce_new_records(metrics: Path, seen: int, label: str) -> int:
    """Print each cloud round and evaluation of a running launch as it lands."""
    if not metrics.is_file():
        return seen
    lines = metrics.read_text(encoding="utf-8").splitlines()
    for line in lines[seen:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return seen  # a line being written; read it next time
        if record.get("tier") == "cloud":
            progress(f"{label}: cloud round {record['round']} done in {record['seconds']:.1f} s")
        elif record.get("tier") in ("eval", "client-eval"):
            whose = " (mean of clients' own models)" if record["tier"] == "client-eval" else ""
            progress(f"{label}: round {record['round']} fd_classifier "
                     f"{record['fd_classifier']:.4g}{whose}")
        seen += 1
    return seen


@dataclass
class LaunchResult:
    out: Path
    records: list[dict[str, Any]]
    wall_seconds: float


def launch(config: Path, out: Path, overrides: Sequence[str] = (), timeout: float = 3600,
           label: str = "run") -> LaunchResult:
    """``fedphd launch --config C --out OUT --set ...`` to completion; its metrics records."""
    out.mkdir(parents=True, exist_ok=True)
    argv = fedphd_argv("launch", "--config", str(config), "--out", str(out),
                       "--timeout", str(int(timeout)), *set_args(overrides))
    log_path = out / "launch.log"
    # The launcher starts a fresh metrics file; an old one must not be read as progress.
    (out / "metrics.jsonl").unlink(missing_ok=True)
    start = time.monotonic()
    with log_path.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=child_env())
        seen = 0
        try:
            while process.poll() is None:
                seen = _announce_new_records(out / "metrics.jsonl", seen, label)
                time.sleep(POLL_SECONDS)
        except BaseException:
            process.terminate()  # the launcher stops every process it started
            process.wait(timeout=60)
            raise
    _announce_new_records(out / "metrics.jsonl", seen, label)
    seconds = time.monotonic() - start
    if process.returncode != 0:
        raise BenchError(f"{label}: `fedphd launch` exited with {process.returncode}\n"
                         f"{tail(log_path)}\n{logs_tail(out)}")
    return LaunchResult(out, read_metrics(out / "metrics.jsonl"), seconds)


def tier(records: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [record for record in records if record.get("tier") == name]


# --------------------------------------------------------------------------------- memory


def process_memory(pid: int) -> dict[str, int]:
    """Resident set size now and its peak (``VmRSS``, ``VmHWM``) in bytes, from /proc."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return fields


def mib(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB"


def megabytes(count: float) -> str:
    return f"{count / 1e6:,.1f} MB"
