"""The package layout: one import name, layers that import only downwards, roles that never
import each other, Flower in one module, generic roles that name no method."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import fedphd, port_overrides

REPO = Path(__file__).resolve().parents[1]
ROLES = ("common", "server", "edge", "client")
# common/'s layers, lowest first: a module may import its own layer and those below it.
LAYERS = ("settings", "configs", "core", "data", "quality", "wire", "federation", "commands")
# Method names in any case, and "FedPhD" itself (the package's own name is lower case).
METHOD_WORDS = re.compile(r"(?i:fedprox|proximal|scaffold|moon|lasso|feddiffuse|fedddpm)|FedPhD"
                          r"|fedphd\.(server|client)\.fedphd")
GENERIC_ROLE_FILES = ("client/client.py", "server/cloud.py", "edge/edge.py")


def package_files(role: str) -> list[Path]:
    return sorted((REPO / role).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, absolute names (the package uses no relative imports)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.append(node.module or "")
    return names


def layer_of(path: Path) -> str:
    relative = path.relative_to(REPO / "common")
    return relative.parts[0] if len(relative.parts) > 1 else "settings"


@pytest.mark.parametrize("role", ROLES)
def test_the_package_imports_itself_only_as_fedphd(role):
    bare = [(path.name, name) for path in package_files(role) for name in imported_modules(path)
            if name.split(".")[0] in ROLES]
    assert bare == []


def test_common_layers_import_only_their_own_layer_or_lower_ones():
    upward = []
    for path in package_files("common"):
        mine = LAYERS.index(layer_of(path))
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[:2] != ["fedphd", "common"] or len(parts) < 3:
                continue
            if parts[2] not in LAYERS:
                upward.append((str(path.relative_to(REPO)), name, "not a layer"))
            elif LAYERS.index(parts[2]) > mine:
                upward.append((str(path.relative_to(REPO)), name))
    assert upward == []


@pytest.mark.parametrize("role", ROLES)
def test_roles_never_import_each_other(role):
    others = {f"fedphd.{other}" for other in ROLES if other != role} - {"fedphd.common"}
    crossing = [(path.name, name) for path in package_files(role)
                for name in imported_modules(path) if ".".join(name.split(".")[:2]) in others]
    assert crossing == []


def test_flower_is_imported_in_one_module_only():
    importers = {str(path.relative_to(REPO)) for role in ROLES for path in package_files(role)
                 if any(name.split(".")[0] == "flwr" for name in imported_modules(path))}
    assert importers == {"common/wire/transport.py"}


@pytest.mark.parametrize("name", GENERIC_ROLE_FILES)
def test_generic_roles_name_no_method(name):
    text = (REPO / name).read_text()
    assert [m.group(0) for m in METHOD_WORDS.finditer(text)] == []
    # Method classes are named *Local, *Round, *Term or *Correction.
    assert not re.search(r"isinstance\([^)]*\b\w+(Local|Round|Term|Correction)\b", text)


def test_wheel_installs_one_top_level_package(tmp_path):
    """``pip wheel .``: only ``fedphd`` at the top of site-packages, the default config in."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel, = tmp_path.glob("fedphd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level, = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["fedphd"]
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"fedphd"}
    assert "fedphd/common/configs/default.toml" in names
    assert "fedphd/server/cloud.py" in names and "fedphd/client/client.py" in names


def test_version_flag_prints_the_installed_version():
    from importlib.metadata import version

    result = fedphd("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fedphd {version('fedphd')}"


USER_PACKAGE = 'raise ImportError("the user\'s own {name} package was imported")\n'


@pytest.mark.slow
def test_launch_runs_from_a_folder_holding_its_own_common_server_and_client(tmp_path, ports):
    """A user's working folder with packages named like ours (each fails on import) does not
    shadow the installed product: every role starts as ``fedphd.*``."""
    work = tmp_path / "work"
    for name in ("common", "server", "client", "edge"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(USER_PACKAGE.format(name=name))
        (work / name / "cli.py").write_text(USER_PACKAGE.format(name=name))
    out = work / "run"
    result = fedphd(
        "launch", "--out", str(out), "--timeout", "300", *port_overrides(ports),
        "--set", "topology.cloud_rounds=1", "--set", "topology.edge_rounds=1",
        "--set", "training.local_steps=2", "--set", "diffusion.sampling_steps=2",
        "--set", "output.grid_samples=4", "--set", "evaluation.final=false",
        cwd=work, timeout=400,
    )
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.log")))
    assert result.returncode == 0, result.stderr[-3000:] + logs
    assert "package was imported" not in logs + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["tier"] == "cloud"] == [1]
    assert (out / "model" / "model_index.json").is_file()
