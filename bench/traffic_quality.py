"""Traffic and sample quality, side by side: FedAvg, FedProx, FedDM-quant 8-bit, FedDiffuse UDEC,
FedPhD, FedPhD + 8-bit and centralised training, on one pathological non-IID split.

Every method is its shipped config (``configs/*-digits.toml``) run for real with ``fedphd
launch``, with the same overrides: the offline digits, the tiny U-Net, 10 clients holding 2
classes each (``partition.method = "classes"``, ``classes_per_client = 2``, one seed, so every
method sees the same split), the same total number of local steps, and an evaluation after
every cloud round. Flat methods put the 10 clients on the cloud; FedPhD puts them on 2 edges
(40 % of an edge's clients per edge round, as in the paper). Centralised training is ``fedphd
train`` on all images for the same number of steps, scored by ``fedphd evaluate`` with the
same sample count and DDIM steps.

Figures come from each run's ``metrics.jsonl``: ``fd_classifier`` (the offline Fréchet
distance; for methods whose clients keep private parts, e.g. FedDiffuse UDEC, the mean over
the clients' own models, as the cloud records it), bytes per link and direction as each
link's server metered them, and the cumulative bytes at the first evaluation whose
``fd_classifier`` is at most FedAvg's final one.

    python -m bench.traffic_quality                    # the full table (~80 min on 2 shared cores)
    python -m bench.traffic_quality --quick            # tiny budget, smoke run
    python -m bench.traffic_quality --reuse            # rerun only what is missing or changed
    python -m bench.traffic_quality --methods fedavg,fedphd,centralised
    python -m bench.traffic_quality --seeds 0,1,2 --methods fedavg,fedphd   # spread over seeds

``--seeds`` runs each method once per training seed (``seed`` and ``training.seed``: the
initial model, noise, batch order and sampling); the split stays the same
(``partition.seed = 0``), so the spread is that of training, not of the data. The table then
gives the mean and min–max over seeds, each method compared with FedAvg of the same seed, and
calls a difference from FedAvg real only when the ranges do not overlap. Runs go to
``seed-<s>/<method>`` and results.json is rewritten after each, so an interrupted command
keeps what it finished (``--reuse`` picks up from there).

``--ablation`` runs FedAvg and FedPhD's components one at a time on fedphd-digits.toml
(hierarchy alone with FedAvg at edges and cloud; + SH-weighted cloud aggregation with static
edges; + homogeneity-aware client-to-edge selection; + pruning 0.2, the shipped FedPhD;
+ 8-bit codecs) over ``--seeds`` and writes ablation.md: each step against the step before,
and against flat FedAvg of the same seed at equal client steps and at equal bytes (FedAvg's
quality read off its per-round curve). ``--methods fedphd-lean`` runs the traffic floor,
``configs/fedphd-lean-digits.toml``, whose own edge rounds, participation and local steps
stand.

    python -m bench.traffic_quality --ablation --seeds 0,1,2
    python -m bench.traffic_quality --methods fedphd-lean --seeds 0,1,2

A method whose config is not in the repository is reported as missing, not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from bench.harness import (
    REPO,
    BenchError,
    child_env,
    command_line,
    derive_config,
    fedphd_argv,
    launch,
    loopback_overrides,
    machine_info,
    machine_line,
    progress,
    tail,
    tier,
    write_config,
)
from fedphd.common.quality.report import read_metrics

CLOUD_LINKS = ("cloud->client", "client->cloud", "cloud->edge", "edge->cloud")
ALL_LINKS = (*CLOUD_LINKS, "edge->client", "client->edge")
REFERENCE = "fedavg"


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a shipped config and how it is deployed."""

    key: str
    label: str
    config: str  # relative to the repository root
    family: str  # "flat", "hierarchical" or "central"
    extra: tuple[str, ...] = ()
    # The config's own edge rounds and participation stand (the bench sets edges and rounds).
    own_topology: bool = False


METHODS = (
    Method("fedavg", "FedAvg (fp32)", "configs/fedavg-digits.toml", "flat"),
    Method("fedprox", "FedProx", "configs/fedprox-digits.toml", "flat"),
    Method("feddm-quant8", "FedDM-quant 8-bit", "configs/feddm-quant8-digits.toml", "flat"),
    Method("feddiffuse-udec", "FedDiffuse UDEC", "configs/feddiffuse-udec-digits.toml", "flat"),
    Method("fedphd", "FedPhD (hierarchy + SH + pruning 0.2)", "configs/fedphd-digits.toml",
           "hierarchical"),
    Method("fedphd-q8", "FedPhD + 8-bit", "configs/fedphd-digits.toml", "hierarchical",
           ('codec.downlink="q8"', 'codec.uplink="q8"')),
    Method("centralised", "centralised (same data, same steps)", "configs/fedavg-digits.toml",
           "central"),
)

