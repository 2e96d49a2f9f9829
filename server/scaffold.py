"""SCAFFOLD's server side: FedAvg of the models plus the server control variate.

``x <- aggregate(y_i)`` (FedAvg's sample-weighted mean) and
``c <- c + (|S| / N) * mean_{i in S} delta_c_i``, with ``S`` the clients that answered and
``N`` the clients connected when the round was configured. ``c`` travels with every
instruction; see :mod:`fedphd.client.scaffold` for the client side.
"""

from __future__ import annotations

import logging

import numpy as np

from fedphd.common.federation.strategy import add_to_config
from fedphd.common.wire.codec import vector_from_bytes, vector_to_bytes
from fedphd.common.wire.keys import CONTROL_DELTA_KEY, SERVER_CONTROL_KEY
from fedphd.common.wire.transport import (
    ClientManager,
    ClientProxy,
    FedAvg,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)

log = logging.getLogger("fedphd.scaffold")


class Scaffold(FedAvg):
    """FedAvg plus SCAFFOLD's server control variate."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.control: np.ndarray | None = None
        self._connected = 0

    def __repr__(self) -> str:
        return "Scaffold()"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        size = sum(int(a.size) for a in parameters_to_ndarrays(parameters) if a.dtype.kind == "f")
        if self.control is None or self.control.shape != (size,):
            self.control = np.zeros(size, dtype=np.float32)  # new run or new architecture
        self._connected = client_manager.num_available()
        blob = vector_to_bytes(self.control)
        return add_to_config(super().configure_fit(server_round, parameters, client_manager),
                             {SERVER_CONTROL_KEY: blob})

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        deltas = []
        for proxy, res in results:
            try:
                deltas.append(vector_from_bytes(
                    res.metrics[CONTROL_DELTA_KEY], self.control.size, f"peer {proxy.cid}"
                ))
            except (KeyError, ValueError) as error:
                log.warning("round %d: no usable control variate update: %s", server_round,
                            error)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if deltas:
            share = len(deltas) / max(self._connected, len(deltas))
            self.control = self.control + share * np.mean(deltas, axis=0).astype(np.float32)
            metrics = {**metrics, "control_norm": float(np.linalg.norm(self.control))}
        return parameters, metrics
