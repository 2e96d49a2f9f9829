"""``fedphd client``: a data owner. Trains the U-Net locally on its own images and answers
whichever server it is connected to: an edge aggregator, or the cloud in flat mode.

Only weights leave the process; images never do. The architecture arrives as JSON with every
instruction, so a client rebuilds whatever model the server sends (e.g. a pruned one).

With partial sharing (FedDiffuse) the instruction names the U-Net groups it carries, those to
train and those to send back. The groups that never travel are this client's own: its whole
model is saved in its state folder after every round and reloaded after a restart.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from client.fedprox import PROXIMAL_MU_KEY, proximal_loss
from client.moon import MoonTerm, frozen_copy
from client.scaffold import ScaffoldCorrection, parameter_count
from common import codec
from common.cli import add_config_args, config_from_args
from common.config import ConfigError, RunConfig
from common.data import load_dataset
from common.diffusion import (
    DiffusionTrainer,
    endless_batches,
    load_model,
    make_noise_scheduler,
    sample_images,
    save_model,
)
from common.evaluate import evaluate_model
from common.images import save_grid
from common.instructions import (
    ARCH_KEY,
    CLOUD_ROUND_KEY,
    CONTROL_DELTA_KEY,
    GROUP_LASSO_KEY,
    LOCAL_STEPS_KEY,
    LR_KEY,
    MOON_MU_KEY,
    MOON_TAU_KEY,
    MOVE_KEY,
    ROUND_KEY,
    SERVER_CONTROL_KEY,
)
from common.limits import max_message_bytes
from common.models import (
    architecture_from_json,
    architecture_of,
    architecture_to_json,
    build_unet,
    load_ndarrays,
    model_to_ndarrays,
    unet_config,
)
from common.partition import label_histogram, partition
from common.pruning import group_lasso_penalty
from common.quantization import ErrorFeedback
from common.runtime import seed_everything, setup_torch
from common.strategy import (
    RECEIVED_DIGEST_KEY,
    RETURN_GROUPS_KEY,
    SEND_GROUPS_KEY,
    TRAIN_GROUPS_KEY,
    HeldModel,
    encode_reply,
)
from common.tls import client_root_certificates, describe_tls
from common.topology import server_address_of_client
from common.transport import (
    Client,
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ServerUnreachable,
    Status,
    connect_client,
    fit_ins_wire_size,
    fit_res,
    ok_status,
)
from common.unet_groups import (
    format_groups,
    group_indices,
    group_of,
    is_everything,
    merge,
    parse_groups,
    select,
    tensor_names,
)

log = logging.getLogger("fedphd.client")


@dataclass
class LocalData:
    """A client's training images and their label histogram (the only statistic it shares)."""

    dataset: Dataset
    label_hist: list[int]


def local_data(cfg: RunConfig, client_id: int, data_dir: str | None = None) -> LocalData:
    """The client's share: its own folder of images, or partition ``client_id`` of the data set."""
    arch = unet_config(cfg.model)
    if data_dir is not None:
        own = cfg.data.model_copy(update={"dataset": "imagefolder", "root": data_dir})
        images = load_dataset(own, arch["sample_size"], arch["in_channels"])
        indices = np.arange(len(images))
        return LocalData(images, label_histogram(images.labels, indices, images.num_classes))
    if not 0 <= client_id < cfg.topology.clients:
        raise ConfigError(
            f"--client-id {client_id} is outside 0..{cfg.topology.clients - 1} "
            "(topology.clients); use --data-dir for a client with its own images"
        )
    images = load_dataset(cfg.data, arch["sample_size"], arch["in_channels"])
    indices = partition(images.labels, cfg.topology.clients, cfg.partition)[client_id]
    hist = label_histogram(images.labels, indices, images.num_classes)
    return LocalData(Subset(images, indices.tolist()), hist)


@dataclass
class RoundStart:
    """A client's state when a cloud round began, kept until the next cloud round: a cloud
    that resumes from its checkpoint sends that round again, and the client replays it from
    here, so the resumed run trains exactly as an uninterrupted one."""

    cloud_round: int
    state: dict[str, Any]


def cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (snapshots do not hold GPU memory)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(item) for item in value)
    return copy.deepcopy(value)


