"""The GPU check (bench/gpu_check.py) runs on a CPU in --quick mode and writes every field the
GPU run reports; no timing is asserted. The GPU run itself is never a test's business."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
VARIANTS = ("unpruned", "pruned")


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m bench.gpu_check ARGS``; on a timeout every process it started goes too
    (its transport round starts a launcher and the cloud, edge and client)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_check", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The launcher starts each role in a session of its own: collect the whole tree of
        # this check's processes first, then stop every one of them.
        tree = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"bench.gpu_check {' '.join(args)} took over {timeout} s\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    # The bound only stops a hung run: ~1 min on an idle 2-core machine.
    result = run_check("--device", "cpu", "--quick", "--out", str(out), timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


def test_quick_check_reports_every_step_figure(quick_result):
    data = quick_result
    assert data["complete"] is True and "errors" not in data
    assert data["device"] == "cpu" and isinstance(data["device_name"], str)
    assert data["device_name"]
    assert data["torch"] == __import__("torch").__version__
    assert data["preset"] == "tiny" and data["batch_size"] == 2
    for precision in PRECISIONS:
        for variant in VARIANTS:
            step = data["steps"][precision][variant]
            assert positive(step["step_seconds"]), (precision, variant, step)
            assert len(step["step_seconds_all"]) == data["timed_steps"] == 1
            # images/s is the batch over the step time, not a separate guess
            assert math.isclose(step["images_per_second"],
                                data["batch_size"] / step["step_seconds"])
            assert step["peak_memory_bytes"] is None  # CPU: no GPU memory to report
            assert math.isfinite(step["loss"])
        assert positive(data["steps"][precision]["pruned_speedup"])
    assert all(positive(data["bf16_speedup"][v]) for v in VARIANTS)
    # The pruned variant really is the product's 0.2 pruning of the same U-Net.
    assert data["pruning"]["ratio"] == 0.2
    assert data["parameters"]["pruned"] < data["parameters"]["unpruned"]
    assert data["parameters"]["unpruned"] == data["pruning"]["params_before"]


def test_quick_check_reports_one_transport_round(quick_result):
    transport = quick_result["transport"]
    assert transport["preset"] == "tiny"
    assert positive(transport["round_seconds"]) and positive(transport["bare_round_seconds"])
    assert math.isclose(transport["ratio"],
                        transport["round_seconds"] / transport["bare_round_seconds"])
    assert transport["rounds_measured"] == [2]  # round 1 connects and builds: not measured
    # the tiny U-Net's fp32 weights crossed each of the four links
    assert set(transport["bytes"]) == {"cloud->edge", "edge->client", "client->edge",
                                       "edge->cloud"}
    assert all(count > 4_000_000 for count in transport["bytes"].values())


def test_bad_flag_is_one_clear_line(tmp_path):
    result = run_check("--device", "cpu", "--quick", "--rounds", "1",
                       "--out", str(tmp_path / "x.json"), timeout=300)
    assert result.returncode == 2
    assert "--rounds must be at least 2, got 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.json").exists()
