#!/usr/bin/env bash
# This repository's dev container, once created: devbox-build from the workspace (editable; its
# dependencies are already in the image, locked), and the host's Docker engine for the user.
set -euo pipefail
pip install --no-deps --no-build-isolation -q -e .
# The engine is the host's (its socket is mounted): join the group that owns the socket.
gid="$(stat -c %g /var/run/docker.sock)"
getent group "$gid" >/dev/null || sudo groupadd --gid "$gid" host-docker
sudo usermod -aG "$(getent group "$gid" | cut -d: -f1)" "$(id -un)"
echo "devbox-build $(devbox-build --version 2>/dev/null | tail -1) ready; engine: $(stat -c %g /var/run/docker.sock)"
