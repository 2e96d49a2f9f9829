"""The cloud's ``metrics.jsonl``: one JSON line per round, per edge round, per evaluation.

Every line goes through :meth:`MetricsLog.write`, so the run's tracker
(``output.report_to``, :mod:`fedphd.common.quality.tracking`) sees each one too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedphd.common.quality.tracking import Tracker

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON lines, flushed per line so a watcher (the launcher) sees progress."""

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tracker = tracker
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tracker is not None:
            self.tracker.record(record)

    def offset(self) -> int:
        """Bytes written so far (a resumed run cuts the lines of an unfinished round)."""
        return self._file.tell()

    @staticmethod
    def truncate(path: Path, offset: int) -> None:
        """Drop what was written after ``offset``: the lines of rounds a resumed run redoes."""
        if path.exists() and path.stat().st_size > offset:
            with path.open("r+b") as handle:
                handle.truncate(offset)

    def close(self) -> None:
        self._file.close()
        if self.tracker is not None:
            self.tracker.close()
