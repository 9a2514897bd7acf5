"""The pip groups of an image, each installed on its own and assembled onto the base steps.

Chosen by measurement over one Dockerfile RUN per group (README, Benchmarks): a group is
installed into an empty tree in a builder container of the base steps' image, normalised
(fixed mtimes, bytecode compiled against them, sorted tar, numeric owners) and kept as a layer tar
in the host's cache, keyed by everything that goes into it. The image is put together with
`docker load`, which skips every layer whose chain the engine already holds. A one-pin change
therefore installs one group; the groups above it are not installed again, only streamed in again
(same bytes, so a registry that has them is not sent them again).

    head build (classic builder)  →  docker load of the groups onto it  →  tail build FROM the
      │ os layer done                          ↑                         loaded image (classic)
      └→ groups (cache, or one builder container of the os layer's image, while the head's
         system layer builds; each group loaded ahead once the head is built)

Everything here goes through engine.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import cache, hostca, settings
from .engine import Engine, Step, StepFailed
from .errors import BuildFailed, DevboxError, EngineError, InputError
from .render import HEAD_DOCKERFILE, LAYER_MTIME, VENV, BuildContext, InstallStep, template_file
from .report import SILENT, Reporter

SCRIPT = "assemble-groups.sh"
COMPILER = "bytecode.py"  # run by SCRIPT: the groups' bytecode
WORK = "/tmp/devbox-assemble"
# The builder installs each group with uv (the default CPU stack: 10 s, where pip took 59 s), a
# static build pinned by version and wheel hash: a group's bytes depend on its installer, so
# every host runs this one. It is fetched once per host (by the uv devbox-build itself runs,
# through this host's CAs) into the cache, and copied into the builder, never into a layer.
UV_VERSION = "0.13.9"
UV_WHEELS = {  # platform → (uv's name for it, the sha256 of its wheel)
    "linux/amd64": ("x86_64-unknown-linux-musl",
                    "2c45530751517d6c3bbc69a19473f6effe47cce047bede01ffd8af7ea7b36b25"),
    "linux/arm64": ("aarch64-unknown-linux-musl",
                    "5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe"),
}
# How the builder runs it for a group (the script adds --python, --prefix and -r): no solve, only
# the hashed files, no cache or config of its own, bytecode compiled afterwards by the script.
UV_INSTALL = ("pip install --no-deps --require-hashes --no-cache --no-config --link-mode=hardlink "
              "--quiet")
# A cached layer unused this long is removed at the next assembly; so are the least recently
# used ones while the cache holds more than DEVBOX_LAYER_CACHE_MB (settings.py; a GPU stack's
# groups are ~6.5 GB; a new base or tool version makes a new set).
UNUSED_DAYS = 30
# A half-written entry (a build killed while it copied a layer out) is removed once it is this old:
# a younger one may be another build's, still being written.
PARTIAL_SECONDS = 3600
# The builder containers carry this label (host:pid of the build that made them): a build killed
# with SIGKILL cannot remove its own, so the next assembly on this host removes those whose
# build is gone.
BUILDER_LABEL = "devbox.assemble-builder"


@dataclass(frozen=True)
class GroupLayer:
    """One pip group's layer: its tar in the host's cache and its diff id."""

    step: InstallStep
    key: str
    tar: Path
    diff_id: str

    @property
    def created_by(self) -> str:
        """Its line in `docker history`: what made it, in the words of a Dockerfile step."""
        return (f"devbox-build assemble: uv {UV_INSTALL} -r "
                f"/opt/devbox/requirements/{self.step.name}.txt  # {self.step.count} packages, "
                f"from {self.step.lock}, installed on their own")


class LayerCacheError(InputError):
    """The cache folder (layers, tools) cannot be written (read-only, full, not a folder)."""


CACHE_HINT = "free space there, make it writable, or set XDG_CACHE_HOME to another folder"


class LayerCache:
    """Group layers by key: ``<key>.tar`` and ``<key>.json`` (its diff id and size) in one
    folder. A tar whose size is not the recorded one (cut short) is evicted when it is looked
    up; one whose bytes changed is found by :meth:`damaged` when the engine refuses a load."""

    def __init__(self, folder: Path | None = None, reporter: Reporter = SILENT) -> None:
        self.folder = folder or cache.folder("layers")
        self.reporter = reporter

    def get(self, step: InstallStep, key: str) -> GroupLayer | None:
        tar, meta = self.folder / f"{key}.tar", self.folder / f"{key}.json"
        try:
            record = json.loads(meta.read_text())
            diff_id = record["diff_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not tar.is_file():
            return None
        size = tar.stat().st_size
        if record.get("size") not in (None, size):
            self.evict(key, f"{tar} ({step.name}) is {size} bytes, not the {record['size']} "
                            "it was written with (cut short)")
            return None
        try:
            os.utime(meta)  # used now: kept by prune
        except OSError:
            pass  # a read-only cache still serves its layers
        return GroupLayer(step, key, tar, diff_id)

    def damaged(self, layer: GroupLayer) -> bool:
        """Whether the cached tar's bytes no longer give its diff id (evicted when so)."""
        try:
            sha256 = _sha256(layer.tar)
        except OSError:
            return True
        if f"sha256:{sha256}" == layer.diff_id:
            return False
        self.evict(layer.key, f"{layer.tar} ({layer.step.name}) does not have the digest it was "
                              "written with (changed on disk)")
        return True

    def evict(self, key: str, why: str) -> None:
        self.reporter.note(f"layer cache: {why}; removed, the group is installed again")
        for suffix in (".json", ".tar"):
            try:
                (self.folder / f"{key}{suffix}").unlink(missing_ok=True)
            except OSError:
                pass

    def writable(self) -> None:
        """Fail now, naming the folder, when layers cannot be written into it."""
        probe = self.folder / f".probe.{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise LayerCacheError(
                f"the layer cache {self.folder} cannot be written: {exc.strerror}",
                hint=CACHE_HINT) from None

    def put(self, step: InstallStep, key: str, tar: Path, sha256: str) -> GroupLayer:
        target = self.folder / f"{key}.tar"
        meta = self.folder / f"{key}.json"
        partial = self.folder / f"{key}.{os.getpid()}.json-partial"  # builds may race
        try:
            size = tar.stat().st_size
            tar.replace(target)
            partial.write_text(json.dumps({"diff_id": f"sha256:{sha256}", "group": step.name,
                                           "size": size,
                                           "requirements": list(step.requirements)}))
            partial.replace(meta)
        except OSError as exc:
            for leftover in (tar, partial, target):
                leftover.unlink(missing_ok=True)
            raise LayerCacheError(f"the layer cache {self.folder} cannot take {step.name}'s "
                                  f"layer: {exc.strerror}",
                                  hint=CACHE_HINT) from None
        return GroupLayer(step, key, target, f"sha256:{sha256}")

    def prune(self, keep: set[str]) -> None:
        """Remove layers not used for UNUSED_DAYS, then the least recently used while the cache
        is over its budget (never one of ``keep``: the build's own)."""
        budget = cache_budget()
        cutoff = time.time() - UNUSED_DAYS * 86400
        for partial in [*self.folder.glob("*.partial"), *self.folder.glob("*.json-partial"),
                        *self.folder.glob(f"{OUTBOX_PREFIX}*")]:
            try:
                if partial.stat().st_mtime < time.time() - PARTIAL_SECONDS:
                    if partial.is_dir():
                        shutil.rmtree(partial)
                    else:
                        partial.unlink()
            except OSError:
                continue
        entries = []  # (last used, key, bytes), oldest first
        for meta in self.folder.glob("*.json"):
            tar = self.folder / f"{meta.stem}.tar"
            entries.append((meta.stat().st_mtime, meta.stem,
                            tar.stat().st_size if tar.exists() else 0))
        entries.sort()
        total = sum(size for _, _, size in entries)
        for used, key, size in entries:
            if key not in keep and (used < cutoff or total > budget):
                (self.folder / f"{key}.json").unlink(missing_ok=True)
                (self.folder / f"{key}.tar").unlink(missing_ok=True)
                total -= size


