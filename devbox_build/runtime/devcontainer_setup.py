"""devbox-devcontainer-setup: run once when a dev container of this image is created (the
image's `devcontainer.metadata` label names it as onCreateCommand), so a plain {"image": ...}
opens as well as a project does.

- The Dev Container CLI gives the container user the host user's uid and gid
  (updateRemoteUserUID). With a host gid other than the image's (100, `users`), it renumbers that
  group, and the environments (/opt/venv, /opt/conda) and /data keep the old number: `pip install`
  would fail. The user joins a group of the old number instead (`devbox-env`), which costs one
  line in /etc/group: changing the group of every file would copy the whole environment into
  the container's layer (about a minute and most of a GB). Sessions started after this one
  (VS Code's, each `docker exec`) have the group.
- A workspace the container user cannot write (a host user the CLI does not remap, e.g. root)
  is reported with what to do, instead of failing later on the first save.

Safe to run again; never fails the container's creation.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess

from . import contract
from .log import Messages

SHARED = (contract.VENV, "/opt/conda", contract.DATA)

say = Messages("devbox")


def image_gid() -> int:
    try:
        with open(contract.MANIFEST) as handle:
            return int(json.load(handle)["user"]["gid"])
    except (OSError, KeyError, ValueError, TypeError):
        return contract.GID


ENV_GROUP = "devbox-env"


def group_name(gid: int, group_file: str = "/etc/group") -> str | None:
    try:
        with open(group_file) as handle:
            for line in handle:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 3 and parts[2] == str(gid):
                    return parts[0]
    except OSError:
        pass
    return None


def join_the_environments_group() -> None:
    """Make the user a member of the group that owns the environments, when the CLI renumbered
    the user's own group away from it."""
    old = image_gid()
    if old in set(os.getgroups()) | {os.getgid()}:
        return
    owned = [path for path in SHARED if os.path.exists(path) and os.stat(path).st_gid == old]
    if not owned:
        return
    user = pwd.getpwuid(os.getuid()).pw_name
    name = group_name(old)
    steps = [] if name else [["groupadd", "--gid", str(old), ENV_GROUP]]
    steps.append(["usermod", "--append", "--groups", name or ENV_GROUP, user])
    for step in steps:
        result = subprocess.run(["sudo", "-n", *step], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            say(f"could not give {user} the group of {', '.join(owned)} (gid {old}): "
                f"{' '.join(step)}: {result.stderr.strip()}; installs there may fail")
            return
    say(f"{user} joined group {name or ENV_GROUP} (gid {old}), which owns {', '.join(owned)}: "
        "your host group renumbered the image's; new terminals can install there")


def check_workspace() -> None:
    workspace = os.getcwd()
    if os.access(workspace, os.W_OK):
        return
    owner = os.stat(workspace).st_uid
    say(f"the workspace {workspace} is not writable for uid {os.getuid()}: it belongs to uid "
        f"{owner} on the host{' (root)' if owner == 0 else ''}, and the Dev Container CLI maps "
        "the container user only onto a non-root host user. Open the folder as your own "
        "(non-root) user, or give it to the container user on the host: "
        f"sudo chown -R {os.getuid()}:{os.getgid()} <the folder>")


def main(argv: list) -> int:
    try:
        join_the_environments_group()
        check_workspace()
    except Exception as exc:  # never block the container from opening
        say(f"setup skipped: {exc}")
    return 0