# FedPhD's components one at a time (``--ablation``), on fedphd-digits.toml: each step adds one
# to the step before; "+ pruning" is the shipped FedPhD and "+ 8-bit" FedPhD + 8-bit.
_NO_PRUNING = "pruning.enabled=false"
ABLATION = (
    Method("hier-fedavg", "hierarchy alone (FedAvg at edges and cloud)",
           "configs/fedphd-digits.toml", "hierarchical",
           ('topology.cloud_strategy="flwr.server.strategy.FedAvg"',
            "topology.cloud_strategy_args={}", _NO_PRUNING)),
    Method("hier-sh", "+ SH-weighted cloud aggregation (static edges)",
           "configs/fedphd-digits.toml", "hierarchical",
           ('topology.cloud_strategy_args.selection="static"', _NO_PRUNING)),
    Method("hier-sh-select", "+ homogeneity-aware client-to-edge selection",
           "configs/fedphd-digits.toml", "hierarchical", (_NO_PRUNING,)),
)
ABLATION_STEPS = ("hier-fedavg", "hier-sh", "hier-sh-select", "fedphd", "fedphd-q8")
ABLATION_LABELS = {"fedphd": "+ structured pruning 0.2 (= FedPhD)",
                   "fedphd-q8": "+ 8-bit codecs both ways (= FedPhD + 8-bit)"}
# The traffic floor (``configs/fedphd-lean-digits.toml``): its own edge rounds, participation
# and codecs stand; the bench sets only the split, the edges and the cloud rounds.
LEAN = Method("fedphd-lean", "FedPhD lean (traffic floor)", "configs/fedphd-lean-digits.toml",
              "hierarchical", own_topology=True)
ALL_METHODS = (*METHODS, *ABLATION, LEAN)


@dataclass(frozen=True)
class Budget:
    """The same work for every method: total local steps = clients x flat_rounds x steps =
    edges x (fraction x clients per edge) x edge_rounds x hier_rounds x steps."""

    clients: int
    local_steps: int
    flat_rounds: int
    hier_rounds: int
    edge_rounds: int
    edges: int
    fraction_fit: float
    classes_per_client: int
    eval_samples: int
    eval_steps: int

    @property
    def steps(self) -> int:
        return self.clients * self.flat_rounds * self.local_steps


FULL = Budget(clients=10, local_steps=25, flat_rounds=8, hier_rounds=5, edge_rounds=4, edges=2,
              fraction_fit=0.4, classes_per_client=2, eval_samples=128, eval_steps=25)
# 5 clients: the fewest that still give each of the 10 classes a holder at 2 classes each.
QUICK = Budget(clients=5, local_steps=2, flat_rounds=2, hier_rounds=1, edge_rounds=2, edges=2,
               fraction_fit=0.4, classes_per_client=2, eval_samples=16, eval_steps=2)


# -------------------------------------------------------------------------------- configs


def shared_overrides(budget: Budget, run_dir: Path, own_topology: bool = False) -> list[str]:
    # A config with its own topology keeps its local steps too (rounds x steps go together).
    steps = [] if own_topology else [f"training.local_steps={budget.local_steps}"]
    return [
        'partition.method="classes"', f"partition.classes_per_client={budget.classes_per_client}",
        "partition.seed=0", f"topology.clients={budget.clients}", *steps,
        "evaluation.every_cloud_rounds=1", "evaluation.final=true",
        f"evaluation.num_samples={budget.eval_samples}",
        f"evaluation.sampling_steps={budget.eval_steps}",
        f"evaluation.batch_size={budget.eval_samples}",
        "output.grid_samples=16", f'output.dir="{run_dir}"', "output.progress=false",
        "topology.connect_timeout=300", "topology.round_timeout=1800",
    ]


def family_overrides(method: Method, budget: Budget) -> list[str]:
    if method.family == "hierarchical" and method.own_topology:
        return [f"topology.edges={budget.edges}", f"topology.cloud_rounds={budget.hier_rounds}"]
    if method.family == "hierarchical":
        return [f"topology.edges={budget.edges}", f"topology.cloud_rounds={budget.hier_rounds}",
                f"topology.edge_rounds={budget.edge_rounds}",
                f"topology.fraction_fit={budget.fraction_fit}"]
    if method.family == "flat":
        return ["topology.edges=0", f"topology.cloud_rounds={budget.flat_rounds}"]
    # Centralised: one process, so it may use every core; threads change speed, not results.
    return ["training.threads=0"]


def method_config(method: Method, budget: Budget, run_dir: Path, user: list[str]) -> Path:
    """The method's shipped config with the shared overrides (then the user's ``--set``),
    written next to its run."""
    overrides = [*shared_overrides(budget, run_dir, method.own_topology),
                 *family_overrides(method, budget),
                 *method.extra, *user, *loopback_overrides()]
    # FedPhD's config fixes class pairs; every method here uses the same k-classes split.
    cfg = derive_config(REPO / method.config, overrides, drop=[("partition", "pairs")])
    return write_config(cfg, run_dir / "bench-config.toml")


