"""``output.report_to = "tensorboard"``: a run's metrics.jsonl mirrored as TensorBoard events.

The events are read back with TensorBoard's own ``EventAccumulator`` and compared with the
numbers the run wrote to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedphd.common.commands import cli
from fedphd.common.quality.tracking import Tracker, check_tracking
from fedphd.common.settings.config import ConfigError, OutputConfig, load_config
from tests.conftest import fedphd, port_overrides

ROUNDS = 2
# A flat run of 1 client, 2 rounds, evaluated after every round (few samples, 2 DDIM steps).
QUICK = ["tls.insecure=true", "topology.edges=0", "topology.clients=1",
         f"topology.cloud_rounds={ROUNDS}", "training.local_steps=2",
         "diffusion.sampling_steps=2", "output.grid_samples=4", "output.progress=false",
         "topology.connect_timeout=120", "evaluation.every_cloud_rounds=1",
         "evaluation.num_samples=8", "evaluation.sampling_steps=2",
         "output.report_to=tensorboard"]


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def series(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def assert_series(accumulator: EventAccumulator, tag: str,
                  expected: list[tuple[int, float]]) -> None:
    """One event per step, each the record's number (TensorBoard stores float32)."""
    got = series(accumulator, tag)
    assert [step for step, _ in got] == [step for step, _ in expected], tag
    for (_, value), (_, want) in zip(got, expected, strict=True):
        assert value == pytest.approx(want, rel=1e-6), tag


@pytest.mark.slow
def test_a_flat_run_writes_loss_bytes_quality_and_samples_per_round(tmp_path, ports):
    out = tmp_path / "run"
    overrides = [arg for item in QUICK for arg in ("--set", item)]
    result = fedphd("launch", "--out", str(out), "--timeout", "300", *overrides,
                    *port_overrides(ports), timeout=400)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted((out / "logs").glob("*.log")))
    assert result.returncode == 0, result.stderr[-3000:] + logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cloud = [r for r in records if r["tier"] == "cloud"]
    evals = [r for r in records if r["tier"] == "eval"]
    assert [r["round"] for r in cloud] == [r["round"] for r in evals] == [1, 2]

    accumulator = events(out / "tensorboard")
    assert_series(accumulator, "train/loss", [(r["round"], r["loss"]) for r in cloud])
    for link, tag in (("cloud->client", "bytes/cloud_to_client"),
                      ("client->cloud", "bytes/client_to_cloud")):
        assert_series(accumulator, tag, [(r["round"], r["bytes"][link]) for r in cloud])
        assert_series(accumulator, tag.replace("bytes/", "bytes_cumulative/"),
                      [(r["round"], r["bytes_cumulative"][link]) for r in cloud])
    assert_series(accumulator, "quality/fd_classifier",
                  [(r["round"], r["fd_classifier"]) for r in evals])

    # The grid the cloud wrote, as an image at the last round, and one grid of the same
    # size per evaluated round.
    assert sorted(accumulator.Tags()["images"]) == ["samples", "samples/round"]
    [image] = accumulator.Images("samples")
    with Image.open(out / "samples.png") as grid:
        assert (image.step, image.width, image.height) == (ROUNDS, *grid.size)
    per_round = accumulator.Images("samples/round")
    assert [i.step for i in per_round] == list(range(1, ROUNDS + 1))
    assert {(i.width, i.height) for i in per_round} == {(image.width, image.height)}


def test_edge_rounds_go_to_their_own_run_counted_in_edge_rounds(tmp_path):
    """Edge lines (step = edge round) live in tensorboard/edges, apart from the cloud's."""
    tracker = Tracker(tmp_path)
    lines = [{"tier": "edge", "edge": 0, "cloud_round": 1, "round": k, "loss": 0.5 / k,
              "num_examples": 64, "bytes": {"edge->client": 1000 * k, "client->edge": 7 * k}}
             for k in (1, 2)]
    lines.append({"tier": "cloud", "round": 1, "loss": 0.25, "bytes": {"cloud->edge": 11}})
    for line in lines:
        tracker.record(line)
    tracker.close()
    edges = events(tmp_path / "edges")
    assert_series(edges, "edge-0/loss", [(r["round"], r["loss"]) for r in lines[:2]])
    assert_series(edges, "edge-0/bytes/edge_to_client",
                  [(r["round"], r["bytes"]["edge->client"]) for r in lines[:2]])
    cloud = events(tmp_path)
    assert_series(cloud, "train/loss", [(1, 0.25)])
    assert "edge-0/loss" not in cloud.Tags()["scalars"]


def test_a_resumed_run_replaces_the_rounds_it_redoes(tmp_path):
    """The rounds after the checkpoint are written again: each step is shown once."""
    first = Tracker(tmp_path)
    for server_round, loss in ((1, 0.9), (2, 0.8), (3, 0.7)):  # round 3 never checkpointed
        first.record({"tier": "cloud", "round": server_round, "loss": loss})
    first.close()
    resumed = Tracker(tmp_path, purge_step=3)
    resumed.record({"tier": "cloud", "round": 3, "loss": 0.6})
    resumed.close()
    assert_series(events(tmp_path), "train/loss", [(1, 0.9), (2, 0.8), (3, 0.6)])


def test_other_values_of_report_to_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"output\.report_to: not one of the allowed"):
        load_config(None, ["output.report_to=wandb"])


def test_missing_tensorboard_is_one_line_naming_the_field_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    check_tracking(OutputConfig())  # report_to = "none" needs nothing
    with pytest.raises(ConfigError) as error:
        check_tracking(OutputConfig(report_to="tensorboard"))
    message = str(error.value)
    assert "\n" not in message
    assert 'output.report_to = "tensorboard"' in message
    assert "pip install 'fedphd[tensorboard]'" in message


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["launch", "--timeout", "5"]])
def test_the_commands_stop_at_start_with_that_line(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # launch's SIGTERM handler
    out = tmp_path / "run"
    code = cli.main([*command, "--out", str(out), "--set", "output.report_to=tensorboard"])
    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert len(stderr.splitlines()) == 1
    assert stderr.startswith(f"fedphd {command[0]}: output.report_to")
    assert "pip install 'fedphd[tensorboard]'" in stderr
    assert not out.exists()  # stopped before any training or process


def test_fedphd_train_writes_the_loss_of_every_step_and_its_grid(tmp_path):
    out = tmp_path / "train"
    result = fedphd("train", "--steps", "3", "--out", str(out), "--set", "output.progress=false",
                    "--set", "diffusion.sampling_steps=2", "--set", "output.grid_samples=4",
                    "--set", "output.report_to=tensorboard", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    accumulator = events(out / "tensorboard")
    losses = series(accumulator, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3]
    # summary.json's first loss, and its last loss: the mean of the (here: 3) last steps.
    assert losses[0][1] == pytest.approx(summary["first_loss"], rel=1e-6)
    assert sum(v for _, v in losses) / 3 == pytest.approx(summary["last_loss"], rel=1e-6)
    assert [image.step for image in accumulator.Images("samples")] == [3]
