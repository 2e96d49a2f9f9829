"""Tests of stochastic 8/4-bit quantisation of model updates (fedphd.common.wire.quantization)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedphd.common.wire import quantization as qz

CONFIGS = [(8, False), (8, True), (4, False), (4, True)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _step(x: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    """The quantisation step s of each element's group, broadcast to x's shape."""
    levels = 2**bits - 1
    if per_channel and x.ndim >= 2:
        axes = tuple(range(1, x.ndim))
        return np.broadcast_to(
            (x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)) / levels, x.shape
        )
    return np.full(x.shape, (x.max() - x.min()) / levels)


def _grid_of(parts: list[np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, scale) read back from the wire parts, broadcast to the tensor's shape."""
    params = parts[1].astype(np.float64)
    groups = params.size // 2
    per_channel = parts[2][1] == qz.PER_CHANNEL
    column = (groups,) + (1,) * (len(shape) - 1)
    lo, scale = (v.reshape(column) if per_channel else v[0] for v in np.split(params, 2))
    return np.broadcast_to(lo, shape), np.broadcast_to(scale, shape)


def _unet_like() -> list[np.ndarray]:
    """Tensors shaped like a small DDPM U-Net's: convs, shortcut, time MLP, norms, a counter."""
    rng = _rng(42)
    shapes = (
        [(256, 256, 3, 3)] * 2
        + [(256, 128, 3, 3), (256, 128, 1, 1)]
        + [(128, 128, 3, 3)] * 2
        + [(128, 3, 3, 3), (3, 128, 3, 3), (512, 128), (512,)]
        + [(256,)] * 3
        + [(128,)] * 3
        + [(3,)]
    )
    # Updates of different magnitude per channel, as real layers have.
    arrays = [
        (rng.normal(size=s) * rng.uniform(1e-4, 1e-2, size=_column(s))).astype(np.float32)
        for s in shapes
    ]
    return [*arrays, np.array(12, dtype=np.int64)]  # e.g. a num_batches_tracked buffer


