"""Layers from the lock: what a one-pin change costs, devbox-build against hand-written Dockerfiles.

    python benchmarks/layers.py                 # 3 rounds (~30 min on 2 cores)
    python benchmarks/layers.py --rounds 1
    python benchmarks/layers.py --scale         # only the 20 / 100 / 300 package series
    python benchmarks/layers.py --before        # against itself with one layer per lock
    python benchmarks/layers.py --chain         # against the chain mechanism (--mechanism chain)
    python benchmarks/layers.py --push          # only the push after a leaf change

Contenders, on equal footing (same base, apt packages, cleanup, CA and lock; bytecode compiled):
devbox-build (grouped install layers, assembled: what `build` does), a hand-written `pip install -r` Dockerfile and a
hand-written `uv pip install` one (benchmarks/_handwritten.py). Each round, interleaved (each
stage runs every contender before the next stage, in an order that rotates per round; with
--before, each contender runs its stages in a row, see rounds()):

  cold            build with no cache (the default CPU stack plus a tqdm leaf)
  leaf one-pin    tqdm moved to another version, locked, rebuilt
  numpy one-pin   numpy (foundational: most of the stack stands on it) moved, rebuilt

The versions are drawn at random per run, so no run can hit a cache an earlier one left. Also
reported for devbox-build: its layer count, how many layers below the changed one kept their
ids, and the bytes a loopback registry (Debian's docker-registry) received when the image was
pushed again after the leaf change, against the compressed size of every layer that changed (the
moved pin's group and the final layers, from the pushed manifests).

Each contender builds FROM a base of its own (the base under a label of its own: another image
id, no new layer; the classic builder continues a cached step from the newest matching child of
an image), and devbox-build's copies get a user id of their own per run: its layers are
reproducible, so an image another run left in the engine would otherwise hold its chains, and
a "cold" build would skip loading them.

Needs a running engine and the base image (scripts/provision.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _handwritten import DOCKERFILES, build_handwritten, copy_spec, own_base, timed  # noqa: E402

from devbox_build import locking  # noqa: E402
from devbox_build.build import BuildOptions, build  # noqa: E402
from devbox_build.engine import Engine  # noqa: E402
from devbox_build.hostca import host_ca_certificates  # noqa: E402
from devbox_build.spec import load_spec  # noqa: E402

CA_CERTS = host_ca_certificates()
OURS = "devbox-build"
# devbox-build with every lock in one layer: how it built before layers came from the lock.
BEFORE = "devbox-build, one layer per lock"
# The same groups as one Dockerfile RUN each (build --mechanism chain), as build did before.
CHAIN = "devbox-build, chain"
CONTENDERS = (OURS, *DOCKERFILES)
STAGES = ("cold", "leaf one-pin", "numpy one-pin")
# Versions every pin of the default stack resolves with (checked when this was written).
TQDM = ("4.60.0", "4.62.3", "4.64.1", "4.65.0", "4.66.1", "4.66.6", "4.67.0", "4.67.1")
NUMPY = ("2.3.3", "2.3.5", "2.4.0", "2.4.2", "2.4.4", "2.4.5")
# The scale series: a small stack, the default one, and the default one with a wide tail.
SCALE_EXTRA = {
    "≈20": ["requests", "rich", "click", "httpx", "pydantic", "python-dateutil"],
    "≈300": ["sphinx", "black", "mypy", "sqlalchemy", "polars", "scikit-image", "statsmodels",
             "seaborn", "plotly", "bokeh", "dask[complete]", "streamlit", "fastapi", "uvicorn",
             "nltk", "openpyxl", "lightgbm", "sympy", "networkx", "pre-commit", "hypothesis",
             "tox", "jupytext", "papermill", "great-tables", "altair", "mlflow", "prefect"],
}


class Stack:
    """One contender's copy of the spec, and how its pins are moved."""

    def __init__(self, scratch: Path, name: str, contender: str, extra: list[str] | None = None,
                 small: bool = False, base: str | None = None) -> None:
        self.contender = contender
        self.folder = copy_spec(scratch, name)
        self.base = base  # a base of its own (own_base), removed with the stack
        if base:
            spec_file = self.folder / "image.toml"
            spec_file.write_text(re.sub(r'(?m)^base = "[^"]*"$', f'base = "{base}"',
                                        spec_file.read_text()))
            # The apt lock names the base it was resolved on: without it, apt installs the
            # mirror's versions of the day, as the hand-written Dockerfiles do.
            for apt_lock in self.folder.glob("locks/*/apt.txt"):
                apt_lock.unlink()
        if contender == BEFORE:
            # Another uid too: its os step differs, so the two never share a cache chain (two
            # cold builds of one os step leave two candidates, and the classic builder may
            # continue from either).
            with (self.folder / "image.toml").open("a") as spec_file:
                spec_file.write("\n[layers]\nmax_per_lock = 1\n[user]\nuid = 1001\n")
        if contender == CHAIN:  # its own uid for the same reason
            with (self.folder / "image.toml").open("a") as spec_file:
                spec_file.write("\n[user]\nuid = 1002\n")
        if contender == OURS:  # a cold build loads every layer (see the module's docstring)
            with (self.folder / "image.toml").open("a") as spec_file:
                spec_file.write(f"\n[user]\nuid = {random.randrange(2000, 60000)}\n")
        self.spec_inputs = self.folder / "requirements.in"
        if small:
            self.spec_inputs.write_text("")
            (self.folder / "dev.in").write_text("")
        inputs = self.spec_inputs.read_text()
        self.base_inputs = inputs + "".join(f"{line}\n" for line in extra or [])
        self.image = ""
        self.built: list[str] = []  # every image id this stack made, removed at the end

    def pin(self, tqdm: str, numpy: str | None = None) -> None:
        lines = [f"tqdm=={tqdm}"] + ([f"numpy=={numpy}"] if numpy else [])
        self.spec_inputs.write_text(self.base_inputs + "".join(f"{line}\n" for line in lines))
        locking.lock(load_spec(self.folder))

    def build(self, engine: Engine, *, no_cache: bool = False) -> str:
        spec = load_spec(self.folder)
        if self.contender in (OURS, BEFORE, CHAIN):
            mechanism = "chain" if self.contender == CHAIN else "assembled"
            [result] = build(spec, ["cpu"], engine, BuildOptions(
                ca_certificates=CA_CERTS, no_cache=no_cache, mechanism=mechanism))
            self.image = result.content_tag
        else:
            top = locking.stack(spec, "cpu", "linux/amd64")[-1].path(spec)
            self.image = build_handwritten(
                engine, self.contender, top.read_bytes(),
                base=self.base or spec.variants["cpu"].base,
                apt=spec.system.packages, ca_certs=CA_CERTS, no_cache=no_cache)
        self.built.append(engine.image_id(self.image))
        return self.image

    def remove(self, engine: Engine) -> None:
        for image_id in reversed(self.built):
            engine.remove_image(image_id)
        if self.base:
            engine.remove_image(self.base)


