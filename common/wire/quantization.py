"""Stochastic uniform quantisation of model updates for the wire (FedDM-quant).

A float tensor ``x`` is cut into groups ``g`` (the whole tensor, or each output channel = slice
along axis 0 when ``per_channel`` and ``x.ndim >= 2``). With ``L = 2**bits - 1`` levels, each group
gets an affine grid

    lo_g = min(x_g),   s_g = (max(x_g) - lo_g) / L,   x̂ = lo_g + q * s_g,   q ∈ {0, …, L},

and every element is rounded *stochastically*: ``q = floor((x - lo_g) / s_g + U)`` with
``U ~ U[0, 1)``, clipped to ``[0, L]``. For ``t = (x - lo_g) / s_g`` we get
``P(q = ⌈t⌉) = t - ⌊t⌋``, so ``E[q] = t`` and ``E[x̂] = x`` exactly (up to float rounding), and
``|x - x̂| < s_g`` always. A constant group (``max == min``) gets ``s_g = 0`` and decodes exactly.

Wire form of one tensor: exactly :data:`PARTS_PER_TENSOR` plain 1-D numpy arrays, so Flower's
``ndarrays_to_parameters`` (``np.save``, ``allow_pickle=False``) carries it unchanged::

    codes   uint8    codes, 8 // bits per byte, lowest bits first (raw values if passed through)
    params  float32  [lo_0 … lo_{G-1}, s_0 … s_{G-1}]   (G groups; empty if passed through)
    header  int64    [FORMAT_VERSION, kind, bits, ndim, *shape]

Overhead beyond the codes: 8 bytes per group (float32 ``lo`` and ``s``) — so per-channel adds
8 bytes per output channel — plus ``8 * (4 + ndim)`` header bytes and, on the wire, ~128 bytes
of ``np.save`` header per part. Non-float tensors (integer/bool buffers) pass through unchanged
(``kind = RAW``, ``bits = 0``). Float16/32/64 tensors all decode to float32.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

FORMAT_VERSION = 1
PARTS_PER_TENSOR = 3
ALLOWED_BITS = (1, 2, 4, 8)  # divisors of 8, so codes pack into whole bytes

RAW, PER_TENSOR, PER_CHANNEL = 0, 1, 2  # header "kind"
_KIND_NAMES = {RAW: "raw", PER_TENSOR: "per-tensor", PER_CHANNEL: "per-channel"}
_RAW_DTYPE_KINDS = "biu"  # bool, signed and unsigned integers travel unquantised
_HEADER_FIXED = 4  # version, kind, bits, ndim
_MAX_NDIM = 64  # numpy's own limit; bounds what a hostile header can ask for


# --------------------------------------------------------------------------- quantise


def quantize(
    x: np.ndarray, bits: int, *, per_channel: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantise ``x`` to ``bits`` bits with stochastic rounding; return its wire parts.

    ``E[dequantize(quantize(x))] = x`` and ``|x - dequantize(quantize(x))| <= s`` elementwise,
    with ``s = (max - min) / (2**bits - 1)`` of the element's group. Raises ``ValueError`` for
    unsupported ``bits``, unsupported dtypes and non-finite values.
    """
    _check_bits(bits)
    x = np.asarray(x)
    if x.dtype.kind in _RAW_DTYPE_KINDS:
        return _raw_parts(x)
    if x.dtype.kind != "f":
        raise ValueError(f"cannot quantise dtype {x.dtype}: only float, int and bool tensors")
    kind = PER_CHANNEL if per_channel and x.ndim >= 2 else PER_TENSOR
    groups = _as_groups(x, kind).astype(np.float64)  # float64: (x - lo) / s without overflow
    lo, scale = _grid(groups, bits)
    codes = _stochastic_codes(groups, lo, scale, bits, rng)
    params = np.concatenate([lo, scale]).astype(np.float32)
    return [_pack(codes, bits), params, _header(kind, bits, x.shape)]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")


def _raw_parts(x: np.ndarray) -> list[np.ndarray]:
    params = np.zeros(0, dtype=np.float32)
    return [np.ascontiguousarray(x).reshape(-1), params, _header(RAW, 0, x.shape)]


