"""Resource limits of a run: the gRPC message size every link allows, and process memory.

Flower's default gRPC limit (512 MB, 2 GiB here before) lets any peer make a server buffer
a message far larger than any honest one. Every honest message carries at most one model
(fp32, the largest codec) plus, for SCAFFOLD, a control variate of the same size, plus small
instructions and metrics; so the limit is derived from the configured model's size, and the
same config gives every process the same limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from pathlib import Path

import torch

from fedphd.common.core.models import build_model, unet_config
from fedphd.common.settings.config import RunConfig

# Instructions, metrics (an edge's per-round log), protobuf framing.
MESSAGE_MARGIN_BYTES = 32 * 2**20
# gRPC's own ceiling: lengths are signed 32-bit.
GRPC_CEILING_BYTES = 2**31 - 1
MODELS_PER_MESSAGE = 2  # weights + a same-sized SCAFFOLD control variate


def model_bytes(cfg: RunConfig) -> int:
    """fp32 bytes of the configured U-Net's state (built on the meta device: no memory,
    no initialisation). Pruning only shrinks a model, so this bounds every later one."""
    with torch.device("meta"):
        model = build_model(unet_config(cfg.model))
    return sum(t.numel() * 4 for t in model.state_dict().values())


def max_message_bytes(cfg: RunConfig) -> int:
    """The gRPC message limit of every server and client of the run.

    ``topology.max_message_mb`` when set, else ``2 × model + 32 MiB``."""
    configured = cfg.topology.max_message_mb
    if configured is not None:
        limit = int(configured * 2**20)
    else:
        limit = MODELS_PER_MESSAGE * model_bytes(cfg) + MESSAGE_MARGIN_BYTES
    return min(limit, GRPC_CEILING_BYTES)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (``VmRSS`` from ``/proc``; 0 where there is no /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


# Freed heap memory kept for the next round's buffers: below this, handing it back to the OS
# only makes the next round fault the same pages in again (8 ms of a 90 ms tiny-U-Net round
# at the cloud, measured by bench.transport --quick); RSS plateaus there instead of creeping.
KEEP_FREE_BYTES = 64 * 2**20


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap instead of a fresh mmap each time: a link frame
# (1 MiB), a lone tensor of the 35.75 M U-Net (up to 4.7 MB), the message gRPC hands over.
# glibc's ceiling for the setting on 64-bit.
HEAP_BUFFER_BYTES = 32 * 2**20
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_buffers_for_reuse() -> bool:
    """Have glibc reuse freed message buffers instead of mapping fresh pages for each.

    By default glibc maps each buffer of a few MiB on its own and unmaps it when freed, or
    hands the top of a heap back once more than twice that is free; every message of every
    round then faults its pages in again (a 4.4 MB fetch from a tensor depot on loopback
    here: 7.0 ms with glibc's default, 4.2 ms with buffers reused). Buffers up to
    ``HEAP_BUFFER_BYTES`` come from the heap and up to ``KEEP_FREE_BYTES`` of freed heap stay
    mapped, the same bound
    :func:`release_free_memory` keeps. Settings in the environment (``MALLOC_*_``,
    ``GLIBC_TUNABLES``) win: nothing is changed then. Whether it changed them (False
    without glibc)."""
    if any(name in os.environ for name in ALLOCATOR_ENV):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFER_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): byte counts of the malloc arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_info() -> _MallInfo2 | None:
    """glibc's ``mallinfo2()`` of this process; None without it."""
    libc = _libc()
    info = getattr(libc, "mallinfo2", None) if libc is not None else None
    if info is None:
        return None
    info.restype = _MallInfo2
    return info()


def free_heap_bytes() -> int | None:
    """Bytes glibc holds freed in its arenas (``mallinfo2().fordblks``); None without it."""
    info = heap_info()
    return None if info is None else int(info.fordblks)


def release_free_memory(keep: int = KEEP_FREE_BYTES) -> bool:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``) once more than
    ``keep`` bytes of it are held; whether it trimmed.

    Each round frees several model-sized buffers, allocated by the worker threads Flower
    starts per round; glibc keeps such memory in its heaps for reuse, so without a trim the
    resident size of a large model's run creeps up round after round although nothing is
    leaked. Up to ``keep`` bytes stay for the next round to reuse (where glibc cannot say how
    much it holds, it trims always). No-op without glibc.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    free = free_heap_bytes()
    if free is not None and free <= keep:
        return False
    trim(0)
    return True