def layer_ids(engine: Engine, ref: str) -> list[str]:
    """The image's filesystem layers (diff ids), bottom first."""
    return engine.image(ref)["RootFS"]["Layers"]


def kept_below(before: list[str], after: list[str]) -> int:
    kept = 0
    for old, new in zip(before, after):
        if old != new:
            break
        kept += 1
    return kept


def filesystem_layers(engine: Engine, ref: str) -> int:
    return len(engine.image(ref)["RootFS"]["Layers"])


def blobs(registry: Path) -> dict[str, int]:
    """The registry's stored blobs (layers, configs, manifests): path → bytes."""
    return {str(path): path.stat().st_size
            for path in (registry / "data").rglob("data") if path.is_file()}


def push_after_leaf(engine: Engine, scratch: Path, tqdm: list[str]) -> dict:
    """Push the cold image, move the leaf, rebuild, push again: what the registry received, and
    the compressed size of every layer the second image has and the first has not."""
    from tests.support.registry import LoopbackRegistry

    (scratch / "registry").mkdir()
    stack = Stack(scratch, "push", OURS)
    figures, layers = {}, {}
    with LoopbackRegistry(scratch / "registry") as registry:
        for step, version in (("cold", tqdm[0]), ("leaf", tqdm[1])):
            stack.pin(version)
            stack.build(engine, no_cache=step == "cold")
            ref = f"{registry.host}/bench/push:{step}"
            engine.tag(engine.image_id(stack.image), ref)
            before = blobs(scratch / "registry")
            lines = list(engine.push(ref))
            added = {path: size for path, size in blobs(scratch / "registry").items()
                     if path not in before}
            figures[step] = sum(added.values())
            layers[step] = manifest_layers(scratch / "registry", lines)
            engine.untag(ref)
    changed = {digest: size for digest, size in layers["leaf"].items()
               if digest not in layers["cold"]}
    figures["changed layers"] = sum(changed.values())
    figures["changed count"] = len(changed)
    stack.remove(engine)
    return figures


