"""Every fact the image and the host share, defined once.

The runtime reads these inside the image; render, the checks, the targets and the templates read
the same names on the host. A test fails when one of these values is written anywhere else.
"""

from __future__ import annotations

# ---- the image's user (the spec's [user] defaults: SageMaker Studio's)
USER = "sagemaker-user"
UID = 1000
GID = 100  # Debian's `users`: what SageMaker and Zero to JupyterHub (fsGid) use
HOME = "/home/sagemaker-user"
SHELL = "/bin/bash"

# ---- where things are
VENV = "/opt/venv"
DEVBOX = "/opt/devbox"
BIN = f"{DEVBOX}/bin"  # the launchers, on PATH
LIB = f"{DEVBOX}/lib"  # this package, as devbox_runtime
PACKAGE = "devbox_runtime"
MANIFEST = f"{DEVBOX}/manifest.json"  # written by the build's last step: what is installed
SBOM = f"{DEVBOX}/sbom.cdx.json"  # the same packages as a CycloneDX document (sbom.py)
BUILD_INFO = f"{DEVBOX}/build-info.json"  # what render knew: spec, user, locks, idle rules
START_HOOKS = f"{DEVBOX}/start.d"  # run at every container start, in name order
DATA = "/data"  # the data volume's mount point (dev containers, EC2 boxes)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PIP_CONFIG = f"{VENV}/pip.conf"  # the environment's own pip configuration

# The launchers in BIN: command → the module of this package whose main(argv) it runs.
COMMANDS = {
    "devbox-entrypoint": "entrypoint", "devbox-start": "hooks", "devbox-idle": "idle",
    "devbox-restore": "restore", "devbox-cron": "cron", "devbox-train": "train",
    "devbox-healthcheck": "healthcheck", "devbox-devcontainer-setup": "devcontainer_setup",
    "devbox-finalize": "finalize", "devbox-sshd": "sshd",
}
# The image's own start hooks (files in START_HOOKS): name → the command it runs.
BUILT_IN_HOOKS = {"10-restore": ["devbox-restore"], "40-sshd": ["devbox-sshd", "start"],
                  "50-idle": ["devbox-idle", "watch", "--detach"]}

# ---- the IDE server
IDE_PORT = 8888
IDE_MARKER = "/tmp/devbox-ide.json"  # the entrypoint writes the served URL; the healthcheck reads it
STUDIO_APP_TYPE = "JupyterLab"  # SAGEMAKER_APP_TYPE in a Studio JupyterLab space
STUDIO_BASE_URL = "/jupyterlab/default/"
HUB_SERVER = "jupyterhub-singleuser"  # what a JupyterHub spawner runs (the chart's cmd)
# Where JupyterLab keeps its runtime files when the home is not writable (the watcher looks there).
JUPYTER_RUNTIME_FALLBACK = "/tmp/devbox-jupyter-runtime"

# ---- training jobs
TRAINING_PEER_PORT = 47913  # the hosts of a multi-instance job wait for each other on it

# ---- idle watcher
IDLE_RULES = "/etc/devbox/idle.toml"
IDLE_STATE_DIR = "/tmp/devbox-idle"
KEEP_ALIVE_FILE = "/tmp/devbox-keep-alive"
# CPU seconds used by short-lived housekeeping (the healthcheck, `devbox-idle status`), which the
# watcher does not count as work: each adds its own at exit.
HOUSEKEEPING_CPU = "/tmp/devbox-idle/housekeeping-cpu"
INHIBIT_DIR = "/tmp/devbox-idle/inhibit"  # one file per `devbox-idle inhibit -- CMD` running
SAGEMAKER_ACTIVE_FILE = "/tmp/.sagemaker-last-active-timestamp"
HOST_CHANNEL = "/run/devbox/host"  # an EC2 box's host reads requests (poweroff) written here
# The watcher touches this in the host channel at every sample: the host powers off a box whose
# watcher went quiet (its failsafe).
HEARTBEAT = "heartbeat"

# ---- ssh into the environment (an EC2 box: SSM's tunnel reaches the host's loopback port, which
# is this one in the container): sshd runs as the image's user, only when the host put keys here.
SSH_PORT = 2222
SSH_AUTHORIZED_KEYS = f"{HOST_CHANNEL}/authorized_keys"
SSH_RUN_DIR = "/tmp/devbox-sshd"
IDLE_ACTIONS = ("none", "stop", "poweroff")
IDLE_DEFAULTS = {"timeout": "1h", "action": "none", "interval": "60s", "warn_before": "5m",
                 "cpu_percent": 5.0, "gpu_percent": 10.0}

# ---- the user's state on the home volume (relative to the home)
CRONTAB = ".config/devbox/crontab"
STATE = ".local/state/devbox"
DOTFILES = ".dotfiles"
SSH_HOST_KEY = f"{STATE}/ssh/ssh_host_ed25519_key"  # one per volume: it follows a move

# ---- image labels
LABEL_CONTENT_HASH = "devbox.content-hash"
LABEL_SPEC = "devbox.spec"
LABEL_VARIANT = "devbox.variant"
LABEL_DEVCONTAINER = "devcontainer.metadata"


def home_path(relative: str, home: str | None = None) -> str:
    """A path under the user's home (``home`` or this process's)."""
    import os

    return os.path.join(home or os.path.expanduser("~"), relative)
