"""The lean tensor path: np.save's bytes written with one copy, decoded without one, sent on
without one, and digests off the round's critical path."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from fedphd.client.local_model import LocalModel
from fedphd.common.core.models import (
    architecture_to_json,
    load_ndarrays,
    model_views,
    unet_config,
)
from fedphd.common.federation.downlink import Downlink
from fedphd.common.federation.held import HeldModel, Rebuilt
from fedphd.common.federation.sharing import Layout
from fedphd.common.settings.config import load_config
from fedphd.common.wire import codec, limits, npy
from fedphd.common.wire.transport import (
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

CONFIG = Path(__file__).resolve().parents[1] / "common" / "configs" / "default.toml"

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


def _reference_digest(model: list[np.ndarray], hasher) -> str:
    """The digest's definition, spelled out: label then C-order bytes of each tensor."""
    state = hasher()
    for array in model:
        state.update(f"{array.dtype.str}{array.shape}".encode())
        state.update(np.ascontiguousarray(array).tobytes())
    return state.hexdigest()


def test_a_digest_computed_in_the_background_is_the_digest_and_copies_as_it():
    model = [np.arange(10, dtype=np.float32), np.ones((300, 300), np.float32)]
    sha = _reference_digest(model, hashlib.sha256)
    fast = "xxh3-128:" + _reference_digest(model, xxhash.xxh3_128)
    pending = codec.PendingDigest(model)
    assert pending.result() == codec.digest(model) == sha
    assert codec.PendingDigest(model, algorithm="xxh3-128").result() == fast
    # fedphd's receivers report xxh3-128.
    held = HeldModel()
    assert held.keep_soon(model).result() == fast == held.digest
    # A receiver's state is deep-copied (replays) and saved: the digest goes as a string.
    assert copy.deepcopy(held).__dict__["_digest"] == fast
    assert copy.copy(codec.PendingDigest(model)) == sha  # what pickling writes
    assert Rebuilt.of(model).digest == fast


def test_a_sender_checks_a_reported_digest_in_the_algorithm_it_names():
    model = [np.arange(10, dtype=np.float32), np.ones((30, 30), np.float32)]
    other = [model[0], model[1] + 1]
    sent = Rebuilt.of(model)
    sha, fast = codec.digest(model, "sha256"), codec.digest(model, "xxh3-128")
    assert codec.digest_algorithm(sha) == "sha256" and codec.digest_algorithm(fast) == "xxh3-128"
    assert sent.matches(sha) and sent.matches(fast)  # a plain peer, a fedphd receiver
    assert not sent.matches(codec.digest(other, "sha256"))
    assert not sent.matches(codec.digest(other, "xxh3-128"))
    for forged in ("", "xxh3-128:" + sha[:32].upper(), sha[:63], fast[9:], 12, None):
        assert codec.digest_algorithm(forged) is None and not sent.matches(forged)
    # What a receiver holds is named, as the base of the next update, as it reported it.
    assert sent.as_reported(sha).digest == sha and sent.as_reported(fast).digest == fast
    held = HeldModel()
    held.keep(model)
    assert held.holds(fast) and held.holds(sha) and not held.holds(codec.digest(other))


