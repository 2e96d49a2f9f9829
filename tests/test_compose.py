"""The docker compose test bed for real (``make compose-test``): build the image, run the cloud,
2 edges and 4 clients as containers with ``docker-compose.yml`` over mutual TLS (each role's
volume holding its own key only), check the cloud's results.

On a machine like CI's (root, Debian, no image registry) the setup installs and starts what it
needs: the Docker engine, Compose and debootstrap from Debian's packages
(docker/ensure-engine.sh), a Debian base image made with debootstrap + ``docker import``
(docker/debian-base.sh), and the Python packages from a wheelhouse made here with
``pip download`` (docker/build-image.sh serves it to the build). Compose v2 is used where it
is installed, Debian's v1 otherwise. Everything the test creates carries this run's name (image
tags, the compose project's containers, network and volumes) and is removed afterwards, also
what an earlier run that died left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "compose-test"  # debootstrap's packed root file system, kept
RUN_ID = str(os.getpid())
IMAGE_REPO, BASE_REPO, PROJECT_PREFIX = "fedphd-compose-test", "fedphd-compose-base", "fedphd-ct-"
IMAGE, BASE = f"{IMAGE_REPO}:{RUN_ID}", f"{BASE_REPO}:{RUN_ID}"
PROJECT = f"{PROJECT_PREFIX}{RUN_ID}"
CONFIG = REPO / "configs" / "compose-digits.toml"
ROLES = {"cloud", "edge-1", "edge-2", "client-1", "client-2", "client-3", "client-4"}
SERVICES = {"certs", *ROLES}  # certs: the one-shot service that makes the certificates
TIMINGS: dict[str, float] = {}


def sh(*args: str, timeout: float, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; its output is in the failure message."""
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def timed(name: str, *args: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = sh(*args, timeout=timeout, **kwargs)
    TIMINGS[name] = round(time.monotonic() - start, 1)
    return result


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


def cannot_run(reason: str) -> None:
    """Skip, saying why; `make compose-test` (FEDPHD_COMPOSE_REQUIRED=1) fails instead."""
    if os.environ.get("FEDPHD_COMPOSE_REQUIRED"):
        pytest.fail(f"the compose test bed cannot run here: {reason}")
    pytest.skip(reason)


def pid_alive(text: str) -> bool:
    return text.isdigit() and Path(f"/proc/{text}").exists()


def remove_leftovers_of_dead_runs(compose: list[str]) -> None:
    """Images and compose projects of earlier runs whose process is gone (a killed run)."""
    projects = sh("docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}',
                  timeout=60).stdout.split()
    for project in set(projects):
        if project.startswith(PROJECT_PREFIX) and not pid_alive(project[len(PROJECT_PREFIX):]):
            sh(*compose, "-p", project, "down", "-v", "--remove-orphans", "-t", "5",
               timeout=300, check=False)
    for repo in (IMAGE_REPO, BASE_REPO):
        tags = sh("docker", "images", repo, "--format", "{{.Tag}}", timeout=60).stdout.split()
        stale = [f"{repo}:{tag}" for tag in tags if not pid_alive(tag)]
        if stale:
            sh("docker", "rmi", "-f", *stale, timeout=300, check=False)


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """A running engine and a Compose command, installed and started when missing."""
    result = subprocess.run(["bash", "docker/ensure-engine.sh"], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    if result.returncode == 3:
        cannot_run(f"no Docker engine can be had here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    command = compose_command()
    remove_leftovers_of_dead_runs(command)
    return command


def torch_requirements() -> list[str]:
    """The torch pins the Dockerfile installs (its ARG TORCH default)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    return re.search(r'^ARG TORCH="([^"]+)"', text, re.MULTILINE).group(1).split()


def make_wheelhouse(folder: Path) -> None:
    """Every wheel the image installs, fetched with this machine's pip and its settings."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = folder / "requirements.txt"
    folder.mkdir(parents=True)
    requirements.write_text("\n".join([*torch_requirements(), "setuptools>=77",
                                       *project["dependencies"]]))
    timed("wheelhouse", sys.executable, "-m", "pip", "download", "--quiet", "-d", str(folder),
          "-r", str(requirements), timeout=1200)


@pytest.fixture(scope="module")
def image(compose) -> Iterator[str]:
    """The project's image, built offline on a debootstrap base; removed afterwards."""
    if os.geteuid() != 0:
        cannot_run("debootstrap makes the base image (no image registry here) and needs root")
    wheelhouse = CACHE / f"wheelhouse-{RUN_ID}"
    try:
        timed("base image", "bash", "docker/debian-base.sh", BASE, timeout=1200,
              env={"FEDPHD_CACHE": str(CACHE)})
        make_wheelhouse(wheelhouse)
        timed("image build", "bash", "docker/build-image.sh", "--tag", IMAGE, "--base", BASE,
              "--wheelhouse", str(wheelhouse), timeout=1800)
        yield IMAGE
    finally:
        shutil.rmtree(wheelhouse, ignore_errors=True)
        sh("docker", "rmi", "-f", IMAGE, BASE, timeout=300, check=False)


@pytest.fixture
def testbed(compose, image) -> Iterator[tuple[list[str], dict[str, str]]]:
    """The compose project of this run; its containers, network and volumes go afterwards."""
    env = {"FEDPHD_IMAGE": image, "FEDPHD_CONFIG": str(CONFIG)}
    base = [*compose, "-p", PROJECT, "-f", "docker-compose.yml"]
    try:
        yield base, env
    finally:
        sh(*base, "down", "-v", "--remove-orphans", "-t", "5", timeout=300, env=env,
           check=False)


def container_states(base: list[str], env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Service -> (status, exit code) of every container of the project."""
    # -a: Compose v2 lists running containers only without it.
    ids = sh(*base, "ps", "-a", "-q", timeout=60, env=env).stdout.split()
    lines = sh("docker", "inspect", "--format",
               '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
               "{{.State.ExitCode}}", *ids, timeout=60).stdout.splitlines()
    return {name: (status, int(code)) for name, status, code in (ln.split() for ln in lines)}


@pytest.mark.timeout(3000)
def test_compose_testbed_trains_and_leaves_the_clouds_results(testbed, tmp_path):
    base, env = testbed
    up = timed("compose run", *base, "up", "--no-build", "--no-color", timeout=1200, env=env,
               check=False)
    logs = sh(*base, "logs", "--no-color", timeout=120, env=env).stdout
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:] + logs[-6000:]

    # Every container ran its role and exited 0 on its own once the cloud was done.
    states = container_states(base, env)
    assert set(states) == SERVICES, states
    assert all(state == ("exited", 0) for state in states.values()), (states, logs[-6000:])

    # Mutual TLS on every link: each role logs that it serves or dials with the test CA and
    # that client certificates are required.
    for role in ("cloud: ", "edge 0: serving", "edge 1: serving", "client 0:", "client 3:"):
        assert any(role in line and "TLS, CA /certs/ca.pem, client certificates required"
                   in line for line in logs.splitlines()), role
    assert_each_role_mounts_its_own_certificates(base, env)

    cloud_id = sh(*base, "ps", "-a", "-q", "cloud", timeout=60, env=env).stdout.strip()
    results = tmp_path / "results"
    sh("docker", "cp", f"{cloud_id}:/results", str(results), timeout=120)
    check_results(results)
    # Where the time went (seconds), kept beside the cache for whoever sizes CI.
    (CACHE / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    print(f"compose test bed timings (s): {json.dumps(TIMINGS)}")


def assert_each_role_mounts_its_own_certificates(base: list[str], env: dict[str, str]) -> None:
    """Every role's /certs is its own volume, read-only; the CA's key is in none of them."""
    for service in ROLES:
        container = sh(*base, "ps", "-a", "-q", service, timeout=60, env=env).stdout.strip()
        mounts = json.loads(sh("docker", "inspect", "--format", "{{json .Mounts}}", container,
                               timeout=60).stdout)
        (certs,) = [m for m in mounts if m["Destination"] == "/certs"]
        assert certs["Name"].endswith(f"_certs-{service}") and not certs["RW"], certs
        assert not any(m["Name"].endswith("_ca") for m in mounts if m.get("Name")), mounts


def check_results(results: Path) -> None:
    """The cloud's metrics of 2 cloud rounds over both edges and a trained, loadable model."""
    from diffusers import UNet2DModel

    from fedphd.common.core.models import build_unet, model_to_ndarrays, unet_config
    from fedphd.common.settings.config import load_config

    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert [r["round"] for r in cloud] == [1, 2]
    assert all(r["model_updated"] and sorted(r["participants"]) == ["edge 0", "edge 1"]
               for r in cloud), cloud
    for edge_id in (0, 1):
        rounds = [r for r in records if r["tier"] == "edge" and r["edge"] == edge_id]
        assert [r["cloud_round"] for r in rounds] == [1, 1, 2, 2]
        # Edge N+1 serves clients N and N+2 (client-id mod 2).
        assert all(sorted(r["clients"]) == [f"client {edge_id}", f"client {edge_id + 2}"]
                   for r in rounds), rounds
        assert all(r["bytes"]["edge->client"] == r["reported_by_clients"]["received"]
                   for r in rounds)

    cfg = load_config(CONFIG)
    trained = model_to_ndarrays(UNet2DModel.from_pretrained(results / "model", subfolder="unet"))
    initial = model_to_ndarrays(build_unet(unet_config(cfg.model), seed=cfg.seed))
    changed = [not np.array_equal(a, b) for a, b in zip(trained, initial, strict=True)]
    assert sum(changed) > 0.9 * len(changed)
    assert (results / "samples.png").stat().st_size > 0
    assert json.loads((results / "summary.json").read_text())["cloud_rounds"] == 2
