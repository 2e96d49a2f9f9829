"""The wrapper every strategy runs inside: instructions, codecs, answer checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.server.strategy import FedAdam, FedAvg

from fedphd.common.federation.strategy import (
    ManagedStrategy,
    build_strategy,
    client_strategy_defaults,
)
from fedphd.common.settings.config import ConfigError
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, ROUND_KEY, UPLINK_KEY
from fedphd.common.wire.transport import (
    ClientProxy,
    FitRes,
    GetPropertiesRes,
    SimpleClientManager,
    ndarrays_to_parameters,
    ok_status,
)


class FakeProxy(ClientProxy):
    """Stands in for a connected gRPC client; the wrapper never calls it."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class IdentifiedProxy(FakeProxy):
    """A connected client that says who it is (its properties carry ``client_id``)."""

    def __init__(self, cid: str, client_id: int):
        super().__init__(cid)
        self.client_id = client_id

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(ok_status(), {"client_id": self.client_id})


MODEL = [np.ones((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]


def answer(cid: int, arrays, examples=10, wire="fp32"):
    metrics = {"client_id": cid, "loss": 0.5, "label_hist": json.dumps([examples, 0])}
    return FakeProxy(str(cid)), FitRes(ok_status(), codec.encode(arrays, wire), examples, metrics)


def managed(inner=None, downlink="fp32"):
    strategy = ManagedStrategy(inner or FedAvg(min_available_clients=1, min_fit_clients=1),
                               {ARCH_KEY: "{}"}, downlink=downlink, uplink="fp16")
    manager = SimpleClientManager()
    for cid in range(3):
        manager.register(FakeProxy(str(cid)))
    return strategy, manager


def test_configure_fit_adds_the_instruction_and_encodes_the_downlink():
    strategy, manager = managed(downlink="fp16")
    instructions = strategy.configure_fit(3, ndarrays_to_parameters(MODEL), manager)
    assert len(instructions) == 3
    for _proxy, ins in instructions:
        assert ins.config[ARCH_KEY] == "{}" and ins.config[ROUND_KEY] == 3
        assert ins.config[UPLINK_KEY] == "fp16"
        assert ins.parameters.tensor_type == codec.FP16
        assert [a.dtype for a in codec.decode(ins.parameters)] == [np.float32, np.float32]


def test_aggregation_is_the_inner_strategys_weighted_mean():
    strategy, manager = managed()
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    a = [np.full((2, 3), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    b = [np.full((2, 3), 4.0, np.float32), np.full(4, 4.0, np.float32)]
    result = strategy.aggregate_round(1, [answer(0, a, 10), answer(1, b, 30, "fp16")], [])
    merged = codec.decode(result.parameters)
    assert np.allclose(merged[0], 3.25) and np.allclose(merged[1], 3.25)
    assert result.summary.num_examples == 40
    assert result.summary.label_hist == [40, 0]
    assert sorted(result.summary.senders) == ["client 0", "client 1"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)], "NaN or Inf"),
        ([np.zeros((3, 2), np.float32), np.zeros(4, np.float32)], "shape"),
        ([np.zeros((2, 3), np.float32)], "sent 1 tensors"),
        ([np.zeros((2, 3), np.int64), np.zeros(4, np.float32)], "dtype"),
    ],
)
def test_bad_updates_are_dropped_with_the_sender_named(bad, reason, caplog):
    strategy, manager = managed()
    manager.register(FakeProxy("7"))
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    good = [np.full((2, 3), 2.0, np.float32), np.full(4, 2.0, np.float32)]
    result = strategy.aggregate_round(1, [answer(0, good), answer(7, bad)], [])
    assert np.allclose(codec.decode(result.parameters)[0], 2.0)  # the attacker had no effect
    assert reason in result.summary.rejected["client 7"]
    assert "client 7" in caplog.text


