"""Models a peer holds, on both ends of a link: a receiver keeps the last model it was sent
(the base of quantised downlinks) and encodes its answer against it; a server remembers what each
receiver rebuilt, with its digest."""

from __future__ import annotations

import numpy as np

from fedphd.common.wire import codec
from fedphd.common.wire.keys import (
    BASE_DIGEST_KEY,
    ERROR_FEEDBACK_KEY,
    PER_CHANNEL_KEY,
    UPLINK_KEY,
)
from fedphd.common.wire.quantization import ErrorFeedback
from fedphd.common.wire.transport import (
    Parameters,
    Scalar,
)


class HeldModel:
    """A receiver's copy of the last model it was sent: the base of quantised downlinks."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] | None = None
        self._digest: str | codec.PendingDigest = ""

    @property
    def digest(self) -> str:
        return codec.resolved(self._digest)

    def decode(self, parameters: Parameters, config: dict[str, Scalar]) -> list[np.ndarray]:
        """Decode an instruction's weights; an update must be from the model held here."""
        base_digest = config.get(BASE_DIGEST_KEY)
        if base_digest is None:
            return codec.decode(parameters)
        if self.arrays is None or base_digest != self.digest:
            raise ValueError("the server sent an update from a model this receiver does not hold")
        return codec.decode(parameters, reference=self.arrays)

    def keep(self, arrays: list[np.ndarray]) -> str:
        """Remember ``arrays`` (as loaded) and return their digest."""
        return codec.resolved(self.keep_soon(arrays))

    def keep_soon(self, arrays: list[np.ndarray], idle: bool = False) -> codec.PendingDigest:
        """:meth:`keep`, the digest computed meanwhile (``arrays`` must not change); ``idle``:
        at the lowest CPU priority, for a digest read only much later."""
        pending = codec.PendingDigest(arrays, idle=idle)
        self.arrays, self._digest = arrays, pending
        return pending

    def __deepcopy__(self, memo: dict) -> HeldModel:
        # A snapshot (the client's round replay) shares the arrays: they never change.
        held = HeldModel()
        held.arrays = None if self.arrays is None else list(self.arrays)
        held._digest = self.digest
        return held


def encode_reply(
    arrays: list[np.ndarray],
    reference: list[np.ndarray],
    config: dict[str, Scalar],
    feedback: ErrorFeedback,
    rng: np.random.Generator,
) -> Parameters:
    """Encode an answer with the uplink codec the instruction names (update vs ``reference``,
    the model the sender received, for the quantised codecs)."""
    use_feedback = bool(config.get(ERROR_FEEDBACK_KEY, True))
    return codec.encode(
        arrays,
        str(config.get(UPLINK_KEY, "fp32")),
        reference=reference,
        per_channel=bool(config.get(PER_CHANNEL_KEY, True)),
        rng=rng,
        feedback=feedback if use_feedback else None,
    )


class Rebuilt:
    """A model as a receiver rebuilds it from a payload, with its digest (computed once, in
    the background when made by :meth:`of`)."""

    def __init__(self, arrays: list[np.ndarray], digest: str | codec.PendingDigest) -> None:
        self.arrays = arrays
        self._digest = digest

    @property
    def digest(self) -> str:
        return codec.resolved(self._digest)

    @property
    def pending_digest(self) -> str | codec.PendingDigest:
        """The digest, or its computation when it has not finished (not waited for)."""
        return self._digest

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> Rebuilt:
        """What a sender expects a receiver to rebuild: its digest is read only when the
        answers are checked, so it is hashed when a core is idle."""
        return cls(arrays, codec.PendingDigest(arrays, idle=True))

    def is_model(self, arrays: list[np.ndarray]) -> bool:
        """Whether ``arrays`` are this model's tensors themselves (views of the same memory,
        same dtypes and shapes): then they have its digest, without hashing them again."""
        return len(arrays) == len(self.arrays) and all(
            a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            for a, b in zip(arrays, self.arrays, strict=True))
