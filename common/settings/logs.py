"""Logging of every ``fedphd`` process: one handler on the root logger, one line per event.

Flower's logger ("flwr") comes with a console handler of its own (coloured, no timestamp)
*and* propagates to the root logger, so without this set-up each Flower line is written
twice, once with ANSI colour codes; it also sets itself to DEBUG. Here Flower's handlers
go, "flwr" propagates to our one handler, its level follows ``-v``, and the deprecation
warning Flower logs on every ``start_client`` call (each connection attempt) becomes one line
of ours, once per process. On a terminal, lines go through ``tqdm.write`` so they do not
tear a progress bar; in a file or a pipe there are no bars (``progress_bar``), no colour
codes and no carriage returns.

Flower is not imported here (only ``common/wire/transport.py`` imports it): its logger is
found by name. :func:`configure_logging` must run after Flower was imported, since Flower
adds its console handler at import; ``cli.main`` calls it after the sub-commands (which
import Flower) are loaded.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import TextIO

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLOWER_LOGGER = "flwr"
# Libraries whose DEBUG lines are noise even with -v (PNG chunks, font lookups, lock files).
QUIET_LOGGERS = ("PIL", "matplotlib", "filelock", "urllib3", "httpx", "httpcore", "asyncio")
# Colour and cursor sequences (CSI ... letter) and carriage returns: a file keeps plain lines.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\r")

DEPRECATION_MARK = "DEPRECATED FEATURE"
# Lines of Flower's start_client deprecation block (flwr/compat/client/app.py and
# flwr/supercore/logger.py warn_deprecated_feature): recognised when Flower logs the block as
# several records instead of one.
DEPRECATION_LINES = (
    "flower-supernode",
    "to view all available options",
    "using `start_client()` is deprecated",
    "this is a deprecated feature",
    "entirely in future versions of flower",
    "check the following `feature update`",
    "feature update:",
)
EXPECTED_DEPRECATION = (
    "DEPRECATED FEATURE start_client() (Flower's warning, shown once per process): expected; "
    "fedphd uses Flower's legacy gRPC-bidi transport on purpose, since the SuperLink/"
    "SuperNode stack has no edge tier (docs/design.md, 'Processes and transport')"
)


class FlowerDeprecationFilter(logging.Filter):
    """Turns Flower's ``start_client`` deprecation block into one line, once per process.

    Flower logs the block (14 lines, one record in flwr 1.42) each time ``start_client``
    runs, i.e. on every connection attempt of a client or edge. The first record of the block
    is rewritten into :data:`EXPECTED_DEPRECATION`; later blocks, and the continuation
    records of a block logged line by line, are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._shown = False
        self._in_block = False  # the last Flower record was part of a deprecation block

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        starts = DEPRECATION_MARK in text and "start_client" in text
        with self._lock:
            if not starts and not (self._in_block and _continues_block(text)):
                self._in_block = False
                return True
            self._in_block = True
            if not starts or self._shown:
                return False
            self._shown = True
        record.msg, record.args = EXPECTED_DEPRECATION, ()
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def _continues_block(text: str) -> bool:
    line = text.strip().lower()
    return not line or any(mark in line for mark in DEPRECATION_LINES)


class DropEmptyFilter(logging.Filter):
    """Flower logs empty INFO records as separators; in a log file they are blank events."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(record.getMessage().strip())


class LineHandler(logging.StreamHandler):
    """The one handler: plain lines in files and pipes, ``tqdm.write`` on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.terminal = _is_terminal(self.stream)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if self.terminal else _CONTROL.sub("", text)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.terminal:
            super().emit(record)
            return
        try:
            # Clears any bar on this terminal, writes the line, redraws the bar below it.
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def configure_logging(verbose: bool = False, stream: TextIO | None = None) -> LineHandler:
    """Set up this process's logging (idempotent: a second call replaces the first)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(handler)
    handler = LineHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    configure_flower_logger(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    return handler


def configure_flower_logger(level: int) -> logging.Logger:
    """Flower's logger: no handler of its own (ours, on the root, writes its lines), our
    level instead of Flower's DEBUG, and the filters of its known noise."""
    flower = logging.getLogger(FLOWER_LOGGER)
    for handler in list(flower.handlers):
        flower.removeHandler(handler)  # Flower's coloured console handler
    flower.propagate = True
    flower.setLevel(level)
    for old in [f for f in flower.filters if isinstance(f, (FlowerDeprecationFilter,
                                                             DropEmptyFilter))]:
        flower.removeFilter(old)
    flower.addFilter(DropEmptyFilter())
    flower.addFilter(FlowerDeprecationFilter())
    return flower


def verbosity_args() -> list[str]:
    """The flags that give a child ``fedphd`` process this process's verbosity (``-v``)."""
    return ["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []
