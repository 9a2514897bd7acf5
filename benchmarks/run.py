"""Speed and size figures for the default image, printed side by side.

    python benchmarks/run.py            # everything (~10 min on 2 cores; pip-compile is slow)
    python benchmarks/run.py --quick    # skip the pip-compile lock timing
    python benchmarks/run.py --checks   # only the contract-check figures (~1 min)
    python benchmarks/run.py --conda    # only the conda lock figures (seconds; no engine)
    python benchmarks/run.py --noop     # only the no-op rebuild figures (one cold build first)

Figures (goals from the build-spine issue):
  no-op rebuild              `devbox-build build` with nothing changed: the first after an
                             in-process build (the full path, which leaves a stamp), then
                             the median of 7 (answered from the stamp, noop.py)  goal ≤ 0.3 s
  size overhead              (image − base) ÷ installed payload                  goal ≤ 1.05
  lock                       uv vs pip-compile on the default stack's pip inputs
  conda lock                 the conda tests' environment, linux-64 + linux-aarch64: py-rattler,
                             and conda-lock where a conda/mamba/micromamba executable exists
  hand-written baseline      the same lock as one `pip install -r` stage, cold
One-pin rebuilds (leaf and foundational, against `pip install -r` and `uv pip install`, with
pushed bytes and a scale series) are benchmarks/layers.py.
  check suite                `devbox-build check` on the default images           goal ≤ 20 s
  start → /api/status 200    container start to JupyterLab answering, per mode    goal ≤ 3 s

Builds run on copies of images/datascience under a throwaway repository name, so they never
touch the team's tags. Needs a running engine and the base image (scripts/provision.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _handwritten import build_handwritten, copy_spec, timed  # noqa: E402

from devbox_build import conda, locking  # noqa: E402
from devbox_build.build import BuildOptions, build  # noqa: E402
from devbox_build.checks import run_checks  # noqa: E402
from devbox_build.checks.image import IDE_PORT, http_get  # noqa: E402
from devbox_build.engine import Engine  # noqa: E402
from devbox_build.hostca import host_ca_certificates  # noqa: E402
from devbox_build.spec import load_spec  # noqa: E402

CA_CERTS = host_ca_certificates()  # what the CLI trusts by default


def build_ours(engine: Engine, folder: Path, *, no_cache=False) -> str:
    [result] = build(load_spec(folder), ["cpu"], engine,
                     BuildOptions(ca_certificates=CA_CERTS, no_cache=no_cache))
    return result.content_tag


def payload_bytes(engine: Engine, ref: str, base: str) -> int:
    """Bytes the installs put on disk: the venv and devbox files, plus apt packages over the base."""
    code, venv = engine.run(ref, ["sh", "-c", "du -sb /opt/venv /opt/devbox | awk '{s+=$1} END {print s}'"])
    sizes = {}
    for image in (base, ref):
        code, out = engine.run(image, ["dpkg-query", "-W", "-f", "${Package} ${Installed-Size}\\n"],
                               entrypoint=[])
        sizes[image] = dict(line.split() for line in out.splitlines() if line.strip())
    added = sum(int(kb) * 1024 for name, kb in sizes[ref].items() if name not in sizes[base])
    return int(venv.strip()) + added


def lock_time(resolver: str) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "datascience"
        shutil.copytree(ROOT / "images" / "datascience", folder)
        shutil.rmtree(folder / "locks")
        spec = load_spec(folder)
        layer = locking.stack(spec, "cpu", "linux/amd64")[0]  # the pip layer: 100+ packages
        started = time.monotonic()
        body = locking._resolve(spec, layer, resolver, upgrade=True)
        took = time.monotonic() - started
        assert "numpy==" in body
        return took


def conda_lock_rows() -> list[tuple[str, str, str, str]]:
    """Lock the conda tests' environment (their loopback channel) for two platforms."""
    from tests.support.conda_channel import ServedChannel, build_channel

    with tempfile.TemporaryDirectory(prefix="devbox-bench-conda-") as scratch:
        scratch = Path(scratch)
        folder = scratch / "tiny"
        shutil.copytree(ROOT / "tests" / "stacks" / "tiny", folder)
        with ServedChannel(build_channel(scratch / "channel")) as channel:
            (folder / "environment.yml").write_text(
                f"channels:\n  - {channel.url}\ndependencies:\n  - greeter >=2\n"
                "  - ca-certificates\n  - farewell\n")
            with (folder / "image.toml").open("a") as spec_file:
                spec_file.write('\n[conda]\nenvironment = "environment.yml"\n')
            spec = load_spec(folder)
            [unit] = conda.stack(spec, "cpu")
            times = sorted(timed(lambda: unit.write(spec, resolver="uv", upgrade=True))[0]
                           for _ in range(5))
            rows = [("conda lock, py-rattler (2 platforms, median of 5)", f"{times[2]:.2f} s",
                     "-", "")]
            executable = next((shutil.which(n) for n in ("micromamba", "mamba", "conda")
                               if shutil.which(n)), None)
            if executable:
                took, _ = timed(lambda: subprocess.run(
                    ["conda-lock", "lock", "--conda", executable, "-f",
                     str(folder / "environment.yml"), "-p", "linux-64", "-p", "linux-aarch64",
                     "--lockfile", str(scratch / "conda-lock.yml")],
                    check=True, capture_output=True))
                rows.append((f"conda lock, conda-lock with {Path(executable).name}",
                             f"{took:.2f} s", "-", ""))
            else:
                rows.append(("conda lock, conda-lock", "not measured: no conda, mamba or "
                             "micromamba executable here", "-", ""))
    return rows


