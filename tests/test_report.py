"""``fedphd report`` on run folders fabricated the way ``fedphd launch`` writes them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import tomli_w
from PIL import Image

from fedphd.common.commands.report import register
from fedphd.common.quality.report import ReportError, load_run, write_report

HIER_LINKS = ("cloud->edge", "edge->cloud", "edge->client", "client->edge")
FLAT_LINKS = ("cloud->client", "client->cloud")


def cloud_record(round_: int, loss: float, per_link: dict[str, int],
                 cumulative: dict[str, int]) -> dict:
    return {"tier": "cloud", "round": round_, "loss": loss, "num_examples": 1797,
            "participants": ["edge 1", "edge 0"], "failures": 0, "model_updated": True,
            "seconds": 7.0, "bytes": per_link, "bytes_cumulative": dict(cumulative),
            "strategy": {}}


def fabricate_run(directory: Path, name: str, links: tuple[str, ...], edges: int,
                  evals: list[dict] | None = None, rounds: int = 3) -> dict[str, int]:
    """Write config.toml, metrics.jsonl (cloud, edge and eval lines) and samples.png; return
    the expected byte total per link (the sum of the per-round counts written)."""
    directory.mkdir(parents=True)
    config = {"name": name, "seed": 0, "topology": {"edges": edges, "clients": 4,
                                                    "cloud_rounds": rounds, "edge_rounds": 2}}
    (directory / "config.toml").write_text(tomli_w.dumps(config))
    lines, cumulative = [], dict.fromkeys(links, 0)
    for round_ in range(1, rounds + 1):
        # Distinct, irregular counts so a wrong sum (or a per-round value) cannot match.
        per_link = {link: 8_951_620 + 1_000 * round_ + 17 * i for i, link in enumerate(links)}
        for link, count in per_link.items():
            cumulative[link] += count
        if edges:
            for edge in range(edges):
                lines.append({"tier": "edge", "edge": edge, "cloud_round": round_,
                              "round": 2 * round_, "loss": 0.4, "num_examples": 899,
                              "clients": [], "seconds": 2.4,
                              "bytes": {"edge->client": 5, "client->edge": 5}})
        lines.append(cloud_record(round_, 0.5 / round_, per_link, cumulative))
    lines += evals or []
    lines.append({"tier": "pruning", "round": 0, "ratio": 0.2})  # other tiers are ignored
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    Image.new("RGB", (48, 48), "white").save(directory / "samples.png")
    return cumulative


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 300 and image.size[1] > 200
        image.verify()


def test_report_compares_two_runs_with_plots_and_exact_byte_totals(tmp_path):
    evals = [{"tier": "eval", "round": 2, "fd_classifier": 12.5},
             {"tier": "eval", "round": 3, "fd_classifier": 9.25, "fid": 45.6}]
    hier = fabricate_run(tmp_path / "runs" / "a", "digits-hier", HIER_LINKS, 2, evals)
    flat = fabricate_run(tmp_path / "runs" / "b", "digits-flat", FLAT_LINKS, 0)
    out = tmp_path / "report"

    report = write_report([tmp_path / "runs" / "a", tmp_path / "runs" / "b"], out)

    text = report.read_text()
    assert report == out / "report.md"
    assert "digits-hier" in text and "digits-flat" in text
    assert "## Comparison" in text
    for totals in (hier, flat):
        for link, count in totals.items():
            assert f"| {link} | {count:,} B" in text
        assert f"{sum(totals.values()):,}" in text
    cloud_link = hier["cloud->edge"] + hier["edge->cloud"]
    assert f"| {cloud_link:,} |" in text  # the comparison's cloud-link column
    assert "9.25 (round 3)" in text and "45.6 (round 3)" in text
    assert "hierarchical, 2 edges" in text and "| flat |" in text
    for plot in ("loss.png", "bytes.png", "quality.png"):
        assert_png(out / plot)
        assert f"]({plot})" in text
    assert "](../runs/a/samples.png)" in text and "](../runs/b/samples.png)" in text


def test_without_eval_lines_there_is_no_quality_plot_and_names_fall_back_to_folders(tmp_path):
    fabricate_run(tmp_path / "run-x", "same", FLAT_LINKS, 0)
    fabricate_run(tmp_path / "run-y", "same", FLAT_LINKS, 0)
    (tmp_path / "run-y" / "config.toml").unlink()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "quality.png").write_bytes(b"stale")

    text = write_report([tmp_path / "run-x", tmp_path / "run-y"], out).read_text()

    assert not (out / "quality.png").exists()
    assert "## same" in text and "## run-y" in text  # run-y has no config.toml: folder name
    assert load_run(tmp_path / "run-y").mode == "flat"  # inferred from its link names


def test_malformed_line_is_an_error_naming_the_file_and_line(tmp_path):
    fabricate_run(tmp_path / "run", "r", FLAT_LINKS, 0)
    metrics = tmp_path / "run" / "metrics.jsonl"
    good = metrics.read_text().splitlines()
    metrics.write_text("\n".join([good[0], '{"tier": "cloud", "round": 2, "loss": 0.3', *good[1:]]))
    with pytest.raises(ReportError, match=r"metrics\.jsonl, line 2: malformed JSON"):
        write_report([tmp_path / "run"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is written for a bad input

    metrics.write_text('{"tier": "cloud", "round": 1, "bytes": {"cloud->client": "many"}}\n')
    with pytest.raises(ReportError, match=str(metrics)):
        load_run(tmp_path / "run")


def test_command_reports_a_missing_metrics_file_by_name(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert args.run(args) == 2
    assert str(tmp_path / "empty" / "metrics.jsonl") in capsys.readouterr().err

    fabricate_run(tmp_path / "ok", "ok-run", FLAT_LINKS, 0)
    args = parser.parse_args(["report", str(tmp_path / "ok"), "--out", str(tmp_path / "r")])
    assert args.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")


def test_runs_scored_per_client_report_the_clients_mean(tmp_path):
    """FedDiffuse UDEC/ULATDEC runs have only ``client-eval`` lines (no global model)."""
    evals = [{"tier": "client-eval", "round": 3, "fd_classifier": 41.5,
              "per_client": {"client 0": {"fd_classifier": 40.0},
                             "client 1": {"fd_classifier": 43.0}}}]
    fabricate_run(tmp_path / "udec", "udec", FLAT_LINKS, 0, evals)
    run = load_run(tmp_path / "udec")
    assert [record["fd_classifier"] for record in run.evals] == [41.5]
    bad = [{**evals[0], "fd_classifier": "good"}]
    fabricate_run(tmp_path / "bad", "bad", FLAT_LINKS, 0, bad)
    with pytest.raises(ReportError, match="fd_classifier"):
        load_run(tmp_path / "bad")
