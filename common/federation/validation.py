"""Answers are untrusted: each is checked before it counts, and a rejection names its sender."""

from __future__ import annotations

import json

import numpy as np

from fedphd.common.wire.keys import (
    CLIENT_ID_METRIC,
    EDGE_ID_METRIC,
    LABEL_HIST_METRIC,
    LOSS_METRIC,
)
from fedphd.common.wire.transport import (
    ClientProxy,
    FitRes,
    GrpcBridgeClosed,
)


def sender_name(proxy: ClientProxy, res: FitRes | None = None) -> str:
    """A human name for the sender of an answer: its declared id, else its connection id."""
    if res is not None and CLIENT_ID_METRIC in res.metrics:
        return f"client {res.metrics[CLIENT_ID_METRIC]}"
    if res is not None and EDGE_ID_METRIC in res.metrics:
        return f"edge {res.metrics[EDGE_ID_METRIC]}"
    return f"peer {proxy.cid}"


def check_update(arrays: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """Refuse an update that cannot be averaged into ``reference`` without corrupting it."""
    if len(arrays) != len(reference):
        raise ValueError(f"sent {len(arrays)} tensors, the model has {len(reference)}")
    for index, (array, ref) in enumerate(zip(arrays, reference, strict=True)):
        if array.shape != ref.shape:
            raise ValueError(f"tensor {index} has shape {array.shape}, expected {ref.shape}")
        if array.dtype != ref.dtype:
            raise ValueError(f"tensor {index} has dtype {array.dtype}, expected {ref.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"tensor {index} holds NaN or Inf")


def describe_failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """Why an answer is missing, in words (Flower passes an exception or an error answer)."""
    if isinstance(failure, tuple):
        proxy, res = failure
        return f"{sender_name(proxy, res)} answered with an error: {res.status.message}"
    if isinstance(failure, GrpcBridgeClosed):
        return ("a peer's connection closed before it answered: it stopped or lost the "
                "network, did not answer within topology.round_timeout, or sent a message over "
                "the gRPC message limit (topology.max_message_mb)")
    return f"an answer failed: {failure!r}"


def answer_order(answer: tuple[ClientProxy, FitRes]) -> tuple[str, str]:
    """A fixed order of a round's answers (by sender, then connection), so that the same
    answers aggregate to bit-identical sums whatever order they arrived in."""
    proxy, res = answer
    return sender_name(proxy, res), proxy.cid


def check_metrics(res: FitRes) -> None:
    """Refuse an answer whose numbers would corrupt the aggregate or the round's summary."""
    if not isinstance(res.num_examples, int) or res.num_examples < 0:
        raise ValueError(f"num_examples = {res.num_examples!r} is not a non-negative integer")
    loss = res.metrics.get(LOSS_METRIC)
    if loss is not None and (not isinstance(loss, int | float) or isinstance(loss, bool)
                             or np.isinf(loss)):
        raise ValueError(f"loss = {loss!r} is not a number (NaN = unknown is allowed)")
    try:
        hist = json.loads(str(res.metrics.get(LABEL_HIST_METRIC, "[]")))
    except json.JSONDecodeError:
        hist = None
    if not (isinstance(hist, list) and all(isinstance(c, int) and c >= 0 for c in hist)):
        raise ValueError("label_hist is not a JSON list of non-negative integers")
