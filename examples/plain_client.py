"""A FedPhD client written with stock Flower, torch and diffusers only: no import of the project.

It speaks the wire protocol described in the README ("Writing your own client"):

* at join it answers ``get_properties`` with ``client_id``, ``num_examples`` and
  ``label_hist`` (the server identifies every peer before it counts as connected);
* per ``fit`` it rebuilds ``diffusers.UNet2DModel`` from the instruction's ``fedphd.arch``,
  loads the weights (fp32, fp16, or a q8/q4 update from the model it holds), trains a few
  DDPM steps (``DDPMScheduler.add_noise``, MSE on the noise) on its own images (a seeded
  share of scikit-learn's digits, resized like the project does) and answers in the codec
  named by ``fedphd.uplink`` (fp32, fp16, q8 or q4) with ``num_examples`` and the metrics
  the server checks (``client_id``, ``loss``, ``label_hist``, ``received_digest``).

What it does not do (it answers such an instruction with an error status that says so):
pruned architectures (``pruned_shapes`` in ``fedphd.arch``) and partial sharing
(``fedphd.send_groups`` / ``fedphd.return_groups`` naming less than the whole U-Net). It
ignores the methods' own keys (FedProx, SCAFFOLD, MOON, group lasso): plain local training.
Quantised answers carry no error feedback.

    python examples/plain_client.py --server 127.0.0.1:9090 --client-id 0 --insecure
    python examples/plain_client.py --server cloud.example.org:9090 --client-id 0 \\
        --root-cert certs/ca.pem --client-cert certs/client-0.pem --client-key certs/client-0.key
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from flwr.client import Client, start_client
from flwr.common import (
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
    Status,
    serde,
)
from flwr.compat.client.grpc_client import connection as flower_connection
from flwr.proto.transport_pb2 import ServerMessage  # pylint: disable=no-name-in-module

# Parameters.tensor_type of each codec (the first is Flower's own name for np.save tensors).
TENSOR_TYPES = {"fp32": "numpy.ndarray", "fp16": "fedphd.fp16",
                "q8": "fedphd.q8-delta", "q4": "fedphd.q4-delta"}
BITS = {"fedphd.q8-delta": 8, "fedphd.q4-delta": 4}
RAW, PER_TENSOR, PER_CHANNEL = 0, 1, 2  # the "kind" in a quantised tensor's header
FORMAT_VERSION = 1
GROUPS = {"down", "mid", "up"}


class Refusal(ValueError):
    """An instruction this client cannot follow; the message says why."""


# --- tensors on the wire ----------------------------------------------------------------


def to_blob(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def from_blob(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 over each tensor's dtype, shape and bytes: the server compares it with the
    model it sent (a match lets it send q8/q4 updates from that model next time)."""
    sha = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def dequantize(codes: np.ndarray, params: np.ndarray, header: np.ndarray) -> np.ndarray:
    """One quantised tensor: ``lo_g + q * s_g`` per group (float32), or a raw int tensor."""
    version, kind, bits, ndim = (int(v) for v in header[:4])
    shape = tuple(int(d) for d in header[4:4 + ndim])
    if version != FORMAT_VERSION:
        raise Refusal(f"quantised tensor format {version}, this client knows {FORMAT_VERSION}")
    if kind == RAW:
        return codes.reshape(shape)
    count = math.prod(shape)
    groups = shape[0] if kind == PER_CHANNEL else 1
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    q = ((codes[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)[:count]
    q = q.astype(np.float32).reshape(groups, count // max(groups, 1))
    q *= params[groups:][:, None]
    q += params[:groups][:, None]
    return q.reshape(shape)


def quantize(x: np.ndarray, bits: int, per_channel: bool,
             rng: np.random.Generator) -> list[np.ndarray]:
    """One tensor as its three wire parts (codes, [lo..., scale...], header), stochastic
    rounding so that the expected value is ``x``; integer tensors travel raw."""
    if x.dtype.kind != "f":
        header = np.array([FORMAT_VERSION, RAW, 0, x.ndim, *x.shape], dtype=np.int64)
        return [x.reshape(-1), np.zeros(0, np.float32), header]
    kind = PER_CHANNEL if per_channel and x.ndim >= 2 else PER_TENSOR
    groups = (x.reshape(x.shape[0], -1) if kind == PER_CHANNEL else x.reshape(1, -1))
    groups = groups.astype(np.float64)
    levels = 2**bits - 1
    lo = groups.min(axis=1).astype(np.float32)  # the deltas are float32: min is exact
    scale64 = (groups.max(axis=1) - lo) / levels
    scale = scale64.astype(np.float32)
    low = scale.astype(np.float64) < scale64
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))  # round up: codes stay <= L
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    t = (groups - lo[:, None]) / safe[:, None] + rng.random(groups.shape)
    codes = np.clip(np.floor(t), 0, levels).astype(np.uint8).reshape(-1)
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[:codes.size] = codes
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    packed = np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1)
    header = np.array([FORMAT_VERSION, kind, bits, x.ndim, *x.shape], dtype=np.int64)
    return [packed.astype(np.uint8), np.concatenate([lo, scale]), header]


