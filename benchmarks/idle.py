"""The idle watcher's cost and its detection latency, printed side by side.

    python benchmarks/idle.py            # overhead over 10 minutes, latency over 3 rounds
    python benchmarks/idle.py --quick    # overhead over 1 minute
    python benchmarks/idle.py --against 2057d35   # also the watcher of that commit, side by side

Contenders: the default check interval (60 s) and a short one (5 s); with --against, the same
two intervals run by the watcher of an earlier commit (its stand-alone script, started in a
container of the same image), all four over the same minutes.
  overhead   CPU (% of one core) and memory (RSS) of the watcher in an idle container running
             JupyterLab, both containers side by side over the same minutes
  latency    activity ends at a known instant (a keep-alive that expires), timeout 10 s:
             seconds from that instant to the watcher's action and to the container's exit;
             rounds interleave the contenders; min and median

Needs a running engine and the default CPU image (scripts/provision.sh; devbox-build build).
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devbox_build.engine import Engine  # noqa: E402

IMAGE = "devbox/datascience:cpu"
CONTENDERS = {"interval 60 s (default)": "60s", "interval 5 s": "5s"}
TIMEOUT = 10.0
USER = (1000, 100)


def shell(engine: Engine, container: str, command: str) -> str:
    exec_id = engine.api.exec_create(container, ["sh", "-c", command])
    return engine.api.exec_start(exec_id).decode()


def watcher_sample(engine: Engine, container: str) -> tuple[float, int]:
    """The watcher's CPU seconds so far and its RSS in KiB."""
    out = shell(engine, container, "pid=$(cat /tmp/devbox-idle/watch.lock);"
                " cat /proc/$pid/stat; grep VmRSS /proc/$pid/status; getconf CLK_TCK")
    stat, rss, ticks = out.strip().splitlines()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / int(ticks), int(rss.split()[1])


OLD_SCRIPT = "devbox_build/dockerfile/bin/devbox-idle"  # where the watcher lived before


def old_watcher(commit: str) -> bytes:
    return subprocess.run(["git", "show", f"{commit}:{OLD_SCRIPT}"], cwd=ROOT, check=True,
                          capture_output=True).stdout


def overhead(engine: Engine, seconds: float, against: str | None) -> dict[str, tuple[float, float]]:
    containers = {}
    contenders = {name: (interval, None) for name, interval in CONTENDERS.items()}
    if against:
        script = old_watcher(against)
        contenders.update({f"{name}, watcher of {against}": (interval, script)
                           for name, interval in CONTENDERS.items()})
    try:
        for name, (interval, script) in contenders.items():
            environment = {"DEVBOX_IDLE_ACTION": "stop", "DEVBOX_IDLE_TIMEOUT": "24h",
                           "DEVBOX_IDLE_INTERVAL": interval}
            if script is None:
                containers[name] = engine.start(IMAGE, environment=environment)
                continue
            # The image's own watcher stays off (action none); the old one watches instead.
            container = engine.start(IMAGE, environment={"DEVBOX_IDLE_ACTION": "none"},
                                     files={"/tmp/devbox-idle-old": (script, *USER)})
            exec_id = engine.api.exec_create(
                container, ["/usr/bin/python3", "-I", "/tmp/devbox-idle-old", "watch",
                            "--detach"], environment=environment, user="1000")
            engine.api.exec_start(exec_id)
            containers[name] = container
        while not all(_has_watcher(engine, c) for c in containers.values()):
            time.sleep(0.5)
        before = {name: watcher_sample(engine, c) for name, c in containers.items()}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {name: watcher_sample(engine, c) for name, c in containers.items()}
        return {name: ((after[name][0] - before[name][0]) / elapsed * 100, after[name][1] / 1024)
                for name in containers}
    finally:
        for container in containers.values():
            engine.remove(container)


def _has_watcher(engine: Engine, container: str) -> bool:
    return shell(engine, container, "cat /tmp/devbox-idle/watch.lock 2>/dev/null").strip() != ""


def latency(engine: Engine, interval: str) -> tuple[float, float]:
    """Seconds from the end of activity to the watcher's action, and to the container's exit."""
    ends = time.time() + 8
    container = engine.start(IMAGE, ["sleep", "infinity"], environment={
        "DEVBOX_IDLE_ACTION": "stop", "DEVBOX_IDLE_TIMEOUT": f"{TIMEOUT:g}s",
        "DEVBOX_IDLE_INTERVAL": interval},
        files={"/tmp/devbox-keep-alive": (f"{ends:.3f}\n".encode(), *USER)})
    try:
        engine.wait(container, timeout=600)
        logs = engine.logs(container)
        acted = float(re.search(r"acting at epoch ([\d.]+)", logs).group(1))
        finished = engine.state(container)["FinishedAt"]
        exited = datetime.datetime.fromisoformat(finished[:26].rstrip("Z") + "+00:00")
        return acted - ends, exited.timestamp() - ends
    finally:
        engine.remove(container)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="overhead over 1 minute, not 10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="COMMIT",
                        help="also measure the watcher of this earlier commit, side by side")
    args = parser.parse_args()
    engine = Engine.connect()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name, interval in CONTENDERS.items():
            samples[name].append(latency(engine, interval))
    costs = overhead(engine, 60 if args.quick else 600, args.against)
    names = list(costs)
    print(f"| figure | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    print(f"| watcher CPU, idle JupyterLab container, {'1' if args.quick else '10'} min "
          f"(% of one core) | " + " | ".join(f"{costs[n][0]:.3f}%" for n in names) + " |")
    print("| watcher memory (RSS) | " + " | ".join(f"{costs[n][1]:.1f} MiB" for n in names)
          + " |")
    for index, label in ((0, "action"), (1, "container exited")):
        cells = []
        for name in names:
            values = [sample[index] for sample in samples.get(name, [])]
            cells.append(f"{min(values):.1f} / {statistics.median(values):.1f} s" if values
                         else "-")
        print(f"| activity ended → {label}, timeout {TIMEOUT:g} s (min / median of "
              f"{args.rounds}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