def cache_budget() -> int:
    """The layer cache's size budget in bytes (DEVBOX_LAYER_CACHE_MB)."""
    return settings.value("DEVBOX_LAYER_CACHE_MB") * 1_000_000


@functools.cache
def recipe() -> str:
    """What, beyond the rendered context, decides an assembled image's layers: the installer
    script and the installer (in the content tag, so changing either builds again)."""
    return hashlib.sha256(template_file(SCRIPT) + template_file(COMPILER) + json.dumps(
        [UV_VERSION, UV_WHEELS, UV_INSTALL]).encode()).hexdigest()


def group_key(context: BuildContext, head: dict, step: InstallStep) -> str:
    """Everything a group's layer bytes depend on: the builder's image by content (its layers'
    digests and its environment, not the engine's id for it: a base rebuilt with the same bytes
    keeps every group), the requirements, the installer script and command, and where things
    go. ``head``: the builder image's inspect data."""
    below = {"layers": head["RootFS"]["Layers"], "env": sorted(head["Config"].get("Env") or [])}
    inputs = {"head": below, "platform": context.platform, "name": step.name,
              "requirements": list(step.requirements), "venv": VENV,
              "gid": context.spec.user.gid, "mtime": LAYER_MTIME, "recipe": recipe()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def builder_uv(platform: str, reporter: Reporter = SILENT) -> bytes:
    """The uv binary the builder of ``platform`` runs (UV_VERSION), from this host's cache;
    fetched there first when missing."""
    triple, sha256 = UV_WHEELS[platform]
    folder = cache.folder("tools") / f"uv-{UV_VERSION}-{triple}"
    binary = folder / "bin" / "uv"
    if binary.is_file():
        return binary.read_bytes()
    reporter.note(f"fetching uv {UV_VERSION} for {platform}, the installer of the pip groups "
                  f"(once per host: {folder})")
    try:
        _fetch_uv(folder, triple, sha256)
        return binary.read_bytes()
    except LayerCacheError as unwritable:
        # A full or read-only cache: this build fetches it for itself (the layer cache's own
        # error, if it has one, comes when a layer is written).
        reporter.note(f"{unwritable.message}; fetched for this build only")
        with tempfile.TemporaryDirectory(prefix="devbox-uv-") as scratch:
            _fetch_uv(Path(scratch) / "uv", triple, sha256)
            return (Path(scratch) / "uv" / "bin" / "uv").read_bytes()


def _fetch_uv(folder: Path, triple: str, sha256: str) -> None:
    """Install uv's wheel for ``triple``, checked against its hash, into ``folder`` (atomic)."""
    from uv import find_uv_bin

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".uv-", dir=folder.parent))
    except OSError as exc:
        raise LayerCacheError(f"the cache {folder.parent} cannot be written: {exc.strerror}",
                              hint=CACHE_HINT) from None
    try:
        requirement = scratch / "uv.txt"
        requirement.write_text(f"uv=={UV_VERSION} --hash=sha256:{sha256}\n")
        process = subprocess.run(
            [find_uv_bin(), "pip", "install", "--quiet", "--no-config", "--no-cache", "--no-deps",
             "--require-hashes", "--only-binary", ":all:", "--python", sys.executable,
             "--python-platform", triple, "--target", str(scratch / "uv"), "-r",
             str(requirement)],
            capture_output=True, text=True, check=False,
            env=hostca.resolver_environment(scratch))
        if process.returncode != 0 or not (scratch / "uv" / "bin" / "uv").is_file():
            detail = "\n".join(f"  {line}" for line in process.stderr.strip().splitlines())
            raise BuildFailed(f"could not fetch uv {UV_VERSION} ({triple}), the installer of the "
                              f"pip groups:\n{detail}",
                              hint="the package index must be reachable from this host, as it "
                                   "is for `lock`")
        (scratch / "uv").replace(folder)
    except OSError as exc:
        if not (folder / "bin" / "uv").is_file():  # else another build fetched it meanwhile
            raise LayerCacheError(f"the cache {folder.parent} cannot take uv: {exc.strerror}",
                                  hint=CACHE_HINT) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain id of each layer (the first's is its diff id; each next one hashes the one
    below with its own diff id): what an engine's layer store is keyed by."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else "sha256:" + hashlib.sha256(
            f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def builder_step(context: BuildContext) -> int:
    """The head step whose image the builder installs the groups on while the head's other steps
    build: the os layer's last step, when all the head has after it is the system layer (apt
    packages outside the venv: nothing a group's layer depends on) and every group installs
    wheels (an sdist's build may need a system package). 0: the whole head's image, once built."""
    layers = context.step_layers(HEAD_DOCKERFILE)
    if set(layers) != {"os", "system"} or any(step.from_source
                                              for step in context.assembled_steps):
        return 0
    return max(number for number, layer in enumerate(layers, start=1) if layer == "os")


