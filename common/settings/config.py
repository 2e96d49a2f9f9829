"""One run's configuration: pydantic models loaded from a TOML file plus ``--set`` overrides.

Every role (cloud, edge, client, launcher) reads the same file, so a deployment is described
once. Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_NAME = "default.toml"


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (field, value, what is allowed)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which U-Net to build; any field set here overrides the preset's value."""

    preset: Literal["tiny", "ddpm-cifar10", "celeba64"] = Field(
        "tiny", description="tiny: 16x16 grey 1.1 M; ddpm-cifar10: 35.75 M; celeba64: 64x64"
    )
    sample_size: int | None = Field(None, ge=4, description="image side in pixels")
    in_channels: int | None = Field(None, ge=1, le=4, description="1 = grey, 3 = RGB")
    block_out_channels: list[int] | None = Field(
        None, description="channels per U-Net level (as many as the preset has levels)"
    )
    layers_per_block: int | None = Field(None, ge=1, le=4, description="ResNet layers per block")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout in ResNet blocks")


class DiffusionConfig(_Section):
    """DDPM noise schedule for training and DDIM settings for sampling."""

    num_train_timesteps: int = Field(1000, ge=10, description="DDPM steps T")
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="first noise variance")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="last noise variance")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="diffusers beta schedule"
    )
    sampling_steps: int = Field(100, ge=1, description="DDIM steps")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")

    @model_validator(mode="after")
    def _betas_increase(self) -> DiffusionConfig:
        if self.beta_end <= self.beta_start:
            raise ValueError(
                f"beta_end ({self.beta_end}) must be larger than beta_start ({self.beta_start})"
            )
        return self


class DataConfig(_Section):
    """Where images come from; they are resized to ``model.sample_size``."""

    dataset: Literal["digits", "mnist", "fashionmnist", "cifar10", "celeba", "imagefolder"] = (
        Field("digits", description="digits is offline (scikit-learn); others via torchvision")
    )
    root: str = Field("data", description="folder that holds the data set files")
    download: bool = Field(False, description="let torchvision download the data set")


class PartitionConfig(_Section):
    """How the training set is split over clients (deterministic in ``seed``)."""

    method: Literal["iid", "dirichlet", "quantity", "classes"] = Field(
        "iid", description="iid, Dirichlet label skew, quantity skew, k classes per client"
    )
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1, description="k for method=classes without pairs")
    pairs: list[list[int]] | None = Field(
        None, description="fixed class groups for method=classes, e.g. FedPhD's [[0,5],[1,6],...]"
    )
    min_samples: int = Field(2, ge=1, description="smallest partition dirichlet/quantity allow")
    seed: int = Field(0, description="seed of the split")


class TrainingConfig(_Section):
    """Local DDPM training on each client (and centrally for ``fedphd train``)."""

    lr: float = Field(2e-4, gt=0.0, description="Adam learning rate after warm-up")
    batch_size: int = Field(32, ge=1, description="images per optimiser step")
    local_steps: int = Field(20, ge=0, description="optimiser steps per client per round")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float = Field(1.0, gt=0.0, description="max global gradient norm")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    threads: int = Field(1, ge=0, description="torch CPU threads per process (0 = torch default)")
    seed: int = Field(0, description="seed of noise and batch order (offset per client)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast dtype of the U-Net's forward pass: 'no' (fp32), 'bf16', or "
        "'fp16' with a gradient scaler; weights, optimiser state and answers stay fp32"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value == "cpu" or value == "cuda" or (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            return value
        raise ValueError("must be 'cpu', 'cuda' or 'cuda:N'")


class TopologyConfig(_Section):
    """Who talks to whom: 1 cloud, ``edges`` edge aggregators (0 = flat), ``clients`` clients."""

    edges: int = Field(2, ge=0, description="0 = flat mode, clients talk to the cloud")
    clients: int = Field(4, ge=1, description="number of clients (and data partitions)")
    cloud_rounds: int = Field(2, ge=1, description="rounds the cloud aggregates")
    edge_rounds: int = Field(2, ge=1, description="edge aggregations per cloud round")
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="share of clients per round")
    min_fit_clients: int = Field(1, ge=1, description="fewest clients a round may run with")
    cloud_strategy: str = Field("flwr.server.strategy.FedAvg", description="dotted class path")
    edge_strategy: str = Field("flwr.server.strategy.FedAvg", description="dotted class path")
    cloud_strategy_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the cloud strategy"
    )
    edge_strategy_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the edge strategy"
    )
    host: str = Field("127.0.0.1", description="address the launcher binds and connects to")
    cloud_port: int = Field(9090, ge=1, le=65535, description="port the cloud serves on")
    edge_base_port: int = Field(9100, ge=1, le=65535, description="edge i listens on base + i")
    round_timeout: float = Field(600.0, gt=0.0, description="seconds a server waits for answers")
    connect_timeout: float = Field(120.0, gt=0.0, description="seconds to wait for peers")
    min_clients_per_edge: int = Field(
        1, ge=0, description="client-to-edge selection keeps at least this many clients on "
        "every live edge"
    )
    max_examples_factor: float = Field(
        10.0, gt=0.0, description="an answer counts at most this x the round's median sample "
        "count (larger claims are clipped, and recorded)"
    )
    max_message_mb: float | None = Field(
        None, gt=0.0, le=2048.0, description="gRPC message limit of every link in MiB "
        "(unset = auto: 2 x the model's fp32 size + 32 MiB)"
    )
    tensor_link: bool = Field(
        True, description="serve model tensors on a second gRPC call of the same server "
        "(fedphd.TensorLink, dialled by the receiver over the same address and TLS) to peers "
        "that declare it, instead of inside Flower's messages; plain Flower peers always get "
        "them inside Flower's messages. false: never, on this server"
    )

    @field_validator("cloud_strategy", "edge_strategy")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if "." not in value or value.startswith(".") or value.endswith("."):
            raise ValueError("must be a dotted path such as 'flwr.server.strategy.FedAvg'")
        return value


