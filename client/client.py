"""The ``client`` command: a data owner. Trains the U-Net locally on its own images and
answers whichever server it is connected to: an edge aggregator, or the cloud in flat mode.

Only weights leave the process; images never do. The architecture arrives as JSON with every
instruction, so a client rebuilds whatever model the server sends (e.g. a pruned one).

What a method changes in local training is that method's business (``methods.py`` of this
package lists them); this module is the protocol: it loads what the server sent, trains with the
terms of the methods the instruction asks for, and answers.

With partial sharing the instruction names the U-Net groups it carries and those to send
back. The groups that never travel are this client's own: its whole model is saved in its
state folder after every round and reloaded after a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from fedphd.client.evaluation import evaluate_own_model, evaluation_answer, failed_evaluation
from fedphd.client.link import ClientLink
from fedphd.client.local_model import LocalModel
from fedphd.client.method import RoundTerms
from fedphd.client.methods import local_methods
from fedphd.client.private_parts import PrivateParts, SharedGroups
from fedphd.client.replay import RoundReplay
from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.diffusion import DiffusionTrainer
from fedphd.common.core.models import (
    load_ndarrays,
    model_to_ndarrays,
    model_views,
    unet_config,
)
from fedphd.common.core.unet_groups import (
    group_indices,
    is_everything,
    merge,
    parse_groups,
    select,
    tensor_names,
)
from fedphd.common.data.datasets import DatasetNotFoundError, load_dataset
from fedphd.common.data.partition import label_histogram, partition
from fedphd.common.federation.instructions import foreign_server, missing_protocol_key
from fedphd.common.settings.config import ConfigError, RunConfig
from fedphd.common.settings.runtime import seed_everything, setup_torch
from fedphd.common.settings.topology import parse_addresses, server_address_of_client
from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    ARCH_KEY,
    BYTES_RECEIVED_METRIC,
    CLIENT_ID_METRIC,
    CLIENT_ID_PROPERTY,
    GROUPS_RETURNED_METRIC,
    LABEL_HIST_METRIC,
    LABEL_HIST_PROPERTY,
    LOCAL_STEPS_KEY,
    LOSS_METRIC,
    LR_KEY,
    MOVE_KEY,
    NUM_EXAMPLES_PROPERTY,
    PAYLOAD_BYTES_METRIC,
    RECEIVED_DIGEST_KEY,
    SEND_GROUPS_KEY,
    STEPS_METRIC,
    TRAIN_SECONDS_METRIC,
)
from fedphd.common.wire.limits import max_message_bytes
from fedphd.common.wire.tls import client_certificate, client_root_certificates, describe_tls
from fedphd.common.wire.transport import (
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
    Scalar,
    ServerUnreachable,
    Status,
    connect_client,
    fit_ins_wire_size,
    fit_res,
    ok_status,
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
        try:
            images = load_dataset(own, arch["sample_size"], arch["in_channels"])
        except DatasetNotFoundError as error:
            # The user gave a folder, not data.root: name the flag they typed.
            raise DatasetNotFoundError(f"--data-dir {data_dir}: {error}") from None
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


@dataclass(frozen=True)
class Received:
    """An instruction's model as this client loaded it."""

    names: list[str]  # tensor names in wire order
    reference: list[np.ndarray]  # the whole model as received: the base of the update
    digest: codec.PendingDigest  # of the received part, for the server's check