class DiffusionClient(Client):
    """A Flower client that trains a DDPM U-Net on local images."""

    def __init__(
        self, cfg: RunConfig, client_id: int, data: LocalData, device: torch.device,
        state_dir: Path | None = None,
    ):
        self.cfg = cfg
        self.client_id = client_id
        self.data = data
        self.device = device
        # This client's own disk: its whole model when parts of it are private.
        self.state_dir = state_dir or default_state_dir(cfg, client_id)
        self.arch_json: str | None = None
        self.move_to: str | None = None  # set when a server re-assigns this client
        # Quantised uplinks: residuals of this client only, per set of groups it sends.
        self.feedback: dict[str, ErrorFeedback] = {}
        self.held = HeldModel()  # quantised downlinks are updates from this model
        self.previous_local: list[np.ndarray] | None = None  # MOON's previous local model
        self.scaffold_c: np.ndarray | None = None  # SCAFFOLD's client control variate c_i
        self.rng = np.random.default_rng([cfg.seed, client_id])
        self.trainer: DiffusionTrainer | None = None
        self.batches = None
        self.round_start: RoundStart | None = None
        self.last_round = -1  # the ROUND_KEY of the last instruction trained

    def _training_config(self):
        # Each client draws its own noise and batch order: same run seed, distinct streams.
        return self.cfg.training.model_copy(
            update={"seed": self.cfg.training.seed + 1000 * (self.client_id + 1)}
        )

    def _rebuild(self, arch_json: str) -> None:
        """Build the model the server described; a new architecture gets a fresh optimiser.

        Its initial weights are the run's (seeded like the cloud's), so parts that are never
        sent start where the global model started."""
        try:
            model = build_unet(architecture_from_json(arch_json), seed=self.cfg.seed)
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"cannot build the U-Net the server described in {ARCH_KEY}: "
                             f"{error}") from None
        training = self._training_config()
        self.trainer = DiffusionTrainer(
            model, make_noise_scheduler(self.cfg.diffusion), training, self.device
        )
        self.batches = endless_batches(
            self.data.dataset, training.batch_size, training.seed, self.device
        )
        self.arch_json = arch_json

    def _regularisers(self, config: dict) -> list:
        """Extra local loss terms the server asked for, anchored at the weights just loaded:
        FedProx's proximal term, FedPhD's group lasso (sparse rounds), MOON's contrastive
        term."""
        model = self.trainer.model
        terms = []
        mu = float(config.get(PROXIMAL_MU_KEY, 0.0))
        if mu > 0:
            log.info("client %d: proximal term, mu = %g", self.client_id, mu)
            terms.append(proximal_loss(model, mu))
        lam = float(config.get(GROUP_LASSO_KEY, 0.0))
        if lam > 0:
            terms.append(lambda current: group_lasso_penalty(current, lam))
        moon_mu = float(config.get(MOON_MU_KEY, 0.0))
        if moon_mu > 0:
            log.info("client %d: MOON term, mu = %g", self.client_id, moon_mu)
            terms.append(self._moon_term(moon_mu, float(config.get(MOON_TAU_KEY, 0.5))))
        return terms

    def _moon_term(self, mu: float, tau: float) -> MoonTerm:
        """Global model = the weights just loaded; previous = this client's last local model
        (the global one on its first round or after the architecture changed)."""
        model = self.trainer.model
        global_model = frozen_copy(model)
        previous_model = frozen_copy(model)
        previous = self.previous_local
        if previous is not None and [a.shape for a in previous] == [
            t.shape for t in model.state_dict().values()
        ]:
            load_ndarrays(previous_model, previous)
        return MoonTerm(model, global_model, previous_model, mu, tau)

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        if MOVE_KEY in ins.config:
            self.move_to = str(ins.config[MOVE_KEY])
            log.info("client %d: re-assigned to %s", self.client_id, self.move_to)
        return GetPropertiesRes(
            status=ok_status(),
            properties={
                "client_id": self.client_id,
                "num_examples": len(self.data.dataset),
                "label_hist": json.dumps(self.data.label_hist),
            },
        )

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        arrays = [] if self.trainer is None else model_to_ndarrays(self.trainer.model)
        return GetParametersRes(status=ok_status(), parameters=codec.encode(arrays, "fp32"))

    def fit(self, ins: FitIns) -> FitRes:
        try:
            return self._fit(ins)
        except Exception as error:  # noqa: BLE001 - report to the server instead of dying
            log.exception("client %d: fit failed", self.client_id)
            # Flower's legacy protocol has no generic error code; the message says what failed.
            return FitRes(
                status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=f"fit failed: {error}"),
                parameters=Parameters(tensors=[], tensor_type=codec.FP32),
                num_examples=0,
                metrics={"client_id": self.client_id},
            )

    def _fit(self, ins: FitIns) -> FitRes:
        received = fit_ins_wire_size(ins)
        if ARCH_KEY not in ins.config:
            raise ValueError(f"instruction without {ARCH_KEY!r}: not a FedPhD server?")
        sent, trained, returned = (parse_groups(ins.config.get(key)) for key in
                                   (SEND_GROUPS_KEY, TRAIN_GROUPS_KEY, RETURN_GROUPS_KEY))
        self._mark_round(ins.config)
        self._prepare(str(ins.config[ARCH_KEY]), private=not is_everything(sent))
        trainer = self.trainer
        names = tensor_names(self.arch_json)
        sent_at, returned_at = group_indices(names, sent), group_indices(names, returned)
        received_part = self.held.decode(ins.parameters, ins.config)
        load_ndarrays(trainer.model, merge(model_to_ndarrays(trainer.model), received_part,
                                           sent_at))
        reference = model_to_ndarrays(trainer.model)  # as received: the base of the update
        received_digest = self.held.keep(select(reference, sent_at))
        lr = float(ins.config.get(LR_KEY, self.cfg.training.lr))
        trainer.lr_schedule.base_lrs = [lr for _ in trainer.lr_schedule.base_lrs]
        steps = int(ins.config.get(LOCAL_STEPS_KEY, self.cfg.training.local_steps))
        start = time.perf_counter()
        terms = self._regularisers(ins.config)
        scaffold = self._scaffold_correction(ins.config)
        frozen = freeze_all_but(trainer.model, trained)
        try:
            losses = trainer.train(
                self.batches, steps,
                extra_loss=(lambda model: sum(term(model) for term in terms)) if terms else None,
                gradient_hook=scaffold,
            )
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
            for term in terms:
                if isinstance(term, MoonTerm):
                    term.close()
                    self.previous_local = model_to_ndarrays(trainer.model)
        seconds = time.perf_counter() - start
        trained_model = model_to_ndarrays(trainer.model)
        if not is_everything(sent):
            self._save_state()
        feedback = self.feedback.setdefault(format_groups(returned), ErrorFeedback())
        out = encode_reply(select(trained_model, returned_at), select(reference, returned_at),
                           ins.config, feedback, self.rng)
        log.info(
            "client %d: %d steps in %.1f s, loss %.4f", self.client_id, steps, seconds,
            float(np.mean(losses)),
        )
        return fit_res(
            out,
            len(self.data.dataset),
            {
                "client_id": self.client_id,
                "loss": float(np.mean(losses)),
                "label_hist": json.dumps(self.data.label_hist),
                "bytes_received": received,
                RECEIVED_DIGEST_KEY: received_digest,
                "payload_bytes": codec.payload_bytes(out),
                "train_seconds": seconds,
                "steps": steps,
                "groups_returned": format_groups(returned),
                **self._scaffold_answer(scaffold),
            },
        )

    def _mark_round(self, config: dict) -> None:
        """Keep the state at the start of each cloud round; an instruction for a round this
        client already trained in (the cloud resumed from its checkpoint) rewinds to it."""
        step = int(config.get(ROUND_KEY, 0))
        cloud_round = int(config.get(CLOUD_ROUND_KEY, step))
        start = self.round_start
        if start is None or cloud_round > start.cloud_round:
            self.round_start = RoundStart(cloud_round, self._state())
        elif cloud_round == start.cloud_round and step <= self.last_round:
            log.info("client %d: cloud round %d again (the server resumed): replaying it from "
                     "its start", self.client_id, cloud_round)
            self._set_state(start.state)
        elif cloud_round < start.cloud_round:
            log.warning("client %d: instruction for cloud round %d after round %d: this "
                        "client's state cannot go back that far, it trains on from where it "
                        "is", self.client_id, cloud_round, start.cloud_round)
        self.last_round = step

    def _state(self) -> dict[str, Any]:
        """Everything training carries from round to round, copied (tensors to the CPU)."""
        trainer = None
        if self.trainer is not None:
            trainer = {"weights": self.trainer.model.state_dict(),
                       "trainer": self.trainer.state_dict(),
                       "batches": self.batches.position}
        return cpu_copy({
            "arch_json": self.arch_json, "trainer": trainer, "feedback": self.feedback,
            "held": self.held, "previous_local": self.previous_local,
            "scaffold_c": self.scaffold_c, "rng": self.rng,
        })

    def _set_state(self, saved: dict[str, Any]) -> None:
        state = cpu_copy(saved)  # the snapshot stays as it is for another replay
        if state["trainer"] is None:
            self.trainer, self.batches, self.arch_json = None, None, None
        else:
            if state["arch_json"] != self.arch_json:
                self._rebuild(state["arch_json"])
            self.trainer.model.load_state_dict(state["trainer"]["weights"])
            self.trainer.load_state_dict(state["trainer"]["trainer"])
            self.batches.seek(state["trainer"]["batches"])
        self.feedback, self.held = state["feedback"], state["held"]
        self.previous_local, self.scaffold_c = state["previous_local"], state["scaffold_c"]
        self.rng = state["rng"]

    def _prepare(self, arch_json: str, private: bool) -> None:
        """The model for this instruction: rebuilt when the architecture changed, and, when
        parts of it are private, holding this client's own parts (from memory, else from its
        state folder after a restart, else the run's initial weights)."""
        if arch_json == self.arch_json:
            return
        self._rebuild(arch_json)
        if private:
            self._restore_state()

    def _state_model_dir(self) -> Path:
        return self.state_dir / "model"

    def _save_state(self) -> None:
        """The whole local model in diffusers format (safetensors), replaced atomically enough:
        diffusers writes the weights file last, after the config."""
        save_model(self.trainer.model, self.cfg.diffusion, self._state_model_dir())

    def _restore_state(self) -> None:
        directory = self._state_model_dir()
        if not (directory / "config.json").is_file():
            log.info("client %d: no saved model in %s, private parts start from the run's "
                     "initial weights", self.client_id, directory)
            return
        try:
            saved, _ = load_model(directory)
        except (OSError, ValueError) as error:
            raise ValueError(f"client {self.client_id}: saved model in {directory} "
                             f"cannot be loaded: {error}") from None
        if architecture_to_json(architecture_of(saved)) != self.arch_json:
            log.warning("client %d: the saved model in %s has another architecture; private "
                        "parts start from the run's initial weights", self.client_id, directory)
            return
        load_ndarrays(self.trainer.model, model_to_ndarrays(saved))
        log.info("client %d: private parts restored from %s", self.client_id, directory)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Sample quality of this client's own model holding the shared groups just sent
        (partial sharing: every client's model differs). Samples go to the state folder."""
        try:
            sent = parse_groups(ins.config.get(SEND_GROUPS_KEY))
            self._prepare(str(ins.config[ARCH_KEY]), private=not is_everything(sent))
            model = self.trainer.model
            names = tensor_names(self.arch_json)
            received = codec.decode(ins.parameters)
            load_ndarrays(model, merge(model_to_ndarrays(model), received,
                                       group_indices(names, sent)))
            result = evaluate_model(model, self.trainer.scheduler, self.cfg, self.device,
                                    show_progress=False)
            grid = sample_images(model, self.cfg.diffusion, self.cfg.output.grid_samples,
                                 seed=self.cfg.seed, steps=self.cfg.evaluation.sampling_steps)
            save_grid(grid, self.state_dir / "samples.png")
        except Exception as error:  # noqa: BLE001 - report to the server instead of dying
            log.exception("client %d: evaluation failed", self.client_id)
            return EvaluateRes(
                status=Status(code=Code.EVALUATE_NOT_IMPLEMENTED,
                              message=f"evaluation failed: {error}"),
                loss=0.0, num_examples=0, metrics={"client_id": self.client_id},
            )
        log.info("client %d: fd_classifier %.4g of its own model", self.client_id,
                 result["fd_classifier"])
        return EvaluateRes(
            status=ok_status(),
            loss=float(result["fd_classifier"]),
            num_examples=int(result["num_samples"]),
            metrics={"client_id": self.client_id,
                     **{k: v for k, v in result.items() if isinstance(v, int | float | str)}},
        )

    def _scaffold_correction(self, config: dict) -> ScaffoldCorrection | None:
        """SCAFFOLD's drift correction when the server sent its control variate."""
        if SERVER_CONTROL_KEY not in config:
            return None
        model = self.trainer.model
        size = parameter_count(model)
        server_c = codec.vector_from_bytes(config[SERVER_CONTROL_KEY], size, "server control")
        if self.scaffold_c is None or self.scaffold_c.shape != (size,):
            self.scaffold_c = np.zeros(size, dtype=np.float32)  # first round or new architecture
        return ScaffoldCorrection(model, server_c, self.scaffold_c)

    def _scaffold_answer(self, scaffold: ScaffoldCorrection | None) -> dict:
        if scaffold is None:
            return {}
        new_c = scaffold.new_client_control()
        delta, self.scaffold_c = new_c - self.scaffold_c, new_c
        return {CONTROL_DELTA_KEY: codec.vector_to_bytes(delta)}


def default_state_dir(cfg: RunConfig, client_id: int) -> Path:
    return Path(cfg.output.dir) / "clients" / f"client-{client_id}"


def freeze_all_but(model: torch.nn.Module, groups: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Stop gradients outside ``groups`` (Adam skips parameters without a gradient, so they
    stay exactly as received); returns the parameters to unfreeze afterwards."""
    if is_everything(groups):
        return []
    frozen = []
    for name, parameter in model.named_parameters():
        if group_of(name) not in groups and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(parameter)
    return frozen


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    root_certificates = client_root_certificates(cfg.tls)  # a missing file fails at start
    seed_everything(cfg.seed + args.client_id)
    device = setup_torch(cfg.training, args.device)
    data = local_data(cfg, args.client_id, args.data_dir)
    addresses = server_addresses(args.server) or [
        server_address_of_client(args.client_id, cfg.topology)]
    log.info(
        "client %d: %d images, labels %s, connecting to %s (%s)",
        args.client_id, len(data.dataset), data.label_hist, addresses[0], describe_tls(cfg.tls),
    )
    state_dir = Path(args.state_dir) if args.state_dir else None
    client = DiffusionClient(cfg, args.client_id, data, device, state_dir)
    message_limit = max_message_bytes(cfg)
    address, given_up = addresses[0], 0
    while True:
        try:
            connect_client(address, client, max_wait_time=cfg.topology.connect_timeout,
                           max_message_length=message_limit,
                           root_certificates=root_certificates)
        except ServerUnreachable:
            # Every address given up on in a row: nothing left to try.
            given_up += 1
            if given_up >= len(addresses):
                raise
            gone, address = address, fallback_after(address, addresses)
            log.warning("client %d: %s is gone; joining %s", args.client_id, gone, address)
            continue
        given_up = 0
        if client.move_to is None:
            break
        address, client.move_to = client.move_to, None
        log.info("client %d: joining %s", args.client_id, address)
    log.info("client %d: disconnected by the server, exiting", args.client_id)
    return 0


def server_addresses(option: str | None) -> list[str]:
    """``--server A,B,...``: the server to join, then fallbacks in order."""
    return [part.strip() for part in (option or "").split(",") if part.strip()]


def fallback_after(address: str, addresses: list[str]) -> str:
    """The next address of the list after ``address`` (cyclic; a server that moved this
    client elsewhere may not be in the list: then the first)."""
    if address not in addresses:
        return addresses[0]
    return addresses[(addresses.index(address) + 1) % len(addresses)]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "client",
        help="run a data owner: train locally, answer an edge (or the cloud in flat mode)",
        description="Connect to an edge aggregator (or the cloud when topology.edges = 0), "
        "train the U-Net it sends on local images and send back the weights.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="address of the edge (or cloud) to join (default: from the config's topology); "
        "further addresses are fallbacks: when a server stays unreachable for "
        "topology.connect_timeout seconds, the client joins the next one (e.g. another edge "
        "when its own is gone for good)",
    )
    parser.add_argument(
        "--client-id",
        type=int,
        required=True,
        metavar="ID",
        help="this client's id; picks its partition of the data set (0..topology.clients-1)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: training.device)")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="this client's own folder: its whole model when parts stay private (FedDiffuse "
        "UDEC/ULATDEC), reloaded after a restart, and its evaluation samples "
        "(default: output.dir/clients/client-ID)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="train on this folder of images instead (one sub-folder per class, ImageFolder)",
    )
    parser.set_defaults(run=run)
