#!/usr/bin/env bash
# Make sure this machine has a running Docker engine, Compose (v2 plugin or v1
# docker-compose) and debootstrap; idempotent. What is missing comes from Debian's packages
# (docker.io, docker-compose, debootstrap), and an engine that does not answer is started in
# the background (log: $FEDPHD_DOCKERD_LOG, default /var/log/fedphd-dockerd.log).
# Exit 0: ready. Exit 3: it cannot be made ready here (not root, no apt); why is on stderr.
set -euo pipefail

log=${FEDPHD_DOCKERD_LOG:-/var/log/fedphd-dockerd.log}

cannot() { echo "ensure-engine: $*" >&2; exit 3; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
    || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)

if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || cannot "${missing[*]} missing and installing needs root"
    command -v apt-get >/dev/null || cannot "${missing[*]} missing and no apt-get to install them"
    echo "ensure-engine: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
    exit 0
fi
[ "$(id -u)" = 0 ] || cannot "the Docker engine is not running and starting it needs root"
echo "ensure-engine: starting dockerd (log: $log)"
# setsid: the engine outlives this script and the test run that called it.
setsid nohup dockerd >>"$log" 2>&1 </dev/null &
for _ in $(seq 120); do  # at most 60 s
    docker info >/dev/null 2>&1 && exit 0
    sleep 0.5
done
tail -20 "$log" >&2
cannot "dockerd did not answer within 60 s"
