"""The benchmarks run on tiny sizes and print what outside checks read; no timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.traffic_quality import QUICK, Method, add_comparisons, render, run_method

REPO = Path(__file__).resolve().parents[1]
RATIO_LINE = re.compile(r"^ratio: (\d+(\.\d+)?([eE][-+]?\d+)?)$")


def bench(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args], capture_output=True, text=True,
        cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def ratio_of(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    match = RATIO_LINE.match(last)
    assert match, f"last line is not 'ratio: <float>': {last!r}"
    return float(match.group(1))


@pytest.mark.slow
def test_transport_quick_ends_with_a_ratio(tmp_path):
    result = bench("transport", "--quick", "--rounds", "2", "--repeats", "2",
                   "--out", str(tmp_path))
    assert ratio_of(result.stdout) > 0
    saved = json.loads((tmp_path / "transport.json").read_text())
    assert saved["project"]["rounds_measured"] == [2]
    # The bare reference carried exactly the bytes the project metered on each link.
    assert all(count > 4_000_000 for count in saved["project"]["bytes"].values())


@pytest.mark.slow
def test_training_overhead_quick_ends_with_a_ratio(tmp_path):
    result = bench("training_overhead", "--quick", "--steps", "2", "--warmup", "1",
                   "--repeats", "1", "--out", str(tmp_path))
    assert ratio_of(result.stdout) > 0
    saved = json.loads((tmp_path / "training_overhead.json").read_text())
    assert saved["pruning"]["params_after"] < saved["pruning"]["params_before"]


@pytest.mark.slow
def test_training_overhead_without_the_bare_loop_reports_pruning_speedup(tmp_path):
    """The form the ddpm-cifar10 preset runs in (tiny here): pruned vs unpruned only."""
    result = bench("training_overhead", "--preset", "tiny", "--no-bare", "--steps", "1",
                   "--warmup", "1", "--repeats", "1", "--out", str(tmp_path))
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"pruned_speedup: \d+\.\d{4}", last), last
    assert "bare PyTorch loop" not in result.stdout and "images/s" in result.stdout
    saved = json.loads((tmp_path / "training_overhead.json").read_text())
    assert "bare" not in saved["seconds"] and saved["preset"] == "tiny"
    assert saved["pruned_speedup"] > 0


@pytest.mark.slow
def test_scale_quick_writes_its_table(tmp_path):
    bench("scale", "--quick", "--rounds", "2", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "scale.json").read_text())
    (size,) = saved["sizes"]
    assert size["clients"] == 6 and size["edge_clients_answered"] == 6
    assert size["edge_peak_rss"] > 0
    assert "| 6 | 2 | 6 |" in (tmp_path / "scale.md").read_text()


@pytest.mark.slow
def test_traffic_quality_quick_writes_its_table(tmp_path):
    bench("traffic_quality", "--quick", "--methods", "fedavg", "--out", str(tmp_path))
    table = (tmp_path / "table.md").read_text()
    assert "| FedAvg (fp32) | flat |" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["fedavg"]["status"] == "ok"
    assert saved["methods"]["fedavg"]["total_bytes"] > 0


def test_a_method_without_its_config_is_reported_missing(tmp_path):
    method = Method("nowhere", "Nowhere", "configs/does-not-exist.toml", "flat")
    summary = run_method(method, QUICK, tmp_path, timeout=10, reuse=False)
    assert summary["status"] == "missing"
    result = {"machine": {"cpu": "x", "cores": 1, "memory_gib": 1, "date": "d", "python": "3",
                          "torch": "t"},
              "command": "c", "budget": QUICK.__dict__, "methods": {"nowhere": summary}}
    assert "| Nowhere | missing: configs/does-not-exist.toml not found" in render(result,
                                                                                 [method])


def test_bytes_to_reach_fedavg_final_quality():
    def run(points, cumulative, total):
        return {"status": "ok", "mode": "flat", "points": points, "final_fd": points[-1][1],
                "cumulative": cumulative, "total_bytes": total, "cloud_bytes": total}

    results = {
        "fedavg": run([(1, 50.0), (2, 30.0)], {1: 100, 2: 200}, 200),
        "better": run([(1, 40.0), (2, 25.0)], {1: 10, 2: 20}, 20),
        "worse": run([(1, 60.0), (2, 45.0)], {1: 10, 2: 20}, 20),
    }
    add_comparisons(results)
    assert results["fedavg"]["bytes_to_fedavg_final"] == 200
    assert results["better"]["bytes_to_fedavg_final"] == 20
    assert results["better"]["traffic_vs_fedavg_pct"] == pytest.approx(-90.0)
    assert results["better"]["cloud_traffic_vs_fedavg_pct"] == pytest.approx(-90.0)
    assert results["better"]["fd_vs_fedavg_pct"] == pytest.approx(100 * (25 - 30) / 30)
    assert results["worse"]["bytes_to_fedavg_final"] is None


def test_seeds_give_mean_and_range_and_call_a_difference_real_only_without_overlap():
    from bench.traffic_quality import METHODS, add_seed_summaries, render_seeds

    def run(final, total):
        return {"status": "ok", "mode": "flat", "points": [(1, final + 5), (2, final)],
                "final_fd": final, "cumulative": {1: total // 2, 2: total},
                "total_bytes": total, "cloud_bytes": total}

    result = {"machine": {"cpu": "x", "cores": 1, "memory_gib": 1, "date": "d",
                          "python": "3", "torch": "t"},
              "command": "c", "budget": QUICK.__dict__, "seeds": [0, 1, 2],
              "methods": {
                  "fedavg": {"per_seed": {"0": run(30, 1000), "1": run(32, 1000),
                                          "2": run(34, 1000)}},
                  # Better in every seed, but its range meets FedAvg's: noise.
                  "fedprox": {"per_seed": {"0": run(29, 1000), "1": run(31, 1000),
                                           "2": run(33, 1000)}},
                  # Far apart in quality and traffic: real; one seed failed.
                  "fedphd": {"per_seed": {"0": run(20, 100), "1": run(22, 120),
                                          "2": {"status": "failed", "reason": "boom"}}},
              }}
    add_seed_summaries(result)
    fedphd = result["methods"]["fedphd"]["summary"]
    assert fedphd["final_fd"] == {"mean": 21.0, "min": 20.0, "max": 22.0}
    assert fedphd["seeds_ok"] == ["0", "1"] and fedphd["seeds_failed"] == ["2"]
    # Each seed against FedAvg of the same seed: -33.3 % and -31.25 %.
    assert fedphd["fd_vs_fedavg_pct"]["min"] == pytest.approx(100 * (20 - 30) / 30)
    assert fedphd["fd_vs_fedavg_pct"]["max"] == pytest.approx(100 * (22 - 32) / 32)
    # Already at round 1 (fd 25 and 27 <= 30 and 32): half of each run's bytes.
    assert fedphd["bytes_to_fedavg_final"] == {"mean": 55.0, "min": 50, "max": 60}
    methods = [m for m in METHODS if m.key in ("fedavg", "fedprox", "fedphd")]
    table = render_seeds(result, methods)
    prox = next(line for line in table.splitlines() if line.startswith("| FedProx |"))
    phd = next(line for line in table.splitlines() if line.startswith("| FedPhD ("))
    assert "noise (ranges overlap)" in prox and "**real**" not in prox
    assert phd.count("**real**") == 2 and "2 (1 failed)" in phd
    assert "31.00 [29.00–33.00]" in prox


def test_the_ablation_compares_each_step_with_the_one_before_and_fedavg_at_equal_budgets():
    from bench.traffic_quality import ablation_summary, fd_within, render_ablation

    def run(points, bytes_per_round, steps_per_round):
        rounds = range(1, len(points) + 1)
        return {"status": "ok", "mode": "flat", "points": list(zip(rounds, points, strict=True)),
                "final_fd": points[-1], "client_steps": steps_per_round * len(points),
                "total_bytes": bytes_per_round * len(points),
                "cumulative": {r: bytes_per_round * r for r in rounds},
                "cumulative_steps": {r: steps_per_round * r for r in rounds}}

    fedavg = {s: run([90.0 + s, 60.0 + s, 40.0 + s, 30.0 + s], 100, 10) for s in range(3)}
    # FedAvg's curve read at 25 steps: round 2 (20 steps); at 150 bytes: round 1 (100 bytes).
    assert fd_within(fedavg[0], "cumulative_steps", 25) == 60.0
    assert fd_within(fedavg[0], "cumulative", 150) == 90.0
    assert fd_within(fedavg[0], "cumulative", 50) is None
    steps = {
        "hier-fedavg": {s: run([50.0 + s, 35.0 + s], 200, 20) for s in range(3)},
        # Barely better than the step before: ranges overlap.
        "hier-sh": {s: run([50.0 + s, 34.5 + s], 200, 20) for s in range(3)},
        # Far fewer bytes: FedAvg could not finish one round with them.
        "fedphd-q8": {s: run([40.0 + s, 20.0 + s], 20, 20) for s in range(3)},
    }
    result = {"machine": {"cpu": "x", "cores": 1, "memory_gib": 1, "date": "d", "python": "3",
                          "torch": "t"}, "command": "c", "seeds": [0, 1, 2],
              "methods": {key: {"per_seed": {str(s): r for s, r in runs.items()}}
                          for key, runs in {"fedavg": fedavg, **steps}.items()}}
    summary = {step["key"]: step for step in ablation_summary(result)}
    assert list(summary) == ["hier-fedavg", "hier-sh", "fedphd-q8"]
    # 40 client steps: FedAvg's round 4 (40 steps); 400 bytes: its round 4 as well.
    assert summary["hier-fedavg"]["fedavg_at_steps"] == {"mean": 31.0, "min": 30.0, "max": 32.0}
    assert summary["hier-fedavg"]["fedavg_at_bytes"]["mean"] == 31.0
    assert summary["fedphd-q8"]["fedavg_at_bytes_seeds"] == 0
    table = render_ablation(result).splitlines()
    sh = next(line for line in table if line.startswith("| + SH-weighted"))
    q8 = next(line for line in table if line.startswith("| + 8-bit"))
    assert "noise" in sh.split("|")[5]  # vs the row above
    assert "**real**" in q8.split("|")[5] and "less than one FedAvg round" in q8


def test_each_ablation_step_is_a_valid_config_that_adds_one_component(tmp_path):
    from bench.traffic_quality import ABLATION_STEPS, ALL_METHODS, FULL, LEAN, method_config
    from fedphd.common.settings.config import load_config

    known = {m.key: m for m in ALL_METHODS}
    cfgs = {key: load_config(method_config(known[key], FULL, tmp_path / key, []))
            for key in ABLATION_STEPS}
    alone, sh, select, pruned, q8 = (cfgs[k] for k in ABLATION_STEPS)
    assert alone.topology.cloud_strategy == "flwr.server.strategy.FedAvg"
    assert sh.topology.cloud_strategy == "fedphd.server.fedphd.FedPhD"
    assert sh.topology.cloud_strategy_args["selection"] == "static"
    assert select.topology.cloud_strategy_args["selection"] == "fedphd"
    assert not (alone.pruning.enabled or sh.pruning.enabled or select.pruning.enabled)
    assert pruned.pruning.enabled and (pruned.codec.downlink, pruned.codec.uplink) == (
        "fp32", "fp32")
    assert q8.pruning.enabled and (q8.codec.downlink, q8.codec.uplink) == ("q8", "q8")
    # Every step: the same split, edges, rounds and local steps.
    assert len({(c.topology.edges, c.topology.cloud_rounds, c.topology.edge_rounds,
                 c.training.local_steps, c.partition.classes_per_client)
                for c in cfgs.values()}) == 1
    # The lean config keeps its own edge rounds and local steps.
    lean = load_config(method_config(LEAN, FULL, tmp_path / "lean", []))
    shipped = load_config(REPO / LEAN.config)
    assert (lean.topology.edge_rounds, lean.training.local_steps) == (
        shipped.topology.edge_rounds, shipped.training.local_steps)
    assert lean.topology.cloud_rounds == FULL.hier_rounds


def test_a_finished_run_is_recognised_from_its_stamp(tmp_path):
    from dataclasses import asdict

    from bench.traffic_quality import METHODS, finished

    fingerprint = {"method": asdict(METHODS[5]), "budget": QUICK.__dict__, "config_text": "x"}
    assert METHODS[5].extra  # a tuple, written to the stamp as a JSON list
    assert not finished(tmp_path, fingerprint)
    (tmp_path / "bench-done.json").write_text(json.dumps(fingerprint))
    assert finished(tmp_path, fingerprint)
    assert not finished(tmp_path, {**fingerprint, "config_text": "y"})


def test_reuse_only_runs_nothing_and_says_so(tmp_path):
    from bench.traffic_quality import METHODS

    summary = run_method(METHODS[0], QUICK, tmp_path, timeout=10, reuse=True, reuse_only=True)
    assert summary["status"] == "not run"
    assert not (tmp_path / METHODS[0].key / "metrics.jsonl").exists()
