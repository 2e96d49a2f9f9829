"""Build the wheelhouse of ``bench/gpu_check.sh``: every wheel the project needs on a Python
3.12 manylinux x86-64 machine with no network that brings its own torch (and torchvision).

    python -m bench.gpu_wheels                      # -> bench/gpu-wheels/ (git-ignored)
    make gpu-wheels                                 # the same, through the project's venv

Three steps, all through pip:

1. the project itself as a wheel (``pip wheel --no-deps``);
2. its whole dependency closure for the target, resolved without installing anything
   (``pip install --dry-run --report``, wheels only, ``--python-version 3.12`` and the
   manylinux platform tags), with torch and torchvision pinned to the target's own versions
   (2.11.0 / 0.26.0 by default) so that every other pin agrees with them;
3. ``pip download --no-deps --only-binary=:all:`` of each resolved wheel, except the torch
   family (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*), the ``--provided``
   packages the target already has (default: the large ones of the lent H200's image), and
   what only those need (sympy, networkx, ...).

torchvision is imported at run time (``fedphd.common.data``), so the target's own torchvision,
built for its torch, is the one used; none is shipped. ``manifest.json`` beside the wheels
lists what was shipped and what was left to the target.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "gpu-wheels"
# The target provides these (they are built for its CUDA); shipping them would also cost GBs.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# Large packages the lent H200 machine's image has (its package list, 2026-11-17) in versions
# the project accepts: leaving them out keeps the wheelhouse inside the 64 MiB a device call
# carries. pip still installs nothing it cannot find: a missing one fails the install by name.
H200_PROVIDED = ("numpy", "scipy", "scikit-learn", "matplotlib", "pillow", "uvloop",
                 "huggingface-hub", "safetensors", "accelerate", "pyyaml", "regex")
# Installed beside the project so the venv has its own pip and can build the project offline.
TOOLS = ("pip", "setuptools>=77")
# pip matches manylinux_2_N tags exactly, so every N a wheel of the closure may carry is named.
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]


def target_args(python_version: str) -> list[str]:
    """pip's options for wheels of the target interpreter and platform, never an sdist."""
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build_project_wheel(out: Path) -> Path:
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO))
    wheels = sorted(out.glob("fedphd-*.whl"))
    if not wheels:
        raise SystemExit(f"pip wheel left no fedphd wheel in {out}")
    return wheels[-1]


def resolve(project: Path, python_version: str, torch: str, torchvision: str) -> list[dict]:
    """The install report's entries: the whole closure for the target, nothing installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
            *target_args(python_version), str(project),
            f"torch=={torch}", f"torchvision=={torchvision}", *TOOLS)
        return json.loads(report.read_text())["install"]


def _marker_env(python_version: str, extra: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": extra}


def _applies(requirement: Requirement, extras: set[str], python_version: str) -> bool:
    if requirement.marker is None:
        return True
    marker: Marker = requirement.marker
    return any(marker.evaluate(_marker_env(python_version, extra)) for extra in extras | {""})


def needed_on_target(entries: list[dict], python_version: str, provided: set[str]) -> set[str]:
    """Names reachable from the project and the tools without passing through the torch
    family or a ``provided`` package: what the target may lack (it has torch and everything
    torch needs, and each provided package with its own dependencies)."""
    by_name = {canonicalize_name(e["metadata"]["name"]): e for e in entries}
    roots = [canonicalize_name(Requirement(r).name) for r in TOOLS] + ["fedphd"]
    todo: list[tuple[str, set[str]]] = [(name, set()) for name in roots]
    seen: dict[str, set[str]] = {}
    while todo:
        name, extras = todo.pop()
        if name not in by_name or TORCH_FAMILY.match(name) or name in provided:
            continue
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        for text in by_name[name]["metadata"].get("requires_dist") or []:
            requirement = Requirement(text)
            if _applies(requirement, seen[name], python_version):
                todo.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return set(seen)


def download(pins: list[str], out: Path, python_version: str) -> None:
    pip("download", "--quiet", "--no-deps", *target_args(python_version), "-d", str(out), *pins)


def build(out: Path, python_version: str, torch: str, torchvision: str,
          provided: set[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # one version of each: a stale wheel would be picked too
        old.unlink()
    project = build_project_wheel(out)
    entries = resolve(project, python_version, torch, torchvision)
    shipped = needed_on_target(entries, python_version, provided)
    pins, left = [], []
    for entry in entries:
        name, version = entry["metadata"]["name"], entry["metadata"]["version"]
        key = canonicalize_name(name)
        if key == "fedphd":
            continue
        (pins if key in shipped else left).append(f"{name}=={version}")
    download(sorted(pins), out, python_version)
    wheels = sorted(out.glob("*.whl"))
    manifest = {
        "python_version": python_version, "target_torch": torch,
        "target_torchvision": torchvision, "provided_by_target": sorted(provided),
        "wheels": [wheel.name for wheel in wheels],
        "bytes": sum(wheel.stat().st_size for wheel in wheels),
        "left_to_the_target": sorted(left),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="wheelhouse folder")
    parser.add_argument("--python-version", default="3.12", help="the target's Python")
    parser.add_argument("--torch", default="2.11.0", help="the target's own torch version")
    parser.add_argument("--torchvision", default="0.26.0",
                        help="the target's own torchvision version (matching its torch)")
    parser.add_argument("--provided", default=" ".join(H200_PROVIDED), metavar="NAMES",
                        help="space-separated packages the target already has, left out with "
                             "what only they need (default: the lent H200's; '' ships all)")
    args = parser.parse_args(argv)
    provided = {canonicalize_name(name) for name in args.provided.split()}
    manifest = build(args.out, args.python_version, args.torch, args.torchvision, provided)
    print(f"{len(manifest['wheels'])} wheels, {manifest['bytes'] / 2**20:.1f} MiB in "
          f"{args.out}; left to the target: {len(manifest['left_to_the_target'])} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