def manifest_layers(registry: Path, push_lines: list[str]) -> dict[str, int]:
    """The pushed manifest's layers (digest → compressed bytes), from the registry's own copy."""
    digest = next(match[1] for line in push_lines
                  if (match := re.search(r"digest: sha256:([0-9a-f]{64})", line)))
    manifest = next((registry / "data").rglob(f"sha256/{digest[:2]}/{digest}/data"))
    return {layer["digest"]: layer["size"] for layer in json.loads(manifest.read_text())["layers"]}


def rounds(engine: Engine, count: int, scratch: Path, contenders: tuple[str, ...]) -> dict:
    rng = random.Random()
    times: dict[tuple[str, str], list[float]] = {}
    notes: dict[str, list] = {"kept": [], "layers": [], "pins": []}
    for number in range(count):
        tqdm = rng.sample(TQDM, 2)
        numpy = rng.choice(NUMPY)
        notes["pins"].append(f"tqdm {tqdm[0]} → {tqdm[1]}, numpy → {numpy}")
        shift = number % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        base = load_spec(ROOT / "images" / "datascience").variants["cpu"].base
        stacks = {c: Stack(scratch, f"r{number}-{i}", c,
                           base=own_base(engine, base, f"r{number}-{i}"))
                  for i, c in enumerate(contenders)}
        # With --before both contenders are devbox-build, whose first steps are the same: the
        # classic builder continues a cached chain from the newest matching step, so a cold
        # (no-cache) build of one would send the other's next build down its chain. There each
        # contender runs its three stages in a row instead.
        in_a_row = BEFORE in contenders or CHAIN in contenders
        plan = ([(stage, c) for c in order for stage in STAGES] if in_a_row
                else [(stage, c) for stage in STAGES for c in order])
        for stage, contender in plan:
            stack = stacks[contender]
            before = layer_ids(engine, stack.image) if stack.image else []
            if stage == "cold":
                stack.pin(tqdm[0])
            elif stage == "leaf one-pin":
                stack.pin(tqdm[1])
            else:
                stack.pin(tqdm[1], numpy)
            seconds, image = timed(lambda: stack.build(engine, no_cache=stage == "cold"))
            times.setdefault((contender, stage), []).append(seconds)
            if contender == OURS and before:
                after = layer_ids(engine, image)
                notes["kept"].append(f"{stage}: {kept_below(before, after)} of {len(after)} "
                                     "layers kept")
            if contender == OURS and stage == "cold":
                notes["layers"].append(filesystem_layers(engine, image))
            print(f"round {number + 1} {stage:14} {contender:16} {seconds:6.1f} s",
                  file=sys.stderr)
        for stack in stacks.values():
            stack.remove(engine)
    return {"times": times, **notes}


