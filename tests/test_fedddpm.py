"""FedDDPM / FedDDPM+: auxiliary set from pre-trained client models, server correction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.federation.strategy import client_strategy_defaults, run_context
from fedphd.common.settings.config import ModelConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import LOCAL_STEPS_KEY, PHASE_KEY
from fedphd.common.wire.transport import (
    FitRes,
    SimpleClientManager,
    ndarrays_to_parameters,
    ok_status,
)
from fedphd.server.fedddpm import FedDDPM, SlowLearning, shares
from tests.conftest import TESTS_DIR
from tests.test_strategy import FakeProxy

TINY = build_unet(unet_config(ModelConfig()), seed=0)
ARCH = architecture_to_json(architecture_of(TINY))


def test_slow_learning_triggers_only_when_the_improvement_is_below_the_threshold():
    detector = SlowLearning(window=2, threshold=0.05)
    # Not enough history for the first `window` rounds, whatever the losses.
    assert [detector.observe(x) for x in (1.0, 1.0)] == [False, False]
    assert detector.observe(1.0) is True  # 0 % over two rounds
    # The history restarted: two fresh rounds are needed before the next decision.
    assert [detector.observe(x) for x in (0.9, 0.9)] == [False, False]
    assert detector.observe(0.8) is False  # (0.9 - 0.8) / 0.9 = 11 % >= 5 %
    assert detector.observe(0.78) is False  # (0.9 - 0.78) / 0.9 = 13 %
    assert detector.observe(0.77) is True  # (0.8 - 0.77) / 0.8 = 3.75 % < 5 %


def test_auxiliary_shares_follow_the_clients_data_sizes():
    assert shares([100, 300], 40) == [10, 30]
    assert sum(shares([7, 5, 1], 10)) == 10 and min(shares([7, 5, 1], 10)) >= 1
    assert shares([1, 1000], 4)[0] == 1  # every client's model contributes


def strategy(**kwargs) -> FedDDPM:
    cfg = load_config(None, ["training.batch_size=8", "diffusion.sampling_steps=2"])
    initial = ndarrays_to_parameters(model_to_ndarrays(TINY))
    args = {"pretrain_steps": 7, "aux_samples": 24, "server_steps": 15, "server_lr": 1e-3,
            **kwargs}
    context = run_context(cfg, ARCH)
    return FedDDPM(**{**client_strategy_defaults(1.0, 1, initial), **args},
                   run_config=context["run_config"], architecture=context["architecture"])


def answers(proxies, models, examples):
    return [(proxy, FitRes(ok_status(), codec.encode(model, "fp32"), n, {"loss": 0.1}))
            for proxy, model, n in zip(proxies, models, examples, strict=True)]


def perturbed(scale: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [a + scale * rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f"
            else a for a in model_to_ndarrays(TINY)]


def pretrained(fed: FedDDPM, manager: SimpleClientManager):
    instructions = fed.configure_fit(1, ndarrays_to_parameters(model_to_ndarrays(TINY)), manager)
    proxies = [proxy for proxy, _ in instructions]
    fed.aggregate_fit(1, answers(proxies, [perturbed(0.01, 1), perturbed(0.01, 2)], [10, 30]),
                      [])
    return proxies


def manager_with(count: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for cid in range(count):
        manager.register(FakeProxy(str(cid)))
    return manager


def test_first_round_pretrains_every_client_and_builds_the_auxiliary_set():
    fed = strategy(fraction_fit=0.5)
    manager = manager_with(2)
    instructions = fed.configure_fit(1, ndarrays_to_parameters(model_to_ndarrays(TINY)), manager)
    assert len(instructions) == 2  # everyone pre-trains, whatever fraction_fit says
    assert all(ins.config[LOCAL_STEPS_KEY] == 7 and ins.config[PHASE_KEY] == "pretrain"
               for _, ins in instructions)
    proxies = [proxy for proxy, _ in instructions]
    params, metrics = fed.aggregate_fit(
        1, answers(proxies, [perturbed(0.01, 1), perturbed(0.01, 2)], [10, 30]), [])
    assert params is None  # pre-training does not change the global model
    assert metrics["aux_samples"] == 24 and json.loads(metrics["aux_per_client"]) == [6, 18]
    assert len(fed.aux_train) + len(fed.aux_heldout) == 24
    assert fed.aux_train.shape[1:] == (1, 16, 16)
    assert float(fed.aux_train.min()) >= -1.0 and float(fed.aux_train.max()) <= 1.0
    # Later rounds are ordinary FedAvg rounds again.
    later = fed.configure_fit(2, ndarrays_to_parameters(model_to_ndarrays(TINY)), manager)
    assert len(later) == 1 and PHASE_KEY not in later[0][1].config


def fedavg_of(models, examples):
    total = sum(examples)
    return [sum(m[i] * n for m, n in zip(models, examples, strict=True)) / total
            for i in range(len(models[0]))]


def test_fedddpm_corrects_every_round_on_the_auxiliary_set():
    fed = strategy()
    proxies = pretrained(fed, manager_with(2))
    models = [perturbed(0.02, 3), perturbed(0.02, 4)]
    params, metrics = fed.aggregate_fit(2, answers(proxies, models, [10, 30]), [])
    assert metrics["corrected"] is True
    assert metrics["aux_loss_after"] < metrics["aux_loss"]  # held-out: not the images it saw
    mean = fedavg_of(models, [10, 30])
    new = codec.decode(params)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(new, mean, strict=True))


def test_fedddpm_plus_is_plain_fedavg_until_learning_is_slow():
    never = strategy(plus=True, window=1, threshold=-1e9)  # no improvement is ever "slow"
    proxies = pretrained(never, manager_with(2))
    for server_round in (2, 3, 4):
        models = [perturbed(0.02, server_round), perturbed(0.02, 10 + server_round)]
        params, metrics = never.aggregate_fit(server_round, answers(proxies, models, [10, 30]),
                                              [])
        assert metrics["corrected"] is False
        mean = fedavg_of(models, [10, 30])
        assert all(np.allclose(a, b, atol=1e-6) for a, b in
                   zip(codec.decode(params), mean, strict=True))
    always = strategy(plus=True, window=1, threshold=1e9)  # every improvement is "slow"
    proxies = pretrained(always, manager_with(2))
    flags = [always.aggregate_fit(r, answers(proxies, [perturbed(0.02, r)] * 2, [1, 1]),
                                  [])[1]["corrected"] for r in (2, 3, 4, 5)]
    assert flags == [False, True, False, True]  # one window of history, then a correction


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fedddpm", "fedddpm-plus"])
def test_fedddpm_configs_run_end_to_end(variant, tmp_path, ports):
    from tests.test_deployment import launch

    cfg = load_config(TESTS_DIR.parent / f"configs/{variant}-digits.toml", [])
    args = {**cfg.topology.cloud_strategy_args, "pretrain_steps": 6, "aux_samples": 32,
            "server_steps": 4}
    if variant == "fedddpm-plus":
        args.update(window=1, threshold=0.2)
    inline = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in args.items()) + " }"
    out, config = tmp_path / variant, TESTS_DIR.parent / f"configs/{variant}-digits.toml"
    records = launch(out, ports, "--config", str(config),
                     "--set", "topology.cloud_rounds=5", "--set", "topology.clients=3",
                     "--set", f"topology.cloud_strategy_args={inline}")
    cloud = [r for r in records if r["tier"] == "cloud"]
    first, later = cloud[0], cloud[1:]
    # Round 1: every client pre-trained and uploaded its model (the extra traffic, metered).
    assert first["strategy"]["phase"] == "pretrain" and not first["model_updated"]
    assert first["strategy"]["aux_samples"] == 32 and len(first["participants"]) == 3
    assert first["bytes"]["client->cloud"] >= 0.9 * later[0]["bytes"]["client->cloud"] > 0
    assert all(r["model_updated"] for r in later)
    flags = [r["strategy"]["corrected"] for r in later]
    if variant == "fedddpm":
        assert all(flags)
        assert all(r["strategy"]["aux_loss_after"] < r["strategy"]["aux_loss"] for r in later)
    else:
        # The logged held-out losses replayed through the criterion give the same decisions.
        detector = SlowLearning(window=1, threshold=0.2)
        assert flags == [detector.observe(r["strategy"]["aux_loss"]) for r in later]
        assert flags[0] is False


def test_a_checkpointed_fedddpm_corrects_the_next_round_as_the_original(tmp_path):
    """The auxiliary set, FedDDPM+'s loss history and the server optimiser (Adam moments,
    noise generator, batch position) survive a cloud checkpoint: the restored strategy's next
    round is bit-identical to the original's."""
    from fedphd.common.federation.checkpoint import (
        CloudCheckpoint,
        restore_strategy,
        strategy_state,
    )

    original = strategy(plus=True, window=1, threshold=1e9)
    proxies = pretrained(original, manager_with(2))
    for server_round in (2, 3, 4):  # corrected in round 3 (the trainer exists), not in 4
        original.aggregate_fit(server_round, answers(proxies, [perturbed(0.02, server_round)] * 2,
                                                     [1, 1]), [])
    cfg = load_config()
    CloudCheckpoint(4, ARCH, [], {}, strategy_state(original), {}, {}, (0, 0, 0), 0,
                    cfg.model_dump(mode="json")).save(tmp_path)
    restored = strategy(plus=True, window=1, threshold=1e9)
    restore_strategy(restored, CloudCheckpoint.load(tmp_path).strategy)
    fresh = strategy(plus=True, window=1, threshold=1e9)
    pretrained(fresh, manager_with(2))

    def next_round(fed: FedDDPM) -> tuple[list[np.ndarray], dict]:
        models = [perturbed(0.02, 5), perturbed(0.02, 15)]
        params, metrics = fed.aggregate_fit(5, answers(proxies, models, [10, 30]), [])
        return codec.decode(params), metrics

    expected, expected_metrics = next_round(original)
    again, metrics = next_round(restored)
    timing = "server_seconds"
    assert metrics.pop(timing) > 0 and expected_metrics.pop(timing) > 0
    assert metrics == expected_metrics and expected_metrics["corrected"] is True
    assert all(np.array_equal(a, b) for a, b in zip(again, expected, strict=True))
    # Without the saved history, FedDDPM+ would not have corrected this round.
    assert next_round(fresh)[1]["corrected"] != expected_metrics["corrected"]
