"""The registry: every method with a client side, in the order their terms apply.

The order is part of the arithmetic: extra losses are summed and gradient hooks run in this
order, and reordering would change the floating-point result of combined methods; a new
method goes at the end.
"""

from __future__ import annotations

from fedphd.client.feddiffuse import FedDiffuseLocal
from fedphd.client.fedphd import FedPhDLocal
from fedphd.client.fedprox import FedProxLocal
from fedphd.client.method import LocalMethod, LocalMethods
from fedphd.client.moon import MoonLocal
from fedphd.client.scaffold import ScaffoldLocal

LOCAL_METHODS: tuple[type[LocalMethod], ...] = (
    FedProxLocal,
    FedPhDLocal,
    MoonLocal,
    ScaffoldLocal,
    FedDiffuseLocal,
)


def local_methods() -> LocalMethods:
    """A fresh set for one client (methods carry per-client state)."""
    return LocalMethods([method() for method in LOCAL_METHODS])
