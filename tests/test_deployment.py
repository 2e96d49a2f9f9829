"""The deployment for real: cloud, edges and clients as separate processes over gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import UNet2DModel

from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
from fedphd.common.settings.config import load_config
from tests.conftest import TESTS_DIR, fedphd, port_overrides

pytestmark = pytest.mark.slow

# Small but real: 16x16 U-Net, a few local steps, short sampling.
FAST = ["--set", "training.local_steps=3", "--set", "diffusion.sampling_steps=2",
        "--set", "output.grid_samples=4", "--set", "topology.connect_timeout=120",
        "--set", "evaluation.final=false"]
EVALUATE = ["--set", "evaluation.final=true", "--set", "evaluation.num_samples=8",
            "--set", "evaluation.sampling_steps=2"]


def launch(out: Path, ports, *overrides: str, env=None):
    result = fedphd("launch", "--out", str(out), "--timeout", "400", *FAST,
                    *port_overrides(ports), *overrides, env=env, timeout=500)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted((out / "logs").glob("*.log")))
    assert result.returncode == 0, result.stderr[-3000:] + logs
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_model_trained(out: Path, overrides: list[str]) -> None:
    """The saved global model loads in diffusers and differs from the initial weights."""
    cfg = load_config(out / "config.toml")
    trained = model_to_ndarrays(UNet2DModel.from_pretrained(out / "model", subfolder="unet"))
    initial = model_to_ndarrays(build_unet(unet_config(cfg.model), seed=cfg.seed))
    changed = [not np.array_equal(a, b) for a, b in zip(trained, initial, strict=True)]
    assert sum(changed) > 0.9 * len(changed)
    assert (out / "samples.png").stat().st_size > 0


def test_hierarchical_run_two_edges_four_clients(tmp_path, ports):
    out = tmp_path / "run"
    records = launch(out, ports, "--set", "topology.edges=2", "--set", "topology.clients=4",
                     "--set", "topology.cloud_rounds=2", "--set", "topology.edge_rounds=2",
                     *EVALUATE)
    assert_model_trained(out, [])
    cloud = [r for r in records if r["tier"] == "cloud"]
    edge = [r for r in records if r["tier"] == "edge"]
    assert [r["round"] for r in cloud] == [1, 2]
    assert all(r["model_updated"] and r["participants"] for r in cloud)
    for edge_id in (0, 1):
        mine = [r for r in edge if r["edge"] == edge_id]
        assert [r["round"] for r in mine] == [1, 2, 3, 4]
        assert [r["cloud_round"] for r in mine] == [1, 1, 2, 2]
        # Round-robin assignment: edge e serves clients e and e + 2.
        assert all(sorted(r["clients"]) == [f"client {edge_id}", f"client {edge_id + 2}"]
                   for r in mine)
    # Metered bytes equal what the other end measured of the same messages.
    for r in edge:
        # Every client rebuilt exactly the model the edge sent (digest of its loaded state).
        assert r["digests_checked"] == 2 and r["digest_mismatches"] == []
        assert r["bytes"]["edge->client"] == r["reported_by_clients"]["received"]
        up, payload = r["bytes"]["client->edge"], r["reported_by_clients"]["payload"]
        assert payload <= up <= payload + 4096
    for r in cloud:
        assert r["bytes"]["cloud->edge"] == r["reported_by_peers"]["received"]
        up, payload = r["bytes"]["edge->cloud"], r["reported_by_peers"]["payload"]
        assert payload <= up <= payload + 8192
        # The cloud's per-link totals are the sums of its edges' rounds.
        mine = [e for e in edge if e["cloud_round"] == r["round"]]
        assert r["bytes"]["edge->client"] == sum(e["bytes"]["edge->client"] for e in mine)
    # A 1.1 M-parameter fp32 model is ~4.45 MB per message: 2 clients per edge round.
    model_bytes = 4 * 1_112_801
    assert 2 * model_bytes < edge[0]["bytes"]["edge->client"] < 2 * model_bytes * 1.01
    totals = cloud[-1]["bytes_cumulative"]
    assert totals["cloud->edge"] == sum(r["bytes"]["cloud->edge"] for r in cloud)
    assert (out / "summary.md").read_text().startswith("# Run")
    assert json.loads((out / "summary.json").read_text())["wall_seconds"] > 0

    # The cloud evaluated the final model; FID needs Inception weights this machine lacks.
    (evaluation,) = [r for r in records if r["tier"] == "eval"]
    assert evaluation["round"] == 2 and evaluation["num_samples"] == 8
    assert np.isfinite(evaluation["fd_classifier"]) and "fid_unavailable" in evaluation

    # `fedphd evaluate --json` and `fedphd report` work on the real run folder.
    result = fedphd("evaluate", "--model", str(out / "model"), "--json", "--n", "8",
                    "--steps", "2", timeout=300)
    assert result.returncode == 0, result.stderr
    assert np.isfinite(json.loads(result.stdout)["fd_classifier"])
    report = tmp_path / "report"
    result = fedphd("report", str(out), "--out", str(report), timeout=300)
    assert result.returncode == 0, result.stderr
    text = (report / "report.md").read_text()
    assert "fd_classifier" in text or "FD" in text
    for plot in ("loss.png", "bytes.png", "quality.png"):
        assert (report / plot).stat().st_size > 1000


def test_flat_mode_three_clients_with_flower_fedadam(tmp_path, ports):
    out = tmp_path / "flat"
    records = launch(out, ports, "--set", "topology.edges=0", "--set", "topology.clients=3",
                     "--set", "topology.cloud_rounds=2",
                     "--set", "topology.cloud_strategy=flwr.server.strategy.FedAdam",
                     "--set", "topology.cloud_strategy_args={eta=0.001}")
    assert_model_trained(out, [])
    assert not [r for r in records if r["tier"] == "edge"]
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [1, 2]
    # FedAdam's numpy maths yields float64; the global model must stay float32 on the wire.
    assert cloud[0]["bytes"]["cloud->client"] == cloud[1]["bytes"]["cloud->client"]
    for r in cloud:
        assert r["model_updated"] and not r["rejected"]
        assert sorted(r["participants"]) == ["client 0", "client 1", "client 2"]
        assert set(r["bytes"]) == {"cloud->client", "client->cloud"}
        assert r["bytes"]["cloud->client"] == r["reported_by_peers"]["received"]
    log = (out / "logs" / "cloud.log").read_text()
    assert "FedAdam" in log


def test_custom_strategy_class_plugs_in_by_dotted_path(tmp_path, ports):
    out = tmp_path / "custom"
    record = tmp_path / "aggregations.jsonl"
    env = {"PYTHONPATH": str(TESTS_DIR)}
    launch(out, ports, "--set", "topology.edges=1", "--set", "topology.clients=2",
           "--set", "topology.cloud_rounds=1", "--set", "topology.edge_rounds=2",
           "--set", "topology.edge_strategy=custom_strategy.RecordingFedAvg",
           "--set", f'topology.edge_strategy_args={{record_to="{record}"}}', env=env)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [{"round": 1, "results": 2}, {"round": 2, "results": 2}]


def test_unknown_strategy_fails_at_start_naming_the_field(tmp_path, ports):
    result = fedphd("cloud", "--out", str(tmp_path), *port_overrides(ports),
                    "--set", "topology.cloud_strategy=nowhere.Strategy", timeout=120)
    assert result.returncode == 2
    assert "topology.cloud_strategy" in result.stderr and "nowhere" in result.stderr


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_launcher_stops_every_process_it_started_on_sigterm(tmp_path, ports):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "terminated"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedphd.common.commands.cli", "launch", "--out", str(out), *FAST,
         *port_overrides(ports), "--set", "topology.cloud_rounds=50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while len(processes_mentioning(str(out))) < 7 and time.monotonic() < deadline:
            time.sleep(0.5)  # launcher + cloud + 2 edges + 4 clients
        assert len(processes_mentioning(str(out))) >= 7
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_mentioning(str(out)) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
