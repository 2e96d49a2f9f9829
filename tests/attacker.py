"""A hostile client for the bad-input tests: a real Flower client process that answers every
fit instruction with one kind of bad payload (the kind chosen by the round number).

    python -m tests.attacker --server HOST:PORT --client-id ID --kinds nan,inf,...

It never trains; each answer claims many samples, so an accepted one would dominate FedAvg
and show in the global model.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle

import numpy as np

from fedphd.common.core.models import architecture_from_json, build_unet, model_to_ndarrays
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, ROUND_KEY
from fedphd.common.wire.transport import (
    GRPC_MAX_MESSAGE_LENGTH,
    Client,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    connect_client,
    fit_res,
    ok_status,
)

log = logging.getLogger("fedphd.attacker")

CLAIMED_EXAMPLES = 100_000
OVERSIZED_BYTES = 160 * 2**20  # over the tiny U-Net's automatic limit (2 x 4.45 MB + 32 MiB)


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def first_float(arrays: list[np.ndarray]) -> int:
    return next(i for i, a in enumerate(arrays) if a.dtype.kind == "f" and a.size > 1)


def poisoned(arrays: list[np.ndarray], value: float) -> list[np.ndarray]:
    out = [a.copy() for a in arrays]
    out[first_float(out)].flat[0] = value
    return out


def reshaped(arrays: list[np.ndarray]) -> list[np.ndarray]:
    out = list(arrays)
    index = first_float(out)
    out[index] = np.zeros((out[index].size + 1,), np.float32)
    return out


def other_unet(arch_json: str) -> list[np.ndarray]:
    """The tensors of a U-Net of another architecture (one more ResNet layer per block)."""
    arch = architecture_from_json(arch_json)
    arch["layers_per_block"] = int(arch.get("layers_per_block", 1)) + 1
    return model_to_ndarrays(build_unet(arch, seed=1))


def encoded(arrays: list[np.ndarray]) -> Parameters:
    return codec.encode(arrays, "fp32")


# Answers whose tensors are wrong as a whole (built from the reference model).
_WHOLE_MODEL_ATTACKS = {
    "nan": lambda ref, arch: poisoned(ref, np.nan),
    "inf": lambda ref, arch: poisoned(ref, np.inf),
    "shape": lambda ref, arch: reshaped(ref),
    "dtype": lambda ref, arch: [a.astype(np.float64) if a.dtype == np.float32 else a
                                for a in ref],
    "count": lambda ref, arch: ref[:-1],
    "arch": lambda ref, arch: other_unet(arch),
}

# Answers whose bytes are wrong: each replaces the encoded tensors.
_BYTE_ATTACKS = {
    "truncated": lambda tensors, ref: [tensors[0][: len(tensors[0]) // 2], *tensors[1:]],
    # A 4 TB tensor declared in the header, 16 bytes of data behind it.
    "bomb": lambda tensors, ref: [
        _declare_shape(npy(np.zeros(4, np.float32)), "(1099511627776,)"), *tensors[1:]],
    "pickle": lambda tensors, ref: [
        npy(np.array([{"os.system": "echo pwned"}], dtype=object), allow_pickle=True),
        *tensors[1:]],
    "raw-pickle": lambda tensors, ref: [pickle.dumps(ref[0]), *tensors[1:]],
    "oversized": lambda tensors, ref: [npy(np.zeros(OVERSIZED_BYTES // 4, np.float32))],
}


def bad_payload(kind: str, reference: list[np.ndarray], arch_json: str) -> Parameters:
    """One malformed or malicious answer of ``kind``."""
    if kind in _WHOLE_MODEL_ATTACKS:
        return encoded(_WHOLE_MODEL_ATTACKS[kind](reference, arch_json))
    parameters = encoded(reference)
    tensors = list(parameters.tensors)
    if kind == "codec":
        return Parameters(tensors=tensors, tensor_type="fedphd.zip-bomb")
    if kind in _BYTE_ATTACKS:
        tensors = _BYTE_ATTACKS[kind](tensors, reference)
    elif kind not in ("metrics", "examples"):
        raise ValueError(f"unknown attack kind {kind!r}")
    return Parameters(tensors=tensors, tensor_type=parameters.tensor_type)


def _declare_shape(header_and_data: bytes, shape: str) -> bytes:
    """The npy bytes with the header's shape replaced (header re-padded to its length)."""
    magic, rest = header_and_data[:10], header_and_data[10:]
    header_len = int.from_bytes(magic[8:10], "little")
    header = rest[:header_len].decode("latin1")
    data = rest[header_len:]
    start = header.index("'shape': ") + len("'shape': ")
    end = header.index(")", start) + 1
    new = (header[:start] + shape + header[end:]).rstrip()
    new = new.rstrip("\n").ljust(header_len - 1) + "\n"
    return magic + new.encode("latin1") + data


class Attacker(Client):
    """Answers round ``r`` with the ``(r - 1) % len(kinds)``-th kind of bad payload."""

    def __init__(self, client_id: int, kinds: list[str]) -> None:
        self.client_id = client_id
        self.kinds = kinds

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        return GetPropertiesRes(status=ok_status(), properties={
            "client_id": self.client_id, "num_examples": CLAIMED_EXAMPLES,
            "label_hist": json.dumps([CLAIMED_EXAMPLES])})

    def fit(self, ins: FitIns) -> FitRes:
        server_round = int(ins.config[ROUND_KEY])
        kind = self.kinds[(server_round - 1) % len(self.kinds)]
        reference = codec.decode(ins.parameters)
        payload = bad_payload(kind, reference, str(ins.config[ARCH_KEY]))
        metrics = {"client_id": self.client_id, "loss": 0.1,
                   "label_hist": json.dumps([CLAIMED_EXAMPLES]), "attack": kind}
        examples = CLAIMED_EXAMPLES
        if kind == "metrics":
            metrics["label_hist"] = "{not json"
        elif kind == "examples":
            examples = -CLAIMED_EXAMPLES
        log.warning("attacker %d: round %d answers with a %s payload", self.client_id,
                    server_round, kind)
        return fit_res(payload, examples, metrics)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", type=int, required=True)
    parser.add_argument("--kinds", required=True, help="comma-separated attack kinds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    attacker = Attacker(args.client_id, args.kinds.split(","))
    # Its own limit is gRPC's ceiling: the server's limit is what is tested.
    connect_client(args.server, attacker, max_message_length=GRPC_MAX_MESSAGE_LENGTH,
                   max_wait_time=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
