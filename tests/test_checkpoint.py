"""Cloud checkpoints, batch streams that can go back, and clients that replay a round."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.server.strategy import FedAdam
from torch.utils.data import TensorDataset

from fedphd.common.core.diffusion import BatchStream
from fedphd.common.federation.checkpoint import (
    CHECKPOINT_FILE,
    CloudCheckpoint,
    random_state,
    restore_random_state,
    restore_strategy,
    strategy_state,
)
from fedphd.common.settings.config import ConfigError, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.transport import Code, FitRes, Status, ndarrays_to_parameters
from tests.test_strategy import FakeProxy


def fedadam(initial: list[np.ndarray]) -> FedAdam:
    return FedAdam(initial_parameters=ndarrays_to_parameters(initial), eta=0.1)


def test_a_flower_strategy_state_survives_a_checkpoint(tmp_path):
    """FedAdam's moments and current weights (plain attributes, no state_dict) are saved and
    put back: the restored strategy aggregates the next round exactly as the original."""
    initial = [np.zeros((3, 2), np.float32), np.ones(4, np.float32)]
    rng = np.random.default_rng(0)

    def answers():
        return [(FakeProxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [a + rng.normal(size=a.shape).astype(np.float32) for a in initial]), 10, {}))
            for i in range(2)]

    original = fedadam(initial)
    original.aggregate_fit(1, answers(), [])
    cfg = load_config()
    CloudCheckpoint(1, "{}", initial, {}, strategy_state(original), {"up": 1}, {}, (1, 2, 3),
                    0, cfg.model_dump(mode="json")).save(tmp_path)
    restored = fedadam(initial)
    restore_strategy(restored, CloudCheckpoint.load(tmp_path).strategy)
    assert all(np.array_equal(a, b) for a, b in zip(restored.m_t, original.m_t, strict=True))
    same = answers()
    left, _ = original.aggregate_fit(2, same, [])
    right, _ = restored.aggregate_fit(2, same, [])
    assert all(np.array_equal(a, b) for a, b in zip(codec.decode(left), codec.decode(right),
                                                    strict=True))
    # A fresh strategy (nothing restored) would have aggregated differently.
    fresh, _ = fedadam(initial).aggregate_fit(2, same, [])
    assert not all(np.array_equal(a, b) for a, b in zip(codec.decode(fresh), codec.decode(left),
                                                        strict=True))


def test_unstorable_attributes_are_named_and_generators_restored(caplog):
    class Custom:
        def __init__(self):
            self.rng = np.random.default_rng(3)
            self.history = {1: [0.5, 0.25], "x": (1, "a")}
            self.handle = object()
            self.callback = print

    original = Custom()
    original.rng.random()
    with caplog.at_level(logging.WARNING, logger="fedphd.checkpoint"):
        saved = strategy_state(original)
    assert "Custom.handle" in caplog.text and "callback" not in caplog.text
    restored = Custom()
    restore_strategy(restored, saved)
    assert restored.history == original.history
    assert restored.rng.random() == original.rng.random()


def test_random_state_is_restored():
    state = random_state()
    first = (np.random.rand(), torch.rand(1).item())
    restore_random_state(state)
    assert (np.random.rand(), torch.rand(1).item()) == first


def test_resume_refuses_another_config_and_a_damaged_file(tmp_path):
    cfg = load_config()
    checkpoint = CloudCheckpoint(2, "{}", [], {}, {"explicit": False, "state": {}}, {}, {},
                                 (0, 0, 0), 0, cfg.model_dump(mode="json"))
    checkpoint.save(tmp_path)
    loaded = CloudCheckpoint.load(tmp_path)
    loaded.check_config(load_config(overrides=["topology.cloud_rounds=9",
                                               "topology.round_timeout=5", "output.dir=x"]))
    with pytest.raises(ConfigError, match=r"training\.lr, training\.seed"):
        loaded.check_config(load_config(overrides=["training.lr=0.1", "training.seed=4"]))
    with pytest.raises(ConfigError, match="2 completed rounds"):
        loaded.check_config(load_config(overrides=["topology.cloud_rounds=1"]))
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=CHECKPOINT_FILE):
        CloudCheckpoint.load(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        CloudCheckpoint.load(tmp_path / "elsewhere")


def test_a_checkpoint_of_the_old_layout_resumes_with_the_new_paths(tmp_path):
    """A run saved before the package was ``fedphd`` names its strategies by the old dotted
    paths (``server.fedphd.FedPhD``): the same classes as the new paths, so the run's config
    in the new layout resumes it; a real change of strategy is still refused."""
    old_layout = load_config(overrides=["topology.cloud_strategy=server.fedphd.FedPhD",
                                        "topology.edge_strategy=server.feddiffuse.FedDiffuse"])
    CloudCheckpoint(1, "{}", [], {}, {"explicit": False, "state": {}}, {}, {}, (0, 0, 0), 0,
                    old_layout.model_dump(mode="json")).save(tmp_path)
    loaded = CloudCheckpoint.load(tmp_path)
    assert loaded.config["topology"]["cloud_strategy"] == "server.fedphd.FedPhD"
    loaded.check_config(load_config(overrides=[
        "topology.cloud_strategy=fedphd.server.fedphd.FedPhD",
        "topology.edge_strategy=fedphd.server.feddiffuse.FedDiffuse"]))
    with pytest.raises(ConfigError, match=r"topology\.cloud_strategy"):
        loaded.check_config(load_config(overrides=[
            "topology.cloud_strategy=fedphd.server.feddiffuse.FedDiffuse",
            "topology.edge_strategy=fedphd.server.feddiffuse.FedDiffuse"]))
    with pytest.raises(ConfigError, match=r"topology\.edge_strategy"):
        loaded.check_config(load_config(overrides=[
            "topology.cloud_strategy=fedphd.server.fedphd.FedPhD"]))


def test_a_version_1_checkpoint_loads_its_pruned_flag_as_the_schedule_state(tmp_path):
    """Before model schedules a checkpoint kept FedPhD's ``pruned`` flag itself."""
    cfg = load_config()
    CloudCheckpoint(3, "{}", [np.ones(2, np.float32)], {"pruned": True},
                    {"explicit": False, "state": {}}, {}, {}, (0, 0, 0), 0,
                    cfg.model_dump(mode="json")).save(tmp_path)
    data = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    data["format"] = 1
    data["pruned"] = data.pop("schedule")["pruned"]
    torch.save(data, tmp_path / CHECKPOINT_FILE)
    loaded = CloudCheckpoint.load(tmp_path)
    assert loaded.schedule == {"pruned": True} and loaded.completed_round == 3


