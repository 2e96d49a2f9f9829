"""Bounded influence, for real: a plain Flower client (flwr's public API only) claims 10**12
samples in a flat run of honest ``fedphd client`` processes; its weight is cut to the
configured cap, the record names it, and the honest clients' training moves the global model
as in the same run without it."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import numpy as np
import pytest

from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
from fedphd.common.settings.config import load_config
from tests.test_reliability import (
    Processes,
    cloud_records,
    finish,
    run_config,
    saved_model,
    start_flat_run,
    wait_until,
)

HONEST = 3  # the digits split into 3 equal IID shares of 599 images
CLAIM = 10**12
PLAIN_CLIENT = Path(__file__).resolve().parent / "plain_flower_client.py"


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def change(model: list[np.ndarray], initial: list[np.ndarray]) -> np.ndarray:
    """The round's model change, all floating tensors as one vector."""
    return np.concatenate([(m - i).ravel() for m, i in zip(model, initial, strict=True)
                           if m.dtype.kind == "f"])


@pytest.fixture
def runs(tmp_path):
    clean, attacked = Processes(tmp_path / "clean-logs"), Processes(tmp_path / "attacked-logs")
    yield clean, attacked
    clean.stop_all()
    attacked.stop_all()


@pytest.mark.slow
def test_a_plain_flower_client_claiming_1e12_samples_is_bounded(tmp_path, runs):
    clean_procs, attacked_procs = runs
    common = [f"topology.clients={HONEST}", "topology.cloud_rounds=1",
              "topology.max_examples_factor=1.0"]
    # The same run twice, at the same time: without and with the plain client; the attacked
    # run's round waits for all four (min_fit_clients).
    config, address = run_config(tmp_path / "clean-config", *common)
    clean_cloud = start_flat_run(clean_procs, config, address, tmp_path / "clean", HONEST)
    config, address = run_config(tmp_path / "attacked-config", *common,
                                 f"topology.min_fit_clients={HONEST + 1}")
    attacked_cloud = start_flat_run(attacked_procs, config, address, tmp_path / "attacked",
                                    HONEST)
    # Flower's own client does not retry a refused connection: it joins once the cloud listens.
    wait_until(lambda: listening(address), 120, "the cloud to listen", attacked_procs)
    plain = attacked_procs.start("plain", str(PLAIN_CLIENT), "--server", address,
                                 "--client-id", str(HONEST), "--claim", str(CLAIM))
    finish(clean_procs, clean_cloud, timeout=600)
    finish(attacked_procs, attacked_cloud, timeout=600)
    assert plain.wait(timeout=60) == 0, attacked_procs.logs()
    assert "answering with 1000000000000 samples" in attacked_procs.log("plain")

    (record,) = cloud_records(tmp_path / "attacked")
    attacker = f"client {HONEST}"
    assert sorted(record["participants"]) == [f"client {n}" for n in range(HONEST + 1)], record
    assert record["rejected"] == {}, record
    # max_examples_factor = 1: it counts as much as the round's (low) median answer, 599.
    assert record["clipped"] == {attacker: {"claimed": CLAIM, "counted": 599}}, record
    share = record["examples_by_sender"][attacker] / record["num_examples"]
    assert share <= 1 / (HONEST + 1) + 1e-12, record
    assert f"{attacker} claimed {CLAIM} samples; counted as 599" in attacked_procs.log("cloud")

    cfg = load_config(config)
    initial = model_to_ndarrays(build_unet(unet_config(cfg.model), seed=cfg.seed))
    clean = change(saved_model(tmp_path / "clean"), initial)
    attacked = change(saved_model(tmp_path / "attacked"), initial)
    assert np.linalg.norm(clean) > 0
    # Its answer is the model it received, with 1/4 of the weight: the honest training moves
    # the model by 3/4 of the clean run's change (unbounded it would be ~1e-9 of it).
    assert np.linalg.norm(attacked) >= (1 - share) * np.linalg.norm(clean) * 0.999
    assert np.linalg.norm(attacked - (1 - share) * clean) <= 1e-3 * np.linalg.norm(clean)


def test_the_plain_client_uses_flowers_public_api_only():
    tree = ast.parse(PLAIN_CLIENT.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules == {"__future__", "argparse", "flwr.client"}
