"""Answers are untrusted: each is checked before it counts, and a rejection names its sender."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

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
    peer_identity,
)


def sender_name(proxy: ClientProxy, res: FitRes | None = None) -> str:
    """A human name for the sender of an answer, for logs, rejections and records.

    The identity the server established when the peer joined (its certificate, or what it
    declared then) wins over anything an answer claims: an answer is the peer's own word, so
    a hostile peer claiming ``client_id = 0`` must not put the blame on client 0. Only a peer
    without an established identity (unit tests' fakes) is named by its claim, else by its
    connection id."""
    identity = peer_identity(proxy)
    if identity is not None:
        return identity.name
    claims = claimed_names(res)
    return claims[0] if claims else f"peer {proxy.cid}"


def claimed_names(res: FitRes | None) -> list[str]:
    """The identities an answer's metrics claim (``client_id``, ``edge_id``), as names."""
    if res is None:
        return []
    return [f"{kind} {res.metrics[key]}"
            for kind, key in (("client", CLIENT_ID_METRIC), ("edge", EDGE_ID_METRIC))
            if key in res.metrics]


def check_identity(proxy: ClientProxy, res: FitRes) -> None:
    """Refuse an answer that claims to come from another peer than the one that sent it: a
    method's own records (e.g. FedPhD's per-edge weights) read the claimed id, so a claim
    that differs would misattribute them."""
    identity = peer_identity(proxy)
    if identity is None:
        return
    for claimed in claimed_names(res):
        if claimed != identity.name:
            raise ValueError(f"{identity.name} (connection {proxy.cid}) claimed to be {claimed}")


def check_declared_examples(proxy: ClientProxy, res: FitRes) -> None:
    """Refuse a client's answer that claims more samples than it declared when it joined.

    An honest client answers with ``len`` of its training set, which is exactly the total of
    the label histogram it declares at join, so it can never trip this. Edges are exempt:
    an edge's count is that of its clients in its latest round, which grows when clients are
    re-assigned to it after it joined; edges are bounded by the round's cap instead."""
    identity = peer_identity(proxy)
    if identity is None or identity.kind != "client" or identity.declared_examples is None:
        return
    if res.num_examples > identity.declared_examples:
        raise ValueError(f"num_examples = {res.num_examples} is more than the "
                         f"{identity.declared_examples} samples it declared when it joined")


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


@dataclasses.dataclass(frozen=True)
class Clipped:
    """An answer whose sample count was cut to the round's cap before aggregation."""

    sender: str
    claimed: int
    counted: int


def examples_cap(counts: list[int], factor: float) -> int | None:
    """The most samples one answer may count this round: ``factor`` x the low median of the
    positive counts (answers counting 0 carry no weight and would drag the median to 0);
    None when no answer counts any."""
    positive = [count for count in counts if count > 0]
    if not positive:
        return None
    # The low median: of two counts the smaller, so one huge claim among two answers cannot
    # raise the cap that bounds it.
    return max(1, math.floor(factor * statistics.median_low(positive)))


def bound_examples(
    answers: list[tuple[ClientProxy, FitRes]], factor: float
) -> tuple[list[tuple[ClientProxy, FitRes]], list[Clipped]]:
    """The answers with every sample count above the round's cap cut to the cap, and which
    were cut: FedAvg-like strategies weigh by these counts, so an unbounded claim would take
    the round's whole weight."""
    cap = examples_cap([res.num_examples for _, res in answers], factor)
    if cap is None:
        return answers, []
    bounded, clipped = [], []
    for proxy, res in answers:
        if res.num_examples > cap:
            clipped.append(Clipped(sender_name(proxy, res), res.num_examples, cap))
            res = dataclasses.replace(res, num_examples=cap)
        bounded.append((proxy, res))
    return bounded, clipped
