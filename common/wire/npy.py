"""``.npy`` tensors as Flower carries them, with the data copied once at most.

A tensor on the wire is one ``.npy`` blob, byte for byte what Flower's
``ndarrays_to_parameters`` (``np.save``, ``allow_pickle=False``) writes, so plain Flower peers
read it: no pickle. :func:`npy_bytes` writes the header and the data straight into one
``bytes`` (``np.save`` into a buffer copies twice); :func:`load_tensor` returns a read-only
array over the received bytes themselves (``np.load`` copies), so reading the same payload
again costs only its headers, whose parsing is cached.
"""

from __future__ import annotations

import functools
import io
import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np


class CodecError(ValueError):
    """A payload that cannot be decoded (unknown codec, malformed tensor)."""


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save(array, allow_pickle=False)``'s bytes, with the data copied once."""
    return _encoded(array)[0]


def _encoded(array: np.ndarray) -> tuple[bytes, bool]:
    """:func:`npy_bytes`, and whether the blob is the one ``array`` is a view of (no copy)."""
    array = np.asanyarray(array)
    if array.dtype.hasobject:
        raise CodecError("object (pickled) arrays cannot be sent")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    fortran = not array.flags.c_contiguous
    header_bytes = _header_bytes(array.dtype.str if array.dtype.names is None else array.dtype,
                                 array.shape, fortran)
    blob = _blob_holding(array, header_bytes)
    if blob is not None:
        return blob, True
    # A Fortran-ordered array is written in its own order, as np.save does (the header says so).
    data = raw_bytes(array if array.flags.c_contiguous else array.T)
    return b"".join((header_bytes, data)), False


@functools.lru_cache(maxsize=8192)
def _header_bytes(dtype: object, shape: tuple[int, ...], fortran: bool) -> bytes:
    """np.save's version-1.0 header (cached: a model's tensors have the same every round)."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return header.getvalue()


def _blob_holding(array: np.ndarray, header: bytes) -> bytes | None:
    """The ``.npy`` blob ``array`` was read from, when it is exactly that blob's data under
    the same header: a decoded tensor sent on (an edge forwarding the global model, a server
    re-encoding what it decoded) is then the received bytes themselves, not a copy."""
    blob = array.base
    while isinstance(blob, np.ndarray):
        blob = blob.base
    if not isinstance(blob, bytes) or len(blob) != len(header) + array.nbytes:
        return None
    if not array.flags.c_contiguous or array.nbytes == 0 or not blob.startswith(header):
        return None
    start = np.frombuffer(blob, dtype=np.uint8, count=1).__array_interface__["data"][0]
    return blob if array.__array_interface__["data"][0] == start + len(header) else None


def encode_views(arrays: Sequence[np.ndarray]) -> tuple[list[bytes], bool]:
    """:func:`npy_bytes` of each array, and whether every blob is the one its array is a
    read-only view of (nothing copied: decoding the blobs gives those arrays again)."""
    blobs, held = [], True
    for array in arrays:
        blob, view = _encoded(array)
        held = held and view and not array.flags.writeable
        blobs.append(blob)
    return blobs, held


class DecodedMemo:
    """What a payload decodes to, kept beside the payload object while it lives.

    A server decodes the same ``Parameters`` several times a round (its strategy step, its
    downlink, its checks) and re-wraps arrays it decoded into a new message that decodes to
    them again; each decode parses every header (~4 us a tensor, hundreds of tensors). Only
    read-only arrays that are views of the payload's own (immutable) blobs are kept, and a
    memo counts only while the payload holds exactly the same blob objects. Arrays with a
    float16 tensor are not kept: Flower's reader returns those as they are, the codec's
    widens them to float32, so the two readers would not agree on them."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, str, list[bytes], list[np.ndarray]]] = {}
        self._by_first_array: dict[int, int] = {}  # id of an entry's first array -> its key
        self._lock = threading.Lock()

    def remember(self, parameters: Any, arrays: Sequence[np.ndarray]) -> None:
        if any(array.flags.writeable or array.dtype == np.float16 for array in arrays):
            return
        key = id(parameters)
        try:
            ref = weakref.ref(parameters, lambda _, key=key: self._forget(key))
        except TypeError:  # an object without weak references: nothing kept
            return
        with self._lock:
            self._entries[key] = (ref, parameters.tensor_type, list(parameters.tensors),
                                  list(arrays))
            if arrays:
                self._by_first_array[id(arrays[0])] = key

    def recall(self, parameters: Any) -> list[np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(id(parameters))
        if entry is None:
            return None
        ref, tensor_type, blobs, arrays = entry
        tensors = parameters.tensors
        if (ref() is not parameters or tensor_type != parameters.tensor_type
                or len(tensors) != len(blobs)
                or any(a is not b for a, b in zip(tensors, blobs, strict=True))):
            return None
        return list(arrays)

    def blobs_of(self, arrays: Sequence[np.ndarray]) -> list[bytes] | None:
        """The blobs of a live payload that decodes to exactly ``arrays`` (the same array
        objects, in order; each a read-only view of its blob): encoding them again would
        give those bytes, so they are the encoding, without a pass over the tensors."""
        if not arrays:
            return None
        with self._lock:
            entry = self._entries.get(self._by_first_array.get(id(arrays[0]), -1))
        if entry is None:
            return None
        _ref, tensor_type, blobs, known = entry
        if (tensor_type != "numpy.ndarray" or len(known) != len(arrays)
                or any(a is not b for a, b in zip(known, arrays, strict=True))):
            return None
        return list(blobs)

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None and entry[3]:
                first = id(entry[3][0])
                if self._by_first_array.get(first) == key:
                    del self._by_first_array[first]


DECODED = DecodedMemo()


def raw_bytes(array: np.ndarray) -> memoryview | bytes:
    """The bytes of a C-contiguous array, without a copy."""
    if array.size == 0:
        return b""
    return memoryview(array.reshape(-1)).cast("B")


def load_tensor(index: int, blob: bytes) -> np.ndarray:
    """One ``.npy`` tensor from the wire, refused unless its header is plain and honest.

    The header is read first so that a sender cannot make the receiver allocate what its
    header claims or hand it pickled objects: the declared size must equal the bytes that
    follow. The array is a read-only view of ``blob`` (no copy).
    """
    try:
        offset, (shape, fortran, dtype, count) = _header(blob)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as error:
        raise CodecError(f"malformed tensor {index}: not an npy tensor ({error})") from None
    if dtype.hasobject:
        raise CodecError(f"malformed tensor {index}: object (pickled) arrays are refused")
    declared = count * dtype.itemsize
    carried = len(blob) - offset
    if declared != carried:
        raise CodecError(f"malformed tensor {index}: header declares {dtype}{tuple(shape)} = "
                         f"{declared} bytes but {carried} bytes follow (truncated or padded "
                         "payload)")
    array = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


# Magic (6) + version (2) + header length (2 or 4), then a header that np.save pads to 64.
_MAGIC = b"\x93NUMPY"
_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}  # by major version


