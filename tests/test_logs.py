"""Readable logs: one plain line per event in every log file, bars on a terminal only."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.common.logger import FLOWER_LOGGER, console_handler, log, warn_deprecated_feature
from tqdm import tqdm

from fedphd.common.settings.logs import EXPECTED_DEPRECATION, configure_logging
from tests.conftest import port_overrides

# The text flwr 1.42's start_client (flwr/compat/client/app.py) passes to
# warn_deprecated_feature on every call, i.e. on every connection attempt.
START_CLIENT_MESSAGE = (
    "flwr.client.start_client() is deprecated."
    "\n\tInstead, use the `flower-supernode` CLI command to start a SuperNode "
    "as shown below:"
    "\n\n\t\t$ flower-supernode --insecure --superlink='<IP>:<PORT>'"
    "\n\n\tTo view all available options, run:"
    "\n\n\t\t$ flower-supernode --help"
    "\n\n\tUsing `start_client()` is deprecated."
)
OUR_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) (\S+): (.*)$")
# Flower's own console handler's format (colours aside): "INFO :      message".
FLOWER_FORMAT = re.compile(r"^(?:\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL) *(?:\x1b\[0m)?:")
BAR = re.compile(r"\d+%\|")


@pytest.fixture
def logging_state() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, FLOWER_LOGGER.handlers[:], FLOWER_LOGGER.level,
             FLOWER_LOGGER.filters[:], FLOWER_LOGGER.propagate)
    yield
    root.handlers[:], FLOWER_LOGGER.handlers[:], FLOWER_LOGGER.filters[:] = (
        saved[0], saved[2], saved[4])
    root.setLevel(saved[1])
    FLOWER_LOGGER.setLevel(saved[3])
    FLOWER_LOGGER.propagate = saved[5]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_flower_lines_once_plain_and_debug_only_when_verbose(logging_state):
    stream = io.StringIO()
    configure_logging(stream=stream)
    assert console_handler not in FLOWER_LOGGER.handlers
    log(logging.INFO, "Received: %s message", "train")
    log(logging.DEBUG, "ChannelConnectivity.READY")
    log(logging.INFO, "")  # Flower's blank separator lines
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" INFO flwr: Received: train message")
    assert "\x1b[" not in stream.getvalue()

    verbose = io.StringIO()
    configure_logging(verbose=True, stream=verbose)
    log(logging.DEBUG, "ChannelConnectivity.READY")
    assert verbose.getvalue().splitlines()[-1].endswith(" DEBUG flwr: ChannelConnectivity.READY")
    assert stream.getvalue().splitlines() == lines  # the first handler was replaced


def test_start_client_deprecation_becomes_one_line_once_per_process(logging_state):
    stream = io.StringIO()
    configure_logging(stream=stream)
    for attempt in range(3):  # three connection attempts
        warn_deprecated_feature(name=START_CLIENT_MESSAGE)
        log(logging.INFO, "attempt %d", attempt)
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        EXPECTED_DEPRECATION, "attempt 0", "attempt 1", "attempt 2"]
    assert "docs/design.md" in lines[0] and " INFO flwr: " in lines[0]


def test_deprecation_block_logged_line_by_line_is_recognised_too(logging_state):
    stream = io.StringIO()
    configure_logging(stream=stream)
    block = f"DEPRECATED FEATURE: {START_CLIENT_MESSAGE}".split("\n") + [
        "This is a deprecated feature. It will be removed",
        "entirely in future versions of Flower."]
    for _ in range(2):
        for line in block:
            log(logging.WARNING, line)
        log(logging.WARNING, "a warning of its own")
    messages = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert messages == [EXPECTED_DEPRECATION, "a warning of its own", "a warning of its own"]


def test_files_get_no_colour_codes_or_carriage_returns(logging_state):
    stream = io.StringIO()
    configure_logging(stream=stream)
    logging.getLogger("fedphd.test").info("\x1b[92mgreen\x1b[0m\r  0%|  | 0/2\rdone")
    assert stream.getvalue().endswith(": green  0%|  | 0/2done\n")


def test_on_a_terminal_log_lines_do_not_tear_a_progress_bar(logging_state):
    terminal = Terminal()
    configure_logging(stream=terminal)
    bar = tqdm(total=3, desc="cloud rounds", file=terminal, disable=None)
    bar.update(1)
    logging.getLogger("fedphd.test").info("round 1 done")
    bar.update(1)
    bar.close()
    pieces = re.split(r"[\r\n]", terminal.getvalue())
    # The line stands alone (the bar was cleared first), and the bar was drawn again after it.
    (line,) = [p for p in pieces if p.endswith("round 1 done")]
    assert OUR_PREFIX.match(line) and not BAR.search(line)
    assert any("cloud rounds" in p and "2/3" in p
               for p in pieces[pieces.index(line):])


def read_terminal(master: int, sink: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end closed
            return
        if not chunk:
            return
        sink.append(chunk)


def launch_on_a_terminal(out: Path, ports: dict[str, int]) -> str:
    """``fedphd launch`` with a pseudo-terminal as stdout and stderr; what it showed there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    argv = [sys.executable, "-m", "fedphd.common.commands.cli", "launch", "--out", str(out),
            "--timeout", "200", "--set", "topology.edges=1", "--set", "topology.clients=1",
            "--set", "topology.cloud_rounds=1", "--set", "topology.edge_rounds=1",
            "--set", "training.local_steps=2", "--set", "diffusion.sampling_steps=2",
            "--set", "output.grid_samples=4", "--set", "evaluation.final=false",
            "--set", "topology.connect_timeout=120", *port_overrides(ports)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_terminal, args=(master, chunks), daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=10)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert code == 0, shown[-3000:]
    return shown


