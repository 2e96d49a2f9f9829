"""The client-side method interface: each method lives in its own module behind one interface,
is driven by its own instruction keys, and the generic client names none of them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fedphd.client.client as client_module
from fedphd.client.client import DiffusionClient, local_data
from fedphd.client.feddiffuse import FedDiffuseLocal
from fedphd.client.fedphd import FedPhDLocal, group_lasso_penalty
from fedphd.client.fedprox import FedProxLocal, proximal_term, snapshot
from fedphd.client.method import LocalMethod, LocalMethods, RoundTerm
from fedphd.client.methods import LOCAL_METHODS, local_methods
from fedphd.client.moon import MoonLocal
from fedphd.client.scaffold import ScaffoldLocal, parameter_count
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    build_unet,
    model_to_ndarrays,
    unet_config,
)
from fedphd.common.settings.config import ModelConfig, load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    ARCH_KEY,
    CONTROL_DELTA_KEY,
    GROUP_LASSO_KEY,
    LOCAL_STEPS_KEY,
    MOON_MU_KEY,
    MOON_TAU_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    SERVER_CONTROL_KEY,
    TRAIN_GROUPS_KEY,
)
from fedphd.common.wire.transport import Code, FitIns

MODEL = build_unet(unet_config(ModelConfig()), seed=0)
SIZE = parameter_count(MODEL)
SERVER_C = np.random.default_rng(3).normal(0, 1e-3, SIZE).astype(np.float32)

# The keys that switch each registered method on.
ACTIVATING = {
    FedProxLocal: {PROXIMAL_MU_KEY: 0.01},
    FedPhDLocal: {GROUP_LASSO_KEY: 1e-4},
    MoonLocal: {MOON_MU_KEY: 1.0, MOON_TAU_KEY: 0.5},
    ScaffoldLocal: {SERVER_CONTROL_KEY: codec.vector_to_bytes(SERVER_C)},
    FedDiffuseLocal: {TRAIN_GROUPS_KEY: "down"},
}
# Values of their keys that leave them off.
OFF = {
    FedProxLocal: {PROXIMAL_MU_KEY: 0.0},
    FedPhDLocal: {GROUP_LASSO_KEY: 0.0},
    MoonLocal: {MOON_MU_KEY: 0.0},
    ScaffoldLocal: {},
    FedDiffuseLocal: {TRAIN_GROUPS_KEY: "down,mid,up"},
}
PLAIN = {ARCH_KEY: architecture_to_json(architecture_of(MODEL)), LOCAL_STEPS_KEY: 2}


def fresh_model() -> torch.nn.Module:
    return build_unet(unet_config(ModelConfig()), seed=0)


def test_every_registered_method_is_covered_here_and_names_are_distinct():
    assert set(ACTIVATING) == set(LOCAL_METHODS) == set(OFF)
    assert all(issubclass(method, LocalMethod) for method in LOCAL_METHODS)
    assert len({method.name for method in LOCAL_METHODS}) == len(LOCAL_METHODS)
    with pytest.raises(ValueError, match="distinct names"):
        LocalMethods([MoonLocal(), MoonLocal()])


@pytest.mark.parametrize("method", LOCAL_METHODS, ids=lambda method: method.name)
def test_a_method_is_active_with_its_keys_only(method):
    model = fresh_model()
    others = {key: value for cls, keys in ACTIVATING.items() if cls is not method
              for key, value in keys.items()}
    assert method().begin_round(model, PLAIN) is None
    assert method().begin_round(model, {**PLAIN, **others}) is None  # others' keys: not its own
    assert method().begin_round(model, {**PLAIN, **OFF[method]}) is None
    term = method().begin_round(model, {**PLAIN, **ACTIVATING[method]})
    assert isinstance(term, RoundTerm)
    term.close()
    assert all(p.requires_grad for p in model.parameters())  # closing undid the round
    assert not model._forward_pre_hooks and not model.mid_block._forward_hooks


def test_a_plain_instruction_trains_without_extra_loss_or_hook():
    terms = local_methods().begin_round(fresh_model(), PLAIN)
    assert terms.terms == () and terms.extra_loss() is None and terms.gradient_hook() is None
    assert terms.finish(MODEL) == {}


def test_extra_losses_add_up_in_registry_order_and_terms_say_what_they_are():
    model = fresh_model()
    config = {**PLAIN, **ACTIVATING[FedProxLocal], **ACTIVATING[FedPhDLocal],
              **ACTIVATING[MoonLocal]}
    terms = local_methods().begin_round(model, config)
    assert terms.descriptions() == ["proximal term, mu = 0.01", "MOON term, mu = 1"]
    anchor = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model(images, torch.tensor([1, 2]))  # MOON's term reads the forward pass
    expected = (proximal_term(model, anchor, 0.01) + group_lasso_penalty(model, 1e-4)
                + terms.terms[2].loss(model))
    assert torch.equal(terms.extra_loss()(model), expected)
    terms.close()


def test_a_method_that_cannot_start_closes_those_already_started():
    model = fresh_model()
    config = {**PLAIN, **ACTIVATING[MoonLocal], SERVER_CONTROL_KEY: b"not a vector"}
    with pytest.raises(ValueError, match="server control"):
        local_methods().begin_round(model, config)
    assert not model._forward_pre_hooks and not model.mid_block._forward_hooks


def new_client(tmp_path: Path) -> DiffusionClient:
    cfg = load_config(None, ["topology.clients=4", "training.batch_size=8"])
    return DiffusionClient(cfg, 0, local_data(cfg, 0), torch.device("cpu"), tmp_path)


def test_the_generic_client_names_no_method(tmp_path):
    source = Path(client_module.__file__).read_text()
    without_package_paths = re.sub(r"\bfedphd(\.\w+)+", "", source)
    found = re.findall(r"(?i)fedprox|scaffold|moon|lasso|feddiffuse|fedphd\b|proximal",
                       without_package_paths)
    assert found == []
    client = new_client(tmp_path)
    client.fit(FitIns(codec.encode(model_to_ndarrays(MODEL), "fp32"),
                      {**PLAIN, **ACTIVATING[MoonLocal], **ACTIVATING[ScaffoldLocal]}))
    parts = [client, *(part for name, part in vars(client).items()
                       if name != "methods" and hasattr(part, "__dict__"))]
    attributes = [name for part in parts for name in vars(part)]
    assert not [name for name in attributes
                if re.search(r"(?i)scaffold|moon|prox|lasso|previous|control|frozen", name)]
    # The method's state lives with the method.
    assert client.methods[MoonLocal.name].state() is not None
    assert client.methods[ScaffoldLocal.name].state() is not None


def fit(client: DiffusionClient, server_round: int, keys: dict):
    res = client.fit(FitIns(codec.encode(model_to_ndarrays(MODEL), "fp32"),
                            {**PLAIN, ROUND_KEY: server_round, **keys}))
    assert res.status.code == Code.OK, res.status.message
    return res


def same_answer(a, b) -> bool:
    return a.parameters.tensors == b.parameters.tensors and a.metrics.get(
        CONTROL_DELTA_KEY) == b.metrics.get(CONTROL_DELTA_KEY)


def flat(state: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """A method's carried arrays as one vector."""
    return np.concatenate([np.ravel(a) for a in (state if isinstance(state, list) else [state])])


