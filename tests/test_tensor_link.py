"""The tensor link (model tensors on a second gRPC call) and the sizes metered without
serialising: exact, refused when misused, and invisible to the model a run trains."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from flwr.common import Code, FitIns, FitRes, Parameters, Status, serde
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage

from bench.harness import free_port_block
from fedphd.common.wire import codec, tensor_link, transport
from fedphd.common.wire.transport import EvaluateIns, TrafficMeter
from tests.test_deployment import launch
from tests.test_reliability import same_models


def random_payload(rng: np.random.Generator, count: int) -> Parameters:
    shapes = [tuple(int(d) for d in rng.integers(1, 40, size=rng.integers(1, 4)))
              for _ in range(count)]
    return codec.encode([rng.standard_normal(s).astype(np.float32) for s in shapes], "fp32")


CONFIGS = [{}, {"fedphd.round": 3, "fedphd.arch": "x" * 300, "lr": 0.5, "flag": True,
                "blob": b"\x00" * 200}]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("count", [0, 1, 7, 130])
def test_sizes_computed_from_tensor_lengths_equal_protobufs_own(config, count):
    parameters = random_payload(np.random.default_rng(count), count)
    flower_fit = ServerMessage(fit_ins=serde.fit_ins_to_proto(FitIns(parameters, config)))
    message, size = transport._instruction("fit_ins", FitIns(parameters, config))
    assert size == flower_fit.ByteSize() == message.ByteSize()
    assert message.SerializeToString() == flower_fit.SerializeToString()
    assert transport.fit_ins_wire_size(FitIns(parameters, config)) == size
    evaluate = EvaluateIns(parameters, config)
    message, size = transport._instruction("evaluate_ins", evaluate)
    assert size == ServerMessage(evaluate_ins=serde.evaluate_ins_to_proto(evaluate)).ByteSize()
    res = FitRes(Status(Code.OK, "ok"), parameters, 42, {"loss": 0.25, "client_id": 3})
    answer = ClientMessage(fit_res=serde.fit_res_to_proto(res))
    expected = answer.ByteSize()
    decoded, size = transport._fit_answer(answer)
    assert size == expected
    assert decoded.parameters.tensors == parameters.tensors
    assert decoded.num_examples == 42 and decoded.metrics == res.metrics


def test_a_failed_answer_is_sized_like_protobuf_does():
    res = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "edge failed"), Parameters([], ""), 0, {})
    answer = ClientMessage(fit_res=serde.fit_res_to_proto(res))
    expected = answer.ByteSize()
    decoded, size = transport._fit_answer(answer)
    assert size == expected and decoded.status.code == Code.FIT_NOT_IMPLEMENTED


class Depot:
    """A gRPC server with only the tensor link, and a channel to it."""

    def __init__(self, max_upload: int, fingerprint: str | None = None) -> None:
        self.meter = TrafficMeter()
        self.depot = tensor_link.TensorDepot(max_upload, self.meter,
                                             lambda context: fingerprint)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tensor_link.add_to_server(self.server, self.depot)
        address = f"127.0.0.1:{free_port_block(1)}"
        self.server.add_insecure_port(address)
        self.server.start()
        self.channel = tensor_link.LinkChannel(lambda: grpc.insecure_channel(address), address)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def depot():
    served = Depot(max_upload=10_000)
    yield served
    served.close()


def test_a_ticket_fetches_its_tensors_once_and_takes_one_answer(depot):
    blobs = random_payload(np.random.default_rng(0), 5).tensors
    ticket = depot.depot.offer("peer", blobs, None)
    assert depot.channel.fetch(ticket, timeout=10) == blobs
    with pytest.raises(tensor_link.LinkError, match="already fetched"):
        depot.channel.fetch(ticket, timeout=10)
    depot.channel.put(ticket, [b"a" * 10, b"b" * 20], timeout=10)
    assert depot.depot.claim(ticket) == [b"a" * 10, b"b" * 20]
    with pytest.raises(tensor_link.LinkError, match="already uploaded"):
        depot.channel.put(ticket, [b"c"], timeout=10)
    traffic = depot.meter.take()
    assert traffic.down == sum(len(b) for b in blobs)
    # Both uploads' tickets crossed the link, the refused one's too; fetches' are control.
    assert traffic.up == 2 * len(ticket) + 30 and traffic.control == 2 * len(ticket)
    depot.depot.close(ticket)
    with pytest.raises(tensor_link.LinkError, match="NOT_FOUND"):
        depot.channel.fetch(ticket, timeout=10)


def test_unknown_tickets_oversized_uploads_and_missing_answers_are_refused(depot):
    with pytest.raises(tensor_link.LinkError, match="unknown or expired"):
        depot.channel.fetch("0" * 32, timeout=10)
    ticket = depot.depot.offer("peer", [], None)
    # Final, like Flower's link over its limit: the client gives up saying why.
    with pytest.raises(tensor_link.TooLarge, match="RESOURCE_EXHAUSTED"):
        depot.channel.put(ticket, [b"x" * 6000, b"y" * 6000], timeout=10)
    with pytest.raises(tensor_link.LinkError, match="none were uploaded"):
        depot.depot.claim(ticket)


def test_a_ticket_is_refused_to_a_caller_with_another_certificate():
    served = Depot(max_upload=10_000, fingerprint="AA:BB")
    try:
        ticket = served.depot.offer("client 1", [b"secret"], "CC:DD")
        with pytest.raises(tensor_link.LinkError, match="PERMISSION_DENIED"):
            served.channel.fetch(ticket, timeout=10)
        mine = served.depot.offer("client 1", [b"mine"], "AA:BB")
        assert served.channel.fetch(mine, timeout=10) == [b"mine"]
    finally:
        served.close()


def test_a_server_that_is_not_up_is_retried_then_named():
    address = f"127.0.0.1:{free_port_block(1)}"
    channel = tensor_link.LinkChannel(lambda: grpc.insecure_channel(address), address)
    try:
        with pytest.raises(tensor_link.LinkError, match=f"fetch at {address} failed: "
                                                        "UNAVAILABLE"):
            channel.fetch("0" * 32, timeout=5)
    finally:
        channel.close()


@pytest.mark.slow
def test_a_run_over_the_link_trains_the_model_of_a_run_without_it(tmp_path, ports):
    """Cloud, edge and two clients, 8-bit updates both ways (updates from held models, error
    feedback): the link on every hop, then off; bit-identical models, exact meters both."""
    settings = ["--set", "topology.edges=1", "--set", "topology.clients=2",
                "--set", "topology.cloud_rounds=2", "--set", "topology.edge_rounds=1",
                "--set", "training.local_steps=2", "--set", 'codec.downlink="q8"',
                "--set", 'codec.uplink="q8"']
    runs = {}
    for link in ("true", "false"):
        out = tmp_path / f"link-{link}"
        runs[link] = (out, launch(out, ports, *settings,
                                  "--set", f"topology.tensor_link={link}"))
    assert same_models(runs["true"][0], runs["false"][0])
    for link, (out, records) in runs.items():
        logs = "\n".join(p.read_text() for p in (out / "logs").glob("*.log"))
        assert (logs.count("speaks the tensor link") == 3) == (link == "true"), link
        # Round 2's instructions (edge, both clients) came over fetches made ahead.
        assert (logs.count("tensors are fetched ahead") == 3) == (link == "true"), link
        for r in records:
            if r["tier"] == "edge":
                assert r["bytes"]["edge->client"] == r["reported_by_clients"]["received"]
                assert r["digests_checked"] == 2 and r["digest_mismatches"] == []
            else:
                assert r["bytes"]["cloud->edge"] == r["reported_by_peers"]["received"]
    # Round 2's downlinks are 8-bit updates from the models the receivers hold.
    second = [r for r in runs["true"][1] if r["tier"] == "edge"][-1]["bytes"]["edge->client"]
    first = [r for r in runs["true"][1] if r["tier"] == "edge"][0]["bytes"]["edge->client"]
    assert second < first / 3


def test_small_tensors_travel_in_frames_that_split_back_to_the_same_blobs():
    rng = np.random.default_rng(5)
    blobs = random_payload(rng, 300).tensors
    blobs[7:7] = [codec.encode([np.ones((600, 600), np.float32)], "fp32").tensors[0],
                  b"not an npy blob", b""]
    messages = list(tensor_link.frames(blobs, limit=300_000))
    # Fewer gRPC messages, never one over the limit unless a tensor alone is, the same bytes.
    assert len(messages) < len(blobs) / 5
    assert all(len(m) <= 300_000 or m in blobs for m in messages)
    assert sum(len(m) for m in messages) == sum(len(b) for b in blobs)
    assert [b for m in messages for b in tensor_link.split_frame(m)] == blobs
    # What is not exactly a run of whole .npy blobs is passed on as it came.
    assert tensor_link.split_frame(blobs[0][:-1] + b"x") == [blobs[0][:-1] + b"x"]
    assert tensor_link.split_frame(blobs[0] + blobs[1][:-3]) == [blobs[0] + blobs[1][:-3]]


def test_a_framed_fetch_and_upload_move_and_meter_exactly_the_blobs():
    blobs = random_payload(np.random.default_rng(6), 150).tensors
    small = Depot(max_upload=sum(len(b) for b in blobs) + 100)
    try:
        ticket = small.depot.offer("peer", blobs, None)
        assert small.channel.fetch(ticket, timeout=10) == blobs
        small.channel.put(ticket, blobs[::-1], timeout=10)
        assert small.depot.claim(ticket) == blobs[::-1]
        traffic = small.meter.take()
        assert traffic.down == sum(len(b) for b in blobs)
        assert traffic.up == sum(len(b) for b in blobs) + len(ticket)
    finally:
        small.close()


def _waiting(ahead: tensor_link.FetchAhead, seconds: float = 0.3) -> bool:
    """Whether a fetch ahead is still waiting after ``seconds`` (bounded: one join)."""
    ahead._thread.join(seconds)
    return ahead._thread.is_alive()


def test_a_fetch_ahead_waits_for_its_instruction_then_gets_exactly_its_tensors(depot):
    depot.depot.max_waiting = 1
    blobs = random_payload(np.random.default_rng(7), 9).tensors
    ticket = depot.depot.reserve("peer", None)
    assert ticket is not None and depot.depot.reserve("peer", None) == ticket  # one per peer
    ahead = depot.channel.fetch_ahead(ticket, timeout=10)
    assert _waiting(ahead)  # nothing offered yet: the server's handler waits
    with pytest.raises(tensor_link.LinkError, match="no instruction was sent"):
        depot.channel.put(ticket, [b"early"], timeout=10)  # no answer before an instruction
    assert depot.depot.offer("peer", blobs, None) == ticket  # the reserved ticket
    assert ahead.result(10) == blobs
    with pytest.raises(tensor_link.LinkError, match="already fetched"):
        depot.channel.fetch(ticket, timeout=10)
    depot.channel.put(ticket, [b"answer"], timeout=10)
    assert depot.depot.claim(ticket) == [b"answer"]
    traffic = depot.meter.take()
    assert traffic.down == sum(len(b) for b in blobs)
    # The next instruction gets a ticket of its own.
    assert depot.depot.offer("peer", blobs, None) != ticket


def test_reserved_tickets_are_bounded_released_and_kept_to_their_certificate(depot):
    depot.depot.max_waiting = 1
    first = depot.depot.reserve("client 1", None)
    assert first is not None
    assert depot.depot.reserve("client 2", None) is None  # as many as the server allows
    ahead = depot.channel.fetch_ahead(first, timeout=10)
    assert _waiting(ahead)
    depot.depot.release("client 1")  # it left: its waiting fetch ends without tensors
    assert ahead.result(10) is None
    with pytest.raises(tensor_link.LinkError, match="unknown or expired"):
        depot.channel.fetch(first, timeout=10)
    # A reservation is only used for the certificate it was made for, and then dropped.
    again = depot.depot.reserve("client 1", "AA")
    other = depot.depot.offer("client 1", [b"x"], "BB")
    assert other != again
    with pytest.raises(tensor_link.LinkError, match="unknown or expired"):
        depot.channel.fetch(again, timeout=10)
    assert depot.depot.reserve("client 2", None) is not None


def test_a_fetch_ahead_that_ends_without_tensors_leaves_a_fetch_on_arrival_working(depot):
    depot.depot.max_waiting = 1
    ticket = depot.depot.reserve("peer", None)
    ahead = depot.channel.fetch_ahead(ticket, timeout=0.5)  # ends before the instruction
    assert ahead.result(10) is None
    blobs = random_payload(np.random.default_rng(8), 3).tensors
    assert depot.depot.offer("peer", blobs, None) == ticket
    assert depot.channel.fetch(ticket, timeout=10) == blobs
    cancelled = depot.channel.fetch_ahead(depot.depot.reserve("peer", None), timeout=10)
    cancelled.cancel()  # another ticket arrived: this instruction will not come
    assert cancelled.result(10) is None
