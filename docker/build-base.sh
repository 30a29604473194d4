#!/usr/bin/env bash
# Build a local base image for docker/Dockerfile without any registry: debootstrap a
# minimal Debian with Python 3 from Debian's own packages and `docker import` it.
#
#   sudo docker/build-base.sh [TAG]          # TAG defaults to ringfeed-base:bookworm
#   docker compose -f docker/compose.yaml build   # with RINGFEED_BASE_IMAGE=ringfeed-base:bookworm
#
# For hosts that cannot reach Docker Hub (or must not). Needs root (debootstrap),
# debootstrap and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org). Does
# nothing when TAG already exists, so CI can call it on every run.
set -euo pipefail

TAG="${1:-ringfeed-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" > /dev/null 2>&1; then
    echo "$TAG already exists; leaving it alone"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-base.sh: debootstrap needs root; run it with sudo" >&2
    exit 1
fi
command -v debootstrap > /dev/null || { echo "build-base.sh: install debootstrap first" >&2; exit 1; }

root="$(mktemp -d /tmp/ringfeed-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR"
# An image needs no package lists, caches or docs: they are a third of the tree.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/*
# `docker import` keeps no metadata, so set what a base image usually carries.
tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE with python3, python3-venv, ca-certificates" \
    - "$TAG"
echo "built $TAG"