def message_of(line: str) -> str:
    match = OUR_PREFIX.match(line)
    return match.group(3) if match else line


def assert_readable(path: Path) -> None:
    text = path.read_bytes().decode()  # read_text would turn a "\r" into a line end
    assert "\x1b[" not in text, f"{path.name}: ANSI colour codes"
    assert "\r" not in text, f"{path.name}: carriage return (a progress bar?)"
    assert not BAR.search(text), f"{path.name}: a progress bar"
    lines = text.splitlines()
    assert lines, f"{path.name} is empty"
    for before, after in zip(lines, lines[1:], strict=False):
        assert before != after, f"{path.name}: line twice: {after}"
        if message_of(after).strip():
            assert message_of(before) != message_of(after), f"{path.name}: event twice: {after}"
    for line in lines:
        assert len(line) <= 1000, f"{path.name}: a {len(line)}-character line"
        assert not FLOWER_FORMAT.match(line), f"{path.name}: Flower's own handler: {line}"
        match = OUR_PREFIX.match(line)
        assert not (match and match.group(1) == "DEBUG"), f"{path.name}: DEBUG without -v"
    assert text.count("DEPRECATED FEATURE") <= 1, f"{path.name}: deprecation block repeated"


@pytest.mark.slow
def test_launch_logs_one_plain_line_per_event_and_bar_closes_first(tmp_path, ports):
    started = time.monotonic()
    out = tmp_path / "run"
    shown = launch_on_a_terminal(out, ports)
    logs = sorted((out / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["client-0.log", "cloud.log", "edge-0.log"]
    for path in logs:
        assert_readable(path)
    # The edge and the client called start_client; each says once why its warning is expected.
    for name in ("client-0.log", "edge-0.log"):
        assert (out / "logs" / name).read_text().count(EXPECTED_DEPRECATION) == 1
    # On the terminal: the launcher's bar was shown and closed before "run finished".
    finished = shown.index("run finished")
    assert "cloud rounds" in shown[:finished]
    assert "cloud rounds" not in shown[finished:], shown[finished - 500:]
    assert time.monotonic() - started < 240