class Assembly:
    """A context's pip groups: looked up in the cache and the missing ones installed in a builder
    container of the builder image (:meth:`start`, in a thread of its own, so the head's
    remaining steps build meanwhile), then put onto the head's image (:meth:`onto`).
    :meth:`close` stops a builder still running when the build fails elsewhere."""

    def __init__(self, engine: Engine, context: BuildContext, *, environment: dict[str, str],
                 network_mode: str | None, fresh: bool, reporter: Reporter,
                 layer_cache: LayerCache | None = None) -> None:
        self.engine, self.context, self.reporter = engine, context, reporter
        self.fresh = fresh  # --no-cache: install every group again, whatever the cache holds
        self.layer_cache = layer_cache or LayerCache(reporter=reporter)
        self.steps = context.assembled_steps
        self.builder_id = ""
        self.keys: list[str] = []
        self.found: dict[str, GroupLayer | None] = {}
        self._install = functools.partial(_install, engine, context, environment=environment,
                                          network_mode=network_mode,
                                          layer_cache=self.layer_cache, reporter=reporter,
                                          track=self._track)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._container = ""
        self._closed = False
        self._ahead: _LoadAhead | None = None

    @property
    def started(self) -> bool:
        return bool(self.builder_id)

    def start(self, builder_id: str) -> None:
        """Key the groups by the builder image's content and install the missing ones on it."""
        remove_orphaned_builders(self.engine, self.reporter)
        self.builder_id = builder_id
        builder = self.engine.image(builder_id)
        self.keys = [group_key(self.context, builder, step) for step in self.steps]
        self.found = {key: None if self.fresh else self.layer_cache.get(step, key)
                      for step, key in zip(self.steps, self.keys)}
        missing = [(step, key) for step, key in zip(self.steps, self.keys)
                   if self.found[key] is None]
        if cached := [step.name for step, key in zip(self.steps, self.keys)
                      if self.found[key] is not None]:
            self.reporter.note(f"{len(cached)} of the pip groups' layers from this host's cache: "
                               f"{', '.join(cached)}")
        if missing:
            self._thread = threading.Thread(target=self._run, args=(missing,),
                                            name="devbox-assemble", daemon=True)
            self._thread.start()

    def _run(self, missing: list[tuple[InstallStep, str]]) -> None:
        try:
            self._install(self.builder_id, missing, self._arrived)
        except BaseException as exc:  # noqa: BLE001  (raised in the build's thread by onto())
            self._error = exc

    def _track(self, container: str) -> None:
        """The builder container now running; stopped by close()."""
        with self._lock:
            self._container = container
            if self._closed:
                raise BuildFailed("the build stopped before the pip groups were installed")

    def _arrived(self, layer: GroupLayer) -> None:
        with self._lock:
            self.found[layer.key] = layer
            if self._ahead:
                self._ahead.load([self.found[key] for key in self.keys])

    def onto(self, head_id: str) -> str:
        """The head's image with the groups on top (waiting for the builder); its id."""
        engine, layer_cache = self.engine, self.layer_cache
        head = engine.image(head_id)
        history = engine.history(head_id)
        held = {chain for layers in engine.layer_lists("devbox.spec")
                for chain in chain_ids(layers)}
        held.update(chain_ids(head["RootFS"]["Layers"]))
        with self._lock:
            self._ahead = _LoadAhead(engine, head, history, held, self.reporter)
            self._ahead.load([self.found[key] for key in self.keys])
        image_id = ""
        try:
            if self._thread:
                self._thread.join()
            if self._error:
                raise self._error
            groups = [self.found[key] for key in self.keys]
            layer_cache.prune(set(self.keys))
            try:
                image_id = _load(engine, head, history, groups, held, self.reporter)
            except DevboxError as refused:
                # A cached tar whose bytes changed (the engine computes another digest): evict
                # it, install its group again. Else a layer this build counted on went away
                # meanwhile (an image removed): send them all.
                damaged = [(g.step, g.key) for g in groups if layer_cache.damaged(g)]
                if damaged:
                    self._install(self.builder_id, damaged,
                                  lambda layer: self.found.update({layer.key: layer}))
                    groups = [self.found[key] for key in self.keys]
                try:
                    image_id = _load(engine, head, history, groups, set(), self.reporter)
                except DevboxError as again:
                    raise type(again)(f"{again.message} (the first try: {refused.message}); "
                                      "the layers sent were "
                                      f"{', '.join(str(g.tar) for g in groups)}") from None
            return image_id
        finally:
            self._ahead.remove_partial_images(keep=image_id)

    def close(self) -> None:
        """Stop the builder if it still runs (removed, by id) and wait for its thread."""
        with self._lock:
            self._closed = True
            container = self._container
        if self._thread and self._thread.is_alive():
            if container:
                self.engine.remove(container)
            self._thread.join()