def test_many_small_tensors_hash_as_each_fed_in_turn():
    rng = np.random.default_rng(1)
    model = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 900, 300)]
    model[10:10] = [np.ones((600, 600), np.float32), np.asfortranarray(np.ones((40, 30))),
                    np.arange(70_000, dtype=np.int64)]
    sha = _reference_digest(model, hashlib.sha256)
    assert codec.digest(model) == sha
    assert codec.PendingDigest(model, idle=True).result() == sha
    assert codec.digest(model, "xxh3-128") == "xxh3-128:" + _reference_digest(
        model, xxhash.xxh3_128)
    # A model over codec.INLINE_BYTES is hashed in a thread, to the same digest.
    large = [*model, np.ones(codec.INLINE_BYTES // 4 + 1, np.float32)]
    assert codec.PendingDigest(large, algorithm="xxh3-128").result() == (
        "xxh3-128:" + _reference_digest(large, xxhash.xxh3_128))


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
    assert downlink.sent_to("c1").matches(pending.result())  # the same model, hashed anew


def test_a_payload_is_decoded_once_while_it_holds_the_same_blobs():
    model = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)]
    payload = codec.encode(model, "fp32")
    first = codec.decode(payload)
    again = codec.decode(payload)
    assert all(a is b for a, b in zip(first, again, strict=True))  # headers not parsed again
    assert all(a is b for a, b in zip(parameters_to_ndarrays(payload), first, strict=True))
    # A tensor replaced by other bytes is read from those bytes.
    changed = np.full((2, 3), 7.0, dtype=np.float32)
    payload.tensors[0] = npy.npy_bytes(changed)
    fresh = codec.decode(payload)
    assert fresh[0] is not first[0] and np.array_equal(fresh[0], changed)
    assert np.array_equal(fresh[1], model[1])
    # An fp16 tensor in an fp32 payload: Flower's reader keeps fp16, the codec widens it,
    # each every time (neither answer is taken for the other).
    mixed = Parameters(tensors=[npy.npy_bytes(np.ones(3, np.float16))],
                       tensor_type=codec.FP32)
    assert parameters_to_ndarrays(mixed)[0].dtype == np.float16
    assert codec.decode(mixed)[0].dtype == np.float32
    assert parameters_to_ndarrays(mixed)[0].dtype == np.float16
    # Writable arrays (the caller's own, which may change) are not taken as the decoding.
    writable = [np.arange(3, dtype=np.float32)]
    sent = ndarrays_to_parameters(writable)
    assert codec.decode(sent)[0] is not writable[0]


def test_a_model_received_and_sent_on_unchanged_is_the_received_payload():
    received = codec.encode([np.arange(6, dtype=np.float32)], "fp32")
    arrays = codec.decode(received)
    assert codec.fp32_message(arrays, received) is received
    other = [np.arange(6, dtype=np.float32) + 1]
    message = codec.fp32_message(other, received)
    assert message is not received and np.array_equal(codec.decode(message)[0], other[0])


def test_arrays_a_live_payload_decodes_to_encode_to_its_blobs_without_a_pass(monkeypatch):
    model = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)]
    received = Parameters(tensors=[np_save(a) for a in model], tensor_type=codec.FP32)
    arrays = codec.decode(received)

    def no_pass(_arrays):
        raise AssertionError("the tensors were encoded again")

    monkeypatch.setattr(npy, "encode_views", no_pass)
    again = ndarrays_to_parameters(arrays)
    assert again is not received and all(
        a is b for a, b in zip(again.tensors, received.tensors, strict=True))
    assert all(a is b for a, b in zip(codec.decode(again), arrays, strict=True))
    # Other arrays (not all of them, another order, a copy) are encoded as ever.
    for other in ([arrays[0]], arrays[::-1], [arrays[0].copy(), arrays[1]]):
        with pytest.raises(AssertionError, match="encoded again"):
            ndarrays_to_parameters(other)
    monkeypatch.undo()
    assert [np_save(a) for a in arrays[::-1]] == ndarrays_to_parameters(arrays[::-1]).tensors


def test_freed_heap_memory_is_kept_up_to_the_threshold_and_handed_back_above_it():
    if limits.free_heap_bytes() is None:
        pytest.skip("this C library has no mallinfo2 (glibc 2.33+): it trims every time")
    # Fragmented heap memory: every other block freed, below glibc's mmap threshold.
    blocks = [bytearray(64 * 1024) for _ in range(1024)]
    del blocks[::2]
    free = limits.free_heap_bytes()
    assert free >= 16 * 2**20
    assert limits.release_free_memory(keep=free + 2**30) is False
    assert limits.free_heap_bytes() >= free - 2**20  # nothing handed back
    assert limits.release_free_memory(keep=2**20) is True
    del blocks


