"""MOON's server side: FedAvg that asks clients for the model-contrastive term.

Aggregation is FedAvg's; every fit instruction carries ``moon_mu`` (weight of the term) and
``moon_tau`` (temperature), which :mod:`fedphd.client.moon` turns into
``L = L_ddpm + mu * l_con`` on each client.
"""

from __future__ import annotations

from fedphd.common.federation.strategy import add_to_config
from fedphd.common.wire.keys import MOON_MU_KEY as MU_KEY
from fedphd.common.wire.keys import MOON_TAU_KEY as TAU_KEY
from fedphd.common.wire.transport import ClientManager, ClientProxy, FedAvg, FitIns, Parameters


class MOON(FedAvg):
    """FedAvg plus MOON's ``mu`` and ``tau`` in every instruction."""

    def __init__(self, *, mu: float = 1.0, tau: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if mu < 0 or tau <= 0:
            raise ValueError(f"MOON needs mu >= 0 and tau > 0, got mu={mu}, tau={tau}")
        self.mu, self.tau = mu, tau

    def __repr__(self) -> str:
        return f"MOON(mu={self.mu}, tau={self.tau})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return add_to_config(super().configure_fit(server_round, parameters, client_manager),
                             {MU_KEY: self.mu, TAU_KEY: self.tau})