class _LoadAhead:
    """Loads the groups below the first one still installing while the builder works on (the
    engine unpacks one group while the next installs): each load is an image of the head and
    the groups so far, whose chains the final load then need not send. A partial image is
    removed once the whole one is loaded; a load that fails only ends loading ahead."""

    def __init__(self, engine: Engine, head: dict, history: list[dict], held: set[str],
                 reporter: Reporter) -> None:
        self.engine, self.head, self.history, self.held = engine, head, history, held
        self.reporter, self.partial_images, self.failed = reporter, [], False

    def load(self, groups: list[GroupLayer | None]) -> None:
        ready = []
        for group in groups:
            if group is None:
                break
            ready.append(group)
        chains = chain_ids(self.head["RootFS"]["Layers"] + [group.diff_id for group in ready])
        if self.failed or not ready or chains[-1] in self.held:
            return
        below = len(self.head["RootFS"]["Layers"])
        sent = [group.step.name for group, chain in zip(ready, chains[below:])
                if chain not in self.held]
        try:
            self.partial_images.append(
                _load(self.engine, self.head, self.history, ready, self.held, SILENT))
        except DevboxError:
            self.failed = True  # the final load sends what is not held, as it would have
            return
        self.held.update(chains)
        self.reporter.note(f"loaded {', '.join(sent)} into the engine while the builder goes on")

    def remove_partial_images(self, keep: str) -> None:
        for image_id in self.partial_images:
            if image_id != keep:
                self.engine.remove_image(image_id)