def scale(engine: Engine, scratch: Path) -> list[tuple[str, ...]]:
    rng = random.Random()
    rows = []
    for label, extra, small in (("≈20", SCALE_EXTRA["≈20"], True), ("≈100", [], False),
                                ("≈300", SCALE_EXTRA["≈300"], False)):
        tqdm = rng.sample(TQDM, 2)
        cells = []
        for contender in (OURS, "pip install -r"):
            stack = Stack(scratch, f"scale-{len(rows)}-{contender[:3]}", contender, extra, small)
            stack.pin(tqdm[0])
            cold, _ = timed(lambda: stack.build(engine, no_cache=True))
            stack.pin(tqdm[1])
            leaf, _ = timed(lambda: stack.build(engine))
            cells.append(f"{leaf:.1f} s / {cold:.0f} s = {leaf / cold:.2f}")
            if contender == OURS:
                spec = load_spec(stack.folder)
                packages = len(locking.read_pins(locking.stack(spec, "cpu", "linux/amd64")[-1]
                                                 .path(spec)))
            stack.remove(engine)
        rows.append((f"{label} ({packages} packages): leaf one-pin / cold", *cells))
    return rows


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", action="store_true", help="only the scale series")
    parser.add_argument("--before", action="store_true",
                        help="devbox-build against itself with one layer per lock (as before)")
    parser.add_argument("--chain", action="store_true",
                        help="build (assembled) against the same groups as one Dockerfile RUN "
                             "each (--mechanism chain)")
    parser.add_argument("--push", action="store_true",
                        help="only the push to a loopback registry after a leaf change")
    args = parser.parse_args()
    engine = Engine.connect()
    with tempfile.TemporaryDirectory(prefix="devbox-bench-layers-") as scratch:
        scratch = Path(scratch)
        # Its own layer cache, removed with the scratch folder: nothing from an earlier run.
        os.environ["XDG_CACHE_HOME"] = str(scratch / "cache")
        if args.push:
            pushed = push_after_leaf(engine, scratch, random.Random().sample(TQDM, 2))
            print_push(pushed)
            return
        if args.scale:
            rows = scale(engine, scratch)
            print("\n| stack | devbox-build | pip install -r |\n|---|---|---|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
            return
        contenders = ((OURS, BEFORE) if args.before else (OURS, CHAIN) if args.chain
                      else CONTENDERS)
        result = rounds(engine, args.rounds, scratch, contenders)
        pushed = None if args.before or args.chain else push_after_leaf(
            engine, scratch, random.Random().sample(TQDM, 2))
    times = result["times"]
    print(f"\n{args.rounds} rounds, min / median. Pins moved: {'; '.join(result['pins'])}")
    print("\n| figure | " + " | ".join(contenders) + " |\n|---|" + "---|" * len(contenders))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(spread(times[(c, stage)]) for c in contenders) + " |")
    for stage in STAGES[1:]:
        ratios = {c: [a / b for a, b in zip(times[(c, stage)], times[(c, "cold")])]
                  for c in contenders}
        print(f"| {stage} ÷ cold | " + " | ".join(
            f"{min(r):.2f} / {statistics.median(r):.2f}" for r in ratios.values()) + " |")
    if "uv pip install" in contenders:  # the cold build against uv's, within each round
        print("| cold ÷ uv pip install, per round | " + " | ".join(
            ", ".join(f"{a / b:.2f}" for a, b in zip(times[(c, "cold")],
                                                     times[("uv pip install", "cold")]))
            for c in contenders) + " |")
    print(f"\ndevbox-build: {result['layers'][0]} filesystem layers; "
          + "; ".join(result["kept"][:2]))
    if pushed is not None:
        print_push(pushed)


def print_push(pushed: dict) -> None:
    print(f"push after the leaf change: {pushed['leaf'] / 1e6:.2f} MB received "
          f"(first push {pushed['cold'] / 1e6:.0f} MB); the {pushed['changed count']} changed "
          f"layers compressed: {pushed['changed layers'] / 1e6:.2f} MB; ratio "
          f"{pushed['leaf'] / pushed['changed layers']:.2f}")


if __name__ == "__main__":
    main()