def test_receivers_digest_of_the_rebuilt_model_is_checked():
    strategy, manager = managed(downlink="fp16")
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    honest, corrupted = answer(0, MODEL), answer(1, MODEL)
    received = codec.decode(codec.encode(MODEL, "fp16"))
    honest[1].metrics["received_digest"] = codec.digest(received)
    received[0] = received[0] + 1e-3
    corrupted[1].metrics["received_digest"] = codec.digest(received)
    summary = strategy.aggregate_round(1, [honest, corrupted, answer(2, MODEL)], []).summary
    assert summary.digests_checked == 2
    assert summary.digest_mismatches == ["client 1"]


def test_unknown_codec_is_rejected():
    strategy, manager = managed()
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    proxy, res = answer(2, MODEL)
    res.parameters.tensor_type = "zip-bomb"
    result = strategy.aggregate_round(1, [(proxy, res)], [])
    assert result.parameters is None
    assert "unknown tensor type" in result.summary.rejected["client 2"]


def test_float64_results_of_the_inner_strategy_are_cast_back():
    initial = ndarrays_to_parameters(MODEL)
    inner = build_strategy("flwr.server.strategy.FedAdam", {"eta": 0.1},
                           client_strategy_defaults(1.0, 1, initial), "topology.cloud_strategy")
    assert isinstance(inner, FedAdam)
    strategy, manager = managed(inner)
    strategy.configure_fit(1, initial, manager)
    params, _ = strategy.aggregate_fit(1, [answer(0, [a + 1 for a in MODEL])], [])
    assert [a.dtype for a in codec.decode(params)] == [np.float32, np.float32]


def test_build_strategy_errors_name_the_field():
    with pytest.raises(ConfigError, match="topology.edge_strategy.*cannot be imported"):
        build_strategy("nowhere.Nothing", {}, {}, "topology.edge_strategy")
    with pytest.raises(ConfigError, match="is not a flwr.server.strategy.Strategy"):
        build_strategy("json.JSONDecoder", {}, {}, "topology.cloud_strategy")
    with pytest.raises(ConfigError, match="rejected its arguments"):
        build_strategy("flwr.server.strategy.FedAvg", {"no_such_arg": 1}, {},
                       "topology.cloud_strategy")


def test_quantised_downlink_sends_updates_from_what_each_receiver_holds():
    from fedphd.common.federation.held import HeldModel
    from fedphd.common.wire.keys import BASE_DIGEST_KEY

    rng = np.random.default_rng(0)
    model = [rng.normal(size=(64, 64, 3, 3)).astype(np.float32), np.zeros(64, np.float32)]
    strategy = ManagedStrategy(FedAvg(min_available_clients=1, min_fit_clients=1),
                               {ARCH_KEY: "{}"}, downlink="q8", uplink="fp32")
    manager = SimpleClientManager()
    manager.register(FakeProxy("0"))
    receiver = HeldModel()

    def exchange(global_arrays, server_round):
        (proxy, ins), = strategy.configure_fit(server_round, ndarrays_to_parameters(global_arrays),
                                               manager)
        arrays = receiver.decode(ins.parameters, ins.config)
        metrics = {"client_id": 0, "received_digest": receiver.keep(arrays)}
        result = strategy.aggregate_round(server_round, [(proxy, FitRes(ok_status(), codec.encode(
            arrays, "fp32"), 1, metrics))], [])
        return ins, arrays, result.summary

    first, got, _ = exchange(model, 1)
    assert BASE_DIGEST_KEY not in first.config  # nothing held yet: full weights
    assert all(np.array_equal(a, b) for a, b in zip(got, model, strict=True))
    moved = [m + 0.01 for m in model]
    second, got, summary = exchange(moved, 2)
    assert second.config[BASE_DIGEST_KEY] == codec.digest(model)
    assert codec.payload_bytes(second.parameters) < 0.3 * codec.payload_bytes(first.parameters)
    assert np.max(np.abs(got[0] - moved[0])) < 1e-3  # within one 8-bit step of the update
    assert summary.digest_mismatches == []
    # A receiver that does not hold the base refuses the update instead of corrupting itself.
    with pytest.raises(ValueError, match="does not hold"):
        HeldModel().decode(second.parameters, second.config)