def start_to_status(engine: Engine, ref: str, studio: bool) -> float:
    """Seconds from `docker run` (create + start) to /api/status answering 200."""
    environment = {"SAGEMAKER_APP_TYPE": "JupyterLab"} if studio else {"JUPYTER_TOKEN": "bench"}
    path = "/jupyterlab/default/api/status" if studio else "/api/status"
    headers = {} if studio else {"Authorization": "token bench"}
    started = time.monotonic()
    container_id = engine.start(ref, environment=environment, publish=[IDE_PORT])
    try:
        url = f"http://127.0.0.1:{engine.published_port(container_id, IDE_PORT)}{path}"
        status, _ = http_get(url, headers=headers, timeout=60)
        assert status == 200, status
        return time.monotonic() - started
    finally:
        engine.remove(container_id)


def check_rows(engine: Engine, spec) -> list[tuple[str, str, str, str]]:
    rows = []
    variants = ["cpu"] + (["gpu"] if engine.image_id(f"{spec.repository}:gpu") else [])
    for result in build(spec, variants, engine, BuildOptions(ca_certificates=CA_CERTS)):
        _, outcomes, seconds = run_checks(result.content_tag)
        failed = sum(o.outcome == "failed" for o in outcomes)
        rows.append((f"check suite, {result.variant} ({len(outcomes)} checks, {failed} failed)",
                     f"{seconds:.1f} s", "-", "≤ 20 s"))
    for studio in (False, True):
        times = sorted(start_to_status(engine, f"{spec.repository}:cpu", studio) for _ in range(3))
        rows.append((f"start → /api/status 200, {'Studio' if studio else 'laptop'} mode (median of 3)",
                     f"{times[1]:.2f} s", "-", "≤ 3 s"))
    return rows


def no_op_rebuild(spec_folder: Path) -> tuple[float, float]:
    """The command line as a user runs it (``python -m devbox_build``, what ``devbox-build``
    runs), in a cache of its own: the first no-op (the full path), then the median of 7."""
    with tempfile.TemporaryDirectory(prefix="devbox-bench-noop-") as cache:
        environment = {**os.environ, "XDG_CACHE_HOME": cache}

        def once() -> float:
            seconds, _ = timed(lambda: subprocess.run(
                [sys.executable, "-m", "devbox_build", "build", str(spec_folder),
                 "--variant", "cpu"], env=environment, check=True, capture_output=True))
            return seconds

        full = once()
        return full, sorted(once() for _ in range(7))[3]


def print_rows(rows) -> None:
    print("\n| figure | devbox-build | hand-written Dockerfile | goal |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the pip-compile lock timing")
    parser.add_argument("--checks", action="store_true", help="only the contract-check figures")
    parser.add_argument("--conda", action="store_true", help="only the conda lock figures")
    parser.add_argument("--noop", action="store_true", help="only the no-op rebuild figures")
    args = parser.parse_args()
    if args.conda:
        print_rows(conda_lock_rows())
        return
    engine = Engine.connect()
    if args.checks:
        print_rows(check_rows(engine, load_spec(ROOT / "images" / "datascience")))
        return
    spec = load_spec(ROOT / "images" / "datascience")
    base = spec.variants["cpu"].base
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="devbox-bench-") as scratch:
        scratch = Path(scratch)
        ours = copy_spec(scratch, "ours")
        cold, ref = timed(lambda: build_ours(engine, ours, no_cache=True))
        full, noop = no_op_rebuild(ours)
        if args.noop:
            print_rows([("no-op rebuild, full path (CLI, wall)", f"{full:.2f} s", "-", ""),
                        ("no-op rebuild, from its stamp (CLI, wall, median of 7)",
                         f"{noop:.2f} s", "-", "≤ 0.3 s")])
            engine.remove_image(ref)
            return
        size = engine.size(ref) - engine.size(base)
        payload = payload_bytes(engine, ref, base)

        requirements = (ours / "locks/linux-amd64/dev.txt").read_bytes()
        hand_cold, hand_id = timed(lambda: build_handwritten(
            engine, "pip install -r", requirements, base=base, apt=spec.system.packages,
            ca_certs=CA_CERTS, no_cache=True))
        hand_size = engine.size(hand_id) - engine.size(base)
        engine.remove_image(hand_id)

    rows += [
        ("no-op rebuild, full path (CLI, wall)", f"{full:.2f} s", "-", ""),
        ("no-op rebuild, from its stamp (CLI, wall, median of 7)", f"{noop:.2f} s", "-",
         "≤ 0.3 s"),
        ("cold build", f"{cold:.0f} s", f"{hand_cold:.0f} s", ""),
        ("image size − base", f"{size / 1e6:.0f} MB", f"{hand_size / 1e6:.0f} MB", ""),
        ("(image − base) ÷ installed payload", f"{size / payload:.3f}", "-", "≤ 1.05"),
        ("lock, uv (pip layer, hashes)", f"{lock_time('uv'):.1f} s", "-", ""),
    ]
    if not args.quick:
        rows.append(("lock, pip-compile (same input)", f"{lock_time('pip-compile'):.0f} s", "-", ""))
    rows += conda_lock_rows()
    rows += check_rows(engine, spec)
    print_rows(rows)


if __name__ == "__main__":
    main()
