#!/usr/bin/env bash
# The GPU check (python -m bench.gpu_check) on a machine with no network that has Python 3.12
# and its own torch + torchvision: a venv that sees the machine's torch, the project and its
# other dependencies installed offline from the wheelhouse shipped beside this script
# (`make gpu-wheels` builds it where PyPI is reachable), then the check, all inside one limit.
#
#   bench/gpu_check.sh                 # from the repository root; arguments go to the check
#   bench/gpu_check.sh --skip-transport
#
# Environment (all optional):
#   PYTHON          the machine's interpreter, the one that imports torch (python3)
#   GPU_WHEELS      the wheelhouse (bench/gpu-wheels)
#   GPU_CHECK_VENV  the venv made here, replaced on each run (/tmp/fedphd-gpu-check/venv)
#   GPU_CHECK_JSON  the result ($OUT/gpu_check.json where OUT is set, else
#                   runs/bench/gpu_check.json)
#   GPU_CHECK_LIMIT seconds for everything, install included (480)
# Exit status: the check's (0 all measured, 1 a part failed, 124 out of time: the JSON keeps
# what was measured), or 2 with one line saying what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

host=${PYTHON:-python3}
wheels=${GPU_WHEELS:-bench/gpu-wheels}
work=/tmp/fedphd-gpu-check
venv=${GPU_CHECK_VENV:-$work/venv}
limit=${GPU_CHECK_LIMIT:-480}
if [ -n "${OUT:-}" ]; then default_json=$OUT/gpu_check.json; else default_json=runs/bench/gpu_check.json; fi
json=${GPU_CHECK_JSON:-$default_json}
mkdir -p "$work" "$(dirname "$json")"
log=$work/install.log

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
# Seconds left of the limit, at least 1 (timeout 0 would mean no limit at all).
left() { local rest=$((limit - SECONDS)); echo $((rest > 0 ? rest : 1)); }

shopt -s nullglob
pip_wheels=("$wheels"/pip-*.whl)
[ ${#pip_wheels[@]} -eq 1 ] \
    || die "no wheelhouse in $wheels (or two pip wheels): run 'make gpu-wheels' where PyPI is reachable"
"$host" -c 'import torch, torchvision' 2>/dev/null \
    || die "$host cannot import torch and torchvision: the check uses the machine's own (set PYTHON)"

echo "gpu_check.sh: venv $venv over $("$host" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
rm -rf "$venv"
# --without-pip: the venv gets the wheelhouse's pip below, whatever ensurepip the machine has.
"$host" -m venv --system-site-packages --without-pip "$venv"
# A venv made from another venv's interpreter (the machine's python3 is one) sees the *base*
# interpreter's site-packages, not the folder torch is in: add the host's folders from a .pth
# file (site.addsitedir: their own .pth files count too). They come after the venv's own, so
# what is installed here wins over the machine's copy.
site_dir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$host" -c 'import os, site, torch
for folder in [*site.getsitepackages(), os.path.dirname(os.path.dirname(torch.__file__))]:
    print(f"import site; site.addsitedir({folder!r})")' > "$site_dir/_machine_site.pth"
"$venv/bin/python" -c 'import torch, torchvision' \
    || die "the venv does not see the machine's torch (folders in $site_dir/_machine_site.pth)"

pip_opts=(--no-index --find-links "$wheels" --no-cache-dir --disable-pip-version-check
          --root-user-action=ignore --quiet)
# pip runs from its own wheel to install itself (no ensurepip, no network); --ignore-installed:
# into the venv even where the machine's pip is visible, so the pip used is the shipped one.
if ! timeout "$(left)" "$venv/bin/python" "${pip_wheels[0]}/pip" install "${pip_opts[@]}" \
        --ignore-installed "${pip_wheels[0]}" >"$log" 2>&1; then
    cat "$log" >&2; die "installing pip from ${pip_wheels[0]} failed"
fi
# The project from this tree (editable: the code measured is the code here), every dependency
# from the wheelhouse, or the machine's copy where it already satisfies the requirement; never
# torch or torchvision. setuptools for the build comes from the wheelhouse too.
if ! timeout "$(left)" "$venv/bin/python" -m pip install "${pip_opts[@]}" -e . >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "offline install failed (above: the package pip could not find; rebuild the wheelhouse with 'make gpu-wheels GPU_WHEELS_PROVIDED=...' leaving that one out of the provided list)"
fi
"$venv/bin/python" -c 'import flwr, diffusers, torch_pruning, pydantic, fedphd.common.core.diffusion' \
    || die "the venv cannot import the project's dependencies (install log: $log)"
echo "gpu_check.sh: installed in ${SECONDS} s; $(left) s left for the check"

remaining=$(left)
[ "$remaining" -gt 60 ] || die "only $remaining s left of GPU_CHECK_LIMIT=$limit after the install"
# The check plans its own end 20 s before the limit; timeout is the backstop.
status=0
timeout --kill-after=10 "$remaining" "$venv/bin/python" -m bench.gpu_check \
    --out "$json" --work "$work/transport" --deadline $((remaining - 20)) "$@" || status=$?
echo "gpu_check.sh: exit $status after ${SECONDS} s; result in $json"
exit "$status"