class PruningConfig(_Section):
    """Structured pruning of the U-Net at the cloud (FedPhD)."""

    enabled: bool = Field(False, description="prune the initial model at the cloud")
    ratio: float = Field(0.2, ge=0.0, lt=1.0, description="channel pruning ratio")
    sparse_rounds: int = Field(
        0, ge=0, description="cloud rounds of group-lasso sparse training before pruning"
    )
    group_lasso: float = Field(
        1e-5, ge=0.0, description="lambda of the group-lasso penalty in sparse rounds"
    )


class CodecConfig(_Section):
    """How model tensors are encoded on each direction of every link."""

    downlink: Literal["fp32", "fp16", "q8", "q4"] = Field(
        "fp32", description="server to client: weights (fp32, fp16) or quantised updates from "
        "the model the receiver holds (q8, q4; whole weights, see whole, the first time)"
    )
    uplink: Literal["fp32", "fp16", "q8", "q4"] = Field(
        "fp32", description="client to server: weights (fp32, fp16) or quantised updates (q8, q4)"
    )
    cloud_downlink: Literal["fp32", "fp16", "q8", "q4"] | None = Field(
        None, description="the cloud's downlink (to edges, or to clients in flat mode); "
        "unset = downlink"
    )
    cloud_uplink: Literal["fp32", "fp16", "q8", "q4"] | None = Field(
        None, description="answers to the cloud (from edges, or clients in flat mode); "
        "unset = uplink"
    )
    edge_downlink: Literal["fp32", "fp16", "q8", "q4"] | None = Field(
        None, description="edge to its clients; unset = downlink"
    )
    edge_uplink: Literal["fp32", "fp16", "q8", "q4"] | None = Field(
        None, description="clients to their edge; unset = uplink"
    )
    whole: Literal["fp32", "fp16"] = Field(
        "fp32", description="q8/q4 downlinks: how the weights go to a receiver that holds no "
        "model yet (its first round, a client re-assigned to another edge): fp32, or fp16 "
        "(half the bytes; the receiver's reference is then the fp16-rounded model, and the "
        "next update, taken from that reference, carries the rounding back)"
    )
    per_channel: bool = Field(True, description="q8/q4: one scale per output channel")
    error_feedback: bool = Field(True, description="q8/q4: carry what rounding dropped forward")

    def for_link(self, server: Literal["cloud", "edge"]) -> tuple[str, str]:
        """(downlink, uplink) codecs of the links that ``server`` serves."""
        down = getattr(self, f"{server}_downlink") or self.downlink
        up = getattr(self, f"{server}_uplink") or self.uplink
        return down, up


class EvaluationConfig(_Section):
    """Sample quality checks during and after training."""

    every_cloud_rounds: int = Field(
        0, ge=0, description="evaluate at the cloud every N cloud rounds (0 = not during training)"
    )
    final: bool = Field(True, description="evaluate the final model at the end of a run")
    num_samples: int = Field(64, ge=2, description="generated images per evaluation")
    batch_size: int = Field(64, ge=1, description="images per sampling batch")
    sampling_steps: int | None = Field(
        None, ge=1, description="DDIM steps for evaluation (default: diffusion.sampling_steps)"
    )
    fid_weights: str | None = Field(
        None, description="pytorch-fid Inception weights file (default: torch hub's cache)"
    )
    cache_dir: str | None = Field(
        None, description="cache of real-data statistics (default ~/.cache/fedphd/evaluation)"
    )
    max_real_images: int = Field(50_000, ge=2, description="real images in the statistics")


