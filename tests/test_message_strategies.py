"""Flower's message-API strategies (``flwr.serverapp.strategy``) inside the project's rounds,
and strategies configured from TOML: nested wrappers, refusals at start."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping as LegacyDP
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping as MessageDP
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedphd.common.federation.checkpoint import restore_strategy, strategy_state
from fedphd.common.federation.message_strategy import MessageStrategyAdapter
from fedphd.common.federation.strategy import ManagedStrategy, client_strategy_defaults
from fedphd.common.federation.strategy_builder import build_strategy
from fedphd.common.settings.config import ConfigError
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY
from fedphd.common.wire.transport import (
    BoundedClientManager,
    Code,
    FitRes,
    SimpleClientManager,
    Status,
    ndarrays_to_parameters,
    ok_status,
)
from tests.custom_strategy import RecordingMessageFedAvg
from tests.test_strategy import MODEL, IdentifiedProxy

NAMES = ["down.weight", "up.bias"]
FIELD = "topology.cloud_strategy"


def build(path: str, args: dict | None = None):
    return build_strategy(path, args or {},
                          client_strategy_defaults(1.0, 1, ndarrays_to_parameters(MODEL)), FIELD,
                          {"tensor_names": NAMES})


def connected(count: int = 3, manager=None):
    manager = SimpleClientManager() if manager is None else manager
    for client in range(count):
        manager.register(IdentifiedProxy(f"conn-{client}", client))
    for proxy in manager.all().values():  # as BoundedClientManager establishes it at join
        from fedphd.common.wire.transport import PeerIdentity
        proxy.peer_identity = PeerIdentity("client", proxy.client_id)
    return manager


def round_of(inner, manager, shift=lambda client: client, examples=lambda c: 10 * (c + 1),
             extra=None, failing=()):
    """One fit round through ManagedStrategy: every client answers MODEL + shift(client)."""
    strategy = ManagedStrategy(inner, {ARCH_KEY: "{}"}, downlink="fp32", uplink="fp32",
                               names=NAMES)
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    results, failures = [], []
    for proxy, _ in instructions:
        client = proxy.client_id
        if client in failing:
            failures.append((proxy, FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "out of memory"),
                                           ndarrays_to_parameters([]), 0, {})))
            continue
        metrics = {"client_id": client, "loss": 0.5 + client,
                   "label_hist": json.dumps([examples(client), 0]), **(extra or {})}
        results.append((proxy, FitRes(ok_status(),
                                      codec.encode([a + shift(client) for a in MODEL], "fp32"),
                                      examples(client), metrics)))
    params, metrics = strategy.aggregate_fit(1, results, failures)
    return instructions, (None if params is None else codec.decode(params)), metrics


def test_message_fedavg_averages_exactly_as_flowers_legacy_fedavg():
    message = build("flwr.serverapp.strategy.FedAvg")
    assert isinstance(message, MessageStrategyAdapter) and isinstance(message.strategy, FedAvg)
    legacy = build("flwr.server.strategy.FedAvg")
    _, by_message, metrics = round_of(message, connected())
    _, by_legacy, _ = round_of(legacy, connected())
    for ours, theirs in zip(by_message, by_legacy, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # sum_k n_k (w + k) / sum_k n_k with n_k = 10 (k + 1): w + 80/60
    np.testing.assert_allclose(by_message[0], MODEL[0] + 80 / 60, rtol=1e-6)
    assert metrics["loss"] == pytest.approx((10 * 0.5 + 20 * 1.5 + 30 * 2.5) / 60)


def test_a_users_subclass_gets_node_ids_named_arrays_and_numeric_metrics_only(tmp_path):
    record = tmp_path / "calls.jsonl"
    inner = build("tests.custom_strategy.RecordingMessageFedAvg", {"record_to": str(record)})
    assert isinstance(inner.strategy, RecordingMessageFedAvg)
    instructions, arrays, _ = round_of(inner, connected(), extra={"note": "text"})
    assert arrays is not None
    (call,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(reply["node"] for reply in call["replies"]) == [1000, 1001, 1002]
    # Strings/JSON (label_hist, note) and the peer-id key stay out of the strategy's way.
    assert {tuple(reply["metrics"]) for reply in call["replies"]} == {("loss", "num-examples")}
    assert {reply["arrays"] for reply in call["replies"]} == {len(MODEL)}
    assert all(ins.config["server-round"] == 1 for _, ins in instructions)


def test_failed_answers_reach_the_message_strategy_as_error_replies(tmp_path):
    seen: list = []

    class Watching(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.extend((r.metadata.src_node_id, r.has_error()) for r in replies)
            return super().aggregate_train(server_round, replies)

    adapter = MessageStrategyAdapter(Watching(min_train_nodes=1, min_available_nodes=1),
                                     ndarrays_to_parameters(MODEL), NAMES)
    _, arrays, _ = round_of(adapter, connected(), failing=(1,))
    assert sorted(seen) == [(1000, False), (1001, True), (1002, False)]
    np.testing.assert_allclose(arrays[0], MODEL[0] + (10 * 0 + 30 * 2) / 40, rtol=1e-6)


def test_a_strategy_that_raises_costs_the_round_not_the_model(caplog):
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise KeyError("bug")

    adapter = MessageStrategyAdapter(Broken(min_train_nodes=1, min_available_nodes=1),
                                     ndarrays_to_parameters(MODEL), NAMES)
    _, arrays, _ = round_of(adapter, connected())
    assert arrays is None
    assert "Broken.aggregate_train failed (KeyError: 'bug'); keeping the previous model" \
        in caplog.text


def test_too_few_nodes_end_the_round_after_a_bounded_wait(caplog):
    manager = connected(2, BoundedClientManager(max_wait=1))
    adapter = build("flwr.serverapp.strategy.FedAvg", {"min_available_nodes": 3})
    started = time.monotonic()
    strategy = ManagedStrategy(adapter, {ARCH_KEY: "{}"}, names=NAMES)
    assert strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager) == []
    assert time.monotonic() - started < 20
    assert "wants more nodes than are connected" in caplog.text


def test_nested_strategies_from_toml_for_both_apis():
    dp_args = {"noise_multiplier": 0.1, "clipping_norm": 1.0, "num_sampled_clients": 3}
    legacy = build("flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping",
                   {"strategy": {"path": "flwr.server.strategy.FedAvg"}, **dp_args})
    assert isinstance(legacy, LegacyDP) and isinstance(legacy.strategy, LegacyFedAvg)
    # The nested strategy got the driver's defaults (the initial model among them).
    assert legacy.initialize_parameters(None) is not None
    message = build("flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping",
                    {"strategy": {"path": "flwr.serverapp.strategy.FedAdam",
                                  "args": {"eta": 0.01}}, **dp_args})
    assert isinstance(message.strategy, MessageDP)
    assert isinstance(message.strategy.strategy, FedAdam) and message.strategy.strategy.eta == 0.01
    # Shifted by k + 1: Flower's clipping divides by the update's norm (zero for a copy).
    _, arrays, _ = round_of(message, connected(), shift=lambda client: client + 1)
    assert arrays is not None and arrays[0].shape == MODEL[0].shape


@pytest.mark.parametrize(("path", "args", "message"), [
    ("flwr.server.strategy.QFedAvg", {},
     f"{FIELD} = 'flwr.server.strategy.QFedAvg' needs evaluate_fn, a Python callable"),
    ("flwr.server.strategy.Bulyan", {}, f"needs to_keep for its first aggregation rule "
     f"(aggregate_krum): give it in {FIELD}_args"),
    ("flwr.serverapp.strategy.QFedAvg", {},
     f"needs client_learning_rate: give it in {FIELD}_args"),
    ("flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping",
     {"strategy": {"path": "flwr.serverapp.strategy.FedAvg"}, "noise_multiplier": 0.1,
      "clipping_norm": 1.0, "num_sampled_clients": 1},
     f"{FIELD}_args.strategy.path = 'flwr.serverapp.strategy.FedAvg' is a "
     "flwr.serverapp.strategy.Strategy, but the strategy it is given to wraps a "
     "flwr.server.strategy.Strategy"),
    ("flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping",
     {"strategy": {"path": "flwr.server.strategy.FedAvg", "arguments": {}}},
     f"{FIELD}_args.strategy = {{ path = ..., args = {{...}} }} names a nested strategy; "
     "unknown keys ['arguments']"),
    ("flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping",
     {"strategy": {"path": "nowhere.Nothing"}},
     f"{FIELD}_args.strategy.path = 'nowhere.Nothing' cannot be imported"),
])
def test_what_a_config_cannot_give_is_refused_at_build_in_one_line(path, args, message):
    with pytest.raises(ConfigError) as refused:
        build(path, args)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_bulyan_with_to_keep_and_message_qfedavg_with_a_learning_rate_build():
    assert build("flwr.server.strategy.Bulyan", {"to_keep": 0}) is not None
    qfedavg = build("flwr.serverapp.strategy.QFedAvg", {"client_learning_rate": 0.1})
    assert qfedavg.strategy.train_loss_key == "loss"  # the loss key the project's clients send


def test_message_strategy_state_survives_a_checkpoint(tmp_path):
    def adam():
        return build("flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping",
                     {"strategy": {"path": "flwr.serverapp.strategy.FedAdam"},
                      "noise_multiplier": 0.0, "clipping_norm": 100.0,
                      "num_sampled_clients": 3})

    first = adam()
    round_of(first, connected(), shift=lambda client: client + 1)
    torch.save(strategy_state(first), tmp_path / "state.pt")
    resumed = adam()
    restore_strategy(resumed, torch.load(tmp_path / "state.pt", weights_only=True))
    saved, restored = first.strategy.strategy, resumed.strategy.strategy
    assert saved.m_t is not None and sorted(restored.m_t) == sorted(saved.m_t) == NAMES
    for name in NAMES:
        np.testing.assert_array_equal(restored.m_t[name], saved.m_t[name])
        np.testing.assert_array_equal(restored.v_t[name], saved.v_t[name])
    # The next round of both gives the same model: the moments were the whole state.
    _, after_saved, _ = round_of(first, connected(), shift=lambda c: 2 * c + 1)
    _, after_restored, _ = round_of(resumed, connected(), shift=lambda c: 2 * c + 1)
    for left, right in zip(after_saved, after_restored, strict=True):
        np.testing.assert_array_equal(left, right)
