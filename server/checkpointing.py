"""The cloud's checkpoint after every completed round, and ``--resume`` from it.

The file format is :class:`fedphd.common.federation.checkpoint.CloudCheckpoint`; this module
decides what of the cloud goes into it and where it goes back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fedphd.common.core.models import architecture_from_json, build_unet, load_ndarrays
from fedphd.common.federation.checkpoint import (
    CloudCheckpoint,
    restore_strategy,
    strategy_state,
)
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.transport import Traffic, TrafficMeter
from fedphd.server.global_model import GlobalModel
from fedphd.server.metrics_log import MetricsLog
from fedphd.server.peers import Peers
from fedphd.server.schedule import ModelSchedule

log = logging.getLogger("fedphd.cloud")  # the cloud's log, as before the driver was split


@dataclass
class Progress:
    """How far the run got: the last completed cloud round, the bytes per link so far."""

    completed_round: int = 0
    cumulative: dict[str, int] = field(default_factory=dict)

    def add_bytes(self, per_link: dict[str, int]) -> None:
        for link, count in per_link.items():
            self.cumulative[link] = self.cumulative.get(link, 0) + count


@dataclass
class Checkpointing:
    """Saves the cloud's state into ``out`` and puts a saved one back."""

    cfg: RunConfig
    out: Path
    global_model: GlobalModel
    schedule: ModelSchedule
    peers: Peers
    meter: TrafficMeter
    progress: Progress

    def load(self) -> CloudCheckpoint:
        """The run's checkpoint, refused when the config changes what it trains."""
        checkpoint = CloudCheckpoint.load(self.out)
        checkpoint.check_config(self.cfg)
        return checkpoint

    def install(self, checkpoint: CloudCheckpoint) -> None:
        """The global model, schedule and strategy state and counters of the last completed
        round."""
        model = build_unet(architecture_from_json(checkpoint.architecture))
        load_ndarrays(model, checkpoint.model)
        # Before the model: the schedule's state decides the instruction keys.
        self.schedule.load_state(checkpoint.schedule)
        self.global_model.install(model, self.schedule.instruction_keys())
        restore_strategy(self.global_model.strategy.inner, checkpoint.strategy)
        self.progress.completed_round = checkpoint.completed_round
        self.progress.cumulative = dict(checkpoint.cumulative_bytes)
        self.peers.expect_held(checkpoint.held)
        self.meter.carry_over(Traffic(*checkpoint.link_total))
        log.info("cloud: resuming after cloud round %d of %d (checkpoint in %s)",
                 checkpoint.completed_round, self.cfg.topology.cloud_rounds, self.out)

    def save(self, metrics: MetricsLog, server_round: int) -> None:
        total = self.meter.total
        strategy = self.global_model.strategy
        CloudCheckpoint(
            completed_round=server_round,
            architecture=self.global_model.architecture(),
            model=self.global_model.weights(),
            schedule=self.schedule.state(),
            strategy=strategy_state(strategy.inner),
            cumulative_bytes=self.progress.cumulative,
            held=self.peers.held_now(strategy),
            link_total=(total.down, total.up, total.messages),
            metrics_offset=metrics.offset(),
            config=self.cfg.model_dump(mode="json"),
        ).save(self.out)