# ----------------------------------------------------------------------------------- runs


def run_federated(method: Method, budget: Budget, run_dir: Path, timeout: float,
                  user: list[str]) -> None:
    config = method_config(method, budget, run_dir, user)
    launch(config, run_dir, timeout=timeout, label=method.key)


def _run_logged(argv: list[str], log: Path, timeout: float, what: str) -> str:
    with log.open("w") as sink:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=sink, text=True,
                                cwd=REPO, env=child_env(), timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"{what} exited with {result.returncode}\n{tail(log)}")
    return result.stdout


def run_central(method: Method, budget: Budget, run_dir: Path, timeout: float,
                user: list[str]) -> None:
    """``fedphd train`` for the federated step budget, then ``fedphd evaluate``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = method_config(method, budget, run_dir, user)
    progress(f"{method.key}: {budget.steps} steps on all images")
    _run_logged(fedphd_argv("train", "--config", str(config), "--steps", str(budget.steps),
                            "--out", str(run_dir)), run_dir / "train.log", timeout, "train")
    progress(f"{method.key}: evaluating")
    out = _run_logged(fedphd_argv("evaluate", "--model", str(run_dir / "model"), "--json",
                                  "--config", str(config), "--n", str(budget.eval_samples),
                                  "--steps", str(budget.eval_steps)),
                      run_dir / "evaluate.log", timeout, "evaluate")
    (run_dir / "evaluation.json").write_text(out.strip().splitlines()[-1] + "\n")


def finished(run_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a complete run of exactly this method and budget."""
    stamp = run_dir / "bench-done.json"
    # Compared as JSON: the stamp's lists were the fingerprint's tuples.
    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(
        json.dumps(fingerprint))


