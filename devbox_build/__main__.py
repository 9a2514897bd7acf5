"""``devbox-build`` and ``python -m devbox_build``: a no-op rebuild answered from its stamp
(noop.py), else the command line (cli.py), watched so that it can leave one."""

from __future__ import annotations

import sys

from . import noop


def main() -> None:
    argv = sys.argv[1:]
    try:
        if noop.fast_path(argv):
            return
    except KeyboardInterrupt:
        print("interrupted (SIGINT): nothing was tagged", file=sys.stderr)
        sys.exit(130)
    noop.watch(argv)
    from .cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