class OutputConfig(_Section):
    """What a run leaves on disk."""

    dir: str = Field("runs/latest", description="run folder when --out is not given")
    grid_samples: int = Field(64, ge=1, description="images in samples.png")
    progress: bool = Field(True, description="progress bars on a terminal")
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="experiment tracking: tensorboard writes TensorBoard event files "
        "(loss, bytes, quality per round, the sample grid) to DIR/tensorboard/ (needs pip "
        "install 'fedphd[tensorboard]')"
    )


class TlsConfig(_Section):
    """Transport security of every gRPC link: TLS with these files, or plaintext if asked for.

    Files are checked when a role starts, not here: each machine holds only what its roles
    need (every one the CA certificate, the cloud and edges their certificate and key).
    """

    ca_cert: str | None = Field(
        None, description="PEM CA certificate that signed the servers' certificates (all roles)"
    )
    server_cert: str | None = Field(
        None, description="PEM certificate the cloud and edges serve; its names must cover the "
        "addresses peers dial"
    )
    server_key: str | None = Field(None, description="PEM private key of server_cert")
    client_cert: str | None = Field(
        None, description="PEM certificate naming this peer (CN client-N or edge-N), signed by "
        "ca_cert: clients, and edges towards the cloud, present it to their server"
    )
    client_key: str | None = Field(None, description="PEM private key of client_cert")
    require_client_auth: bool | None = Field(
        None, description="servers (cloud, edges) refuse peers without a certificate signed by "
        "ca_cert (unset = on whenever certificates are configured)"
    )
    deny: list[str] = Field(
        default_factory=list, description="revoked peers: identities (\"client-3\", "
        "\"edge-1\") or SHA-256 fingerprints of their certificates; servers refuse them"
    )
    insecure: bool = Field(
        False, description="plaintext gRPC, no certificates: only when asked for explicitly"
    )

    @model_validator(mode="after")
    def _certificates_or_plaintext(self) -> TlsConfig:
        keys = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")
        certificates = [k for k in keys if getattr(self, k)]
        if self.insecure and certificates:
            raise ValueError(
                f"insecure = true (plaintext) contradicts {', '.join(certificates)} (TLS): "
                "remove one or the other"
            )
        if bool(self.server_cert) != bool(self.server_key):
            raise ValueError("server_cert and server_key go together: set both or neither")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together: set both or neither")
        return self


class RunConfig(_Section):
    """Everything one run needs; each section is a table of the TOML file."""

    name: str = Field("fedphd", description="run name, shown in summaries")
    seed: int = Field(0, description="seed of the initial model and of sampling")
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)

    def to_json(self) -> str:
        return self.model_dump_json()


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the shipped configs)"
        elif item["type"] == "literal_error":
            allowed = item.get("ctx", {}).get("expected", "")
            message = f"not one of the allowed values {allowed}"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def _parse_override_value(text: str) -> Any:
    """Read a ``--set`` value as TOML (numbers, booleans, lists, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (in place, also returned)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override_value(raw.strip())
    return data


def default_config_path() -> Path:
    """The offline default shipped inside the package (digits, tiny U-Net, 2 edges, 4 clients)."""
    return Path(str(resources.files("fedphd.common.configs") / DEFAULT_CONFIG_NAME))


def config_from_dict(data: dict[str, Any], source: str = "configuration") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run configuration from TOML (the packaged default when ``path`` is None)."""
    path = Path(path) if path is not None else default_config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    apply_overrides(data, overrides or [])
    return config_from_dict(data, source=str(path))



def config_reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the models."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `common/settings/config.py` by "
        "`python -m fedphd.common.settings.config > docs/configuration.md`"
        " (a test keeps it current). One TOML file; every key can be overridden on the command"
        " line with `--set section.key=value`.",
        "",
    ]
    top = {n: f for n, f in RunConfig.model_fields.items() if not _is_section(f.annotation)}
    lines += _field_table("(top level)", top, RunConfig.__doc__ or "")
    for name, info in RunConfig.model_fields.items():
        if _is_section(info.annotation):
            section = info.annotation
            lines += _field_table(f"[{name}]", section.model_fields, section.__doc__ or "")
    return "\n".join(lines)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Section)


def _field_table(title: str, fields: dict[str, Any], doc: str) -> list[str]:
    lines = [f"## {title}", "", doc.strip().splitlines()[0] if doc.strip() else "", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in fields.items():
        annotation = info.annotation
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        kind = kind.replace("typing.", "").replace("|", "\\|")
        default = info.default_factory() if info.default_factory else info.default
        lines.append(
            f"| `{key}` | `{kind}` | `{json.dumps(default)}` | {info.description or ''} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    print(config_reference_markdown())