def _header(blob: bytes | memoryview) -> tuple[int, tuple[tuple[int, ...], bool, np.dtype, int]]:
    """(data offset, (shape, Fortran order, dtype, element count)) of an ``.npy`` blob."""
    if blob[:6] != _MAGIC or len(blob) < 10:
        raise ValueError("no npy magic string")
    major, minor = blob[6], blob[7]
    if major not in _LENGTH_BYTES or minor != 0:
        raise ValueError(f"unsupported npy version {(major, minor)}")
    width = _LENGTH_BYTES[major]
    length = 8 + width + int.from_bytes(blob[8:8 + width], "little")
    if length > len(blob):
        raise ValueError(f"a header of {length} bytes")
    return length, _parse_header((major, minor), bytes(blob[:length]))


@functools.lru_cache(maxsize=8192)
def _parse_header(version: tuple[int, int], header: bytes) -> tuple[tuple[int, ...], bool,
                                                                     np.dtype, int]:
    """numpy's own header reader (its ``literal_eval`` costs ~1 ms a tensor), cached: a model's
    headers are the same every round."""
    stream = io.BytesIO(header)
    np.lib.format.read_magic(stream)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = reader(stream)
    return tuple(shape), bool(fortran), dtype, math.prod(shape)


def blob_length(buffer: bytes, start: int = 0) -> int | None:
    """The length of the plain ``.npy`` blob that begins at ``buffer[start]`` (header and
    data), or None when none does or it would run past the end: what lets blobs sent back to
    back be told apart without a length prefix."""
    view = memoryview(buffer)[start:]
    try:
        offset, (_shape, _fortran, dtype, count) = _header(view)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError):
        return None
    total = offset + count * dtype.itemsize
    return None if dtype.hasobject or total > len(view) else total
