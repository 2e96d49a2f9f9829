"""FedDiffuse: only the shared U-Net groups cross the wire; private parts live on client disk."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from fedphd.client.client import DiffusionClient, local_data
from fedphd.common.core.models import (
    PRESETS,
    architecture_of,
    architecture_to_json,
    build_unet,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.core.unet_groups import (
    GROUPS,
    group_indices,
    group_of,
    group_sizes,
    select,
    tensor_names,
)
from fedphd.common.federation.strategy import (
    ManagedStrategy,
    client_strategy_defaults,
    run_context,
)
from fedphd.common.federation.strategy_builder import build_strategy
from fedphd.common.settings.config import ModelConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    ARCH_KEY,
    LOCAL_STEPS_KEY,
    RETURN_GROUPS_KEY,
    SEND_GROUPS_KEY,
    TRAIN_GROUPS_KEY,
)
from fedphd.common.wire.transport import (
    Code,
    FitIns,
    FitRes,
    SimpleClientManager,
    ndarrays_to_parameters,
    ok_status,
)
from fedphd.server.feddiffuse import FedDiffuse, average_groups, usplit_assignment
from tests.conftest import TESTS_DIR, fedphd
from tests.test_strategy import FakeProxy

TINY = build_unet(unet_config(ModelConfig()), seed=0)
TINY_ARCH = architecture_to_json(architecture_of(TINY))
NAMES = tensor_names(TINY_ARCH)
UP = group_indices(NAMES, ("up",))


def test_every_tensor_is_in_exactly_the_group_design_names():
    assert group_of("conv_in.weight") == "down"
    assert group_of("time_embedding.linear_1.weight") == "down"
    assert group_of("down_blocks.1.attentions.0.to_q.weight") == "down"
    assert group_of("mid_block.resnets.0.conv1.weight") == "mid"
    assert group_of("up_blocks.0.resnets.0.conv1.weight") == "up"
    assert group_of("conv_norm_out.weight") == "up" and group_of("conv_out.bias") == "up"
    with pytest.raises(ValueError, match="no U-Net group"):
        group_of("add_embedding.linear_1.weight")
    counts = Counter(group_of(name) for name in NAMES)
    assert set(counts) == set(GROUPS) and sum(counts.values()) == len(NAMES)


def test_decoder_share_of_the_reference_unet():
    """What UDEC saves is the encoder + bottleneck share. With diffusers' UNet2DModel the
    decoder is the larger half (its ResNets take the skip connections and it has one more
    layer per level): measured 62.5 % of the 35.75 M model's bytes, so UDEC sends 0.62x FULL,
    not the paper's 0.26x (see docs/design.md)."""
    model = build_unet(PRESETS["ddpm-cifar10"])
    names = list(model.state_dict())
    sizes = group_sizes(names, model_to_ndarrays(model))
    total = sum(sizes.values())
    assert total == 35_746_307 * 4
    share = sizes["up"] / total
    assert 0.60 < share < 0.65, share
    assert sizes["down"] > sizes["mid"] > 0


def managed_feddiffuse(mode: str, clients: int = 4):
    initial = ndarrays_to_parameters(model_to_ndarrays(TINY))
    inner = build_strategy("fedphd.server.feddiffuse.FedDiffuse", {"mode": mode},
                           client_strategy_defaults(1.0, 1, initial), "topology.cloud_strategy",
                           run_context(None, TINY_ARCH))
    strategy = ManagedStrategy(inner, {ARCH_KEY: TINY_ARCH}, names=NAMES)
    manager = SimpleClientManager()
    for cid in range(clients):
        manager.register(FakeProxy(str(cid)))
    return strategy, manager, initial


def reply(proxy, arrays, examples):
    metrics = {"client_id": int(proxy.cid), "loss": 0.1, "label_hist": json.dumps([examples])}
    return proxy, FitRes(ok_status(), codec.encode(arrays, "fp32"), examples, metrics)


