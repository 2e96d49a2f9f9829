"""The one place that names the methods' server-side parts the cloud driver uses.

:mod:`fedphd.server.cloud` runs any method through generic hooks; this registry picks, from
the run's config, the implementation of each hook (today: the schedule of model changes).
"""

from __future__ import annotations

from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import GROUP_LASSO_KEY
from fedphd.server.fedphd_pruning import PruningSchedule
from fedphd.server.schedule import FixedSchedule, ModelSchedule


def model_schedule(cfg: RunConfig) -> ModelSchedule:
    """FedPhD's pruning schedule when ``pruning.enabled``, else a model that never changes."""
    if cfg.pruning.enabled:
        return PruningSchedule(cfg.pruning)
    # Without pruning, FedPhD's group-lasso weight still travels as 0 (off), as it always
    # has: instructions keep their size, so the bytes in metrics.jsonl match earlier runs.
    # FixedSchedule() would leave the key out (about 30 bytes less per instruction).
    return FixedSchedule({GROUP_LASSO_KEY: 0.0})