def decode(parameters: Parameters, held: list[np.ndarray] | None) -> list[np.ndarray]:
    """The instruction's model: whole weights (fp32/fp16), or ``held + update`` (q8/q4)."""
    arrays = [from_blob(blob) for blob in parameters.tensors]
    kind = parameters.tensor_type
    if kind in (TENSOR_TYPES["fp32"], TENSOR_TYPES["fp16"]):
        return [a.astype(np.float32) if a.dtype == np.float16 else a for a in arrays]
    if kind not in BITS:
        raise Refusal(f"unknown tensor type {kind!r}; this client decodes "
                      f"{sorted(TENSOR_TYPES.values())}")
    if held is None:
        raise Refusal(f"{kind} is an update, and this client holds no model")
    deltas = [dequantize(*arrays[i:i + 3]) for i in range(0, len(arrays), 3)]
    return [(ref + d).astype(ref.dtype) if ref.dtype.kind == "f" else d
            for ref, d in zip(held, deltas, strict=True)]


def encode(arrays: list[np.ndarray], reference: list[np.ndarray], codec: str,
           per_channel: bool, rng: np.random.Generator) -> Parameters:
    """The answer in the instruction's uplink codec (q8/q4: the update from ``reference``)."""
    if codec not in TENSOR_TYPES:
        raise Refusal(f"fedphd.uplink {codec!r} is not a codec this client encodes "
                      f"({sorted(TENSOR_TYPES)})")
    tensor_type = TENSOR_TYPES[codec]
    if tensor_type in BITS:
        wire = []
        for array, ref in zip(arrays, reference, strict=True):
            delta = array - ref if array.dtype.kind == "f" else array
            wire.extend(quantize(delta, BITS[tensor_type], per_channel, rng))
    elif codec == "fp16":
        wire = [a.astype(np.float16) if a.dtype == np.float32 else a for a in arrays]
    else:
        wire = arrays
    return Parameters(tensors=[to_blob(a) for a in wire], tensor_type=tensor_type)


# --- the model and local training -------------------------------------------------------


def build_unet(arch_json: str) -> UNet2DModel:
    """The U-Net the server described (its diffusers config as JSON)."""
    try:
        arch = json.loads(arch_json)
    except json.JSONDecodeError as error:
        raise Refusal(f"fedphd.arch is not JSON: {error}") from None
    if not isinstance(arch, dict):
        raise Refusal("fedphd.arch is not a JSON object of UNet2DModel arguments")
    if arch.get("pruned_shapes"):
        raise Refusal("the server sent a pruned U-Net (pruned_shapes in fedphd.arch); this "
                      "example builds unpruned UNet2DModel only")
    arch.pop("pruned_shapes", None)
    try:
        return UNet2DModel(**arch)
    except (TypeError, ValueError) as error:
        raise Refusal(f"UNet2DModel refused fedphd.arch: {error}") from None