def run_method(method: Method, budget: Budget, out: Path, timeout: float,
               reuse: bool, user: list[str] | None = None,
               reuse_only: bool = False) -> dict[str, Any]:
    """Run one method (unless reusable) and summarise it; never raises for a bad method."""
    config = REPO / method.config
    if not config.is_file():
        progress(f"{method.key}: {method.config} does not exist; reported as missing")
        return {"status": "missing", "reason": f"{method.config} not found in the repository"}
    run_dir = out / method.key
    user = list(user or [])
    # A field left at its default is not named, so runs made before it existed still match.
    described = {k: v for k, v in asdict(method).items() if k != "own_topology" or v}
    fingerprint: dict[str, Any] = {"method": described, "budget": asdict(budget),
                                   "config_text": config.read_text()}
    if user:
        fingerprint["overrides"] = user
    start = time.monotonic()
    reused = (reuse or reuse_only) and finished(run_dir, fingerprint)
    if reused:
        progress(f"{method.key}: reusing the finished run in {run_dir}")
    elif reuse_only:
        progress(f"{method.key}: no finished run in {run_dir}; not run (--reuse-only)")
        return {"status": "not run", "reason": "no finished run (--reuse-only)"}
    else:
        (run_dir / "bench-done.json").unlink(missing_ok=True)  # a failed rerun is not done
        try:
            if method.family == "central":
                run_central(method, budget, run_dir, timeout, user)
            else:
                run_federated(method, budget, run_dir, timeout, user)
        except (BenchError, subprocess.SubprocessError, ValueError) as error:
            reason = str(error) or repr(error)
            progress(f"{method.key}: failed: {reason.splitlines()[0]}")
            return {"status": "failed", "reason": reason[-3000:], "run": str(run_dir)}
        (run_dir / "bench-done.json").write_text(json.dumps(fingerprint))
        (run_dir / "bench-seconds.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    summary = summarise(method, run_dir, budget)
    seconds = run_dir / "bench-seconds.txt"
    summary["wall_seconds"] = float(seconds.read_text()) if seconds.is_file() else None
    # When the run finished: a reused run was measured by an earlier invocation.
    done = (run_dir / "bench-done.json").stat().st_mtime
    summary["measured"] = datetime.datetime.fromtimestamp(done, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M UTC")
    summary["reused"] = bool(reused)
    return summary


# -------------------------------------------------------------------------------- figures


def quality_points(records: list[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]]:
    """(round, fd_classifier) per evaluation: of the global model, or — for methods that keep
    parts private — the mean over the clients' own models."""
    evals = tier(records, "eval")
    kind = "global model"
    if not evals:
        evals, kind = tier(records, "client-eval"), "mean of clients' own models"
    points = [(r["round"], float(r["fd_classifier"])) for r in evals
              if r.get("fd_classifier") is not None]
    return kind, points


def cumulative_bytes(records: list[dict[str, Any]]) -> dict[int, int]:
    """All-link bytes sent up to and including each cloud round."""
    total, by_round = 0, {}
    for record in tier(records, "cloud"):
        total += sum(record["bytes"].values())
        by_round[record["round"]] = total
    return by_round


def cumulative_steps(records: list[dict[str, Any]], local_steps: int) -> dict[int, int]:
    """Client steps taken up to and including each cloud round: one instruction per client per
    (edge) round."""
    per_round: dict[int, int] = {}
    edge = tier(records, "edge")
    if edge:
        for record in edge:
            round_number = record["cloud_round"]
            per_round[round_number] = (per_round.get(round_number, 0)
                                       + len(record["clients"]) * local_steps)
    else:
        for record in tier(records, "cloud"):
            per_round[record["round"]] = len(record["participants"]) * local_steps
    total, by_round = 0, {}
    for round_number in sorted(per_round):
        total += per_round[round_number]
        by_round[round_number] = total
    return by_round


def run_local_steps(run_dir: Path, budget: Budget) -> int:
    """Local steps per round the run was given (its config: a ``--set`` may change them)."""
    config = run_dir / "bench-config.toml"
    if not config.is_file():
        return budget.local_steps
    return int(tomllib.loads(config.read_text())["training"]["local_steps"])


def summarise(method: Method, run_dir: Path, budget: Budget) -> dict[str, Any]:
    if method.family == "central":
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        return {"status": "ok", "mode": "centralised", "client_steps": budget.steps,
                "quality_kind": "model", "points": [[budget.steps, evaluation["fd_classifier"]]],
                "final_fd": evaluation["fd_classifier"], "bytes": {}, "total_bytes": 0,
                "cloud_bytes": 0, "cumulative": {}, "run": str(run_dir)}
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = cumulative_steps(records, run_local_steps(run_dir, budget))
    cloud = tier(records, "cloud")
    totals: dict[str, int] = {}
    for record in cloud:
        for link, count in record["bytes"].items():
            totals[link] = totals.get(link, 0) + count
    kind, points = quality_points(records)
    pruning = tier(records, "pruning")
    return {
        "status": "ok", "mode": method.family, "cloud_rounds": len(cloud),
        "client_steps": max(steps.values(), default=0),
        "quality_kind": kind, "points": points,
        "final_fd": points[-1][1] if points else None,
        "bytes": totals, "total_bytes": sum(totals.values()),
        "cloud_bytes": sum(count for link, count in totals.items() if link in CLOUD_LINKS),
        "cumulative": cumulative_bytes(records),
        "cumulative_steps": steps,
        "parameters": pruning[-1]["params_after"] if pruning else None,
        "run": str(run_dir),
    }


def bytes_to_reach(summary: dict[str, Any], target: float) -> int | None:
    """Cumulative all-link bytes at the first evaluation with fd_classifier <= target."""
    for round_number, value in summary["points"]:
        if value <= target:
            return summary["cumulative"].get(round_number)
    return None


def add_comparisons(results: dict[str, dict[str, Any]]) -> None:
    """Quality and traffic relative to FedAvg, and the bytes to reach its final quality."""
    reference = results.get(REFERENCE, {})
    if reference.get("status") != "ok" or reference.get("final_fd") is None:
        return
    target, traffic = reference["final_fd"], reference["total_bytes"]
    cloud_traffic = reference["cloud_bytes"]
    for summary in results.values():
        if summary.get("status") != "ok" or summary.get("final_fd") is None:
            continue
        summary["fd_vs_fedavg_pct"] = 100 * (summary["final_fd"] - target) / target
        if summary["mode"] != "centralised":
            summary["traffic_vs_fedavg_pct"] = 100 * (summary["total_bytes"] - traffic) / traffic
            summary["cloud_traffic_vs_fedavg_pct"] = (
                100 * (summary["cloud_bytes"] - cloud_traffic) / cloud_traffic)
            summary["bytes_to_fedavg_final"] = bytes_to_reach(summary, target)


# --------------------------------------------------------------------------------- tables


def _mb(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 1e6:,.1f} MB"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def _quality_row(method: Method, s: dict[str, Any]) -> str:
    if s["status"] != "ok":
        reason = s["reason"].splitlines()[0]
        return f"| {method.label} | {s['status']}: {reason} | | | | | | | | | |"
    reach = s.get("bytes_to_fedavg_final")
    if s["mode"] == "centralised":
        reach_text = "no traffic"
    elif "fd_vs_fedavg_pct" not in s:
        reach_text = "n/a"
    else:
        reach_text = _mb(reach) if reach is not None else "not reached"
    final = "n/a" if s["final_fd"] is None else f"{s['final_fd']:.2f}"
    wall = "n/a" if s.get("wall_seconds") is None else f"{s['wall_seconds']:.0f} s"
    return (f"| {method.label} | {s['mode']} | {s['client_steps']:,} | {final} "
            f"({s['quality_kind']}) | {_pct(s.get('fd_vs_fedavg_pct'))} "
            f"| {_mb(s['total_bytes'])} | {_pct(s.get('traffic_vs_fedavg_pct'))} "
            f"| {_mb(s['cloud_bytes'])} | {_pct(s.get('cloud_traffic_vs_fedavg_pct'))} "
            f"| {reach_text} | {wall} |")


def _links_row(method: Method, s: dict[str, Any]) -> str | None:
    if s["status"] != "ok" or s["mode"] == "centralised":
        return None
    cells = " | ".join(f"{s['bytes'][link]:,}" if link in s["bytes"] else "–"
                       for link in ALL_LINKS)
    return f"| {method.label} | {cells} | {s['total_bytes']:,} |"


def _curve_row(method: Method, s: dict[str, Any]) -> str | None:
    if s["status"] != "ok" or s["mode"] == "centralised":
        return None
    points = ", ".join(f"r{r}: {v:.1f} ({_mb(s['cumulative'].get(r))})" for r, v in s["points"])
    return f"| {method.label} | {points} |"


def reused_note(methods: list[Method], results: dict[str, dict[str, Any]]) -> list[str]:
    """Runs kept from an earlier invocation (``--reuse``) say when they were measured."""
    reused = [f"{m.key} ({results[m.key]['measured']})" for m in methods
              if results[m.key].get("reused")]
    return ["", f"Reused runs, measured earlier: {', '.join(reused)}."] if reused else []


def render(result: dict[str, Any], methods: list[Method]) -> str:
    budget = result["budget"]
    results = result["methods"]
    rows = [_quality_row(m, results[m.key]) for m in methods]
    links = [row for m in methods if (row := _links_row(m, results[m.key])) is not None]
    curves = [row for m in methods if (row := _curve_row(m, results[m.key])) is not None]
    return "\n".join([
        "# Traffic and quality: digits, tiny U-Net, 2 classes per client, "
        f"{budget['clients']} clients",
        "",
        machine_line(result["machine"]),
        f"command: {result['command']}",
        f"budget: {budget['clients']} clients, {budget['local_steps']} local steps per round; "
        f"flat: {budget['flat_rounds']} rounds of all clients; hierarchical: {budget['edges']} "
        f"edges, {budget['hier_rounds']} cloud rounds x {budget['edge_rounds']} edge rounds, "
        f"{budget['fraction_fit']:.0%} of an edge's clients per edge round; centralised: "
        f"{budget['clients'] * budget['flat_rounds'] * budget['local_steps']} steps. "
        f"fd_classifier from {budget['eval_samples']} samples, {budget['eval_steps']} DDIM "
        "steps, after every cloud round (lower is better; not FID).",
        "",
        "| method | mode | client steps | final fd_classifier | vs FedAvg | bytes, all links "
        "| vs FedAvg | bytes, cloud links | vs FedAvg | bytes to reach FedAvg's final fd "
        "| wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        *reused_note(methods, results),
        "",
        "Bytes per link and direction over the whole run (serialised Flower messages, as each "
        "link's server metered them):",
        "",
        "| method | " + " | ".join(ALL_LINKS) + " | total |",
        "|---|" + "---|" * (len(ALL_LINKS) + 1),
        *links,
        "",
        "fd_classifier after each cloud round (cumulative all-link bytes):",
        "",
        "| method | round: fd_classifier (bytes so far) |",
        "|---|---|",
        *curves,
    ])


def write_report(out: Path, results: dict[str, dict[str, Any]]) -> None:
    """``fedphd report`` over the federated runs: loss, quality and bytes plots side by side."""
    runs = [s["run"] for s in results.values()
            if s.get("status") == "ok" and s["mode"] != "centralised"]
    if not runs:
        return
    try:
        _run_logged(fedphd_argv("report", *runs, "--out", str(out / "report")),
                    out / "report.log", 600, "report")
    except (BenchError, subprocess.SubprocessError) as error:
        progress(f"fedphd report failed: {str(error).splitlines()[0]}")


def select_methods(keys: str | None) -> list[Method]:
    if not keys:
        return list(METHODS)
    known = {m.key: m for m in ALL_METHODS}
    unknown = [k for k in keys.split(",") if k not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    return [known[k] for k in keys.split(",")]


def parse_budget(base: Budget, items: list[str]) -> Budget:
    """``--budget key=value`` changes of the budget (e.g. ``local_steps=100``)."""
    types = {f.name: f.type for f in fields(Budget)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--budget {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(types)}")
        changes[key] = float(value) if types[key] in (float, "float") else int(value)
    return replace(base, **changes)


# -------------------------------------------------------------------------------- seeds


def seed_overrides(seed: int) -> list[str]:
    """Training varies with the seed; the split (``partition.seed``) does not."""
    return [f"seed={seed}", f"training.seed={seed}"]


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def overlaps(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    return a is None or b is None or (a["min"] <= b["max"] and b["min"] <= a["max"])


def seed_summary(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and min–max over the seeds that finished (each compared with FedAvg of its own
    seed by :func:`add_comparisons` first)."""
    ok = {seed: s for seed, s in per_seed.items() if s.get("status") == "ok"}
    reach = [s.get("bytes_to_fedavg_final") for s in ok.values() if "fd_vs_fedavg_pct" in s]
    return {
        "seeds_ok": sorted(ok, key=int),
        "seeds_failed": sorted((seed for seed, s in per_seed.items()
                                if s.get("status") not in ("ok", "not run")), key=int),
        "seeds_not_run": sorted((seed for seed, s in per_seed.items()
                                 if s.get("status") == "not run"), key=int),
        "mode": next((s["mode"] for s in ok.values()), None),
        "final_fd": spread([s["final_fd"] for s in ok.values() if s["final_fd"] is not None]),
        "total_bytes": spread([s["total_bytes"] for s in ok.values()]),
        "fd_vs_fedavg_pct": spread([s["fd_vs_fedavg_pct"] for s in ok.values()
                                    if "fd_vs_fedavg_pct" in s]),
        "traffic_vs_fedavg_pct": spread([s["traffic_vs_fedavg_pct"] for s in ok.values()
                                         if "traffic_vs_fedavg_pct" in s]),
        "bytes_to_fedavg_final": spread([r for r in reach if r is not None]),
        "reached_in": f"{sum(r is not None for r in reach)}/{len(reach)}",
    }


def add_seed_summaries(result: dict[str, Any]) -> None:
    """Per seed the comparisons with that seed's FedAvg, then each method's spread."""
    seeds = [str(seed) for seed in result["seeds"]]
    for seed in seeds:
        add_comparisons({key: m["per_seed"][seed] for key, m in result["methods"].items()
                         if seed in m["per_seed"]})
    for entry in result["methods"].values():
        entry["summary"] = seed_summary(entry["per_seed"])


def _range(value: dict[str, float] | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "MB":
        return (f"{value['mean'] / 1e6:,.1f} MB [{value['min'] / 1e6:,.1f}–"
                f"{value['max'] / 1e6:,.1f}]")
    if unit == "%":
        return f"{value['mean']:+.1f} % [{value['min']:+.1f}, {value['max']:+.1f}]"
    return f"{value['mean']:.2f} [{value['min']:.2f}–{value['max']:.2f}]"


def _verdict(summary: dict[str, Any], reference: dict[str, Any] | None, field: str) -> str:
    """Whether the difference from FedAvg is real: the ranges over seeds do not overlap."""
    if reference is None or summary is reference or summary[field] is None:
        return ""
    mine, theirs = summary[field], reference[field]
    if theirs is not None and abs(mine["mean"] - theirs["mean"]) < 0.01 * abs(theirs["mean"]):
        return "none (< 1 %)"  # e.g. byte counts that differ by a few config bytes
    if len(summary["seeds_ok"]) < 2 or len(reference["seeds_ok"]) < 2:
        return "one seed: unknown"
    return "noise (ranges overlap)" if overlaps(mine, theirs) else "**real**"


def render_seeds(result: dict[str, Any], methods: list[Method]) -> str:
    budget, entries = result["budget"], result["methods"]
    reference = entries.get(REFERENCE, {}).get("summary")
    rows = []
    for method in methods:
        summary = entries[method.key]["summary"]
        failed = f" ({len(summary['seeds_failed'])} failed)" if summary["seeds_failed"] else ""
        if summary.get("seeds_not_run"):
            failed += f" ({len(summary['seeds_not_run'])} not run)"
        central = summary["mode"] == "centralised"
        rows.append(
            f"| {method.label} | {len(summary['seeds_ok'])}{failed} "
            f"| {_range(summary['final_fd'])} | {_range(summary['fd_vs_fedavg_pct'], '%')} "
            f"| {_verdict(summary, reference, 'final_fd')} "
            f"| {'no traffic' if central else _range(summary['total_bytes'], 'MB')} "
            f"| {'' if central else _range(summary['traffic_vs_fedavg_pct'], '%')} "
            f"| {'' if central else _verdict(summary, reference, 'total_bytes')} "
            f"| {'' if central else _range(summary['bytes_to_fedavg_final'], 'MB')} "
            f"| {'' if central else summary['reached_in']} |")
    return "\n".join([
        "# Traffic and quality over seeds: digits, tiny U-Net, 2 classes per client, "
        f"{budget['clients']} clients",
        "",
        machine_line(result["machine"]),
        f"command: {result['command']}",
        f"seeds: {', '.join(str(s) for s in result['seeds'])} (seed and training.seed; the "
        "split is partition.seed = 0 for every run). Mean [min–max] over the seeds that "
        "finished; \"vs FedAvg\" compares each seed with FedAvg of the same seed; a "
        "difference is real when the method's range and FedAvg's do not overlap (and the "
        "means differ by 1 % or more).",
        "",
        "| method | seeds | final fd_classifier | vs FedAvg | quality difference "
        "| bytes, all links | vs FedAvg | traffic difference | bytes to reach FedAvg's final "
        "fd | reached in |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


# ------------------------------------------------------------------------------- ablation


def fd_within(summary: dict[str, Any], key: str, limit: float) -> float | None:
    """fd_classifier of the last evaluation whose cumulative ``key`` (``cumulative``: bytes,
    ``cumulative_steps``: client steps) is at most ``limit``; None if even the first exceeds it."""
    found = None
    for round_number, value in summary["points"]:
        used = summary.get(key, {}).get(round_number)
        if used is not None and used <= limit:
            found = value
    return found


def difference(mine: dict[str, float] | None, theirs: dict[str, float] | None,
               seeds: int) -> str:
    """Whether two spreads over seeds differ: real only when their ranges do not overlap."""
    if mine is None or theirs is None:
        return "n/a"
    change = 100 * (mine["mean"] - theirs["mean"]) / theirs["mean"]
    if abs(change) < 1:
        return f"{change:+.1f} %, none"
    if seeds < 2:
        return f"{change:+.1f} %, one seed: unknown"
    verdict = "noise" if overlaps(mine, theirs) else "**real**"
    return f"{change:+.1f} %, {verdict}"


def ablation_summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ablation step over the seeds: its final fd, and flat FedAvg's fd of the same seed
    at the same client steps and at the same bytes (read off FedAvg's per-round curve)."""
    entries, steps = result["methods"], []
    for key in ABLATION_STEPS:
        if key not in entries:
            continue
        finals, at_steps, at_bytes, client_steps, total = [], [], [], [], []
        compared = 0  # seeds with a FedAvg run to compare with
        for seed, run in entries[key]["per_seed"].items():
            fedavg = entries.get(REFERENCE, {}).get("per_seed", {}).get(seed)
            if run.get("status") != "ok" or run["final_fd"] is None:
                continue
            finals.append(run["final_fd"])
            client_steps.append(run["client_steps"])
            total.append(run["total_bytes"])
            if fedavg is not None and fedavg.get("status") == "ok":
                compared += 1
                at_steps.append(fd_within(fedavg, "cumulative_steps", run["client_steps"]))
                at_bytes.append(fd_within(fedavg, "cumulative", run["total_bytes"]))
        at_steps = [v for v in at_steps if v is not None]
        at_bytes = [v for v in at_bytes if v is not None]
        steps.append({"key": key, "seeds": len(finals), "final_fd": spread(finals),
                      "client_steps": spread(client_steps), "total_bytes": spread(total),
                      "fedavg_at_steps": spread(at_steps), "fedavg_at_bytes": spread(at_bytes),
                      "fedavg_at_bytes_seeds": len(at_bytes), "compared": compared})
    return steps


def render_ablation(result: dict[str, Any]) -> str:
    labels = {m.key: ABLATION_LABELS.get(m.key, m.label) for m in ALL_METHODS}
    rows, before = [], None
    for step in ablation_summary(result):
        n = step["seeds"]
        reached, compared = step["fedavg_at_bytes_seeds"], step["compared"]
        at_bytes = ("n/a" if compared == 0
                    else "less than one FedAvg round" if reached == 0
                    else _range(step["fedavg_at_bytes"]) if reached == compared
                    else f"{_range(step['fedavg_at_bytes'])} ({reached}/{compared} seeds)")
        steps = "n/a" if step["client_steps"] is None else f"{step['client_steps']['mean']:,.0f}"
        rows.append(
            f"| {labels[step['key']]} | {n} | {steps} "
            f"| {_range(step['final_fd'])} "
            f"| {difference(step['final_fd'], before, n) if before else ''} "
            f"| {_range(step['total_bytes'], 'MB')} "
            f"| {_range(step['fedavg_at_steps'])} "
            f"| {difference(step['final_fd'], step['fedavg_at_steps'], n)} "
            f"| {at_bytes} | {difference(step['final_fd'], step['fedavg_at_bytes'], n)} |")
        before = step["final_fd"]
    return "\n".join([
        "# FedPhD ablation: each row adds one component to the row above", "",
        machine_line(result["machine"]), f"command: {result['command']}",
        f"seeds: {', '.join(str(s) for s in result['seeds'])}. Mean [min–max] over seeds. "
        "Flat FedAvg at equal client steps / bytes: FedAvg's fd_classifier (same seed) at its "
        "last evaluation that had used no more client steps / all-link bytes than the row's "
        "whole run. A difference is real when the ranges over seeds do not overlap.", "",
        "| step | seeds | client steps | final fd_classifier | vs the row above "
        "| bytes, all links | flat FedAvg, equal client steps | row vs it "
        "| flat FedAvg, equal bytes | row vs it |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def run_seeds(methods: list[Method], seeds: list[int], budget: Budget, out: Path,
              args: argparse.Namespace) -> int:
    """Every method once per seed, results.json rewritten after each run."""
    result: dict[str, Any] = {"machine": machine_info(), "command": command_line(),
                              "budget": asdict(budget), "seeds": seeds,
                              "methods": {m.key: {"per_seed": {}} for m in methods}}
    total, number = len(methods) * len(seeds), 0
    for seed in seeds:
        for method in methods:
            number += 1
            progress(f"[{number}/{total}] {method.label}, seed {seed}")
            result["methods"][method.key]["per_seed"][str(seed)] = run_method(
                method, budget, out / f"seed-{seed}", args.timeout, args.reuse,
                [*args.overrides, *seed_overrides(seed)], reuse_only=args.reuse_only)
            (out / "results.json").write_text(json.dumps(result, indent=2))
    add_seed_summaries(result)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_tables(out, result, methods)
    return 0


def write_tables(out: Path, result: dict[str, Any], methods: list[Method]) -> None:
    """table.md (every method over seeds) and, when ablation steps ran, ablation.md."""
    table = render_seeds(result, methods)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if any(method.key in result["methods"] for method in ABLATION):
        ablation = render_ablation(result)
        (out / "ablation.md").write_text(ablation + "\n")
        print("\n" + ablation)


def render_saved(out: Path, methods: list[Method]) -> int:
    """The table of an earlier invocation, from its results.json (machine and command kept)."""
    result = json.loads((out / "results.json").read_text())
    methods = [m for m in methods if m.key in result["methods"]]
    seeded = "seeds" in result
    summaries = ([s for m in result["methods"].values() for s in m["per_seed"].values()]
                 if seeded else list(result["methods"].values()))
    for summary in summaries:  # JSON made the round numbers strings
        for key in ("cumulative", "cumulative_steps"):
            summary[key] = {int(k): v for k, v in summary.get(key, {}).items()}
    if seeded:
        add_seed_summaries(result)
        write_tables(out, result, methods)
        return 0
    add_comparisons(result["methods"])
    table = render(result, methods)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic_quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke run)")
    parser.add_argument("--methods", help="comma-separated methods (default: the first "
                        f"{len(METHODS)}): " + ", ".join(m.key for m in ALL_METHODS))
    parser.add_argument("--ablation", action="store_true", help="FedPhD's components one at a "
                        "time (" + ", ".join(ABLATION_STEPS) + ") and FedAvg, over --seeds "
                        "(default 0); adds the ablation table")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs of the same method, config and budget")
    parser.add_argument("--reuse-only", action="store_true",
                        help="like --reuse, but run nothing: a method and seed without a "
                        "finished run is reported as not run (to merge parts into one table)")
    parser.add_argument("--out", type=Path, help="result folder "
                        "(default runs/bench/traffic-quality[-quick])")
    parser.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                        help="change the budget: " + ", ".join(f.name for f in fields(Budget)))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="config override for every method, after the bench's (e.g. "
                        "model.preset=ddpm-cifar10)")
    parser.add_argument("--timeout", type=float, default=3600, help="per method, seconds")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite table.md from results.json (no runs)")
    parser.add_argument("--seeds", help="comma-separated training seeds: each method once per "
                        "seed, mean and min–max in the table (the split stays fixed)")
    args = parser.parse_args(argv)
    budget = parse_budget(QUICK if args.quick else FULL, args.budget)
    methods = select_methods(args.methods)
    if args.ablation:
        methods = [m for m in ALL_METHODS if m.key in (REFERENCE, *ABLATION_STEPS)]
        args.seeds = args.seeds or "0"
    name = "traffic-quality-quick" if args.quick else "traffic-quality"
    out = (args.out or REPO / "runs" / "bench" / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render_saved(out, methods)
    if args.seeds:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",")]
        except ValueError:
            raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") \
                from None
        return run_seeds(methods, seeds, budget, out, args)
    result: dict[str, Any] = {"machine": machine_info(), "command": command_line(),
                              "budget": asdict(budget), "methods": {}}
    for number, method in enumerate(methods, start=1):
        progress(f"[{number}/{len(methods)}] {method.label}")
        result["methods"][method.key] = run_method(method, budget, out, args.timeout,
                                                   args.reuse, args.overrides)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    add_comparisons(result["methods"])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_report(out, result["methods"])
    table = render(result, methods)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
