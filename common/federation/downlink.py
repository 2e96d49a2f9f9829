"""The global model on its way down: encoded once per codec, or as an update per receiver.

``q8``/``q4`` downlinks send ``Q(w_global - w_held)``, the update from the model that receiver
holds (what it rebuilt last time, tracked per connection); a receiver with no known model gets
the whole weights, in fp32 or (``whole="fp16"``) fp16. The error never accumulates: each
update is taken from the receiver's actual model, not from the previous global one. A receiver
holds what it was sent once its answer reports the digest of exactly that model.
"""

from __future__ import annotations

import numpy as np

from fedphd.common.federation.held import Rebuilt
from fedphd.common.federation.sharing import Layout
from fedphd.common.wire import codec
from fedphd.common.wire.keys import BASE_DIGEST_KEY, RECEIVED_DIGEST_KEY
from fedphd.common.wire.transport import ClientProxy, FitRes, Parameters, Scalar


class Downlink:
    """Encodes the global model for each receiver and tracks what each receiver holds."""

    def __init__(
        self, codec_name: str, per_channel: bool, held: dict[str, Rebuilt] | None = None,
        forwarded: Rebuilt | None = None, whole: str = "fp32",
    ) -> None:
        if whole not in ("fp32", "fp16"):
            raise ValueError(f"codec.whole must be fp32 or fp16, got {whole!r}")
        self.codec_name = codec_name
        self.whole = whole
        self.per_channel = per_channel
        # The model the server itself received, when known: sent on as it is (an edge's
        # fp32 downlink), its digest need not be computed again.
        self._forwarded = forwarded
        # Per connection: the model a receiver holds, and the one it rebuilds this round.
        self._held: dict[str, Rebuilt] = dict(held or {})
        self._pending: dict[str, Rebuilt] = {}
        self._cache: dict[tuple[str, str], tuple[Parameters, Rebuilt]] = {}

    def begin_round(self, connected: set[str]) -> None:
        """Forget receivers that left and last round's encodings."""
        self._held = {cid: held for cid, held in self._held.items() if cid in connected}
        self._pending, self._cache = {}, {}

    def encode_for(
        self, cid: str, model: list[np.ndarray], layout: Layout, rng: np.random.Generator
    ) -> tuple[Parameters, dict[str, Scalar]]:
        """The wire payload for one receiver and the instruction keys it needs to decode it."""
        held = self._held.get(cid)
        if held is not None and [a.shape for a in held.arrays] != [a.shape for a in model]:
            held = None  # the architecture or the shared part changed: start from full weights
        if held is None or not codec.is_update_codec(self.codec_name):
            wire, rebuilt = self._whole(model, layout)
            self._pending[cid] = rebuilt
            return wire, {}
        wire = codec.encode(model, self.codec_name, reference=held.arrays,
                            per_channel=self.per_channel, rng=rng)
        self._pending[cid] = Rebuilt.of(codec.decode(wire, reference=held.arrays))
        return wire, {BASE_DIGEST_KEY: held.digest}

    def _whole(self, model: list[np.ndarray], layout: Layout) -> tuple[Parameters, Rebuilt]:
        """The same weights for every such receiver: encoded and hashed once per round."""
        name = self.whole if codec.is_update_codec(self.codec_name) else self.codec_name
        key = (name, layout.sent_groups)
        if key not in self._cache:
            wire = codec.encode(model, name)
            self._cache[key] = (wire, self._rebuilt(codec.decode(wire)))
        return self._cache[key]

    def _rebuilt(self, arrays: list[np.ndarray]) -> Rebuilt:
        forwarded = self._forwarded
        if forwarded is not None and forwarded.is_model(arrays):
            return Rebuilt(arrays, forwarded.pending_digest)
        return Rebuilt.of(arrays)

    def sent_to(self, cid: str) -> Rebuilt | None:
        """The model ``cid`` rebuilds from this round's payload (None: it was sent nothing)."""
        return self._pending.get(cid)

    def settle(
        self,
        accepted: list[tuple[ClientProxy, FitRes]],
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> None:
        """Receivers that answered hold what they were sent; of the others nothing is known."""
        for proxy, _ in results:
            self._held.pop(proxy.cid, None)
        for failure in failures:
            if isinstance(failure, tuple):
                self._held.pop(failure[0].cid, None)
        for proxy, res in accepted:
            reported = res.metrics.get(RECEIVED_DIGEST_KEY)
            if self._pending[proxy.cid].matches(reported):
                self._held[proxy.cid] = self._pending[proxy.cid].as_reported(str(reported))

    def held_models(self) -> dict[str, Rebuilt]:
        """What each connected receiver holds (a copy: the caller keeps it across rounds)."""
        return dict(self._held)

    def hold(self, cid: str, rebuilt: Rebuilt) -> None:
        """Record that ``cid`` holds ``rebuilt`` (e.g. a peer that rewound after a resume)."""
        self._held[cid] = rebuilt
