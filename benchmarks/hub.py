"""Spawn-to-ready through a real JupyterHub, against the laptop start, side by side.

    python benchmarks/hub.py             # 3 rounds
    python benchmarks/hub.py --rounds 5

Each round, interleaved:
  laptop start       `docker run` of the default CPU image → JupyterLab's /api/status answers
                     (benchmarks/run.py's figure)
  hub spawn          a new user's spawn request → /user/NAME/lab answering through the hub's
                     OAuth (DockerSpawner, configurable-http-proxy; tests/support/hub.py), with a
                     fresh home volume
Reported: min / median per figure, and the ratio of the medians.

Needs root, a running engine, the default CPU image, and the hub's proxy (scripts/provision.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import header, min_median  # noqa: E402
from run import start_to_status  # noqa: E402

from devbox_build.engine import Engine  # noqa: E402
from tests.support.hub import Hub  # noqa: E402

IMAGE = "devbox/datascience:cpu"


def hub_spawn(hub: Hub, user: str) -> float:
    session = hub.login(user)
    started = time.monotonic()
    hub.open_lab(session, user)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = Engine.connect()
    users = tuple(f"user{n}" for n in range(args.rounds))
    laptop, spawned = [], []
    with tempfile.TemporaryDirectory() as scratch, Hub(engine, IMAGE, Path(scratch),
                                                       users=users) as hub:
        for user in users:  # interleaved: each round measures both
            laptop.append(start_to_status(engine, IMAGE, studio=False))
            spawned.append(hub_spawn(hub, user))

    print(header(args.rounds))
    print(f"| laptop: `docker run` → /api/status 200 | {min_median(laptop)} |")
    print(f"| hub: spawn → /user/NAME/lab through OAuth | {min_median(spawned)} |")
    print(f"| ratio of the medians (hub ÷ laptop) | "
          f"{statistics.median(spawned) / statistics.median(laptop):.1f}× |")


if __name__ == "__main__":
    main()
