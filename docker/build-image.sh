#!/usr/bin/env bash
# Build the FedPhD image (docker/Dockerfile), optionally offline from a local wheel directory.
#
#   docker/build-image.sh [--tag TAG] [--base IMAGE] [--wheelhouse DIR] [DOCKER BUILD ARGS...]
#
# --wheelhouse DIR: a folder of wheels for every dependency (make one on a connected machine
#   with `pip download -d DIR torch==2.14.1 torchvision==0.29.1 setuptools .`); it is served
#   on a loopback port for the length of the build and pip reads nothing else, so no copy of
#   the wheels ends up in an image layer or in the build context.
# --base IMAGE: the base image (default python:3.11-slim; e.g. a CUDA base or a local one).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=fedphd:latest
base=""
wheelhouse=""
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --wheelhouse) wheelhouse=$2; shift 2 ;;
        *) break ;;
    esac
done

args=(-f docker/Dockerfile -t "$tag")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")

server=""
cleanup() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || { echo "build-image: no such folder: $wheelhouse" >&2; exit 2; }
    # A fixed port: the URL is a build argument, and a new one would defeat the layer cache.
    port=${FEDPHD_WHEELHOUSE_PORT:-38765}
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then
        echo "build-image: port $port is taken; set FEDPHD_WHEELHOUSE_PORT to a free one" >&2
        exit 2
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 50); do  # at most 5 s for the server to listen
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
        sleep 0.1
    done
    kill -0 "$server" 2>/dev/null || { echo "build-image: cannot serve $wheelhouse on port $port" >&2; exit 2; }
    # The build's RUN steps share the host's network to reach the loopback server.
    args+=(--network host --build-arg "WHEELHOUSE=http://127.0.0.1:$port/")
fi

# The classic builder: Debian's docker.io has no buildx, and it needs no entitlement for
# --network host. Set DOCKER_BUILDKIT=1 to use BuildKit where it is installed.
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build "${args[@]}" "$@" .