def state_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    """Every state tensor in state_dict order: the wire order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def load_arrays(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    state = model.state_dict()
    if len(arrays) != len(state):
        raise Refusal(f"the instruction carries {len(arrays)} tensors, the U-Net has {len(state)}")
    for (name, current), array in zip(state.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise Refusal(f"tensor {name}: shape {array.shape}, the U-Net's {tuple(current.shape)}")
    model.load_state_dict({name: torch.as_tensor(array) for name, array
                           in zip(state, arrays, strict=True)})


def digits_share(client_id: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of scikit-learn's 8x8 digits (a seeded choice per client), in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = np.random.default_rng(client_id).choice(len(digits.images), count, replace=False)
    return digits.images[chosen] / 16.0, digits.target[chosen]


def as_batch(images: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """Images resized to the U-Net's input and scaled to [-1, 1] (as the project does)."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear")
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).repeat(1, channels, 1, 1)


class PlainClient(Client):
    """Answers a FedPhD cloud or edge with plain DDPM training of what it was sent."""

    def __init__(self, client_id: int, images: np.ndarray, labels: np.ndarray,
                 steps: int | None, batch_size: int, timesteps: int) -> None:
        self.client_id = client_id
        self.images, self.labels = images, labels
        self.steps, self.batch_size = steps, batch_size
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps)  # linear 1e-4..0.02
        self.held: list[np.ndarray] | None = None  # the model last received (q8/q4 base)
        self.held_digest = ""
        self.rng = np.random.default_rng(client_id)  # stochastic rounding
        self.move_to: str | None = None
        torch.manual_seed(client_id)

    def label_hist(self) -> str:
        return json.dumps(np.bincount(self.labels, minlength=10).tolist())

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        if "fedphd.move_to" in ins.config:  # an edge re-assigns this client elsewhere
            self.move_to = str(ins.config["fedphd.move_to"])
        return GetPropertiesRes(status=Status(Code.OK, "ok"), properties={
            "client_id": self.client_id, "num_examples": len(self.images),
            "label_hist": self.label_hist()})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return GetParametersRes(status=Status(Code.OK, "ok"),
                                parameters=Parameters(tensors=[], tensor_type="numpy.ndarray"))

    def fit(self, ins: FitIns) -> FitRes:
        try:
            return self._fit(ins)
        except Refusal as refusal:
            print(f"plain client {self.client_id}: refused the instruction: {refusal}",
                  file=sys.stderr, flush=True)
            return FitRes(status=Status(Code.FIT_NOT_IMPLEMENTED, f"fit failed: {refusal}"),
                          parameters=Parameters(tensors=[], tensor_type="numpy.ndarray"),
                          num_examples=0, metrics={"client_id": self.client_id})

    def _fit(self, ins: FitIns) -> FitRes:
        config = ins.config
        if "fedphd.arch" not in config:
            raise Refusal("the instruction has no fedphd.arch: not a FedPhD server")
        for key in ("fedphd.send_groups", "fedphd.return_groups"):
            named = {g.strip() for g in str(config.get(key, "")).split(",") if g.strip()}
            if named and named != GROUPS:
                raise Refusal(f"{key} = {config[key]!r}: this example shares the whole U-Net only")
        model = build_unet(str(config["fedphd.arch"]))
        base = config.get("fedphd.base_digest")
        if base is not None and base != self.held_digest:
            raise Refusal("the server sent an update from a model this client does not hold")
        received = decode(ins.parameters, self.held if base is not None else None)
        load_arrays(model, received)
        received = state_arrays(model)
        self.held, self.held_digest = received, digest(received)
        steps = self.steps or int(config.get("fedphd.local_steps", 2))
        loss = self.train(model, steps, float(config.get("fedphd.lr", 2e-4)))
        answer = encode(state_arrays(model), received, str(config.get("fedphd.uplink", "fp32")),
                        bool(config.get("fedphd.per_channel", True)), self.rng)
        print(f"plain client {self.client_id}: {steps} steps, loss {loss:.4f}, answering "
              f"{len(self.images)} samples as {answer.tensor_type}", flush=True)
        return FitRes(status=Status(Code.OK, "ok"), parameters=answer,
                      num_examples=len(self.images), metrics={
                          "client_id": self.client_id, "loss": loss,
                          "label_hist": self.label_hist(),
                          "received_digest": self.held_digest,
                          "bytes_received": ServerMessage(
                              fit_ins=serde.fit_ins_to_proto(ins)).ByteSize(),
                          "payload_bytes": sum(len(t) for t in answer.tensors),
                          "steps": steps})

    def train(self, model: UNet2DModel, steps: int, lr: float) -> float:
        """``steps`` Adam steps of the DDPM loss ||eps - eps_theta(x_t, t)||^2."""
        size, channels = model.config.sample_size, model.config.in_channels
        data = as_batch(self.images, size, channels)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        losses = []
        for _ in range(steps):
            batch = data[torch.randint(0, len(data), (self.batch_size,))]
            noise = torch.randn_like(batch)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(batch),))
            loss = F.mse_loss(model(self.scheduler.add_noise(batch, noise, t), t).sample, noise)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return EvaluateRes(status=Status(Code.EVALUATE_NOT_IMPLEMENTED, "not implemented"),
                           loss=0.0, num_examples=0, metrics={"client_id": self.client_id})


