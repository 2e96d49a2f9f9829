import numpy as np
import pytest

from fedphd.common.wire import codec
from fedphd.common.wire.transport import Parameters


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


def model_like(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 32, 3, 3)).astype(np.float32),
            rng.normal(size=(64,)).astype(np.float32)]


def test_quantised_updates_are_small_and_rebuild_the_model_within_one_step():
    reference = model_like(0)
    trained = [r + 0.01 * np.random.default_rng(1).normal(size=r.shape).astype(np.float32)
               for r in reference]
    full = codec.payload_bytes(codec.encode(trained, "fp32"))
    for name, limit in (("q8", 0.27), ("q4", 0.15)):
        payload = codec.encode(trained, name, reference=reference,
                               rng=np.random.default_rng(2))
        assert codec.payload_bytes(payload) <= limit * full
        rebuilt = codec.decode(payload, reference=reference)
        step = max(float(np.ptp(t - r)) for t, r in zip(trained, reference, strict=True))
        step /= 255 if name == "q8" else 15
        for got, want in zip(rebuilt, trained, strict=True):
            assert got.dtype == np.float32 and np.max(np.abs(got - want)) <= step * 1.0001


def test_quantised_updates_need_the_sender_reference():
    reference = model_like(0)
    payload = codec.encode(model_like(1), "q8", reference=reference)
    with pytest.raises(codec.CodecError, match="no reference"):
        codec.decode(payload)
    with pytest.raises(codec.CodecError, match="needs the reference"):
        codec.encode(model_like(1), "q4")
    with pytest.raises(codec.CodecError, match="shape"):
        codec.decode(payload, reference=[np.zeros((3,), np.float32), reference[1]])
    payload.tensors[0] = payload.tensors[0][:-7]
    with pytest.raises(codec.CodecError, match="malformed"):
        codec.decode(payload, reference=reference)


def test_quantised_payload_of_the_reference_unet():
    """FedDM-quant's budget on the 35.75 M U-Net: <= 27 % (8-bit), <= 15 % (4-bit) of fp32."""
    from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
    from fedphd.common.settings.config import ModelConfig

    reference = model_to_ndarrays(build_unet(unet_config(ModelConfig(preset="ddpm-cifar10"))))
    trained = [r * 1.001 for r in reference]
    full = codec.payload_bytes(codec.encode(trained, "fp32"))
    for name, limit in (("q8", 0.27), ("q4", 0.15)):
        payload = codec.encode(trained, name, reference=reference)
        assert codec.payload_bytes(payload) <= limit * full
