"""Models a peer holds, on both ends of a link: a receiver keeps the last model it was sent
(the base of quantised downlinks) and encodes its answer against it; a server remembers what each
receiver rebuilt, with its digest.

A receiver reports the digest of what it rebuilt in the algorithm it chooses (fedphd's own:
xxh3-128; a plain Flower peer: SHA-256, README "Answers"); the sender checks it in the same
algorithm (:meth:`Rebuilt.matches`)."""

from __future__ import annotations

import threading

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

    def __init__(self, algorithm: str = codec.FAST_DIGEST) -> None:
        self.algorithm = algorithm
        self.arrays: list[np.ndarray] | None = None
        self._digest: str | codec.PendingDigest = ""

    @property
    def digest(self) -> str:
        return codec.resolved(self._digest)

    def holds(self, reported: object) -> bool:
        """Whether ``reported`` is the digest of the model held here (in its algorithm: a
        server may name it as an older run of this receiver reported it)."""
        if self.arrays is None:
            return False
        algorithm = codec.digest_algorithm(reported)
        if algorithm is None:
            return False
        if algorithm == self.algorithm:
            return reported == self.digest
        return reported == codec.digest(self.arrays, algorithm)

    def decode(self, parameters: Parameters, config: dict[str, Scalar]) -> list[np.ndarray]:
        """Decode an instruction's weights; an update must be from the model held here."""
        base_digest = config.get(BASE_DIGEST_KEY)
        if base_digest is None:
            return codec.decode(parameters)
        if not self.holds(base_digest):
            raise ValueError("the server sent an update from a model this receiver does not hold")
        return codec.decode(parameters, reference=self.arrays)

    def keep(self, arrays: list[np.ndarray]) -> str:
        """Remember ``arrays`` (as loaded) and return their digest."""
        return codec.resolved(self.keep_soon(arrays))

    def keep_soon(self, arrays: list[np.ndarray], idle: bool = False) -> codec.PendingDigest:
        """:meth:`keep`, the digest computed meanwhile (``arrays`` must not change); ``idle``:
        at the lowest CPU priority, for a digest read only much later."""
        pending = codec.PendingDigest(arrays, idle=idle, algorithm=self.algorithm)
        self.arrays, self._digest = arrays, pending
        return pending

    def __deepcopy__(self, memo: dict) -> HeldModel:
        # A snapshot (the client's round replay) shares the arrays: they never change.
        held = HeldModel(self.algorithm)
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
    """A model as a receiver rebuilds it from a payload, with its digests: the one the
    receiver reported (or will: fedphd's algorithm, computed in the background when made by
    :meth:`of`) and any other a receiver names, computed when first asked for."""

    def __init__(self, arrays: list[np.ndarray],
                 digest: str | codec.PendingDigest | None = None) -> None:
        self.arrays = arrays
        self._digests: dict[str, str | codec.PendingDigest] = {}
        self._lock = threading.Lock()
        self._primary = codec.FAST_DIGEST
        if digest is not None:
            self._primary = (digest.algorithm if isinstance(digest, codec.PendingDigest)
                             else codec.digest_algorithm(digest) or codec.SHA256)
            self._digests[self._primary] = digest

    @property
    def digest(self) -> str:
        """The digest the receiver that holds it reported (what a server names as the base
        of an update, and what a checkpoint keeps)."""
        return self.digest_in(self._primary)

    def digest_in(self, algorithm: str) -> str:
        with self._lock:
            known = self._digests.get(algorithm)
        if known is None:
            known = codec.digest(self.arrays, algorithm)
            with self._lock:
                self._digests[algorithm] = known
        return codec.resolved(known)

    @property
    def pending_digest(self) -> str | codec.PendingDigest:
        """The primary digest, or its computation when it has not finished (not waited for)."""
        with self._lock:
            known = self._digests.get(self._primary)
        return self.digest if known is None else known

    def matches(self, reported: object) -> bool:
        """Whether ``reported`` (a receiver's ``received_digest``) is this model's digest, in
        the algorithm it names."""
        algorithm = codec.digest_algorithm(reported)
        return algorithm is not None and reported == self.digest_in(algorithm)

    def as_reported(self, reported: str) -> Rebuilt:
        """This model, its primary digest the one its receiver reported (it matched)."""
        rebuilt = Rebuilt(self.arrays, reported)
        with self._lock:
            rebuilt._digests = {**self._digests, rebuilt._primary: reported}
        return rebuilt

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> Rebuilt:
        """What a sender expects a receiver to rebuild: its digest is read only when the
        answers are checked, so it is hashed when a core is idle."""
        return cls(arrays, codec.PendingDigest(arrays, idle=True, algorithm=codec.FAST_DIGEST))

    def is_model(self, arrays: list[np.ndarray]) -> bool:
        """Whether ``arrays`` are this model's tensors themselves (views of the same memory,
        same dtypes and shapes): then they have its digest, without hashing them again."""
        return len(arrays) == len(self.arrays) and all(
            a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            for a, b in zip(arrays, self.arrays, strict=True))
