"""The cloud's global model, with the strategy and the Flower server that train it."""

from __future__ import annotations

import numpy as np
from diffusers import UNet2DModel

from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    load_ndarrays,
    model_to_ndarrays,
)
from fedphd.common.core.unet_groups import tensor_names
from fedphd.common.federation.held import Rebuilt
from fedphd.common.federation.instructions import client_instruction
from fedphd.common.federation.strategy import (
    ManagedStrategy,
    client_strategy_defaults,
    run_context,
)
from fedphd.common.federation.strategy_builder import build_strategy
from fedphd.common.settings.config import ConfigError, RunConfig
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY, EDGE_ROUNDS_KEY
from fedphd.common.wire.transport import (
    ClientManager,
    Parameters,
    Scalar,
    Server,
    ndarrays_to_parameters,
    new_server,
)


def cloud_strategy(
    cfg: RunConfig, flat: bool, arch_json: str, initial: Parameters, extra: dict[str, Scalar],
    held: dict[str, Rebuilt] | None,
) -> ManagedStrategy:
    """``topology.cloud_strategy`` wrapped for the cloud link; ``extra`` joins every
    instruction (the schedule's keys), ``held`` is what each connected peer holds."""
    topology = cfg.topology
    if flat:
        defaults = client_strategy_defaults(
            topology.fraction_fit, topology.min_fit_clients, initial
        )
        instruction = client_instruction(cfg, arch_json, extra)
    else:
        # Every connected edge takes part in every cloud round (the driver waits for
        # missing ones, bounded, before each round).
        defaults = client_strategy_defaults(1.0, 1, initial)
        instruction = {ARCH_KEY: arch_json, EDGE_ROUNDS_KEY: topology.edge_rounds, **extra}
    inner = build_strategy(
        topology.cloud_strategy, topology.cloud_strategy_args,
        defaults, "topology.cloud_strategy", run_context(cfg, arch_json),
    )
    if getattr(inner, "flat_only", False) and not flat:
        raise ConfigError(
            f"topology.cloud_strategy = {topology.cloud_strategy!r} talks to clients "
            f"directly: set topology.edges = 0 (flat mode), got {topology.edges}"
        )
    return ManagedStrategy.with_codecs(inner, instruction, cfg.codec, held=held,
                                       names=tensor_names(arch_json),
                                       max_examples_factor=topology.max_examples_factor)


class GlobalModel:
    """The global model the cloud trains: the module, its strategy and Flower server.

    ``model`` holds the architecture (and the weights it was installed with); the latest
    aggregate lives in ``server.parameters`` and is loaded into ``model`` on demand
    (:meth:`trained`), since decoding it costs a copy of the model.
    """

    def __init__(self, cfg: RunConfig, flat: bool, client_manager: ClientManager) -> None:
        self.cfg = cfg
        self.flat = flat
        self.client_manager = client_manager
        self.model: UNet2DModel | None = None
        self.strategy: ManagedStrategy | None = None
        self.server: Server | None = None

    def install(self, model: UNet2DModel, extra: dict[str, Scalar]) -> None:
        """Make ``model`` the global model: its architecture travels with every instruction,
        with the ``extra`` keys.

        The strategy is rebuilt too, so a strategy with server-side state (e.g. FedAdam's
        moments) starts from the new architecture's weights. What the peers hold outlives
        the old strategy: it is still the base of their quantised downlinks (a peer whose
        model no longer fits the architecture is sent whole weights).
        """
        self.model = model
        arch_json = self.architecture()
        parameters = ndarrays_to_parameters(model_to_ndarrays(model))
        held = self.strategy.held_models() if self.strategy is not None else None
        self.strategy = cloud_strategy(self.cfg, self.flat, arch_json, parameters, extra, held)
        self.server = new_server(self.strategy, self.client_manager)
        self.server.parameters = parameters

    def architecture(self) -> str:
        """The global model's architecture JSON."""
        return architecture_to_json(architecture_of(self.model))

    def weights(self) -> list[np.ndarray]:
        """The latest aggregate, in wire order."""
        return codec.decode(self.server.parameters)

    def trained(self) -> UNet2DModel:
        """``model`` with the latest aggregate loaded."""
        load_ndarrays(self.model, self.weights())
        return self.model
