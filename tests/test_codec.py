import numpy as np
import pytest

from common import codec
from common.transport import Parameters


def test_fp32_is_lossless_and_plain_flower():
    arrays = [np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)]
    payload = codec.encode(arrays, "fp32")
    assert payload.tensor_type == "numpy.ndarray"
    assert np.array_equal(codec.decode(payload)[0], arrays[0])


def test_fp16_halves_the_payload_and_decodes_to_float32():
    arrays = [np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)]
    full, half = codec.encode(arrays, "fp32"), codec.encode(arrays, "fp16")
    assert codec.payload_bytes(half) < 0.52 * codec.payload_bytes(full)
    decoded = codec.decode(half)[0]
    assert decoded.dtype == np.float32
    assert np.allclose(decoded, arrays[0], atol=2e-3)


def test_unknown_codecs_and_malformed_payloads_are_refused():
    with pytest.raises(codec.CodecError, match="unknown codec"):
        codec.encode([], "int3")
    with pytest.raises(codec.CodecError, match="unknown tensor type"):
        codec.decode(Parameters(tensors=[], tensor_type="pickle"))
    with pytest.raises(codec.CodecError, match="malformed"):
        codec.decode(Parameters(tensors=[b"\x93NUMPY garbage"], tensor_type=codec.FP32))
