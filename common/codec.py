"""Encoding of model tensors for the wire, chosen per link direction.

Every codec turns a list of float32 arrays into Flower ``Parameters`` and back. The codec's
name travels as ``Parameters.tensor_type`` so the receiver decodes what was actually sent and
refuses anything it does not know. Tensors are serialised by Flower's
``ndarrays_to_parameters`` (``np.save`` with ``allow_pickle=False``): no pickle on the wire.
"""

from __future__ import annotations

import hashlib

import numpy as np

from common.transport import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

FP32 = "numpy.ndarray"  # Flower's own tensor type name, so plain Flower peers understand it
FP16 = "fedphd.fp16"

_TENSOR_TYPES = {"fp32": FP32, "fp16": FP16}


class CodecError(ValueError):
    """A payload that cannot be decoded (unknown codec, malformed tensor)."""


def encode(arrays: list[np.ndarray], codec: str) -> Parameters:
    """Encode float32 state tensors with ``codec`` (``fp32`` or ``fp16``)."""
    if codec not in _TENSOR_TYPES:
        raise CodecError(f"unknown codec {codec!r}; allowed: {sorted(_TENSOR_TYPES)}")
    if codec == "fp16":
        arrays = [a.astype(np.float16) if a.dtype == np.float32 else a for a in arrays]
    parameters = ndarrays_to_parameters(arrays)
    parameters.tensor_type = _TENSOR_TYPES[codec]
    return parameters


def decode(parameters: Parameters) -> list[np.ndarray]:
    """Decode a payload made by :func:`encode` into float32 arrays (ints stay ints)."""
    if parameters.tensor_type not in _TENSOR_TYPES.values():
        raise CodecError(
            f"unknown tensor type {parameters.tensor_type!r}; "
            f"allowed: {sorted(_TENSOR_TYPES.values())}"
        )
    try:
        arrays = parameters_to_ndarrays(parameters)
    except (ValueError, EOFError, OSError) as error:  # np.load: pickled objects, truncation
        raise CodecError(f"malformed tensor payload: {error}") from None
    return [a.astype(np.float32) if a.dtype == np.float16 else a for a in arrays]


def digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 of a model state (dtypes, shapes and values): equal digests = same model."""
    sha = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of tensor data in a payload (what the codec shrinks)."""
    return sum(len(t) for t in parameters.tensors)
