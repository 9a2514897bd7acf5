"""devbox-start: the start hooks, run at every container start (the entrypoint runs them, and a
dev container's postStartCommand, whose entrypoint is the Dev Container CLI's own).

Every executable file in /opt/devbox/start.d runs, in name order, as the image's user, like
docker-stacks' before-notebook.d: an image that extends ours adds a step with one COPY, without
touching the entrypoint. The image's own: 10-restore (devbox-restore) and 50-idle (the idle
watcher). A hook that fails or hangs (a minute) is reported and skipped: none may keep the
container from starting.
"""

from __future__ import annotations

import os
import subprocess
import sys

from . import contract
from .log import Messages

TIMEOUT = 60

say = Messages("devbox-start")


def hooks(folder: str = contract.START_HOOKS) -> list:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    paths = [os.path.join(folder, name) for name in names if not name.startswith(".")]
    return [path for path in paths if os.path.isfile(path) and os.access(path, os.X_OK)]


def run(folder: str = contract.START_HOOKS) -> int:
    for path in hooks(folder):
        name = os.path.basename(path)
        try:
            result = subprocess.run([path], timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            say(f"start hook {name}: still running after {TIMEOUT} s; left behind")
            continue
        except OSError as exc:
            say(f"start hook {name}: skipped ({exc.strerror})")
            continue
        if result.returncode != 0:
            say(f"start hook {name}: exited {result.returncode}; the container starts anyway")
    return 0


def main(argv: list) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
