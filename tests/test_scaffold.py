"""SCAFFOLD: control variates correct the gradients, update, and travel (metered)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedphd.client.client import DiffusionClient, local_data
from fedphd.client.scaffold import ScaffoldCorrection, ScaffoldLocal
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.settings.config import ModelConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, CONTROL_DELTA_KEY, LOCAL_STEPS_KEY, SERVER_CONTROL_KEY
from fedphd.common.wire.transport import FitIns, FitRes, ndarrays_to_parameters, ok_status
from fedphd.server.scaffold import Scaffold
from tests.conftest import TESTS_DIR
from tests.test_strategy import FakeProxy


def test_correction_adds_c_minus_ci_and_averages_the_raw_gradients():
    model = torch.nn.Linear(2, 1)  # 3 parameters: weight (1, 2), bias (1,)
    server_c = np.array([1.0, 2.0, 3.0], np.float32)
    client_c = np.array([0.5, 0.5, 0.5], np.float32)
    hook = ScaffoldCorrection(model, server_c, client_c)
    raws = []
    for value in (1.0, 3.0):
        model.weight.grad = torch.full((1, 2), value)
        model.bias.grad = torch.full((1,), value)
        raws.append(value)
        hook(model)
        assert torch.allclose(model.weight.grad, torch.tensor([[value + 0.5, value + 1.5]]))
        assert torch.allclose(model.bias.grad, torch.tensor([value + 2.5]))
    assert np.allclose(hook.new_client_control(), np.mean(raws))


def test_server_control_moves_by_the_share_of_mean_client_updates():
    strategy = Scaffold(min_fit_clients=1, min_available_clients=1)
    model = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
    from fedphd.common.wire.transport import SimpleClientManager

    manager = SimpleClientManager()
    for cid in range(4):
        manager.register(FakeProxy(str(cid)))
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(model), manager)
    assert np.array_equal(
        codec.vector_from_bytes(instructions[0][1].config[SERVER_CONTROL_KEY], 6, "c"),
        np.zeros(6),
    )
    answers = []
    for cid, value in ((0, 1.0), (1, 3.0)):
        delta = codec.vector_to_bytes(np.full(6, value, np.float32))
        answers.append((FakeProxy(str(cid)), FitRes(ok_status(), ndarrays_to_parameters(model),
                                                    1, {CONTROL_DELTA_KEY: delta})))
    strategy.aggregate_fit(1, answers, [])
    # |S| / N = 2 / 4 of the mean update 2.0.
    assert np.allclose(strategy.control, 1.0)


def fit(client: DiffusionClient, model, server_c: np.ndarray | None):
    config = {ARCH_KEY: architecture_to_json(architecture_of(model)), LOCAL_STEPS_KEY: 3}
    if server_c is not None:
        config[SERVER_CONTROL_KEY] = codec.vector_to_bytes(server_c)
    return client.fit(FitIns(codec.encode(model_to_ndarrays(model), "fp32"), config))


def test_client_keeps_its_variate_answers_its_change_and_is_corrected():
    cfg = load_config(None, ["topology.clients=4"])
    model = build_unet(unet_config(ModelConfig()), seed=0)
    size = sum(p.numel() for p in model.parameters())
    plain = fit(DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu")), model, None)
    client = DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"))
    first = fit(client, model, np.zeros(size, np.float32))
    delta = codec.vector_from_bytes(first.metrics[CONTROL_DELTA_KEY], size, "delta")
    client_c = client.methods[ScaffoldLocal.name].client_c
    assert np.abs(delta).sum() > 0 and np.allclose(client_c, delta)  # c_i: 0 -> c_i+
    # With c = c_i = 0 the first round is plain training.
    assert all(np.array_equal(a, b) for a, b in zip(
        codec.decode(first.parameters), codec.decode(plain.parameters), strict=True))
    # A non-zero server variate changes the local result.
    other = DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"))
    corrected = fit(other, model, np.full(size, 0.5, np.float32))
    assert not all(np.array_equal(a, b) for a, b in zip(
        codec.decode(corrected.parameters), codec.decode(plain.parameters), strict=True))


@pytest.mark.slow
def test_scaffold_config_runs_end_to_end_and_its_variates_are_metered(tmp_path, ports):
    from tests.test_deployment import launch

    out = tmp_path / "scaffold"
    records = launch(out, ports, "--config", str(TESTS_DIR.parent / "configs/scaffold-digits.toml"),
                     "--set", "topology.cloud_rounds=2")
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert all(r["model_updated"] for r in cloud)
    assert cloud[1]["strategy"]["control_norm"] > 0
    payload = cloud[0]["reported_by_peers"]["payload"]  # the clients' model tensors
    # Down: model + server variate; up: model + variate update, each about one model again.
    assert cloud[0]["bytes"]["cloud->client"] > 1.9 * payload
    assert cloud[0]["bytes"]["client->cloud"] > 1.9 * payload
