"""What a federated method may change in a client's local training, and nothing else.

A client trains ``w`` on its images by minimising the DDPM loss. A method may, for one round:

- add a term to the local objective: ``L(w) = L_ddpm(w) + sum_m R_m(w)``
  (:meth:`RoundTerm.loss`, summed over the active methods in registry order);
- rewrite the gradients after ``backward`` and before clipping and the optimiser step,
  ``g <- h_m(g)`` (:meth:`RoundTerm.after_backward`, applied in registry order);
- keep state from one round to the next (:meth:`LocalMethod.state`), which the client puts
  in its snapshot of a cloud round's start, so a replayed round starts from the same state;
- add entries to the answer's metrics (:meth:`RoundTerm.finish`, after a successful round);
- undo whatever it did to the model for the round (:meth:`RoundTerm.close`, always).

Whether a method takes part in a round is read from the instruction: each method has its own
keys and is inactive without them, so a plain instruction trains plain DDPM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedphd.common.wire.transport import Scalar

Instruction = Mapping[str, Scalar]


class RoundTerm:
    """One method's part in one round of local training; the base adds nothing."""

    def describe(self) -> str | None:
        """A line for the client's log when the round starts (None: nothing worth saying)."""
        return None

    def loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        """``R_m(w)``, added to this step's DDPM loss (None: no term)."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        """Read or correct ``p.grad`` of this step before clipping and the optimiser step."""

    def finish(self, model: torch.nn.Module) -> dict[str, Scalar]:
        """After a successful round: the answer's extra metrics; carried state moves on here."""
        return {}

    def close(self) -> None:
        """End of the round, successful or not: leave the model as the round found it."""


class LocalMethod(ABC):
    """A method's client side, one object per client for the client's whole life."""

    name: ClassVar[str]
    """Its key in the client's state snapshot (unique among the registered methods)."""

    def check(self, config: Instruction) -> None:  # noqa: B027 - optional, most have none
        """Refuse a malformed instruction (``ValueError``) before the client changes anything;
        checks that need the model wait for :meth:`begin_round`."""

    @abstractmethod
    def begin_round(self, model: torch.nn.Module, config: Instruction) -> RoundTerm | None:
        """This round's term, anchored at ``model`` as received; None when the instruction
        does not ask for this method."""

    def state(self) -> Any:
        """What this method carries between rounds (the client copies it)."""
        return None

    def load_state(self, state: Any) -> None:  # noqa: B027 - stateless methods keep this
        """Return to a :meth:`state` (the client hands over its own copy)."""


class RoundTerms:
    """The active methods' terms of one round, combined for ``DiffusionTrainer.train``."""

    def __init__(self, terms: Sequence[RoundTerm]) -> None:
        self.terms = tuple(terms)

    def descriptions(self) -> list[str]:
        return [line for term in self.terms if (line := term.describe()) is not None]

    def extra_loss(self) -> Callable[[torch.nn.Module], torch.Tensor | int] | None:
        """``sum_m R_m`` (0 when the active methods only touch gradients or parameters), or
        None when no method is active: plain training, exactly as the trainer does it."""
        return self._loss if self.terms else None

    def gradient_hook(self) -> Callable[[torch.nn.Module], None] | None:
        return self._after_backward if self.terms else None

    def _loss(self, model: torch.nn.Module) -> torch.Tensor | int:
        # sum() in registry order, as the terms were always added up: the same float result.
        return sum(part for term in self.terms if (part := term.loss(model)) is not None)

    def _after_backward(self, model: torch.nn.Module) -> None:
        for term in self.terms:
            term.after_backward(model)

    def finish(self, model: torch.nn.Module) -> dict[str, Scalar]:
        metrics: dict[str, Scalar] = {}
        for term in self.terms:
            metrics.update(term.finish(model))
        return metrics

    def close(self) -> None:
        for term in self.terms:
            term.close()


class LocalMethods:
    """A client's methods (see ``fedphd.client.methods`` for the registry)."""

    def __init__(self, methods: Sequence[LocalMethod]) -> None:
        names = [method.name for method in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"local methods need distinct names, got {names}")
        self.methods = tuple(methods)

    def __iter__(self) -> Iterator[LocalMethod]:
        return iter(self.methods)

    def __getitem__(self, name: str) -> LocalMethod:
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(name)

    def check(self, config: Instruction) -> None:  # noqa: B027 - optional, most have none
        for method in self.methods:
            method.check(config)

    def begin_round(self, model: torch.nn.Module, config: Instruction) -> RoundTerms:
        """The terms of the methods the instruction asks for; a method that cannot start
        closes those already started (no hook or frozen parameter outlives a failed start)."""
        started: list[RoundTerm] = []
        try:
            for method in self.methods:
                term = method.begin_round(model, config)
                if term is not None:
                    started.append(term)
        except BaseException:
            RoundTerms(started).close()
            raise
        return RoundTerms(started)

    def state(self) -> dict[str, Any]:
        return {method.name: method.state() for method in self.methods}

    def load_state(self, state: Mapping[str, Any]) -> None:
        for method in self.methods:
            method.load_state(state[method.name])
