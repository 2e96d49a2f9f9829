"""Encoding of model tensors for the wire, chosen per link direction.

Every codec turns a list of float32 arrays into Flower ``Parameters`` and back. The codec's
name travels as ``Parameters.tensor_type`` so the receiver decodes what was actually sent and
refuses anything it does not know. Each tensor is one ``.npy`` blob, byte for byte what
Flower's ``ndarrays_to_parameters`` (``np.save``, ``allow_pickle=False``) writes, so plain
Flower peers read it: no pickle on the wire.

Both directions copy a tensor's data once at most (:mod:`fedphd.common.wire.npy`): decoded
arrays are read-only views of the received bytes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import threading
from typing import Any

import numpy as np
import xxhash

from fedphd.common.wire import npy
from fedphd.common.wire.npy import CodecError, load_tensor, npy_bytes, raw_bytes
from fedphd.common.wire.quantization import ErrorFeedback, dequantize_all, quantize_all
from fedphd.common.wire.transport import (
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

__all__ = ["CodecError", "PendingDigest", "decode", "digest", "encode", "load_tensor",
           "to_parameters"]

FP32 = "numpy.ndarray"  # Flower's own tensor type name, so plain Flower peers understand it
FP16 = "fedphd.fp16"
Q8 = "fedphd.q8-delta"
Q4 = "fedphd.q4-delta"

_TENSOR_TYPES = {"fp32": FP32, "fp16": FP16, "q8": Q8, "q4": Q4}
_BITS = {Q8: 8, Q4: 4}


def encode(
    arrays: list[np.ndarray],
    codec: str,
    *,
    reference: list[np.ndarray] | None = None,
    per_channel: bool = True,
    rng: np.random.Generator | None = None,
    feedback: ErrorFeedback | None = None,
) -> Parameters:
    """Encode float32 state tensors with ``codec``.

    ``fp32`` and ``fp16`` send the weights. ``q8`` and ``q4`` (FedDM-quant) send the update
    ``Δ = w - reference`` quantised to 8 or 4 bits with stochastic (unbiased) rounding, per
    output channel or per tensor; the receiver holds ``reference`` (the model it sent) and
    rebuilds ``w = reference + Q(Δ)``. With ``feedback`` (error feedback), what quantisation
    dropped this round is added to the next round's update.
    """
    if codec not in _TENSOR_TYPES:
        raise CodecError(f"unknown codec {codec!r}; allowed: {sorted(_TENSOR_TYPES)}")
    tensor_type = _TENSOR_TYPES[codec]
    if tensor_type in _BITS:
        if reference is None:
            raise CodecError(f"codec {codec!r} encodes updates and needs the reference model")
        deltas = _deltas(arrays, reference)
        rng = rng if rng is not None else np.random.default_rng()
        bits = _BITS[tensor_type]
        arrays = (
            feedback.quantize(deltas, bits, per_channel=per_channel, rng=rng)
            if feedback is not None
            else quantize_all(deltas, bits, per_channel, rng)
        )
    elif codec == "fp16":
        arrays = [a.astype(np.float16) if a.dtype == np.float32 else a for a in arrays]
    return to_parameters(arrays, tensor_type)


def to_parameters(arrays: list[np.ndarray], tensor_type: str = FP32) -> Parameters:
    """``arrays`` as ``.npy`` blobs (what ``ndarrays_to_parameters`` makes, one copy each)."""
    if tensor_type == FP32:  # Flower's own type: its writer, which remembers the decoding
        return ndarrays_to_parameters(arrays)
    return Parameters(tensors=[npy_bytes(a) for a in arrays], tensor_type=tensor_type)


def fp32_message(arrays: list[np.ndarray], decoded_from: Parameters) -> Parameters:
    """``arrays`` as an fp32 message: ``decoded_from`` itself when ``arrays`` are exactly
    what it decodes to (a model received and sent on unchanged), else :func:`to_parameters`."""
    known = npy.DECODED.recall(decoded_from) if decoded_from.tensor_type == FP32 else None
    if known is not None and len(known) == len(arrays) and all(
            a is b for a, b in zip(known, arrays, strict=True)):
        return decoded_from
    return to_parameters(arrays)


def decode(parameters: Parameters, reference: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Decode a payload made by :func:`encode` into float32 arrays (ints stay ints).

    Quantised updates need ``reference``, the model the sender started from.
    """
    if parameters.tensor_type not in _TENSOR_TYPES.values():
        raise CodecError(
            f"unknown tensor type {parameters.tensor_type!r}; "
            f"allowed: {sorted(_TENSOR_TYPES.values())}"
        )
    if parameters.tensor_type == FP32 and reference is None:
        arrays = parameters_to_ndarrays(parameters)  # decoded once per payload (npy.DECODED)
    else:
        arrays = [load_tensor(index, blob) for index, blob in enumerate(parameters.tensors)]
    if parameters.tensor_type in _BITS:
        if reference is None:
            raise CodecError(f"{parameters.tensor_type} carries an update: no reference model")
        try:
            deltas = dequantize_all(arrays)
        except ValueError as error:
            raise CodecError(f"malformed quantised update: {error}") from None
        return _apply(reference, deltas)
    return [a.astype(np.float32) if a.dtype == np.float16 else a for a in arrays]