def _column(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape that broadcasts one value per output channel (axis 0)."""
    return (shape[0],) + (1,) * (len(shape) - 1)


def _wire_bytes(arrays: list[np.ndarray]) -> int:
    return sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(("bits", "per_channel"), CONFIGS)
def test_round_trip_keeps_shape_and_error_within_one_step(bits, per_channel):
    x = (_rng(1).normal(size=(16, 8, 3, 3)) * np.arange(1, 17)[:, None, None, None]).astype(
        np.float32
    )
    parts = qz.quantize(x, bits, per_channel=per_channel, rng=_rng(2))
    assert len(parts) == qz.PARTS_PER_TENSOR
    assert all(isinstance(p, np.ndarray) and p.dtype != object for p in parts)
    x_hat = qz.dequantize(parts)
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    step = _step(x, bits, per_channel)
    slack = 1e-6 * step + 4 * np.finfo(np.float32).eps * np.abs(x).max()  # float32 arithmetic
    assert np.all(np.abs(x - x_hat) <= step + slack)
    assert np.abs(x - x_hat).max() > 0  # it really is lossy: the bound is not vacuous


def test_per_channel_is_finer_than_per_tensor_for_uneven_channels():
    x = (_rng(3).normal(size=(8, 32)) * np.logspace(-3, 0, 8)[:, None]).astype(np.float32)
    err = {
        pc: np.abs(x - qz.dequantize(qz.quantize(x, 4, per_channel=pc, rng=_rng(4))))[0].max()
        for pc in (False, True)
    }
    assert err[True] < err[False] / 10  # the quiet channel gets its own, much finer grid


def test_float16_and_float64_decode_to_float32_and_one_dim_uses_one_grid():
    x64 = _rng(5).normal(size=(10,))
    x_hat = qz.dequantize(qz.quantize(x64, 8, per_channel=True, rng=_rng(6)))
    assert x_hat.dtype == np.float32
    assert np.all(np.abs(x64 - x_hat) <= _step(x64, 8, False) * (1 + 1e-6))
    header = qz.quantize(x64, 8, per_channel=True, rng=_rng(6))[2]
    assert header[1] == qz.PER_TENSOR  # a 1-D tensor has no output channels to split
    x16 = x64.astype(np.float16)
    assert qz.dequantize(qz.quantize(x16, 8, per_channel=False, rng=_rng(7))).dtype == np.float32


def test_whole_model_survives_the_real_flower_wire_form():
    model = _unet_like()
    flat = qz.quantize_all(model, 4, True, _rng(8))
    assert len(flat) == qz.PARTS_PER_TENSOR * len(model)
    received = parameters_to_ndarrays(ndarrays_to_parameters(flat))  # np.save, no pickle
    decoded = qz.dequantize_all(received)
    assert [d.shape for d in decoded] == [m.shape for m in model]
    for original, x_hat in zip(model[:-1], decoded[:-1], strict=True):
        assert np.all(np.abs(original - x_hat) <= _step(original, 4, True) * (1 + 1e-5) + 1e-9)
    assert decoded[-1].dtype == np.int64 and decoded[-1] == 12


# --------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize(("bits", "per_channel"), CONFIGS)
def test_mean_of_many_draws_is_unbiased(bits, per_channel):
    x = _rng(9).normal(size=(4, 16)).astype(np.float32)
    draws = 2000
    rng = _rng(10)
    total = np.zeros(x.shape)
    for _ in range(draws):
        total += qz.dequantize(qz.quantize(x, bits, per_channel=per_channel, rng=rng))
    mean = total / draws
    # Per draw the error is a two-point variable with spread <= s/2: 5 standard errors.
    tolerance = 5 * 0.5 * _step(x, bits, per_channel) / np.sqrt(draws)
    assert np.all(np.abs(mean - x) <= tolerance)
    # Round-to-nearest on the same grid is off by up to s/2: this test would catch it.
    lo, scale = _grid_of(qz.quantize(x, bits, per_channel=per_channel, rng=rng), x.shape)
    nearest = lo + np.round((x - lo) / scale) * scale
    assert np.any(np.abs(nearest - x) > tolerance)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_value_midway_between_levels_is_rounded_both_ways(bits):
    top = 2**bits - 1
    x = np.array([0.0, 1.5, float(top)], dtype=np.float32)  # grid: lo = 0, s = 1
    rng = _rng(11)
    seen = {
        float(qz.dequantize(qz.quantize(x, bits, per_channel=False, rng=rng))[1])
        for _ in range(200)
    }
    assert seen == {1.0, 2.0}


# --------------------------------------------------------------------------- payload


@pytest.mark.parametrize(
    ("bits", "per_channel", "limit"),
    [(8, False, 0.27), (8, True, 0.27), (4, False, 0.15), (4, True, 0.15)],
)
def test_payload_on_the_wire_is_a_fraction_of_fp32(bits, per_channel, limit):
    model = _unet_like()
    fp32 = _wire_bytes(model)
    quantised = _wire_bytes(qz.quantize_all(model, bits, per_channel, _rng(12)))
    assert quantised / fp32 <= limit
    assert qz.payload_fraction(model, bits, per_channel) == pytest.approx(quantised / fp32)


def test_per_channel_costs_eight_bytes_per_output_channel():
    x = np.ones((64, 8), dtype=np.float32)
    per_tensor = qz.quantize(x, 8, per_channel=False, rng=_rng(13))
    per_channel = qz.quantize(x, 8, per_channel=True, rng=_rng(13))
    assert per_channel[1].nbytes - per_tensor[1].nbytes == 8 * (64 - 1)


# --------------------------------------------------------------------------- special tensors


@pytest.mark.parametrize("size", [1, 7, 33])
def test_four_bit_codes_pack_two_per_byte_for_odd_lengths(size):
    x = _rng(size).normal(size=(size,)).astype(np.float32)
    codes = qz.quantize(x, 4, per_channel=False, rng=_rng(14))[0]
    assert codes.dtype == np.uint8 and codes.size == (size + 1) // 2
    x_hat = qz.dequantize(qz.quantize(x, 4, per_channel=False, rng=_rng(14)))
    assert x_hat.shape == (size,)
    assert np.all(np.abs(x - x_hat) <= _step(x, 4, False) * (1 + 1e-6))


@pytest.mark.parametrize("bits", [1, 2])
def test_narrower_codes_pack_more_per_byte(bits):
    x = _rng(15).normal(size=(5, 3)).astype(np.float32)
    parts = qz.quantize(x, bits, per_channel=True, rng=_rng(16))
    assert parts[0].size == -(-15 // (8 // bits))
    assert np.all(np.abs(x - qz.dequantize(parts)) <= _step(x, bits, True) * (1 + 1e-6))


def test_constant_tensors_and_channels_decode_exactly():
    constant = np.full((3, 6), 0.25, dtype=np.float32)
    mixed = np.array([[0.25] * 6, [-3.0] * 6, [7.0] * 5 + [8.0]], dtype=np.float32)
    with np.errstate(all="raise"):  # no division by a zero scale anywhere
        whole = qz.dequantize(qz.quantize(constant, 4, per_channel=False, rng=_rng(17)))
        channels = qz.dequantize(qz.quantize(mixed, 4, per_channel=True, rng=_rng(17)))
    assert np.array_equal(whole, constant)
    assert np.array_equal(channels[:2], mixed[:2])  # the two constant channels
    assert np.all(np.abs(channels[2] - mixed[2]) <= 1 / 15)  # the other one: one step


def test_empty_and_scalar_tensors_round_trip():
    for x in (np.zeros((0, 3, 3), np.float32), np.zeros((4, 0), np.float32), np.float32(2.5)):
        x_hat = qz.dequantize(qz.quantize(np.asarray(x), 4, per_channel=True, rng=_rng(18)))
        assert x_hat.shape == np.shape(x) and np.array_equal(x_hat, x)


@pytest.mark.parametrize(
    "x",
    [
        np.array(123456789012, np.int64),
        np.arange(-5, 6, dtype=np.int32).reshape(11, 1),
        np.array([True, False, True]),
        np.arange(9, dtype=np.uint8).reshape(3, 3),
    ],
)
def test_int_and_bool_tensors_pass_through_exactly(x):
    parts = qz.quantize(x, 4, per_channel=True, rng=_rng(19))
    assert parts[2][1] == qz.RAW and parts[2][2] == 0
    x_back = qz.dequantize(parts)
    assert x_back.dtype == x.dtype and np.array_equal(x_back, x) and x_back.shape == x.shape


def test_unquantisable_inputs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        qz.quantize(np.ones(3, np.float32), 3, per_channel=False, rng=_rng())
    with pytest.raises(ValueError, match="bits"):
        qz.quantize_all([np.ones(3, np.int64)], 16, False, _rng())
    with pytest.raises(ValueError, match="NaN or infinite"):
        qz.quantize(np.array([1.0, np.nan], np.float32), 8, per_channel=False, rng=_rng())
    with pytest.raises(ValueError, match="NaN or infinite"):
        qz.quantize(np.array([[1.0], [np.inf]]), 8, per_channel=True, rng=_rng())
    with pytest.raises(ValueError, match="exceeds float32"):
        qz.quantize(np.array([-1e300, 1e300]), 8, per_channel=False, rng=_rng())
    with pytest.raises(ValueError, match="dtype"):
        qz.quantize(np.ones(2, np.complex64), 8, per_channel=False, rng=_rng())


# --------------------------------------------------------------------------- malformed input


def _good_parts(bits: int = 4, per_channel: bool = True) -> list[np.ndarray]:
    x = _rng(20).normal(size=(3, 5)).astype(np.float32)  # 15 codes: odd, so 4-bit pads
    return qz.quantize(x, bits, per_channel=per_channel, rng=_rng(21))


def _with(parts: list[np.ndarray], index: int, value: np.ndarray) -> list[np.ndarray]:
    changed = list(parts)
    changed[index] = value
    return changed


def _header_with(parts: list[np.ndarray], position: int, value: int) -> list[np.ndarray]:
    header = parts[2].copy()
    header[position] = value
    return _with(parts, 2, header)


MALFORMED = {
    "truncated codes": lambda p: _with(p, 0, p[0][:-1]),
    "extra codes": lambda p: _with(p, 0, np.append(p[0], np.uint8(0))),
    "codes wrong dtype": lambda p: _with(p, 0, p[0].astype(np.int16)),
    "non-zero padding": lambda p: _with(p, 0, np.append(p[0][:-1], p[0][-1] | np.uint8(0xF0))),
    "wrong bits": lambda p: _header_with(p, 2, 3),
    "bits changed 4 to 8": lambda p: _header_with(p, 2, 8),
    "shape mismatch": lambda p: _header_with(p, 5, 6),
    "channels mismatch": lambda p: _header_with(p, 4, 4),
    "negative dim": lambda p: _header_with(p, 4, -3),
    "ndim too large": lambda p: _header_with(p, 3, 3),
    "ndim negative": lambda p: _header_with(p, 3, -1),
    "bad version": lambda p: _header_with(p, 0, 99),
    "bad kind": lambda p: _header_with(p, 1, 7),
    "raw kind on codes": lambda p: _header_with(p, 1, qz.RAW),
    "per-channel on 1-D": lambda p: _with(p, 2, np.array([1, 2, 4, 1, 15], np.int64)),
    "header too short": lambda p: _with(p, 2, p[2][:3]),
    "header wrong dtype": lambda p: _with(p, 2, p[2].astype(np.int32)),
    "header 2-D": lambda p: _with(p, 2, p[2].reshape(1, -1)),
    "params truncated": lambda p: _with(p, 1, p[1][:-1]),
    "params float64": lambda p: _with(p, 1, p[1].astype(np.float64)),
    "params NaN": lambda p: _with(
        p, 1, np.where(np.arange(p[1].size) == 0, np.nan, p[1]).astype(np.float32)
    ),
    "negative scale": lambda p: _with(p, 1, -np.abs(p[1]) - 1),
    "not an array": lambda p: _with(p, 0, p[0].tolist()),
    "too few parts": lambda p: p[:2],
    "too many parts": lambda p: [*p, p[2]],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tensors_raise_value_error(case):
    parts = _good_parts()
    qz.dequantize(parts)  # the unmodified parts are fine
    with pytest.raises(ValueError):
        qz.dequantize(MALFORMED[case](parts))


def test_malformed_raw_tensors_raise_value_error():
    parts = qz.quantize(np.arange(6, dtype=np.int64), 8, per_channel=False, rng=_rng())
    with pytest.raises(ValueError, match="needs 6"):
        qz.dequantize(_with(parts, 0, parts[0][:-1]))
    with pytest.raises(ValueError, match="int or bool"):
        qz.dequantize(_with(parts, 0, parts[0].astype(np.float32)))
    with pytest.raises(ValueError, match="bits 0"):
        qz.dequantize(_header_with(parts, 2, 8))
    with pytest.raises(ValueError, match="no lo/scale"):
        qz.dequantize(_with(parts, 1, np.zeros(2, np.float32)))


def test_whole_model_part_count_must_be_a_multiple():
    flat = qz.quantize_all([np.ones((2, 2), np.float32), np.ones(3, np.float32)], 8, False, _rng())
    with pytest.raises(ValueError, match="multiple"):
        qz.dequantize_all(flat[:-1])
    with pytest.raises(ValueError, match="tensor 1"):  # the error names the broken tensor
        qz.dequantize_all([*flat[:3], flat[3][:-1], *flat[4:]])


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_keeps_the_cumulative_error_bounded():
    delta = _rng(22).normal(size=(32, 16)).astype(np.float32)
    rounds, bits = 300, 2  # coarse codes make per-round errors large
    step = _step(delta, bits, False).max()
    feedback = qz.ErrorFeedback()
    with_feedback = np.zeros(delta.shape)
    without_feedback = np.zeros(delta.shape)
    rng = _rng(23)
    for t in range(1, rounds + 1):
        flat = feedback.quantize([delta], bits, per_channel=False, rng=rng)
        with_feedback += qz.dequantize_all(flat)[0]
        without_feedback += qz.dequantize(qz.quantize(delta, bits, per_channel=False, rng=rng))
        # Σ sent = Σ Δ - r_t, and |r_t| stays below the step of Δ + r_{t-1} (< 2 steps of Δ).
        assert np.abs(with_feedback - t * delta).max() <= 2 * step
    # Without feedback the per-round errors add up like a random walk (~ sqrt(rounds) steps).
    assert np.abs(without_feedback - rounds * delta).max() > 4 * step


def test_error_feedback_residual_is_sent_minus_dequantised():
    deltas = [_rng(24).normal(size=(6, 4)).astype(np.float32), np.arange(3, dtype=np.int64)]
    feedback = qz.ErrorFeedback()
    sent = feedback.compensate(deltas)
    assert np.array_equal(sent[0], deltas[0])  # nothing to add in the first round
    decoded = qz.dequantize_all(qz.quantize_all(sent, 4, True, _rng(25)))
    feedback.update(sent, decoded)
    residual = feedback.residuals
    assert np.array_equal(residual[0], sent[0] - decoded[0]) and residual[1] is None
    assert np.abs(residual[0]).max() > 0
    again = feedback.compensate(deltas)
    assert np.array_equal(again[0], deltas[0] + residual[0])
    assert np.array_equal(again[1], deltas[1])  # int buffers get no residual


def test_error_feedback_resets_when_shapes_or_tensor_count_change():
    feedback = qz.ErrorFeedback()
    deltas = [np.full((4, 4), 0.3, np.float32), np.linspace(0, 1, 5, dtype=np.float32)]
    feedback.update(deltas, [np.zeros((4, 4), np.float32), np.zeros(5, np.float32)])
    pruned = [np.ones((2, 4), np.float32), np.ones(5, np.float32)]  # first tensor pruned
    out = feedback.compensate(pruned)
    assert np.array_equal(out[0], pruned[0])  # stale residual of another shape dropped
    assert np.array_equal(out[1], pruned[1] + deltas[1])  # the unchanged tensor keeps its own
    assert feedback.residuals[0] is None
    out = feedback.compensate([np.ones(5, np.float32)])  # tensors no longer line up: reset all
    assert np.array_equal(out[0], np.ones(5, np.float32)) and feedback.residuals == []
    with pytest.raises(ValueError, match="shape"):
        feedback.update([np.ones(3, np.float32)], [np.ones(4, np.float32)])
