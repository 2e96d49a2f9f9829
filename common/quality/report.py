"""``fedphd report``: a Markdown report with PNG plots for one or more finished runs.

Reads what ``fedphd launch --out DIR`` leaves in each run folder: ``metrics.jsonl`` (required;
one JSON object per line with a ``tier`` of ``cloud``, ``edge``, ``eval``, ...),
``config.toml`` (name and topology; optional), ``summary.json`` (optional), and links to
``samples.png`` and ``model/``. Writes ``report.md``, ``loss.png``, ``bytes.png`` and, when
any run has ``eval`` lines, ``quality.png`` into ``--out``; several runs share each plot's
axes, labelled by run name.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRICS_FILE = "metrics.jsonl"
# Hierarchical links first, then flat mode's, in the order a message travels.
LINK_ORDER = ("cloud->edge", "edge->cloud", "edge->client", "client->edge",
              "cloud->client", "client->cloud")
QUALITY_METRICS = ("fd_classifier", "fid")
MEGABYTE = 1e6


class ReportError(ValueError):
    """A run folder cannot be reported on; the message names the file and the problem."""


# ------------------------------------------------------------------------------ reading


def _check_record(record: Any, path: Path, number: int) -> dict[str, Any]:
    """Refuse what a plot or a total would otherwise silently misread."""
    where = f"{path}, line {number}"
    if not isinstance(record, dict) or not isinstance(record.get("tier"), str):
        raise ReportError(f"{where}: expected a JSON object with a \"tier\" key")
    tier = record["tier"]
    if tier in ("cloud", "edge", "eval", "client-eval") and not isinstance(
        record.get("round"), int
    ):
        raise ReportError(f"{where}: {tier} record has no integer \"round\"")
    if tier == "cloud":
        links = record.get("bytes", {})
        if not isinstance(links, dict) or not all(
            isinstance(count, int) and count >= 0 for count in links.values()
        ):
            raise ReportError(f"{where}: \"bytes\" must map links to byte counts")
        if record.get("loss") is not None and not isinstance(record["loss"], int | float):
            raise ReportError(f"{where}: \"loss\" must be a number or null")
    if tier in ("eval", "client-eval"):
        for metric in QUALITY_METRICS:
            value = record.get(metric)
            if value is not None and not isinstance(value, int | float):
                raise ReportError(f"{where}: \"{metric}\" must be a number or null")
    return record


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped)."""
    if not path.is_file():
        raise ReportError(
            f"{path} not found: is {path.parent} a run folder written by `fedphd launch --out`?"
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(
                f"{path}, line {number}: malformed JSON ({error.msg}, column {error.colno})"
            ) from None
        records.append(_check_record(record, path, number))
    return records


def _read_optional(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is malformed: {error}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is malformed: expected a table/object at the top level")
    return data


# ---------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run folder, read and checked."""

    directory: Path
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    cloud: list[dict[str, Any]]
    edge: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    label: str = field(default="")

    @property
    def links(self) -> list[str]:
        seen = {link for record in self.cloud for link in record.get("bytes", {})}
        return order_links(seen)

    @property
    def mode(self) -> str:
        topology = self.config.get("topology", {})
        if "edges" in topology:
            return "flat" if topology["edges"] == 0 else "hierarchical"
        # No config.toml: flat mode is the one whose clients talk to the cloud directly.
        return "flat" if any("client" in link and "cloud" in link for link in self.links) \
            else "hierarchical"

    @property
    def rounds(self) -> list[int]:
        return [record["round"] for record in self.cloud]

    @property
    def losses(self) -> list[float]:
        return [math.nan if r.get("loss") is None else float(r["loss"]) for r in self.cloud]

    def final_loss(self) -> tuple[int, float] | None:
        """The last cloud round that reported a loss, and that loss."""
        done = [(r["round"], float(r["loss"])) for r in self.cloud if r.get("loss") is not None]
        return done[-1] if done else None

    def quality(self, metric: str) -> tuple[list[int], list[float]]:
        points = [(r["round"], float(r[metric])) for r in self.evals if r.get(metric) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    def final_quality(self, metric: str) -> tuple[int, float] | None:
        rounds, values = self.quality(metric)
        return (rounds[-1], values[-1]) if rounds else None

    def byte_totals(self) -> dict[str, int]:
        """Bytes per link summed over every cloud round (each round's ``bytes``)."""
        return {link: sum(r.get("bytes", {}).get(link, 0) for r in self.cloud)
                for link in self.links}

    def cumulative_bytes(self, link: str) -> np.ndarray:
        return np.cumsum([r.get("bytes", {}).get(link, 0) for r in self.cloud], dtype=np.int64)

    def round_seconds(self) -> float:
        return float(sum(r.get("seconds", 0.0) or 0.0 for r in self.cloud))


def order_links(links: set[str] | list[str]) -> list[str]:
    known = [link for link in LINK_ORDER if link in links]
    return known + sorted(set(links) - set(LINK_ORDER))


def is_cloud_link(link: str) -> bool:
    return "cloud" in link.split("->")


def load_run(directory: str | Path) -> Run:
    """Read a run folder; ``ReportError`` names the file when something is missing or wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory}: no such run folder")
    records = read_metrics(directory / METRICS_FILE)
    config = _read_optional(directory / "config.toml", tomllib.loads)
    summary = _read_optional(directory / "summary.json", json.loads)
    name = str(config.get("name") or summary.get("name") or directory.resolve().name)
    def tier(wanted: str) -> list[dict[str, Any]]:
        return [record for record in records if record["tier"] == wanted]

    # Methods whose clients keep private parts are scored per client (their mean).
    evals = tier("eval") or tier("client-eval")
    return Run(directory, name, config, summary, tier("cloud"), tier("edge"), evals)


def label_runs(runs: list[Run]) -> None:
    """Give every run a distinct plot/table label: its name, plus its folder if names clash."""
    for run in runs:
        run.label = run.name
    for labeller in (lambda r: f"{r.name} ({r.directory.name})", lambda r: str(r.directory)):
        clashing = {r.label for r in runs if sum(o.label == r.label for o in runs) > 1}
        for run in runs:
            if run.label in clashing:
                run.label = labeller(run)


# ---------------------------------------------------------------------------------- plots


def _new_axes(count: int, width: float = 5.0, height: float = 3.6):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def _finish_axes(axes, title: str, ylabel: str) -> None:
    axes.set_title(title)
    axes.set_xlabel("cloud round")
    axes.set_ylabel(ylabel)
    low, high = axes.get_xlim()
    if high - low < 2:
        # MaxNLocator keeps to integers only when the view holds enough of them (one point).
        middle = (low + high) / 2
        axes.set_xlim(middle - 1, middle + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def plot_loss(runs: list[Run], path: Path) -> Path:
    """Training loss (the clients' mean ε-prediction MSE) per cloud round, one line per run."""
    figure, (axes,) = _new_axes(1, width=6.5, height=4.0)
    for run in runs:
        axes.plot(run.rounds, run.losses, marker="o", label=run.label)
    _finish_axes(axes, "training loss", "loss (ε-MSE)")
    figure.savefig(path, dpi=110)
    return path


def plot_quality(runs: list[Run], path: Path) -> Path | None:
    """fd_classifier and FID per evaluated cloud round; ``None`` when no run has either."""
    metrics = [m for m in QUALITY_METRICS if any(run.quality(m)[0] for run in runs)]
    if not metrics:
        path.unlink(missing_ok=True)  # a plot left by an earlier report would be stale
        return None
    figure, axes_list = _new_axes(len(metrics))
    for axes, metric in zip(axes_list, metrics, strict=True):
        for run in runs:
            rounds, values = run.quality(metric)
            if rounds:
                axes.plot(rounds, values, marker="o", label=run.label)
        _finish_axes(axes, metric, f"{metric} (lower is better)")
    figure.savefig(path, dpi=110)
    return path


def plot_bytes(runs: list[Run], path: Path) -> Path:
    """Cumulative megabytes per link (one panel each, plus all links), one line per run."""
    links = order_links({link for run in runs for link in run.links})
    panels = [*links, "all links"]
    figure, axes_list = _new_axes(len(panels))
    for axes, panel in zip(axes_list, panels, strict=True):
        for run in runs:
            shown = run.links if panel == "all links" else [panel]
            if not set(shown) & set(run.links) or not run.cloud:
                continue
            total = sum(run.cumulative_bytes(link) for link in shown if link in run.links)
            axes.plot(run.rounds, np.asarray(total) / MEGABYTE, marker="o", label=run.label)
        _finish_axes(axes, panel, "cumulative MB")
    figure.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------- markdown


def _bytes(count: int) -> str:
    return f"{count:,} B ({count / MEGABYTE:.1f} MB)"


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _at_round(point: tuple[int, float] | None) -> str:
    return "n/a" if point is None else f"{_number(point[1])} (round {point[0]})"


def _link(target: Path, out: Path) -> str:
    relative = os.path.relpath(target.resolve(), out.resolve()).replace(os.sep, "/")
    return f"<{relative}>" if any(c.isspace() for c in relative) else relative


def _topology_line(run: Run) -> str:
    topology = run.config.get("topology", {})
    parts = [run.mode]
    if run.mode == "hierarchical" and "edges" in topology:
        parts.append(f"{topology['edges']} edges")
    if "clients" in topology:
        parts.append(f"{topology['clients']} clients")
    if run.mode == "hierarchical" and "edge_rounds" in topology:
        parts.append(f"{topology['edge_rounds']} edge rounds per cloud round")
    return ", ".join(parts)


def comparison_table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | mode | cloud rounds | final loss | fd_classifier | FID "
        "| cloud-link bytes | all-link bytes | time in rounds (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        totals = run.byte_totals()
        cloud_link = sum(count for link, count in totals.items() if is_cloud_link(link))
        final = run.final_loss()
        lines.append(
            f"| {run.label} | {run.mode} | {len(run.cloud)} "
            f"| {_number(final[1] if final else None)} "
            f"| {_at_round(run.final_quality('fd_classifier'))} "
            f"| {_at_round(run.final_quality('fid'))} "
            f"| {cloud_link:,} | {sum(totals.values()):,} | {run.round_seconds():.1f} |"
        )
    return [*lines, ""]


def run_section(run: Run, out: Path) -> list[str]:
    final = run.final_loss()
    lines = [
        f"## {run.label}",
        "",
        f"- folder: `{run.directory}`",
        f"- mode: {_topology_line(run)}",
        f"- cloud rounds: {len(run.cloud)} (edge-round records: {len(run.edge)})",
        f"- final loss: {_at_round(final)}",
        f"- final fd_classifier: {_at_round(run.final_quality('fd_classifier'))}; "
        f"final FID: {_at_round(run.final_quality('fid'))}",
        f"- time in cloud rounds: {run.round_seconds():.1f} s",
    ]
    if "wall_seconds" in run.summary:
        lines.append(f"- wall time: {float(run.summary['wall_seconds']):.1f} s")
    if (run.directory / "model").is_dir():
        lines.append(f"- model: [{run.directory / 'model'}]({_link(run.directory / 'model', out)})")
    totals = run.byte_totals()
    lines += ["", "| link | bytes |", "|---|---|"]
    lines += [f"| {link} | {_bytes(count)} |" for link, count in totals.items()]
    lines += [f"| all links | {_bytes(sum(totals.values()))} |", ""]
    samples = run.directory / "samples.png"
    if samples.is_file():
        lines += [f"Samples ({samples}):", "", f"![samples of {run.label}]({_link(samples, out)})",
                  ""]
    return lines


def render_markdown(runs: list[Run], out: Path, plots: dict[str, Path | None]) -> str:
    lines = [
        "# FedPhD run report",
        "",
        f"{len(runs)} run(s), read from each folder's `{METRICS_FILE}`. Bytes are serialised "
        "message sizes per link and direction, summed over cloud rounds; fd_classifier is a "
        "Fréchet distance in a small digit/image classifier's feature space (not FID).",
        "",
    ]
    if len(runs) > 1:
        lines += ["## Comparison", "", *comparison_table(runs)]
    lines += ["## Plots", ""]
    for title, path in plots.items():
        if path is not None:
            lines += [f"![{title}]({_link(path, out)})", ""]
    for run in runs:
        lines += run_section(run, out)
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Read every run (all checked before anything is written), then write the plots and
    ``report.md`` into ``out``; returns the path of ``report.md``."""
    if not run_dirs:
        raise ReportError("no run folders given")
    runs = [load_run(directory) for directory in run_dirs]
    label_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "training loss per cloud round": plot_loss(runs, out / "loss.png"),
        "sample quality per cloud round": plot_quality(runs, out / "quality.png"),
        "cumulative bytes per link": plot_bytes(runs, out / "bytes.png"),
    }
    report = out / "report.md"
    report.write_text(render_markdown(runs, out, plots), encoding="utf-8")
    return report