def is_update_codec(codec: str) -> bool:
    """Codecs that send ``w - reference`` and need the receiver to hold ``reference``."""
    return _TENSOR_TYPES.get(codec) in _BITS


def _deltas(arrays: list[np.ndarray], reference: list[np.ndarray]) -> list[np.ndarray]:
    if len(arrays) != len(reference):
        raise CodecError(f"{len(arrays)} tensors but a {len(reference)}-tensor reference")
    # Integer buffers are not updates: they travel as they are (quantize passes ints through).
    return [a - r if a.dtype.kind == "f" else a for a, r in zip(arrays, reference, strict=True)]


def _apply(reference: list[np.ndarray], deltas: list[np.ndarray]) -> list[np.ndarray]:
    if len(deltas) != len(reference):
        raise CodecError(f"update has {len(deltas)} tensors, the model {len(reference)}")
    out = []
    for index, (ref, delta) in enumerate(zip(reference, deltas, strict=True)):
        if delta.shape != ref.shape:
            raise CodecError(f"update tensor {index} has shape {delta.shape}, model {ref.shape}")
        out.append((ref + delta).astype(ref.dtype) if ref.dtype.kind == "f" else delta)
    return out


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """A float32 vector (e.g. a control variate) as ``np.save`` bytes for a config value."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def vector_from_bytes(blob: bytes, size: int, what: str) -> np.ndarray:
    """A vector from the wire, refused unless it is finite float32 of length ``size``."""
    try:
        vector = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise ValueError(f"{what}: malformed vector: {error}") from None
    if vector.dtype != np.float32 or vector.shape != (size,):
        raise ValueError(f"{what}: expected float32[{size}], got {vector.dtype}{vector.shape}")
    if not np.isfinite(vector).all():
        raise ValueError(f"{what}: vector holds NaN or Inf")
    return vector


SHA256 = "sha256"
XXH3_128 = "xxh3-128"
# What fedphd's own receivers report: xxh3-128 hashes 4.4 MB in 0.16 ms here, SHA-256 in
# 2.7 ms (with SHA-NI), and three digests a round share two cores with the transfers.
FAST_DIGEST = XXH3_128
_PREFIX = {SHA256: "", XXH3_128: "xxh3-128:"}
_HASHERS = {SHA256: hashlib.sha256, XXH3_128: xxhash.xxh3_128}


def digest(arrays: list[np.ndarray], algorithm: str = SHA256) -> str:
    """A digest of a model state (dtypes, shapes and values): equal digests = same model.

    Per tensor ``f"{a.dtype.str}{a.shape}"``, then its C-order bytes, fed to ``algorithm``:
    ``sha256`` (64 hex digits, what a plain receiver reports: README "Answers") or
    ``xxh3-128`` (``"xxh3-128:"`` and 32 hex digits, what fedphd's receivers report). Both
    detect a model rebuilt wrongly; neither authenticates a peer (a peer reports its own)."""
    if algorithm != SHA256:
        return _PREFIX[algorithm] + _fed_in_turn(arrays, _HASHERS[algorithm]()).hexdigest()
    sha = _HASHERS[algorithm]()
    # Small tensors are hashed together (the digest of a concatenation is that of its parts
    # fed in turn): hundreds of short updates would each hold the GIL, which the thread
    # that hashes in the background shares with the round's own work.
    run: list[bytes | memoryview] = []
    size = 0
    for array in arrays:
        array = np.ascontiguousarray(array)
        data = raw_bytes(array)
        run.append(_label(array.dtype.str, array.shape))
        if array.nbytes >= _HASHED_ALONE:
            sha.update(b"".join(run))
            sha.update(data)
            run, size = [], 0
            continue
        run.append(data)
        size += array.nbytes
        if size >= _HASHED_ALONE:
            sha.update(b"".join(run))
            run, size = [], 0
    sha.update(b"".join(run))
    return _PREFIX[algorithm] + sha.hexdigest()


def _fed_in_turn(arrays: list[np.ndarray], state: Any) -> Any:
    """``state`` fed each tensor's label and bytes, one update each (xxh3's updates cost
    well under a microsecond: joining small tensors first would cost more than it saves)."""
    update = state.update
    for array in arrays:
        array = np.ascontiguousarray(array)
        update(_label(array.dtype.str, array.shape))
        update(raw_bytes(array))
    return state


def digest_algorithm(value: object) -> str | None:
    """The algorithm a reported digest was made with (None: it is not a digest)."""
    if not isinstance(value, str):
        return None
    for algorithm, prefix in _PREFIX.items():
        if prefix and value.startswith(prefix):
            return algorithm if _is_hex(value[len(prefix):], 32) else None
    return SHA256 if _is_hex(value, 64) else None


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


_HASHED_ALONE = 1 << 18


@functools.lru_cache(maxsize=8192)
def _label(dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"{dtype}{shape}".encode()


# A fast digest of a model up to this size is computed at once: xxh3-128 takes ~0.5 ms for
# the tiny U-Net's 4.4 MB in 182 tensors here, less than starting a thread and waiting for
# it costs on a busy machine (0.3-0.9 ms, traced); larger models are hashed beside the round.
INLINE_BYTES = 16 << 20


class PendingDigest:
    """:func:`digest` computed in a thread of its own, off the round's critical path
    (hashlib and xxhash release the GIL while they hash; SHA-256 takes ~0.09 s per 143 MB
    here): started when a model is received or sent, read when the answer is built or
    checked. The arrays must not change meanwhile (decoded tensors and kept references never
    do). A copy or a pickle of it is the digest itself.

    ``idle``: a digest read only much later (a sender's, when the answers come back; an
    edge's of the global model, when it answers) is hashed at the lowest CPU priority
    (Linux threads have their own nice value), so that it takes only cores nothing else
    wants: on a busy machine it would otherwise slow the transfers and the receivers' work
    it is meant to stay out of the way of. A fast digest of a small model
    (:data:`INLINE_BYTES`) is computed at once instead."""

    def __init__(self, arrays: list[np.ndarray], idle: bool = False,
                 algorithm: str = SHA256) -> None:
        self.algorithm = algorithm
        self._value: str | None = None
        self._thread: threading.Thread | None = None
        if algorithm != SHA256 and sum(a.nbytes for a in arrays) <= INLINE_BYTES:
            self._value = digest(arrays, algorithm)
            return
        self._thread = threading.Thread(target=self._run, args=(arrays, idle), daemon=True,
                                        name="digest")
        self._thread.start()

    def _run(self, arrays: list[np.ndarray], idle: bool) -> None:
        if idle:
            _lowest_priority()
        self._value = digest(arrays, self.algorithm)

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._value is None:  # the thread died: say so where the digest is needed
            raise RuntimeError("computing a model digest failed")
        return self._value

    def __deepcopy__(self, memo: dict) -> str:
        return self.result()

    def __reduce__(self) -> tuple:
        return (str, (self.result(),))


def _lowest_priority() -> None:
    """Nice 19 for the calling thread (Linux; elsewhere, or where refused, nothing)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def resolved(value: str | PendingDigest) -> str:
    return value if isinstance(value, str) else value.result()


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of tensor data in a payload (what the codec shrinks)."""
    return sum(len(t) for t in parameters.tensors)