def test_udec_sends_and_accepts_only_decoder_tensors_and_averages_them():
    strategy, manager, initial = managed_feddiffuse("udec", clients=3)
    global_model = model_to_ndarrays(TINY)
    instructions = strategy.configure_fit(1, initial, manager)
    up_bytes = group_sizes(NAMES, global_model)["up"]
    for _proxy, ins in instructions:
        sent = codec.decode(ins.parameters)
        assert ins.config[SEND_GROUPS_KEY] == "up" and ins.config[RETURN_GROUPS_KEY] == "up"
        assert ins.config[TRAIN_GROUPS_KEY] == "down,mid,up"  # the private parts train too
        assert [a.shape for a in sent] == [global_model[i].shape for i in UP]
        assert codec.payload_bytes(ins.parameters) < up_bytes + 200 * len(UP)  # + npy headers
    proxies = [proxy for proxy, _ in instructions]
    decoders = [[np.full_like(global_model[i], value) for i in UP] for value in (1.0, 4.0)]
    full_model = [a + 1 for a in global_model]  # a client that leaks its private parts
    results = [reply(proxies[0], decoders[0], 10), reply(proxies[1], decoders[1], 30),
               reply(proxies[2], full_model, 10)]
    aggregate = strategy.aggregate_round(1, results, [])
    params, metrics = aggregate.parameters, aggregate.metrics
    assert "groups up only" in aggregate.summary.rejected[f"client {proxies[2].cid}"]
    merged = codec.decode(params)
    for i in UP:
        assert np.allclose(merged[i], 0.25 * 1.0 + 0.75 * 4.0)
    private = [i for i in range(len(NAMES)) if i not in UP]
    assert all(np.array_equal(merged[i], global_model[i]) for i in private)
    assert json.loads(metrics["groups_averaged"]) == {"down": 0, "mid": 0, "up": 2}


def test_usplit_pairs_clients_and_every_pair_covers_the_model():
    mid_with_up = 0
    for draw in range(400):
        rng = np.random.default_rng(draw)
        cids = [str(c) for c in range(5)]
        plan = usplit_assignment(cids, rng)
        assert sorted(plan) == cids
        sides = Counter(g for groups in plan.values() for g in groups if g != "mid")
        assert all(not {"up", "down"} <= set(groups) for groups in plan.values())
        # Two pairs (one up, one down each) and an odd client out with mid plus one side.
        assert sides["up"] + sides["down"] == 5 and min(sides.values()) == 2
        assert sum(1 for groups in plan.values() if "mid" in groups) == 3
        mid_with_up += sum(1 for groups in plan.values() if groups == ("mid", "up"))
    # mid goes to either member of a pair with probability 1/2.
    assert 0.4 < mid_with_up / (400 * 3) < 0.6


def test_usplit_sends_everything_and_averages_each_group_over_its_trainers():
    strategy, manager, initial = managed_feddiffuse("usplit", clients=4)
    global_model = model_to_ndarrays(TINY)
    instructions = strategy.configure_fit(2, initial, manager)
    answers, expected = [], {}
    for value, (proxy, ins) in enumerate(instructions, start=1):
        assert len(codec.decode(ins.parameters)) == len(NAMES)  # the whole model goes down
        groups = tuple(ins.config[RETURN_GROUPS_KEY].split(","))
        assert ins.config[TRAIN_GROUPS_KEY] == ins.config[RETURN_GROUPS_KEY]
        at = group_indices(NAMES, groups)
        answers.append(reply(proxy, [np.full_like(global_model[i], value) for i in at], value))
        for group in groups:
            expected.setdefault(group, []).append(value)
    params, _ = strategy.aggregate_fit(2, answers, [])
    merged = codec.decode(params)
    for group, values in expected.items():
        mean = sum(v * v for v in values) / sum(values)  # weighted by n_k = value
        assert all(np.allclose(merged[i], mean) for i in group_indices(NAMES, (group,)))
    assert set(expected) == set(GROUPS)


def test_usplit_records_which_client_trained_which_groups():
    """The round's record names, per client, the groups it trained: its established identity
    where the server has one (a certificate's), else the client_id of its answer."""
    from fedphd.common.wire.transport import PeerIdentity

    strategy, manager, initial = managed_feddiffuse("usplit", clients=4)
    global_model = model_to_ndarrays(TINY)
    instructions = strategy.configure_fit(3, initial, manager)
    # The peer on connection "2" was identified at join as client 7 (whatever it declares).
    certified = next(proxy for proxy, _ in instructions if proxy.cid == "2")
    certified.peer_identity = PeerIdentity("client", 7, certified=True)
    answers, expected = [], {}
    for proxy, ins in instructions:
        groups = ins.config[TRAIN_GROUPS_KEY].split(",")
        at = group_indices(NAMES, tuple(groups))
        proxy_answer = reply(proxy, [global_model[i] + 1 for i in at], 5)
        if proxy is certified:
            proxy_answer[1].metrics["client_id"] = 7  # an honest client says who it is
        answers.append(proxy_answer)
        expected["client 7" if proxy is certified else f"client {proxy.cid}"] = groups
    _, metrics = strategy.aggregate_fit(3, answers, [])
    trained = json.loads(metrics["groups_trained"])
    assert trained == expected
    assert len(trained) == 4 and "client 2" not in trained
    # Every group is trained by someone, and no client trains both sides.
    assert {g for groups in trained.values() for g in groups} == set(GROUPS)
    assert all(not {"up", "down"} <= set(groups) for groups in trained.values())