WRITTEN = "devbox-build: layer written: "  # the builder's line when a group's tar is complete
# Where the builder installs each group's tree (a tmpfs, see trees_in_memory).
TREES = f"{WORK}/trees"
# A group's installed tree with its bytecode, at most this many times its wheels (the default
# CPU stack's groups: 2.6 to 8.5 times, the most for many small pure-Python packages).
TREE_PER_WHEEL_BYTE = 10
NO_SPACE = "No space left on device"  # strerror(ENOSPC), in the installer's or tar's output


def trees_in_memory(steps: list[InstallStep], memory: int, setting: str) -> int:
    """The size of the tmpfs the builder installs the groups' trees in, 0 for its disk.

    Each tree is written, compiled, read into its tar and removed: on the container's disk
    (overlay over ext4: journal, writeback) that costs CPU time a tmpfs does not (the default
    CPU stack's cold build on 2 cores: 72 CPU-seconds and 45 s in memory, 85-98 and 52-59 s on
    disk; the same layer bytes). At most two trees exist at a time (one
    settling, the next installing), so ``auto`` takes memory when the largest two neighbours, at
    TREE_PER_WHEEL_BYTE, fit in a quarter of the engine's memory (a laptop's 8 GB VM holds the
    CPU stack's, not a GPU stack's CUDA wheels), and never for a group built from an sdist (its
    size is unknown). ``on`` takes half the engine's memory regardless."""
    if setting == "off" or not memory:
        return 0
    if setting == "on":
        return memory // 2
    if any(step.from_source for step in steps):
        return 0
    sizes = [step.wheel_bytes * TREE_PER_WHEEL_BYTE for step in steps]
    peak = max((a + b for a, b in zip(sizes, sizes[1:] + [0])), default=0)
    return memory // 2 if peak <= memory // 4 else 0


