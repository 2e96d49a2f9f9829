"""The wrapper every strategy runs inside: instructions, codecs, answer checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.server.strategy import FedAdam, FedAvg

from fedphd.common.federation.strategy import (
    ManagedStrategy,
    client_strategy_defaults,
)
from fedphd.common.federation.strategy_builder import build_strategy
from fedphd.common.settings.config import ConfigError, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, ROUND_KEY, UPLINK_KEY
from fedphd.common.wire.transport import (
    ClientProxy,
    FitRes,
    GetPropertiesRes,
    PeerIdentity,
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
    with pytest.raises(ConfigError, match="is neither a flwr.server.strategy.Strategy nor"):
        build_strategy("json.JSONDecoder", {}, {}, "topology.cloud_strategy")
    with pytest.raises(ConfigError, match="rejected its arguments"):
        build_strategy("flwr.server.strategy.FedAvg", {"no_such_arg": 1}, {},
                       "topology.cloud_strategy")


# fedphd's receivers report xxh3-128, a plain Flower peer SHA-256 (README "Answers").
@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256"])
def test_quantised_downlink_sends_updates_from_what_each_receiver_holds(algorithm):
    from fedphd.common.federation.held import HeldModel
    from fedphd.common.wire.keys import BASE_DIGEST_KEY

    rng = np.random.default_rng(0)
    model = [rng.normal(size=(64, 64, 3, 3)).astype(np.float32), np.zeros(64, np.float32)]
    strategy = ManagedStrategy(FedAvg(min_available_clients=1, min_fit_clients=1),
                               {ARCH_KEY: "{}"}, downlink="q8", uplink="fp32")
    manager = SimpleClientManager()
    manager.register(FakeProxy("0"))
    receiver = HeldModel(algorithm)

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
    assert second.config[BASE_DIGEST_KEY] == codec.digest(model, algorithm)  # as reported
    assert codec.payload_bytes(second.parameters) < 0.3 * codec.payload_bytes(first.parameters)
    assert np.max(np.abs(got[0] - moved[0])) < 1e-3  # within one 8-bit step of the update
    assert summary.digest_mismatches == []
    # A receiver that does not hold the base refuses the update instead of corrupting itself.
    with pytest.raises(ValueError, match="does not hold"):
        HeldModel().decode(second.parameters, second.config)


def test_whole_fp16_halves_the_first_send_and_the_next_update_corrects_its_rounding():
    from fedphd.common.federation.held import HeldModel

    rng = np.random.default_rng(1)
    model = [rng.normal(size=(32, 32, 3, 3)).astype(np.float32), np.zeros(32, np.float32)]
    sizes, errors = {}, {}
    for whole in ("fp32", "fp16"):
        strategy = ManagedStrategy(FedAvg(min_available_clients=1, min_fit_clients=1),
                                   {ARCH_KEY: "{}"}, downlink="q8", uplink="fp32", whole=whole)
        manager = SimpleClientManager()
        manager.register(FakeProxy("0"))
        receiver = HeldModel()
        for server_round in (1, 2):
            (proxy, ins), = strategy.configure_fit(
                server_round, ndarrays_to_parameters(model), manager)
            arrays = receiver.decode(ins.parameters, ins.config)
            metrics = {"client_id": 0, "received_digest": receiver.keep(arrays)}
            strategy.aggregate_round(server_round, [(proxy, FitRes(
                ok_status(), codec.encode(arrays, "fp32"), 1, metrics))], [])
            sizes[whole, server_round] = codec.payload_bytes(ins.parameters)
            errors[whole, server_round] = float(np.max(np.abs(arrays[0] - model[0])))
    assert sizes["fp16", 1] < 0.51 * sizes["fp32", 1]
    assert errors["fp32", 1] == 0.0 and errors["fp16", 1] > 0.0  # fp16 rounds the weights
    # Round 2 is an 8-bit update from what the receiver holds: the fp16 rounding is its whole
    # content, so it comes back to within a small fraction of that rounding.
    assert errors["fp16", 2] < 0.05 * errors["fp16", 1]


def test_whole_must_be_fp32_or_fp16():
    from fedphd.common.federation.downlink import Downlink

    with pytest.raises(ValueError, match="codec.whole"):
        Downlink("q8", True, whole="q4")


# --- Bounded influence and blame by identity -------------------------------------------------

class KnownProxy(FakeProxy):
    """A connected peer whose server established who it is when it joined (what the client
    manager sets on every real peer)."""

    def __init__(self, cid: str, identity: PeerIdentity):
        super().__init__(cid)
        self.peer_identity = identity


def filled(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.full(4, value, np.float32)]


def identified_answer(identity: PeerIdentity, arrays, examples: int, claimed_id=None):
    """An answer from the peer ``identity`` over connection ``c<number>``, claiming
    ``client_id = claimed_id`` (its own id when None)."""
    metrics = {f"{identity.kind}_id": identity.number if claimed_id is None else claimed_id,
               "loss": 0.5, "label_hist": json.dumps([examples, 0])}
    return (KnownProxy(f"c{identity.number}", identity),
            FitRes(ok_status(), codec.encode(arrays, "fp32"), examples, metrics))


class RecordingFedAvg(FedAvg):
    """FedAvg that remembers the sample counts it was given (what any user strategy sees)."""

    def aggregate_fit(self, server_round, results, failures):
        self.seen = {res.metrics["client_id"]: res.num_examples for _, res in results}
        return super().aggregate_fit(server_round, results, failures)


def round_of(answers, factor=None, inner=None):
    strategy = ManagedStrategy(inner or FedAvg(min_available_clients=1, min_fit_clients=1),
                               {ARCH_KEY: "{}"}, max_examples_factor=factor)
    manager = SimpleClientManager()
    for proxy, _ in answers:
        manager.register(proxy)
    strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    return strategy.aggregate_round(1, answers, [])


def client(number: int, declared: int | None = None) -> PeerIdentity:
    return PeerIdentity("client", number, certified=True, declared_examples=declared)


def test_a_huge_sample_count_is_clipped_to_the_cap_before_the_inner_strategy(caplog):
    inner = RecordingFedAvg(min_available_clients=1, min_fit_clients=1)
    answers = [identified_answer(client(0), filled(1.0), 10),
               identified_answer(client(1), filled(1.0), 10),
               identified_answer(client(2), filled(7.0), 10**12)]
    result = round_of(answers, factor=1.0, inner=inner)
    # Unclipped, FedAvg would give client 2 all the weight (~7.0); clipped to 10 it has 1/3.
    assert np.allclose(codec.decode(result.parameters)[0], 3.0)
    assert inner.seen == {0: 10, 1: 10, 2: 10}
    assert result.summary.clipped == {"client 2": {"claimed": 10**12, "counted": 10}}
    assert result.summary.examples == {"client 0": 10, "client 1": 10, "client 2": 10}
    assert result.summary.num_examples == 30
    assert result.summary.rejected == {}
    assert "client 2 claimed 1000000000000 samples; counted as 10" in caplog.text


def test_the_cap_uses_the_low_median_so_one_claim_of_two_cannot_raise_it():
    answers = [identified_answer(client(0), filled(1.0), 10),
               identified_answer(client(1), filled(1.0), 10**12)]
    result = round_of(answers)  # the default factor, 10
    assert result.summary.clipped == {"client 1": {"claimed": 10**12, "counted": 100}}


def test_counts_within_the_cap_and_zero_counts_are_left_alone():
    answers = [identified_answer(client(0), filled(1.0), 0),
               identified_answer(client(1), filled(1.0), 0),
               identified_answer(client(2), filled(3.0), 500),
               identified_answer(client(3), filled(3.0), 900)]
    result = round_of(answers, factor=2.0)
    # The median of the positive counts (500), not of all (0): nobody is cut.
    assert result.summary.clipped == {}
    assert result.summary.examples["client 3"] == 900


def test_the_cloud_strategy_takes_the_factor_from_the_run_config():
    from fedphd.server.global_model import cloud_strategy

    initial = ndarrays_to_parameters(MODEL)
    cfg = load_config(overrides=["topology.max_examples_factor=2.5"])
    assert cloud_strategy(cfg, True, "{}", initial, {}, None).max_examples_factor == 2.5
    assert ManagedStrategy(FedAvg(), {ARCH_KEY: "{}"}).max_examples_factor == 10.0


def test_a_client_claiming_more_samples_than_it_declared_at_join_is_refused(caplog):
    answers = [identified_answer(client(0, declared=10), filled(1.0), 10),
               identified_answer(client(1, declared=10), filled(9.0), 11)]
    result = round_of(answers)
    assert np.allclose(codec.decode(result.parameters)[0], 1.0)
    assert result.summary.senders == ["client 0"]
    assert result.summary.rejected == {
        "client 1": "num_examples = 11 is more than the 10 samples it declared when it joined"}
    assert "rejected the update of client 1" in caplog.text


def test_an_edge_may_count_more_than_it_declared_at_join():
    # Clients re-assigned to an edge after it joined add to its count: only the cap bounds it.
    edge = PeerIdentity("edge", 1, certified=True, declared_examples=10)
    result = round_of([identified_answer(edge, filled(1.0), 25)])
    assert result.summary.senders == ["edge 1"] and result.summary.rejected == {}


def test_an_answer_claiming_another_id_is_refused_and_blamed_on_its_sender(caplog):
    answers = [identified_answer(client(0), filled(1.0), 10),
               identified_answer(client(2), filled(np.nan), 10, claimed_id=0)]
    result = round_of(answers)
    assert np.allclose(codec.decode(result.parameters)[0], 1.0)
    assert result.summary.senders == ["client 0"]
    reason = "client 2 (connection c2) claimed to be client 0"
    assert result.summary.rejected == {"client 2": reason}
    assert f"rejected the update of client 2: {reason}" in caplog.text
    assert "rejected the update of client 0" not in caplog.text


def test_the_established_identity_names_the_sender_whatever_the_answer_claims(caplog):
    # An answer that claims nothing, with a NaN: blamed on the peer's identity, not a cid.
    proxy, res = identified_answer(client(5), filled(np.nan), 10)
    del res.metrics["client_id"]
    result = round_of([identified_answer(client(0), filled(1.0), 10), (proxy, res)])
    assert "NaN or Inf" in result.summary.rejected["client 5"]
    assert "rejected the update of client 5" in caplog.text