# --- mutual TLS -------------------------------------------------------------------------


def present_certificate(chain: bytes, key: bytes) -> None:
    """Make Flower's legacy client present a client certificate (FedPhD servers with
    certificates require one; Flower's own ``create_channel`` cannot present any)."""
    def create_channel(server_address, insecure, root_certificates=None,
                       max_message_length=2_147_483_647, interceptors=None):
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key=key,
                                                   certificate_chain=chain)
        options = [("grpc.max_send_message_length", max_message_length),
                   ("grpc.max_receive_message_length", max_message_length)]
        return grpc.secure_channel(server_address, credentials, options=options)

    flower_connection.create_channel = create_channel


def join(client: PlainClient, address: str, root: bytes | None, wait: float) -> None:
    """Serve the server at ``address`` until it disconnects this client. Flower's legacy
    client gives up on a server that is not up yet, so an unreachable one is tried again
    for ``wait`` seconds (start order then does not matter)."""
    deadline, delay = time.monotonic() + wait, 0.5
    while True:
        try:
            start_client(server_address=address, client=client, insecure=root is None,
                         root_certificates=root, transport="grpc-bidi")
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise SystemExit(f"plain client: the server at {address}: "
                                 f"{error.details()}") from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--client-id", type=int, required=True, metavar="ID")
    transport = parser.add_mutually_exclusive_group(required=True)
    transport.add_argument("--insecure", action="store_true",
                           help="plaintext (the server's tls.insecure = true)")
    transport.add_argument("--root-cert", metavar="CA.pem", help="the run's CA certificate")
    parser.add_argument("--client-cert", metavar="PEM", help="this client's certificate")
    parser.add_argument("--client-key", metavar="PEM", help="its private key")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="local steps per round (default: the instruction's "
                        "fedphd.local_steps)")
    parser.add_argument("--images", type=int, default=256, help="digits this client owns")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--wait", type=float, default=120, metavar="S",
                        help="how long to retry a server that is not up yet")
    parser.add_argument("--timesteps", type=int, default=1000,
                        help="DDPM steps T: the run's diffusion.num_train_timesteps")
    args = parser.parse_args()
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    if args.client_cert and args.insecure:
        parser.error("--client-cert needs --root-cert (TLS), not --insecure")
    root = None
    try:
        root = Path(args.root_cert).read_bytes() if args.root_cert else None
        if args.client_cert:
            present_certificate(Path(args.client_cert).read_bytes(),
                                Path(args.client_key).read_bytes())
    except OSError as error:
        parser.error(f"cannot read a certificate file: {error}")
    images, labels = digits_share(args.client_id, args.images)
    client = PlainClient(args.client_id, images, labels, args.steps, args.batch_size,
                         args.timesteps)
    address = args.server
    while address is not None:
        join(client, address, root, args.wait)
        address, client.move_to = client.move_to, None  # follow a re-assignment
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
