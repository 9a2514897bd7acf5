"""The default stack built for linux/arm64 under emulation, beside its native amd64 build.

    python benchmarks/arm64.py              # 1 round (~20 min on 2 cores)
    python benchmarks/arm64.py --rounds 3

Each round builds a copy of images/datascience (CPU variant, a throwaway repository name) cold
for each platform, the order alternating per round, each with a layer cache of its own (nothing
from an earlier build): linux/amd64 natively, linux/arm64 under QEMU's emulation FROM the base's
arm64 twin (scripts/provision.sh registers the emulation and bootstraps the twin). Reported:
min / median seconds per platform and the arm64 ÷ amd64 ratio within each round.

Needs a running engine, the base image and its arm64 twin.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _handwritten import copy_spec, timed  # noqa: E402

from devbox_build.build import BuildOptions, build  # noqa: E402
from devbox_build.engine import Engine  # noqa: E402
from devbox_build.hostca import host_ca_certificates  # noqa: E402
from devbox_build.spec import load_spec  # noqa: E402

PLATFORMS = ("linux/amd64", "linux/arm64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    engine = Engine.connect()
    if not engine.can_emulate("linux/arm64"):
        sys.exit("no arm64 emulation registered: run scripts/provision.sh (as root)")
    times: dict[str, list[float]] = {platform: [] for platform in PLATFORMS}
    for number in range(args.rounds):
        order = PLATFORMS if number % 2 == 0 else PLATFORMS[::-1]
        for platform in order:
            with tempfile.TemporaryDirectory(prefix="devbox-bench-arm64-") as scratch:
                scratch = Path(scratch)
                os.environ["XDG_CACHE_HOME"] = str(scratch / "cache")  # a layer cache of its own
                folder = copy_spec(scratch, f"arm64-r{number}-{platform.split('/')[1]}")
                spec = load_spec(folder)
                options = BuildOptions(platform=platform, no_cache=True,
                                       ca_certificates=host_ca_certificates())
                seconds, results = timed(lambda: build(spec, ["cpu"], engine, options))
                times[platform].append(seconds)
                print(f"round {number + 1} {platform:12} {seconds:7.1f} s", file=sys.stderr)
                for result in results:
                    for tag in result.tags:
                        engine.untag(tag)
    print(f"\n{args.rounds} round(s), min / median, the default CPU stack built cold\n")
    print("| platform | seconds |\n|---|---|")
    for platform in PLATFORMS:
        values = times[platform]
        print(f"| {platform}{' (emulated)' if platform.endswith('arm64') else ''} | "
              f"{min(values):.0f} / {statistics.median(values):.0f} |")
    ratios = [arm / amd for arm, amd in zip(times["linux/arm64"], times["linux/amd64"])]
    print(f"| arm64 ÷ amd64, within a round | {min(ratios):.1f} / "
          f"{statistics.median(ratios):.1f} |")


if __name__ == "__main__":
    main()
