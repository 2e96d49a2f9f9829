#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made without an image registry: debootstrap
# a minimal root file system from Debian's mirror, pack it, `docker import` it.
#
#   docker/debian-base.sh [TAG]        (default fedphd-base:bookworm; needs root + debootstrap)
#
# The packed root file system is kept in $FEDPHD_CACHE (default build/compose-test, ~60 MB),
# since debootstrap takes minutes and the import seconds; delete it to start from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-fedphd-base:bookworm}
cache=${FEDPHD_CACHE:-build/compose-test}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball=$cache/debian-bookworm-python3.tar.gz
# python3-venv: the image makes its own venv; openssl: docker/make-certs.sh.
packages=python3,python3-venv,openssl,ca-certificates

if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    # An interrupted debootstrap may leave its /proc and /sys mounted: unmount before deleting.
    trap 'umount "$root/proc" "$root/sys" 2>/dev/null || true; rm -rf "$root"' EXIT
    echo "debian-base: debootstrap bookworm into $root (a few minutes)"
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    tar -C "$root" -czf "$tarball.part" . && mv "$tarball.part" "$tarball"
fi
docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$tag" >/dev/null
echo "debian-base: $tag from $tarball"
