"""Shared helpers: free loopback ports and running the real ``fedphd`` program."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import free_port_block

TESTS_DIR = Path(__file__).resolve().parent


def fedphd(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command line (``python -m fedphd.common.commands.cli``) in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedphd.common.commands.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )


@pytest.fixture
def ports() -> dict[str, int]:
    """A free cloud port and a free block for up to 8 edges."""
    cloud = free_port_block(1)
    edges = free_port_block(8)
    return {"cloud": cloud, "edges": edges}


def port_overrides(ports: dict[str, int]) -> list[str]:
    return ["--set", f"topology.cloud_port={ports['cloud']}",
            "--set", f"topology.edge_base_port={ports['edges']}"]
