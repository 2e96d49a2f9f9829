from pathlib import Path

import pytest

from fedphd.common.settings.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    default_config_path,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_packaged_default_is_the_offline_demo():
    cfg = load_config()
    assert default_config_path().is_file()
    assert cfg.data.dataset == "digits"
    assert cfg.model.preset == "tiny"
    assert (cfg.topology.edges, cfg.topology.clients) == (2, 4)


def test_overrides_are_typed_and_nested(tmp_path):
    path = write(tmp_path, "[training]\nlr = 0.1\n")
    cfg = load_config(path, [
        "training.lr=0.002", "topology.clients=8", "pruning.enabled=true",
        "partition.pairs=[[0,5],[1,6]]", "topology.cloud_strategy=flwr.server.strategy.FedAdam",
    ])
    assert cfg.training.lr == 0.002
    assert cfg.topology.clients == 8
    assert cfg.pruning.enabled is True
    assert cfg.partition.pairs == [[0, 5], [1, 6]]
    assert cfg.topology.cloud_strategy == "flwr.server.strategy.FedAdam"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("[training]\nlr = -1\n", [], ["training.lr", "-1", "greater than 0"]),
        ("[data]\ndataset = 'imagenet'\n", [], ["data.dataset", "imagenet", "cifar10"]),
        ("[topology]\nclinets = 3\n", [], ["topology.clinets", "unknown key"]),
        ("", ["topology.edges=-2"], ["topology.edges", "-2"]),
        ("", ["training.device=gpu"], ["training.device", "gpu", "cuda:N"]),
        ("", ["diffusion.beta_end=0.00001"], ["diffusion", "beta_end"]),
        ("", ["topology.edge_strategy=FedAvg"], ["topology.edge_strategy", "dotted path"]),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), overrides)
    for fragment in expected:
        assert fragment in str(error.value)


def test_bad_files_and_override_syntax_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[training\n"))
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["training.lr"])


def test_json_round_trip_keeps_everything():
    cfg = load_config(None, ["topology.clients=7", "partition.method=dirichlet"])
    again = RunConfig.model_validate_json(cfg.to_json())
    assert again == cfg


def test_every_shipped_config_validates():
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert shipped, "configs/ ships example configurations"
    for path in shipped:
        cfg = load_config(path)
        assert cfg.name, path


def test_configuration_reference_in_docs_is_current():
    from fedphd.common.settings.config import config_reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert docs.read_text().strip() == config_reference_markdown().strip(), (
        "regenerate with: .venv/bin/python -m fedphd.common.settings.config > docs/configuration.md"
    )


METHOD_CONFIGS = ["fedavg", "fedprox", "scaffold", "moon", "feddm-quant8", "feddm-quant4",
                  "feddiffuse-full", "feddiffuse-usplit", "feddiffuse-udec",
                  "feddiffuse-ulatdec", "fedddpm", "fedddpm-plus"]


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_method_configs_share_the_fedavg_topology_rounds_and_split(method):
    """Their runs compare: only the method (strategy, codecs, client terms) differs."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    baseline = load_config(configs / "fedavg-digits.toml")
    cfg = load_config(configs / f"{method}-digits.toml")
    same = ("edges", "clients", "cloud_rounds", "fraction_fit", "min_fit_clients")
    assert {k: getattr(cfg.topology, k) for k in same} == {
        k: getattr(baseline.topology, k) for k in same}
    for section in ("model", "data", "partition", "training", "diffusion"):
        assert getattr(cfg, section) == getattr(baseline, section), section
    assert cfg.name == f"{method}-digits"


def test_the_lean_cifar10_twin_carries_the_lean_digits_settings_onto_fedphd_cifar10():
    configs = Path(__file__).resolve().parent.parent / "configs"
    lean = load_config(configs / "fedphd-lean-digits.toml")
    twin = load_config(configs / "fedphd-lean-cifar10.toml")
    base = load_config(configs / "fedphd-cifar10.toml")
    assert twin.codec == lean.codec and twin.pruning == lean.pruning
    assert twin.topology.edge_rounds == lean.topology.edge_rounds
    # Its client steps per cloud round are fedphd-cifar10's, in fewer exchanges.
    assert (twin.topology.edge_rounds * twin.training.local_steps
            == base.topology.edge_rounds * base.training.local_steps)
    assert twin.model == base.model and twin.data == base.data
    assert twin.partition == base.partition
    assert twin.topology.cloud_strategy_args == base.topology.cloud_strategy_args