# The builder's bind mount of a folder of the host's cache, when the engine can see it.
OUTBOX = f"{WORK}/out"
OUTBOX_PREFIX = ".assemble-"


def _install(engine: Engine, context: BuildContext, builder_id: str,
             missing: list[tuple[InstallStep, str]], arrived, *, environment: dict[str, str],
             network_mode: str | None, layer_cache: LayerCache, reporter: Reporter,
             track) -> None:
    """Install the missing groups in one builder container of ``builder_id``; each group's
    layer is put in the cache and handed to ``arrived`` as soon as its tar is written.
    ``track`` is told the container's id once it exists."""
    layer_cache.writable()
    names = [step.name for step, _ in missing]
    reporter.note(f"installing {len(missing)} of the pip groups on their own: {', '.join(names)}")
    uv = builder_uv(context.platform, reporter)
    in_memory = trees_in_memory([step for step, _ in missing], engine.memory(),
                                settings.value("DEVBOX_BUILDER_TMPFS"))
    tmpfs = f"a tmpfs of at most {in_memory / 1e9:.1f} GB"
    if in_memory:
        reporter.note(f"the builder keeps its install trees in memory ({tmpfs})")
    # Where the engine runs on this host (it sees this folder: the builder finds the token in
    # it), the builder writes each tar straight into the cache; else the tars are copied out.
    token = secrets.token_hex(16)
    try:
        outbox = Path(tempfile.mkdtemp(prefix=OUTBOX_PREFIX, dir=layer_cache.folder))
        (outbox / ".probe").write_text(token)
    except OSError as exc:
        raise LayerCacheError(f"the layer cache {layer_cache.folder} cannot be written: "
                              f"{exc.strerror}", hint=CACHE_HINT) from None
    container = ""
    try:
        for folders in ({str(outbox): OUTBOX}, None):
            try:
                container = engine.create(
                    builder_id, ["/bin/sh", f"{WORK}/{SCRIPT}", WORK, VENV,
                                 str(context.spec.user.gid), str(LAYER_MTIME), OUTBOX,
                                 token if folders else "", *names],
                    user="root", entrypoint=[],
                    environment={**environment, "UV_INSTALL": UV_INSTALL},
                    network_mode=network_mode, labels={BUILDER_LABEL: _builder_owner()},
                    host_folders=folders,
                    tmpfs={TREES: f"size={in_memory},exec"} if in_memory else None)
                break
            except EngineError:
                if not folders:
                    raise
        track(container)
        files = {f"{step.name}.txt": "".join(f"{line}\n" for line in step.requirements).encode()
                 for step, _ in missing}
        engine.copy_into(container, "/", {f"{WORK[1:]}/{name}": data for name, data in
                                          {SCRIPT: template_file(SCRIPT),
                                           COMPILER: template_file(COMPILER), "uv": uv,
                                           **files}.items()})
        engine.start_created(container)
        waiting = {step.name: (step, key) for step, key in missing}
        for line in engine.follow(container):
            reporter.output(line)
            if line.startswith(WRITTEN) and line[len(WRITTEN):] in waiting:
                step, key = waiting.pop(line[len(WRITTEN):])
                arrived(_take(engine, container, outbox, step, key, layer_cache, reporter))
        code = engine.wait(container, timeout=3600)
        if code != 0 or waiting:
            output = engine.logs(container).splitlines()
            failure = StepFailed(f"the builder container exited with {code}",
                                 Step(1, 1, f"install {', '.join(names)} on their own"), output)
            if in_memory and (code == 137 or any(NO_SPACE in line for line in output)):
                failure.hint = (f"the builder kept its install trees in memory ({tmpfs}) and "
                                "ran out: build with DEVBOX_BUILDER_TMPFS=off to keep them on "
                                "its disk")
            raise failure
    finally:
        if container:
            engine.remove(container)
        shutil.rmtree(outbox, ignore_errors=True)