@dataclass(frozen=True)
class Trained:
    """One round of local training."""

    losses: list[float]
    seconds: float
    terms: RoundTerms  # the active methods' terms, closed; finishing them answers for them


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
        self.local = LocalModel(cfg, client_id, data.dataset, device)
        self.private = PrivateParts(self.state_dir / "model", cfg.diffusion, client_id)
        self.link = ClientLink(np.random.default_rng([cfg.seed, client_id]))
        self.methods = local_methods()
        self.replay = RoundReplay(client_id)
        self.move_to: str | None = None  # set when a server re-assigns this client

    @property
    def trainer(self) -> DiffusionTrainer | None:
        return self.local.trainer

    @property
    def arch_json(self) -> str | None:
        return self.local.arch_json

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        if MOVE_KEY in ins.config:
            self.move_to = str(ins.config[MOVE_KEY])
            log.info("client %d: re-assigned to %s", self.client_id, self.move_to)
        return GetPropertiesRes(
            status=ok_status(),
            properties={
                CLIENT_ID_PROPERTY: self.client_id,
                NUM_EXAMPLES_PROPERTY: len(self.data.dataset),
                LABEL_HIST_PROPERTY: json.dumps(self.data.label_hist),
            },
        )

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        arrays = [] if self.trainer is None else model_to_ndarrays(self.trainer.model)
        return GetParametersRes(status=ok_status(), parameters=codec.encode(arrays, "fp32"))

    def fit(self, ins: FitIns) -> FitRes:
        check_protocol(ins.config, "fit")
        try:
            return self._fit(ins)
        except DatasetNotFoundError as error:
            # Its data, not a bug (a file read at first use): one line naming the file, here
            # and in the answer, which the server logs under this client's name.
            log.error("client %d: %s", self.client_id, error)
            return failed_fit(self.client_id, error)
        except Exception as error:  # noqa: BLE001 - report to the server instead of dying
            log.exception("client %d: fit failed", self.client_id)
            return failed_fit(self.client_id, error)

    def _fit(self, ins: FitIns) -> FitRes:
        received_bytes = fit_ins_wire_size(ins)
        config = ins.config
        shared = SharedGroups.of(config)
        self.methods.check(config)  # a malformed instruction changes nothing
        rewind = self.replay.mark(config, self._state)
        if rewind is not None:
            self._set_state(rewind)
        received = self._receive(ins, shared)
        lr = float(config.get(LR_KEY, self.cfg.training.lr))
        steps = int(config.get(LOCAL_STEPS_KEY, self.cfg.training.local_steps))
        trained = self._train(config, steps, lr)
        out = self._reply(config, shared, received)
        loss = float(np.mean(trained.losses))
        log.info("client %d: %d steps in %.1f s, loss %.4f", self.client_id, steps,
                 trained.seconds, loss)
        return fit_res(out, len(self.data.dataset), {
            CLIENT_ID_METRIC: self.client_id,
            LOSS_METRIC: loss,
            LABEL_HIST_METRIC: json.dumps(self.data.label_hist),
            BYTES_RECEIVED_METRIC: received_bytes,
            RECEIVED_DIGEST_KEY: received.digest.result(),
            PAYLOAD_BYTES_METRIC: codec.payload_bytes(out),
            TRAIN_SECONDS_METRIC: trained.seconds,
            STEPS_METRIC: steps,
            GROUPS_RETURNED_METRIC: shared.returned_label,
            **trained.terms.finish(self.local.model),
        })

    def _receive(self, ins: FitIns, shared: SharedGroups) -> Received:
        """Load the instruction's part over this client's model (its own parts elsewhere)."""
        self._prepare(str(ins.config[ARCH_KEY]), private=shared.private)
        model = self.local.model
        names = tensor_names(self.local.arch_json)
        sent_at = shared.sent_at(names)
        part = self.link.receive(ins.parameters, ins.config)
        state = self.local.state_tensors
        own = model_views(model, state)
        # Hashed while the model loads and trains and the answer is encoded: what the model
        # holds once loaded is ``part`` itself where it has the model's dtypes.
        same_dtypes = all(array.dtype == own[index].dtype
                          for index, array in zip(sent_at, part, strict=True))
        digest = self.link.keep_soon(part) if same_dtypes else None
        load_ndarrays(model, merge(own, part, sent_at), state)
        reference = as_loaded(own, part, sent_at)
        if digest is None:
            digest = self.link.keep_soon(select(reference, sent_at))
        return Received(names, reference, digest)

    def _train(self, config: dict[str, Scalar], steps: int, lr: float) -> Trained:
        """Local training with the terms of the methods the instruction asks for; the terms
        are closed however training ends."""
        start = time.perf_counter()
        terms = self.methods.begin_round(self.local.model, config)
        for line in terms.descriptions():
            log.info("client %d: %s", self.client_id, line)
        try:
            losses = self.local.train(steps, lr, terms.extra_loss(), terms.gradient_hook())
        finally:
            terms.close()
        return Trained(losses, time.perf_counter() - start, terms)

    def _reply(self, config: dict[str, Scalar], shared: SharedGroups,
               received: Received) -> Parameters:
        """The returned groups, encoded; with private parts the whole model is saved first."""
        model = self.local.model
        trained = model_views(model, self.local.state_tensors)  # encoded before it changes
        if shared.private:
            self.private.save(model)
        at = shared.returned_at(received.names)
        return self.link.reply(select(trained, at), select(received.reference, at), config,
                               shared.returned_label)

    def _state(self) -> dict[str, Any]:
        """Everything training carries from round to round (live: the replay copies it)."""
        return {"model": self.local.state(), "link": self.link.state(),
                "methods": self.methods.state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.local.load_state(state["model"])
        self.link.load_state(state["link"])
        self.methods.load_state(state["methods"])

    def _prepare(self, arch_json: str, private: bool) -> None:
        """The model for this instruction: rebuilt when the architecture changed, and, when
        parts of it are private, holding this client's own parts (from memory, else from its
        state folder after a restart, else the run's initial weights)."""
        if self.local.prepare(arch_json) and private:
            self.private.restore(self.local.model, arch_json)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Sample quality of this client's own model holding the shared groups just sent
        (partial sharing: every client's model differs). Samples go to the state folder."""
        check_protocol(ins.config, "evaluate")
        try:
            result = self._evaluate(ins)
        except Exception as error:  # noqa: BLE001 - report to the server instead of dying
            log.exception("client %d: evaluation failed", self.client_id)
            return failed_evaluation(self.client_id, error)
        log.info("client %d: fd_classifier %.4g of its own model", self.client_id,
                 result["fd_classifier"])
        return evaluation_answer(self.client_id, result)

    def _evaluate(self, ins: EvaluateIns) -> dict[str, Any]:
        sent = parse_groups(ins.config.get(SEND_GROUPS_KEY))
        self._prepare(str(ins.config[ARCH_KEY]), private=not is_everything(sent))
        model = self.local.model
        names = tensor_names(self.local.arch_json)
        received = codec.decode(ins.parameters)
        load_ndarrays(model, merge(model_to_ndarrays(model), received,
                                   group_indices(names, sent)))
        return evaluate_own_model(model, self.trainer.scheduler, self.cfg, self.device,
                                  self.state_dir / "samples.png")


def as_loaded(own: list[np.ndarray], part: list[np.ndarray],
              sent_at: list[int]) -> list[np.ndarray]:
    """The model just loaded, kept apart from training: a received tensor of the model's
    dtype is itself (decoded tensors are never written to), the others are copied."""
    received = {index: array for index, array in zip(sent_at, part, strict=True)
                if array.dtype == own[index].dtype}
    # ``own`` are views of the model: training would change them.
    return [received[index] if index in received else array.copy()
            for index, array in enumerate(own)]


class ForeignInstruction(BaseException):
    """An instruction without the protocol's keys: the server is not one of this project's,
    and answering it (an error per round) would only keep this client busy for nothing.

    A ``BaseException`` so that it leaves Flower's client loop at once: Flower catches
    ``Exception`` from a client's ``fit`` only to log a traceback and re-raise it. The
    session ends there; :func:`serve` turns it into one line and exit status 1."""


def check_protocol(config: dict[str, Scalar], message: str) -> None:
    """Raise :class:`ForeignInstruction` for an instruction that lacks the keys every server
    of this project sends (:func:`~fedphd.common.federation.instructions.missing_protocol_key`)."""
    missing = missing_protocol_key(config)
    if missing is not None:
        raise ForeignInstruction(f"its {message} instruction has no {missing}")


def failed_fit(client_id: int, error: Exception) -> FitRes:
    # Flower's legacy protocol has no generic error code; the message says what failed.
    return FitRes(
        status=Status(code=Code.FIT_NOT_IMPLEMENTED, message=f"fit failed: {error}"),
        parameters=Parameters(tensors=[], tensor_type=codec.FP32),
        num_examples=0,
        metrics={CLIENT_ID_METRIC: client_id},
    )


def default_state_dir(cfg: RunConfig, client_id: int) -> Path:
    return Path(cfg.output.dir) / "clients" / f"client-{client_id}"


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # Before anything loads: a bad --server costs one line, not a data set load.
    addresses = server_addresses(args.server) or [
        server_address_of_client(args.client_id, cfg.topology)]
    root_certificates = client_root_certificates(cfg.tls)  # a missing file fails at start
    own_certificate = client_certificate(cfg.tls, "client", args.client_id, "--client-id")
    seed_everything(cfg.seed + args.client_id)
    device = setup_torch(cfg.training, args.device)
    data = local_data(cfg, args.client_id, args.data_dir)
    log.info(
        "client %d: %d images, labels %s, connecting to %s (%s)",
        args.client_id, len(data.dataset), data.label_hist, addresses[0], describe_tls(cfg.tls),
    )
    state_dir = Path(args.state_dir) if args.state_dir else None
    client = DiffusionClient(cfg, args.client_id, data, device, state_dir)
    serve(client, addresses, cfg.topology.connect_timeout, max_message_bytes(cfg),
          root_certificates, own_certificate)
    log.info("client %d: disconnected by the server, exiting", args.client_id)
    return 0


def serve(client: DiffusionClient, addresses: list[str], wait: float, message_limit: int,
          root_certificates: bytes | None,
          own_certificate: tuple[bytes, bytes] | None = None) -> None:
    """Answer servers until one disconnects this client for good: a server that re-assigns
    it (``MOVE_KEY``) is followed to its new address; an unreachable one is replaced by the
    next address of the list. ``own_certificate``: what it presents to each (mutual TLS)."""
    address, given_up = addresses[0], 0
    while True:
        try:
            connect_client(address, client, max_wait_time=wait, max_message_length=message_limit,
                           root_certificates=root_certificates,
                           client_certificate=own_certificate)
        except ForeignInstruction as foreign:
            # Not retried, nor a fallback tried: the address is wrong, or the server is.
            raise ForeignServer(foreign_server(address, str(foreign))) from None
        except ServerUnreachable:
            # Every address given up on in a row: nothing left to try.
            given_up += 1
            if given_up >= len(addresses):
                raise
            gone, address = address, fallback_after(address, addresses)
            log.warning("client %d: %s is gone; joining %s", client.client_id, gone, address)
            continue
        given_up = 0
        if client.move_to is None:
            return
        address, client.move_to = client.move_to, None
        log.info("client %d: joining %s", client.client_id, address)


class ForeignServer(ConnectionError):
    """The server this client joined speaks Flower but not this project's protocol (the
    command line prints the message and exits with status 1)."""


def server_addresses(option: str | None) -> list[str]:
    """``--server A,B,...``: the server to join, then fallbacks in order; none when the flag
    is absent (the config's address applies). A flag that names no address (``--server
    ,,,``) is refused rather than replaced by the default: the user meant some server."""
    if option is None:
        return []
    return parse_addresses(option, "--server")


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
        "when its own is gone for good). Checked before anything loads: HOST:PORT or "
        "[IPV6]:PORT, no scheme; a list naming no address is refused",
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
        help="this client's own folder: its whole model when parts stay private (partial "
        "sharing), reloaded after a restart, and its evaluation samples "
        "(default: output.dir/clients/client-ID)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="train on this folder of images instead (one sub-folder per class, ImageFolder)",
    )
    parser.set_defaults(run=run)