def test_fixed_modes_record_no_per_client_groups():
    strategy, manager, initial = managed_feddiffuse("full", clients=2)
    instructions = strategy.configure_fit(1, initial, manager)
    answers = [reply(proxy, model_to_ndarrays(TINY), 3) for proxy, _ in instructions]
    _, metrics = strategy.aggregate_fit(1, answers, [])
    assert "groups_trained" not in metrics and "groups_averaged" in metrics


def test_average_groups_keeps_a_group_nobody_trained():
    model = [np.zeros(2, np.float32) for _ in NAMES]
    down = group_indices(NAMES, ("down",))
    new, counts = average_groups(model, NAMES, [(("down",), [np.ones(2, np.float32)
                                                             for _ in down], 3)])
    assert counts == {"down": 1, "mid": 0, "up": 0}
    assert all(np.array_equal(new[i], np.ones(2)) for i in down)
    assert all(not new[i].any() for i in UP)


def test_feddiffuse_refuses_a_hierarchy_and_unknown_modes(ports):
    with pytest.raises(ValueError, match="mode must be one of"):
        FedDiffuse(mode="uenc", tensor_names=NAMES)
    with pytest.raises(ValueError, match="tensor_names"):
        FedDiffuse(mode="udec")
    config = TESTS_DIR.parent / "configs/feddiffuse-udec-digits.toml"
    result = fedphd("cloud", "--config", str(config), "--set", "topology.edges=2",
                    "--listen", f"127.0.0.1:{ports['cloud']}", timeout=120)
    assert result.returncode == 2
    assert "set topology.edges = 0" in result.stderr


# --------------------------------------------------------------------------- the client


def instruction(groups: dict[str, str], steps: int = 2) -> FitIns:
    sent = group_indices(NAMES, groups[SEND_GROUPS_KEY].split(","))
    arrays = select(model_to_ndarrays(TINY), sent)
    return FitIns(codec.encode(arrays, "fp32"),
                  {ARCH_KEY: TINY_ARCH, LOCAL_STEPS_KEY: steps, **groups})


UDEC = {SEND_GROUPS_KEY: "up", TRAIN_GROUPS_KEY: "down,mid,up", RETURN_GROUPS_KEY: "up"}


def new_client(cfg, state_dir) -> DiffusionClient:
    return DiffusionClient(cfg, 1, local_data(cfg, 1), torch.device("cpu"), state_dir)


def test_client_keeps_private_parts_on_disk_across_a_restart(tmp_path):
    cfg = load_config(None, ["topology.clients=4"])
    private = [i for i in range(len(NAMES)) if i not in UP]
    first = new_client(cfg, tmp_path / "client-1")
    answer = first.fit(instruction(UDEC))
    assert answer.status.code == Code.OK, answer.status.message
    assert answer.metrics["groups_returned"] == "up"
    assert [a.shape for a in codec.decode(answer.parameters)] == [
        model_to_ndarrays(TINY)[i].shape for i in UP]
    trained = model_to_ndarrays(first.trainer.model)
    initial = model_to_ndarrays(TINY)
    assert any(not np.array_equal(trained[i], initial[i]) for i in private)  # trained locally
    saved = tmp_path / "client-1" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert saved.is_file()

    # A restarted client (new process state, same disk) trains only the decoder this time:
    # its private parts must be exactly those it saved, not the run's initial weights.
    restarted = new_client(cfg, tmp_path / "client-1")
    restarted.fit(instruction({**UDEC, TRAIN_GROUPS_KEY: "up"}))
    after = model_to_ndarrays(restarted.trainer.model)
    assert all(np.array_equal(after[i], trained[i]) for i in private)

    # Without its disk a client starts its private parts from the run's initial weights.
    fresh = new_client(cfg, tmp_path / "elsewhere")
    fresh.fit(instruction({**UDEC, TRAIN_GROUPS_KEY: "up"}))
    again = model_to_ndarrays(fresh.trainer.model)
    assert all(np.array_equal(again[i], initial[i]) for i in private)