MAPPED_CHUNKS = """
import sys
from fedphd.common.wire import limits
changed = limits.keep_buffers_for_reuse() if sys.argv[1] == "tune" else None
before = limits.heap_info().hblks
buffer = bytearray(4 << 20)  # the size of the 35.75 M U-Net's largest tensors
print(changed, limits.heap_info().hblks - before)
"""


def _mapped_chunks_of_a_frame(mode: str, **env: str) -> tuple[str, int]:
    clean = {key: value for key, value in os.environ.items()
             if key not in limits.ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", MAPPED_CHUNKS, mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    changed, chunks = out.split()
    return changed, int(chunks)


def test_a_process_serves_message_buffers_from_its_heap_unless_the_environment_says_otherwise():
    if limits.free_heap_bytes() is None:
        pytest.skip("this C library has no mallinfo2 (glibc 2.33+) to count mapped chunks by")
    # glibc's default: a fresh 4 MiB buffer is a mapping of its own, faulted in anew.
    assert _mapped_chunks_of_a_frame("default") == ("None", 1)
    assert _mapped_chunks_of_a_frame("tune") == ("True", 0)
    # An allocator configured in the environment is left as it is.
    assert _mapped_chunks_of_a_frame("tune", MALLOC_MMAP_THRESHOLD_="1048576") == ("False", 1)


def test_a_clients_state_tensors_are_its_models_own_until_it_is_rebuilt():
    cfg = load_config(CONFIG)
    images = torch.zeros(4, 1, 8, 8)  # only counted: nothing trains here
    local = LocalModel(cfg, 0, torch.utils.data.TensorDataset(images), torch.device("cpu"))
    arch = architecture_to_json(unet_config(cfg.model))
    local.rebuild(arch)
    state = local.state_tensors
    assert local.state_tensors is state
    assert list(state) == list(local.model.state_dict())
    zeros = [np.zeros(t.shape, np.float32) for t in state.values()]
    load_ndarrays(local.model, zeros, state)
    assert all(float(p.abs().sum()) == 0.0 for p in local.model.parameters())
    assert all(not v.any() for v in model_views(local.model, state))
    local.rebuild(arch)  # a new model: its own tensors
    assert local.state_tensors is not state
    assert any(float(p.abs().sum()) > 0 for p in local.model.parameters())


def test_a_clients_round_snapshot_is_written_into_the_last_ones_buffers():
    from fedphd.client.replay import RoundReplay
    from fedphd.common.wire.keys import CLOUD_ROUND_KEY, ROUND_KEY

    live = {"weights": {"w": torch.randn(3, 4), "b": torch.zeros(4)}, "steps": [torch.tensor(2)],
            "name": "client"}
    replay = RoundReplay(0)
    replay.mark({ROUND_KEY: 1, CLOUD_ROUND_KEY: 1}, lambda: live)
    first = replay.start.state
    buffer = first["weights"]["w"].data_ptr()
    live["weights"]["w"].add_(1.0)
    live["steps"][0].add_(1)
    replay.mark({ROUND_KEY: 2, CLOUD_ROUND_KEY: 2}, lambda: live)
    second = replay.start.state
    assert second["weights"]["w"].data_ptr() == buffer  # no new buffer
    assert second["weights"]["w"].data_ptr() != live["weights"]["w"].data_ptr()
    assert torch.equal(second["weights"]["w"], live["weights"]["w"])
    assert second["steps"][0].item() == 3 and second["name"] == "client"
    # Round 2 again (the cloud resumed): its start, whatever the model did since.
    live["weights"]["w"].add_(5.0)
    rewind = replay.mark({ROUND_KEY: 2, CLOUD_ROUND_KEY: 2}, lambda: live)
    assert torch.equal(rewind["weights"]["w"], second["weights"]["w"])
    assert rewind["weights"]["w"].data_ptr() != buffer  # the snapshot stays for another replay
    # Another architecture: shapes differ, so the snapshot is made anew.
    live["weights"]["w"] = torch.randn(5)
    replay.mark({ROUND_KEY: 3, CLOUD_ROUND_KEY: 3}, lambda: live)
    assert torch.equal(replay.start.state["weights"]["w"], live["weights"]["w"])