def _take(engine: Engine, container: str, outbox: Path, step: InstallStep, key: str,
          layer_cache: LayerCache, reporter: Reporter) -> GroupLayer:
    """Put a group's layer tar into the cache: from the outbox the builder wrote it into, or
    copied out of the builder."""
    written = outbox / f"{step.name}.tar"
    partial = layer_cache.folder / f"{key}.{os.getpid()}.partial"  # builds may race
    try:
        if written.is_file():
            written.replace(partial)
            sha256 = _sha256(partial)
        else:
            sha256 = engine.copy_file_out(container, f"{WORK}/{step.name}.tar", partial)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LayerCacheError(f"the layer cache {layer_cache.folder} cannot take "
                              f"{step.name}'s layer: {exc.strerror}",
                              hint=CACHE_HINT) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    layer = layer_cache.put(step, key, partial, sha256)
    reporter.note(f"{step.name}: {step.count} packages, layer "
                  f"{layer.tar.stat().st_size / 1e6:.1f} MB")
    return layer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _builder_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def remove_orphaned_builders(engine: Engine, reporter: Reporter) -> None:
    """Builder containers of this host whose build is gone (killed): removed, by id."""
    host = socket.gethostname()
    for container_id, owner in engine.labelled_containers(BUILDER_LABEL).items():
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its build still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's build, alive
        reporter.note(f"removing builder container {container_id[:12]} of a build that was killed "
               f"(pid {pid})")
        engine.remove(container_id)


def _load(engine: Engine, head: dict, history: list[dict], groups: list[GroupLayer],
          held: set[str], reporter: Reporter) -> str:
    """`docker load` the head's layers plus the groups' as one image; its id. Only the groups
    whose chain is not ``held`` are sent (the engine reads no other layer)."""
    diff_ids = list(head["RootFS"]["Layers"])
    chains = chain_ids(diff_ids + [group.diff_id for group in groups])
    paths = [f"held/{index}.tar" for index in range(len(diff_ids))]  # never read: held
    sent: list[tuple[str, GroupLayer]] = []
    for index, group in enumerate(groups, start=len(diff_ids)):
        paths.append(f"{group.step.name}/layer.tar")
        if chains[index] not in held:
            sent.append((paths[-1], group))
    diff_ids += [group.diff_id for group in groups]
    config = {
        "architecture": head["Architecture"], "os": head["Os"],
        **({"variant": head["Variant"]} if head.get("Variant") else {}),
        "created": head["Created"], "config": head["Config"],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": _head_history(history, len(head["RootFS"]["Layers"])) + [
            {"created": head["Created"], "created_by": group.created_by} for group in groups],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": None, "Layers": paths}]).encode()
    size = sum(group.tar.stat().st_size for _, group in sent)
    reporter.note(f"loading {len(sent)} of {len(groups)} group layers into the engine "
           f"({size / 1e6:.1f} MB; the others it holds already)")
    return engine.load(_archive([(config_name, config_bytes), ("manifest.json", manifest)]
                                + [(path, group.tar) for path, group in sent]))


def _head_history(history: list[dict], layers: int) -> list[dict]:
    """The head image's config history from the engine's history API (bottom first). Which
    entries made a layer is not in that API: the classic builder marks the others "#(nop)"
    (COPY and ADD excepted); if that does not add up to the layers, the entries are left out."""
    entries = []
    for entry in history:
        created_by = entry.get("CreatedBy") or ""
        empty = "#(nop) " in created_by and not any(
            f"#(nop) {verb}" in created_by for verb in ("COPY", "ADD"))
        entries.append({"created": _rfc3339(entry.get("Created", 0)), "created_by": created_by,
                        **({"comment": entry["Comment"]} if entry.get("Comment") else {}),
                        **({"empty_layer": True} if empty else {})})
    if sum(1 for entry in entries if not entry.get("empty_layer")) != layers:
        return [{"created_by": ""} for _ in range(layers)]
    return entries


def _rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _archive(members: list[tuple[str, bytes | Path]]) -> Iterator[bytes]:
    """A tar stream of ``members`` (name → bytes or a file), made as it is read."""
    for name, source in members:
        info = tarfile.TarInfo(name)
        info.size = len(source) if isinstance(source, bytes) else source.stat().st_size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        if isinstance(source, bytes):
            yield source
        else:
            with source.open("rb") as data:
                yield from iter(lambda: data.read(1 << 20), b"")
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
