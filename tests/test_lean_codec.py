"""The lean tensor path: np.save's bytes written with one copy, decoded without one, sent on
without one, and digests off the round's critical path."""

from __future__ import annotations

import copy
import hashlib
import io

import numpy as np
import pytest

from fedphd.common.federation.downlink import Downlink
from fedphd.common.federation.held import HeldModel, Rebuilt
from fedphd.common.federation.sharing import Layout
from fedphd.common.wire import codec, npy

ARRAYS = [
    np.array(3.5, dtype=np.float32),
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(24, dtype=np.int64).reshape(2, 3, 4)[:, ::2],
    np.zeros((0, 3), np.float16),
    np.array([True, False]),
]


def np_save(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("index", range(len(ARRAYS)))
def test_blobs_are_np_saves_bytes_and_decode_to_read_only_views(index):
    array = ARRAYS[index]
    blob = npy.npy_bytes(array)
    assert blob == np_save(array)
    decoded = npy.load_tensor(0, blob)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert np.array_equal(decoded, array)
    assert not decoded.flags.writeable  # a view of the received bytes, never written to


def test_a_decoded_tensor_sent_on_is_the_received_bytes_not_a_copy():
    payload = codec.encode([np.arange(6, dtype=np.float32).reshape(2, 3)], "fp32")
    decoded = codec.decode(payload)
    again = codec.encode(decoded, "fp32")
    assert again.tensors[0] is payload.tensors[0]
    # A view that is not the whole blob under the same header is written anew.
    assert codec.encode([decoded[0][1:]], "fp32").tensors[0] == np_save(decoded[0][1:])
    assert codec.encode([decoded[0].reshape(6)], "fp32").tensors[0] == np_save(
        np.arange(6, dtype=np.float32))


def test_a_digest_computed_in_the_background_is_the_digest_and_copies_as_it():
    model = [np.arange(10, dtype=np.float32), np.ones((300, 300), np.float32)]
    sha = hashlib.sha256()
    for array in model:
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.tobytes())
    pending = codec.PendingDigest(model)
    assert pending.result() == codec.digest(model) == sha.hexdigest()
    held = HeldModel()
    assert held.keep_soon(model).result() == sha.hexdigest() == held.digest
    # A receiver's state is deep-copied (replays) and saved: the digest goes as a string.
    assert copy.deepcopy(held).__dict__["_digest"] == sha.hexdigest()
    assert copy.copy(codec.PendingDigest(model)) == sha.hexdigest()  # what pickling writes
    assert Rebuilt.of(model).digest == sha.hexdigest()


def test_many_small_tensors_hash_as_each_fed_in_turn():
    rng = np.random.default_rng(1)
    model = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 900, 300)]
    model[10:10] = [np.ones((600, 600), np.float32), np.asfortranarray(np.ones((40, 30))),
                    np.arange(70_000, dtype=np.int64)]
    sha = hashlib.sha256()
    for array in model:
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    assert codec.digest(model) == sha.hexdigest()
    assert codec.PendingDigest(model, idle=True).result() == sha.hexdigest()


def test_a_snapshot_of_a_held_model_shares_its_arrays():
    held = HeldModel()
    held.keep(ARRAYS[:2])
    snapshot = copy.deepcopy(held)
    assert all(a is b for a, b in zip(snapshot.arrays, held.arrays, strict=True))
    assert snapshot.arrays is not held.arrays and snapshot.digest == held.digest


def test_a_forwarded_model_keeps_the_digest_it_was_received_with():
    received = codec.decode(codec.encode([np.arange(6, dtype=np.float32), np.ones(3)], "fp32"))
    pending = codec.PendingDigest(received)
    layout = Layout.whole(len(received))
    downlink = Downlink("fp32", True, forwarded=Rebuilt(received, pending))
    downlink.encode_for("c1", received, layout, np.random.default_rng(0))
    assert downlink.sent_to("c1").pending_digest is pending  # not hashed again
    other = [np.arange(6, dtype=np.float32), np.ones(3)]  # equal values, other memory
    downlink.begin_round({"c1"})
    downlink.encode_for("c1", other, layout, np.random.default_rng(0))
    assert downlink.sent_to("c1").pending_digest is not pending
    assert downlink.sent_to("c1").digest == pending.result()