def test_a_batch_stream_returns_to_an_earlier_position():
    data = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10))
    stream = BatchStream(data, 3, seed=5, device=torch.device("cpu"))
    first = [next(stream).view(-1).tolist() for _ in range(7)]  # past an epoch (3 per epoch)
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # no repeats in one
    assert first[:3] != first[3:6]  # a new order each epoch
    stream.seek(2)
    assert [next(stream).view(-1).tolist() for _ in range(5)] == first[2:]
    assert stream.position == 7


def test_a_client_replays_a_round_it_already_trained(tmp_path):
    """The same instruction again (a resumed cloud) gives the same answer, bit for bit; the
    next round after the replay equals the next round without it."""
    from fedphd.client.client import DiffusionClient, local_data
    from fedphd.common.core.models import (
        architecture_of,
        architecture_to_json,
        build_unet,
        unet_config,
    )
    from fedphd.common.wire.keys import ARCH_KEY, LOCAL_STEPS_KEY, ROUND_KEY
    from fedphd.common.wire.transport import FitIns

    cfg = load_config(overrides=["topology.edges=0", "training.local_steps=2",
                                 "training.batch_size=8"])
    model = build_unet(unet_config(cfg.model), seed=cfg.seed)
    arrays = codec.decode(codec.encode([p.detach().numpy() for p in
                                        model.state_dict().values()], "fp32"))

    def instruction(server_round: int) -> FitIns:
        return FitIns(codec.encode(arrays, "fp32"), {
            ARCH_KEY: architecture_to_json(architecture_of(model)), ROUND_KEY: server_round,
            LOCAL_STEPS_KEY: 2})

    def answer(client, server_round):
        res = client.fit(instruction(server_round))
        assert res.status.code == Code.OK, res.status.message
        return codec.decode(res.parameters)

    def client():
        return DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"), tmp_path)

    replaying = client()
    first = answer(replaying, 1)
    second = answer(replaying, 2)
    again = answer(replaying, 2)  # the cloud resumed after round 1
    third = answer(replaying, 3)
    straight = client()
    answer(straight, 1)
    assert all(np.array_equal(a, b) for a, b in zip(answer(straight, 2), second, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(again, second, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(answer(straight, 3), third, strict=True))
    # Without the rewind, round 2 again would start from later optimiser and batch state.
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_sampling_follows_the_peers_ids_not_their_connection_order():
    """The same seed samples the same clients, in the same order, whatever order (and
    connection ids) they connected with; sampling waits at most max_wait seconds."""
    import random
    import time

    from fedphd.common.wire.transport import BoundedClientManager
    from tests.test_strategy import IdentifiedProxy

    def sampled(order: list[int], prefix: str) -> list[int]:
        manager = BoundedClientManager(max_wait=1)
        for client in order:
            manager.register(IdentifiedProxy(f"{prefix}:{1000 - client * 7}", client))
        random.seed("same seed")
        return [proxy.client_id for proxy in manager.sample(3)]

    first = sampled([0, 1, 2, 3, 4, 5], "ipv4")
    assert sampled([5, 3, 1, 0, 2, 4], "ipv6") == first
    assert len(set(first)) == 3
    manager = BoundedClientManager(max_wait=1)
    start = time.monotonic()
    assert manager.sample(2) == []  # nobody there: gives up after max_wait, not a day
    assert time.monotonic() - start < 30