@pytest.mark.parametrize("method", [MoonLocal, ScaffoldLocal], ids=lambda method: method.name)
def test_a_methods_carried_state_is_restored_when_a_round_is_replayed(tmp_path, method):
    """A resumed cloud sends round 2 again: the client replays it from round 2's start, the
    method's state (MOON's previous model, SCAFFOLD's c_i) included, so the answer is the
    same bit for bit."""
    client, keys = new_client(tmp_path), ACTIVATING[method]
    fit(client, 1, keys)
    at_start = flat(client.methods[method.name].state())
    second = fit(client, 2, keys)
    after_second = flat(client.methods[method.name].state())
    assert not np.array_equal(at_start, after_second)  # round 2 moved the state on
    assert same_answer(fit(client, 2, keys), second)
    assert np.array_equal(flat(client.methods[method.name].state()), after_second)

    # The same replay with everything but the methods' state rewound answers differently:
    # the equality above is the method's snapshot's doing.
    unrestored = new_client(tmp_path)
    unrestored.methods.load_state = lambda state: None
    fit(unrestored, 1, keys)
    assert same_answer(fit(unrestored, 2, keys), second)
    assert not same_answer(fit(unrestored, 2, keys), second)


def test_method_states_go_back_with_the_snapshot():
    methods = local_methods()
    methods[ScaffoldLocal.name].client_c = np.ones(3, np.float32)
    methods[MoonLocal.name].previous_local = [np.zeros(2, np.float32)]
    saved = methods.state()
    assert set(saved) == {method.name for method in LOCAL_METHODS}
    other = local_methods()
    other.load_state(saved)
    assert np.array_equal(other[ScaffoldLocal.name].client_c, np.ones(3))
    assert np.array_equal(other[MoonLocal.name].previous_local[0], np.zeros(2))
