"""Experiment tracking (``output.report_to``): TensorBoard event files of a run.

With ``report_to = "tensorboard"`` the cloud mirrors its ``metrics.jsonl`` lines into
``DIR/tensorboard/`` (step = cloud round): ``train/loss``, ``bytes/<link>``,
``bytes_cumulative/<link>``, ``quality/fd_classifier`` (and ``quality/fid``),
``client_quality/fd_classifier``, ``pruning/*``, a grid of ``output.grid_samples`` samples
per evaluated round as the image ``samples/round`` and the final sample grid as the image
``samples``. Edge rounds go to ``DIR/tensorboard/edges/`` (step = edge round, tags
``edge-N/...``). Links are named as in ``metrics.jsonl`` with ``->`` written ``_to_``
(``cloud->client`` is ``bytes/cloud_to_client``). ``fedphd train`` writes ``train/loss`` per
step and the grid.

TensorBoard is an optional dependency (``pip install 'fedphd[tensorboard]'``), imported only
when asked for; :func:`check_tracking` says so in one line before a run starts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fedphd.common.settings.config import ConfigError, OutputConfig

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TRACKING_DIR = "tensorboard"
EDGE_DIR = "edges"  # a TensorBoard "run" of its own: edge rounds count on another scale
QUALITY_KEYS = ("fd_classifier", "fid")
CLOUD_KEYS = ("loss", "num_examples", "seconds", "waited_seconds", "rss_mb")
EDGE_KEYS = ("loss", "num_examples", "seconds")


def check_tracking(output: OutputConfig) -> None:
    """Raise ``ConfigError`` (one line) when the tracker asked for is not installed."""
    if output.report_to != "tensorboard":
        return
    try:
        importlib.import_module("tensorboard")
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as error:
        raise ConfigError(
            "output.report_to = \"tensorboard\" needs the tensorboard package, which is not "
            f"installed ({error}): pip install 'fedphd[tensorboard]'"
        ) from None


def _link_tag(prefix: str, link: str) -> str:
    return f"{prefix}/{link.replace('->', '_to_')}"


def _numbers(record: dict[str, Any], keys: tuple[str, ...], prefix: str) -> dict[str, float]:
    """``prefix/key`` for each of ``keys`` the record holds as a number (``loss`` may be
    ``null`` when nobody answered)."""
    return {f"{prefix}/{key}": float(record[key]) for key in keys
            if isinstance(record.get(key), int | float) and not isinstance(record[key], bool)}


def _bytes(record: dict[str, Any], field: str, prefix: str) -> dict[str, float]:
    return {_link_tag(prefix, link): float(value)
            for link, value in (record.get(field) or {}).items()}


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one ``metrics.jsonl`` line, by tag (edge lines included,
    under ``edge-N/``)."""
    tier = record.get("tier")
    if tier == "cloud":
        return {**_numbers(record, CLOUD_KEYS, "train"), **_bytes(record, "bytes", "bytes"),
                **_bytes(record, "bytes_cumulative", "bytes_cumulative")}
    if tier == "edge":
        prefix = f"edge-{record.get('edge')}"
        return {**_numbers(record, EDGE_KEYS, prefix),
                **_bytes(record, "bytes", f"{prefix}/bytes")}
    if tier == "eval":
        return _numbers(record, QUALITY_KEYS, "quality")
    if tier == "client-eval":
        return {**_numbers(record, QUALITY_KEYS, "client_quality"),
                **_bytes(record, "bytes", "bytes")}
    if tier == "pruning":
        keys = tuple(k for k in record if k not in ("tier", "round"))
        return _numbers(record, keys, "pruning")
    return {}


class Tracker:
    """TensorBoard writers of one run folder; flushed after every line, closed at the end."""

    def __init__(self, folder: Path, purge_step: int = 0, edge_purge_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional: only when asked for

        self._writer_class = SummaryWriter
        self.folder = folder
        # purge_step: TensorBoard drops earlier files' events from this step on, so a fresh
        # run over an old folder, or a resumed one redoing rounds, shows each step once.
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self._edge_purge_step = edge_purge_step
        # Made on the first edge line: a flat run has none.
        self._edge_writer: SummaryWriter | None = None

    def record(self, record: dict[str, Any]) -> None:
        """Mirror one ``metrics.jsonl`` line."""
        writer = self._edges() if record.get("tier") == "edge" else self.writer
        step = int(record.get("round", 0))
        for tag, value in record_scalars(record).items():
            writer.add_scalar(tag, value, step)
        writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A PNG the run wrote (its sample grid), as a TensorBoard image."""
        with Image.open(png) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def grid(self, tag: str, images: np.ndarray, step: int) -> None:
        """``N x H x W x C`` samples in [0, 1] as one grid image (as the run's PNGs)."""
        from fedphd.common.core.images import grid_array

        self.writer.add_image(tag, grid_array(images), step, dataformats="HWC")
        self.writer.flush()

    def _edges(self) -> SummaryWriter:
        if self._edge_writer is None:
            self._edge_writer = self._writer_class(str(self.folder / EDGE_DIR),
                                                   purge_step=self._edge_purge_step)
        return self._edge_writer

    def close(self) -> None:
        for writer in (self.writer, self._edge_writer):
            if writer is not None:
                writer.close()


def open_tracker(
    output: OutputConfig, out: Path, completed_round: int = 0, edge_rounds: int = 1
) -> Tracker | None:
    """The run's tracker, or ``None`` with ``report_to = "none"``; a resumed run passes the
    rounds its checkpoint completed (their events are kept, later ones replaced)."""
    check_tracking(output)
    if output.report_to == "none":
        return None
    purge = completed_round + 1 if completed_round else 0
    edge_purge = completed_round * edge_rounds + 1 if completed_round else 0
    return Tracker(out / TRACKING_DIR, purge, edge_purge)


def track_png(tracker: Tracker | None, tag: str, png: Path, step: int) -> None:
    """Add ``png`` as an image when tracking and the run wrote it (a run whose clients keep
    parts of the model writes no grid at the cloud)."""
    if tracker is not None and png.is_file():
        tracker.image(tag, png, step)


def track_training(output: OutputConfig, out: Path, losses: list[float], png: Path) -> None:
    """``fedphd train``'s events: the loss of every optimiser step and the final grid."""
    tracker = open_tracker(output, out)
    if tracker is None:
        return
    try:
        for step, loss in enumerate(losses, start=1):
            tracker.scalar("train/loss", loss, step)
        track_png(tracker, "samples", png, len(losses))
    finally:
        tracker.close()