def test_usplit_client_trains_and_returns_only_its_groups(tmp_path):
    cfg = load_config(None, ["topology.clients=4"])
    client = new_client(cfg, tmp_path / "c")
    groups = {SEND_GROUPS_KEY: "down,mid,up", TRAIN_GROUPS_KEY: "down",
              RETURN_GROUPS_KEY: "down"}
    answer = client.fit(instruction(groups, steps=3))
    down = group_indices(NAMES, ("down",))
    returned = codec.decode(answer.parameters)
    initial, after = model_to_ndarrays(TINY), model_to_ndarrays(client.trainer.model)
    assert [a.shape for a in returned] == [initial[i].shape for i in down]
    assert any(not np.array_equal(a, initial[i]) for a, i in zip(returned, down, strict=True))
    untouched = [i for i in range(len(NAMES)) if i not in down]
    assert all(np.array_equal(after[i], initial[i]) for i in untouched)
    assert all(p.requires_grad for p in client.trainer.model.parameters())  # unfrozen again
    assert not (tmp_path / "c" / "model").exists()  # nothing private: nothing to keep


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "usplit", "udec", "ulatdec"])
def test_feddiffuse_configs_run_end_to_end(mode, tmp_path, ports):
    from tests.test_deployment import EVALUATE, launch

    out = tmp_path / mode
    records = launch(out, ports, "--config",
                     str(TESTS_DIR.parent / f"configs/feddiffuse-{mode}-digits.toml"),
                     "--set", "topology.cloud_rounds=2", "--set", "topology.clients=4",
                     *EVALUATE)
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [1, 2]
    assert all(r["model_updated"] and not r["rejected"] for r in cloud)
    assert all(r["digests_checked"] == 4 and not r["digest_mismatches"] for r in cloud)
    averaged = cloud[0]["strategy"]["groups_averaged"]
    model_bytes = sum(group_sizes(NAMES, model_to_ndarrays(TINY)).values())
    shared = {"full": GROUPS, "usplit": GROUPS, "udec": ("up",), "ulatdec": ("mid", "up")}[mode]
    shared_bytes = sum(group_sizes(NAMES, model_to_ndarrays(TINY))[g] for g in shared)
    down = cloud[0]["bytes"]["cloud->client"] / 4
    assert shared_bytes < down < shared_bytes + 0.02 * model_bytes  # tensors + instruction
    payload = cloud[0]["reported_by_peers"]["payload"]
    if mode == "usplit":
        # Each client sends back one side (and maybe mid): about half the model in all.
        assert averaged["up"] == 2 and averaged["down"] == 2 and averaged["mid"] == 2
        for record in cloud:  # every round says whose update went into which groups
            trained = record["strategy"]["groups_trained"]
            assert sorted(trained) == [f"client {c}" for c in range(4)]
            assert sorted(g for groups in trained.values() for g in groups) == sorted(
                [g for g in GROUPS for _ in range(2)])
        assert 0.48 * 4 * model_bytes < payload < 0.52 * 4 * model_bytes
    else:
        assert all(averaged[g] == (4 if g in shared else 0) for g in GROUPS)
        assert abs(payload - 4 * shared_bytes) < 0.01 * 4 * shared_bytes
    evals = [r for r in records if r["tier"] in ("eval", "client-eval")]
    if mode in ("udec", "ulatdec"):
        assert [r["tier"] for r in evals] == ["client-eval"]
        assert sorted(evals[0]["per_client"]) == [f"client {c}" for c in range(4)]
        for c in range(4):
            assert (out / "clients" / f"client-{c}" / "model" / "model_index.json").is_file()
            assert (out / "clients" / f"client-{c}" / "samples.png").is_file()
        assert not (out / "samples.png").exists()
    else:
        assert [r["tier"] for r in evals] == ["eval"]
        assert (out / "samples.png").is_file()


def test_usplit_pairs_the_same_clients_whatever_their_connection_order():
    """USPLIT's pairing follows the clients' ids, not their (random) connection ids: the
    same seed gives every client the same groups after the clients reconnected in another
    order, e.g. to a resumed cloud."""
    import random

    from fedphd.common.wire.transport import BoundedClientManager
    from tests.test_strategy import IdentifiedProxy

    def groups_by_client(order: list[int], connection_id) -> dict[int, str]:
        strategy, _, initial = managed_feddiffuse("usplit")
        manager = BoundedClientManager(max_wait=1)
        for client in order:
            manager.register(IdentifiedProxy(connection_id(client), client))
        random.seed("round 1")
        return {proxy.client_id: ins.config[TRAIN_GROUPS_KEY]
                for proxy, ins in strategy.configure_fit(1, initial, manager)}

    first = groups_by_client([0, 1, 2, 3, 4], lambda client: f"{client:02x}")
    # Connection ids that sort the other way round, registered in another order.
    assert groups_by_client([4, 2, 0, 3, 1], lambda client: f"{255 - client:02x}") == first
    assert len(set(first.values())) > 1  # really split