def _header(kind: int, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.array([FORMAT_VERSION, kind, bits, len(shape), *shape], dtype=np.int64)


def _as_groups(x: np.ndarray, kind: int) -> np.ndarray:
    """View ``x`` as (groups, elements per group); explicit sizes so empty tensors reshape too."""
    if kind == PER_CHANNEL:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return x.reshape(1, x.size)


def _grid(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``lo`` and ``scale`` per group, stored exactly as the receiver will use them.

    ``lo`` is rounded down and ``scale`` up to float32, so ``(x - lo) / scale`` stays inside
    ``[0, L]`` and the error bound ``|x - x̂| <= scale`` survives the float32 storage.
    """
    if groups.shape[1] == 0:  # empty tensor/channels: any grid decodes nothing
        zeros = np.zeros(groups.shape[0], dtype=np.float32)
        return zeros, zeros.copy()
    lo64, hi64 = groups.min(axis=1), groups.max(axis=1)  # NaN propagates through min/max
    if not (np.isfinite(lo64).all() and np.isfinite(hi64).all()):
        raise ValueError("cannot quantise a tensor with NaN or infinite values")
    lo = _float32_at_most(lo64)
    scale = _float32_at_least((hi64 - lo.astype(np.float64)) / (2**bits - 1))
    if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
        raise ValueError("tensor range exceeds float32; cannot quantise")
    return lo, scale


def _float32_at_most(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller's check
        rounded = values.astype(np.float32)
    too_big = rounded.astype(np.float64) > values
    # Step only where needed: nextafter on a zero scale would flag a (harmless) underflow.
    rounded[too_big] = np.nextafter(rounded[too_big], np.float32(-np.inf))
    return rounded


def _float32_at_least(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float32)
    too_small = rounded.astype(np.float64) < values
    rounded[too_small] = np.nextafter(rounded[too_small], np.float32(np.inf))
    return rounded


def _stochastic_codes(
    groups: np.ndarray, lo: np.ndarray, scale: np.ndarray, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """``q = clip(floor((x - lo) / s + U), 0, L)`` as flat uint8; ``E[q] = (x - lo) / s``."""
    # A constant group has s = 0 and x - lo = 0: divide by 1 instead, giving t = 0 and q = 0.
    safe_scale = np.where(scale > 0, scale, 1).astype(np.float64)
    t = (groups - lo.astype(np.float64)[:, None]) / safe_scale[:, None]
    t += rng.random(t.shape)  # float64 U: a float32 U would bias t by up to ~1e-5 levels
    np.floor(t, out=t)
    # The clip only bites when float64 rounding of t + U lands on L + 1 (probability ~1e-14).
    np.clip(t, 0, 2**bits - 1, out=t)
    return t.astype(np.uint8).reshape(-1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``8 // bits`` codes per byte, first code in the lowest bits; zero-pad the tail."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)
    if codes[count:].any():  # the sender zero-pads; anything else is a corrupt tail
        raise ValueError("codes: padding bits after the last code are not zero")
    return codes[:count]


# --------------------------------------------------------------------------- dequantise


def dequantize(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Rebuild one tensor from its wire parts: ``x̂ = lo_g + q * s_g`` (float32, original shape).

    The parts come from the network, so everything is checked — part count, dtypes, header,
    code length against the shape, finite grid — and anything malformed raises ``ValueError``.
    Raw (non-float) tensors come back with their own dtype.
    """
    codes, params, header = _check_parts(parts)
    kind, bits, shape = _parse_header(header)
    count = math.prod(shape)  # Python int: no overflow for hostile shapes
    if kind == RAW:
        return _decode_raw(codes, params, shape, count)
    groups = shape[0] if kind == PER_CHANNEL else 1
    lo, scale = _check_params(params, groups)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes: dtype must be uint8, got {codes.dtype}")
    expected = -(-count // (8 // bits))
    if codes.size != expected:
        raise ValueError(
            f"codes: {codes.size} bytes, but shape {shape} at {bits} bits needs {expected}"
        )
    q = _unpack(codes, bits, count).astype(np.float32).reshape(groups, count // max(groups, 1))
    q *= scale[:, None]
    q += lo[:, None]
    return q.reshape(shape)


def _check_parts(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(parts) != PARTS_PER_TENSOR:
        raise ValueError(f"a quantised tensor has {PARTS_PER_TENSOR} parts, got {len(parts)}")
    for name, part in zip(("codes", "params", "header"), parts, strict=True):
        if not isinstance(part, np.ndarray) or part.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D numpy array")
    codes, params, header = parts
    return codes, params, header


def _parse_header(header: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
    """Validate ``[version, kind, bits, ndim, *shape]``; return ``(kind, bits, shape)``."""
    if header.dtype != np.int64:
        raise ValueError(f"header: dtype must be int64, got {header.dtype}")
    if header.size < _HEADER_FIXED:
        raise ValueError(f"header: needs at least {_HEADER_FIXED} entries, got {header.size}")
    version, kind, bits, ndim = (int(v) for v in header[:_HEADER_FIXED])
    if version != FORMAT_VERSION:
        raise ValueError(f"header: format version {version}, expected {FORMAT_VERSION}")
    if kind not in _KIND_NAMES:
        raise ValueError(f"header: unknown kind {kind}; allowed {sorted(_KIND_NAMES)}")
    if not 0 <= ndim <= _MAX_NDIM or header.size != _HEADER_FIXED + ndim:
        raise ValueError(f"header: ndim {ndim} does not match {header.size - _HEADER_FIXED} dims")
    shape = tuple(int(d) for d in header[_HEADER_FIXED:])
    if any(d < 0 for d in shape):
        raise ValueError(f"header: negative dimension in shape {shape}")
    if kind == RAW and bits != 0:
        raise ValueError(f"header: raw tensor must have bits 0, got {bits}")
    if kind != RAW and bits not in ALLOWED_BITS:
        raise ValueError(f"header: bits must be one of {ALLOWED_BITS}, got {bits}")
    if kind == PER_CHANNEL and ndim < 2:
        raise ValueError(f"header: per-channel needs ndim >= 2, got shape {shape}")
    return kind, bits, shape


def _check_params(params: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    if params.dtype != np.float32:
        raise ValueError(f"params: dtype must be float32, got {params.dtype}")
    if params.size != 2 * groups:
        raise ValueError(f"params: expected {2 * groups} values (lo, scale), got {params.size}")
    lo, scale = params[:groups], params[groups:]
    if not np.isfinite(params).all() or (scale < 0).any():
        raise ValueError("params: lo/scale must be finite and scale >= 0")
    return lo, scale


def _decode_raw(
    codes: np.ndarray, params: np.ndarray, shape: tuple[int, ...], count: int
) -> np.ndarray:
    if codes.dtype.kind not in _RAW_DTYPE_KINDS:
        raise ValueError(f"codes: raw tensor must be int or bool, got {codes.dtype}")
    if params.size != 0:
        raise ValueError(f"params: raw tensor carries no lo/scale, got {params.size} values")
    if codes.size != count:
        raise ValueError(f"codes: {codes.size} values, but shape {shape} needs {count}")
    return codes.reshape(shape)


# --------------------------------------------------------------------------- whole models


def quantize_all(
    arrays: Sequence[np.ndarray], bits: int, per_channel: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantise every tensor of a model into one flat list, :data:`PARTS_PER_TENSOR` each."""
    _check_bits(bits)  # also when the model has no float tensors
    flat: list[np.ndarray] = []
    for array in arrays:
        flat.extend(quantize(array, bits, per_channel=per_channel, rng=rng))
    return flat


def dequantize_all(flat: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of :func:`quantize_all`; ``ValueError`` names the tensor that is malformed."""
    if len(flat) % PARTS_PER_TENSOR:
        raise ValueError(
            f"{len(flat)} arrays is not a multiple of {PARTS_PER_TENSOR} parts per tensor"
        )
    tensors = []
    for index in range(0, len(flat), PARTS_PER_TENSOR):
        try:
            tensors.append(dequantize(flat[index : index + PARTS_PER_TENSOR]))
        except ValueError as error:
            raise ValueError(f"tensor {index // PARTS_PER_TENSOR}: {error}") from error
    return tensors


def payload_fraction(arrays: Sequence[np.ndarray], bits: int, per_channel: bool) -> float:
    """Serialised bytes of the quantised wire arrays / serialised bytes of the fp32 model.

    Both sides are measured as Flower puts them on the wire (``np.save`` per array), so the
    per-array ``.npy`` headers count too. Sizes do not depend on the random draws.
    """
    rng = np.random.default_rng(0)
    fp32 = [a.astype(np.float32) if np.asarray(a).dtype.kind == "f" else a for a in arrays]
    quantised = quantize_all(arrays, bits, per_channel, rng)
    return _saved_bytes(quantised) / _saved_bytes(fp32)


def _saved_bytes(arrays: Sequence[np.ndarray]) -> int:
    total = 0
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        total += buffer.getbuffer().nbytes
    return total


# --------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Sender-side residual memory (EF-SGD): what quantisation dropped is sent next round.

    Round t sends ``c_t = Δ_t + r_{t-1}`` and keeps ``r_t = c_t - Q(c_t)``. Summed over rounds,
    ``Σ Q(c_t) = Σ Δ_t - r_T``: the cumulative error is the last residual (bounded by one
    quantisation step), not a sum of per-round errors that grows with the number of rounds.
    Non-float tensors carry no residual. A residual whose tensor changed shape (e.g. after
    pruning) is dropped; a change in the number of tensors drops all of them.
    """

    def __init__(self) -> None:
        self._residuals: list[np.ndarray | None] = []

    @property
    def residuals(self) -> list[np.ndarray | None]:
        """The current residual per tensor (``None`` where there is none)."""
        return list(self._residuals)

    def reset(self) -> None:
        """Forget all residuals."""
        self._residuals = []

    def snapshot(self) -> ErrorFeedback:
        """An independent copy; residual arrays are shared (they are replaced, never
        modified), so a copy costs no model-sized memory."""
        copied = ErrorFeedback()
        copied._residuals = list(self._residuals)
        return copied

    def compensate(self, deltas: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``deltas + residual`` per float tensor (float32); other tensors are returned as-is."""
        if len(deltas) != len(self._residuals):
            self.reset()  # tensors no longer line up one-to-one with the stored residuals
            return [_as_float32(d) for d in deltas]
        compensated = []
        for index, delta in enumerate(deltas):
            residual = self._residuals[index]
            if residual is not None and residual.shape != np.shape(delta):
                self._residuals[index] = residual = None  # this tensor was reshaped/pruned
            value = _as_float32(delta)
            compensated.append(value if residual is None else value + residual)
        return compensated

    def update(self, sent_deltas: Sequence[np.ndarray], dequantised: Sequence[np.ndarray]) -> None:
        """Store ``residual = sent - dequantised`` per float tensor (what the receiver missed)."""
        if len(sent_deltas) != len(dequantised):
            raise ValueError(f"{len(sent_deltas)} sent tensors but {len(dequantised)} decoded")
        residuals: list[np.ndarray | None] = []
        for index, (sent, decoded) in enumerate(zip(sent_deltas, dequantised, strict=True)):
            if np.shape(sent) != np.shape(decoded):
                raise ValueError(
                    f"tensor {index}: sent shape {np.shape(sent)} != decoded {np.shape(decoded)}"
                )
            is_float = np.asarray(sent).dtype.kind == "f"
            residuals.append(_as_float32(sent) - _as_float32(decoded) if is_float else None)
        self._residuals = residuals

    def quantize(
        self,
        deltas: Sequence[np.ndarray],
        bits: int,
        *,
        per_channel: bool,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """Compensate, quantise and remember the new residual; return the flat wire arrays."""
        sent = self.compensate(deltas)
        flat = quantize_all(sent, bits, per_channel, rng)
        self.update(sent, dequantize_all(flat))
        return flat


def _as_float32(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.kind == "f" else array
