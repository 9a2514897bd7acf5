"""pip locks: requirements inputs → hashed, pip-tools-format lock files (conda: conda.py).

A variant's pip packages are locked as a *stack* of lock files, one per image layer:

* ``pip.txt``: the inputs every variant shares (``[pip] requirements``),
* ``pip-<variant>.txt``: those plus the variant's own inputs (``[variants.<v>] pip``), resolved
  with ``pip.txt`` as constraints,
* ``dev.txt`` / ``dev-<variant>.txt``: all of the above plus ``[dev] requirements``, resolved with
  the lock below as constraints.

Each lock is the *full* closure of everything at or below it, so the top lock of a stack lists
exactly what the image installs, and a layer installs only what its lock adds to the one below.
Constraining every lock by the one below is what lets the GPU variant share the CPU variant's pip
layer byte for byte: accelerator inputs cannot move a shared pin.

Each pin records the wheel this platform installs, its size and its hash (``# wheel: <bytes>
<file> sha256:<hex>``, read from the index when locking), and the packages that need it (the resolver's ``# via``): what
layers.py groups the image's install layers by, so the grouping follows from the lock alone.

Each lock starts with a header recording a digest of its inputs (input files, the lock below,
Python version, platform), and a digest of the lock file itself (``lock-sha256``, over every
other byte, header included). ``check`` recomputes both: a changed input makes a lock stale, and
a lock edited by hand or cut short by a merge is reported as that file, whatever its inputs say.

A spec that ``extends`` a devbox-built image (a project on the team's image) locks its bottom
layer with ``locks/team-constraints.txt`` as constraints: the pins every variant of that image
shares, read from the images' manifests when locking. The project cannot move a team pin, and
the file is an input like any other, so a new team image makes the project's locks stale.
"""

from __future__ import annotations

import hashlib
import os
import platform as host_platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

from . import conda
from .errors import DevboxError, LockError, SpecError
from .hostca import resolver_environment
from .report import SILENT, Reporter
from .lockunit import DIVERGED, EDITED, MISSING, STALE, Input, LockResult, LockUnit
from .spec import PLATFORMS, TEAM_CONSTRAINTS, TEAM_PYTHON_PREFIX, ImageSpec

__all__ = ["DIVERGED", "EDITED", "MISSING", "STALE", "LockResult", "PipLock", "Pin", "check",
           "divergences", "lock", "read_pins", "stack", "units"]

LOCK_FORMAT = "devbox-lock/2"  # 2: pins record their wheel and its size
DIGEST_PREFIX = "# inputs-sha256: "
SELF_DIGEST_PREFIX = "# lock-sha256: "
WHEEL_PREFIX = "# wheel: "  # inside a pin: "    # wheel: <bytes> <file name> sha256:<hex>"
RESOLVERS = ("uv", "pip-compile")


@dataclass(frozen=True)
class PipLock(LockUnit):
    """One pip lock file of a variant's stack, for one platform."""

    platform: str = field(default="", kw_only=True)

    def path(self, spec: ImageSpec) -> Path:
        return lock_dir(spec, self.platform) / f"{self.name}.txt"

    def like(self, spec: ImageSpec):
        """The release this lock is resolved like (like.Release), or None: the GPU files for a
        lock of a CUDA variant, the CPU files for the shared and CPU locks."""
        if spec.like is None:
            return None
        from . import like

        variant = self.name.split("-", 1)[1] if "-" in self.name else None
        gpu = variant in spec.variants and spec.variants[variant].cuda is not None
        return like.load(spec, spec.like, "gpu" if gpu else "cpu")

    def leader(self, spec: ImageSpec) -> Path | None:
        """The same lock for the spec's first platform, whose pins this one follows (None: this
        is that platform's). One set of pins on every platform: a lock resolved on its own per
        platform picks whatever each index page holds that day."""
        first = spec.platforms[0]
        return None if self.platform == first else lock_dir(spec, first) / f"{self.name}.txt"

    def verdict(self, spec: ImageSpec) -> str | None:
        path = self.path(spec)
        if not path.is_file():
            return MISSING
        return sealed_verdict(path, inputs_digest(spec, self), "its inputs")

    def write(self, spec: ImageSpec, *, resolver: str, upgrade: bool) -> int:
        body = _with_wheel_sizes(spec, self, _resolve(spec, self, resolver, upgrade))
        write_atomic(self.path(spec), sealed(_header(spec, self, inputs_digest(spec, self)) + body))
        return len(parse_pins(body))

    def count(self, spec: ImageSpec) -> int:
        return len(read_pins(self.path(spec)))


@dataclass(frozen=True)
class Pin:
    """One locked requirement: ``name==version`` with its hash lines, as written in the lock."""

    name: str  # canonical
    version: str
    text: str  # the requirement's lines, hashes included, without comments
    size: int | None = None  # bytes of the file this platform installs (None: not recorded)
    wheel: str | None = None  # that file's name
    wheel_hashes: tuple[str, ...] = ()  # "sha256:<hex>" of the file(s) this platform can install
    via: tuple[str, ...] = ()  # the locked packages that depend on it (canonical names)
    direct: bool = False  # an input file names it (the resolver's "# via -r <file>")


def install_line(pin: Pin) -> str:
    """The pin as one requirements line for this platform's install: only the hashes of the
    files it can install (the lock holds every platform's), else all of them."""
    requirement = pin.text.splitlines()[0].rstrip(" \\")
    hashes = pin.wheel_hashes or tuple(
        word.removeprefix("--hash=") for word in pin.text.split() if word.startswith("--hash="))
    return " ".join([requirement, *(f"--hash={digest}" for digest in hashes)])


def lock_dir(spec: ImageSpec, platform: str) -> Path:
    return spec.folder / "locks" / platform.replace("/", "-")


def stack(spec: ImageSpec, variant: str, platform: str) -> list[PipLock]:
    """The pip lock files a variant installs, bottom to top."""
    variant_spec = spec.variants[variant]
    layers: list[PipLock] = []
    inputs: tuple[Input, ...] = ()
    below: PipLock | None = None
    shared = tuple(Input(path) for path in spec.pip.requirements)
    if conda.pip_requirements(spec):
        # The environment.yml's pip: section is a pip input of the shared layer.
        shared += (Input(spec.conda.environment, conda.PIP_SECTION),)
    if shared:
        inputs = shared
        below = PipLock("pip", "pip", inputs, platform=platform)
        layers.append(below)
    if variant_spec.pip:
        inputs = inputs + tuple(Input(path) for path in variant_spec.pip)
        below = PipLock(f"pip-{variant}", "variant", inputs, below, platform=platform)
        layers.append(below)
    if spec.dev.requirements:
        # Variants without inputs of their own share one dev lock.
        name = f"dev-{variant}" if variant_spec.pip else "dev"
        inputs = inputs + tuple(Input(path) for path in spec.dev.requirements)
        layers.append(PipLock(name, "dev", inputs, below, platform=platform))
    return layers


def units(
    spec: ImageSpec, platforms: list[str] | None = None, variants: list[str] | None = None
) -> list[LockUnit]:
    """Every lock of the variants, each once, in an order where a lock follows the one below it:
    conda's first (they cover every conda subdir), then pip's per platform."""
    seen: dict[str, LockUnit] = {}
    for variant in variants or spec.variants:
        for unit in conda.stack(spec, variant):
            seen.setdefault(f"conda/{unit.name}", unit)
    for platform in platforms or spec.platforms:
        for variant in variants or spec.variants:
            for unit in stack(spec, variant, platform):
                seen.setdefault(f"{platform}/{unit.name}", unit)
    return list(seen.values())


def team_constraints_path(spec: ImageSpec) -> Path:
    return spec.folder / TEAM_CONSTRAINTS


def team_constraints(spec: ImageSpec, manifests: dict[str, dict]) -> str:
    """The constraints file for a spec that extends an image: the pins all its variants share.

    ``manifests`` maps each variant's base image ref to its manifest. A pin only one variant has
    (torch in the GPU image) is no constraint for the shared layer.
    """
    shared: dict[str, str] | None = None
    for manifest in manifests.values():
        pins = {p["name"]: p["version"] for p in manifest["packages"]["pip"] if p["layer"] != "seed"}
        shared = pins if shared is None else {
            name: version for name, version in shared.items() if pins.get(name) == version}
    sources = ", ".join(f"{ref} ({m.get('content_hash', '?')[:12]})" for ref, m in manifests.items())
    return (f"# The pins of {spec.extends} that a project on it must keep, from {sources}.\n"
            f"# Written by {regenerate_command(spec)}; do not edit.\n"
            f"{TEAM_PYTHON_PREFIX}{base_python(spec, manifests)}\n"
            + "".join(f"{name}=={version}\n" for name, version in sorted((shared or {}).items())))


def base_python(spec: ImageSpec, manifests: dict[str, dict]) -> str:
    """The Python minor version every image the spec extends has; one error when they differ
    or when the spec asks for another."""
    found = {ref: ".".join(m["python_version"].split(".")[:2]) for ref, m in manifests.items()}
    if len(set(found.values())) > 1:
        raise LockError(f"{spec.path}: key 'extends': its images have different Pythons: "
                        + ", ".join(f"{ref} {version}" for ref, version in found.items()))
    ref, version = next(iter(found.items()))
    if spec.python is not None and version != spec.python:
        raise SpecError(f"{spec.path}: key 'python': {ref} provides Python {version}, not "
                        f"{spec.python_version}")
    return version


def inputs_digest(spec: ImageSpec, layer: PipLock) -> str:
    digest = hashlib.sha256()
    digest.update(f"{LOCK_FORMAT}\npython={spec.python_version}\nplatform={layer.platform}\n".encode())
    for item in layer.inputs:
        digest.update(f"input {item}\n".encode())
        digest.update(_input_bytes(spec, item))
    if layer.below is None and spec.extends:
        team = team_constraints_path(spec)
        digest.update(b"team\n")
        digest.update(team.read_bytes() if team.is_file() else b"<missing>")
    if layer.below is not None:
        below = layer.below.path(spec)
        digest.update(b"below\n")
        digest.update(below.read_bytes() if below.is_file() else b"<missing>")
    if (release := layer.like(spec)) is not None:
        digest.update(f"like {release.like} {release.flavour}\n".encode())
        for path in release.files:
            digest.update(path.read_bytes())
    if (leader := layer.leader(spec)) is not None:
        digest.update(b"leader\n")
        digest.update(leader.read_bytes() if leader.is_file() else b"<missing>")
    return digest.hexdigest()


def recorded_digest(lock: Path) -> str | None:
    try:
        with lock.open(encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(DIGEST_PREFIX):
                    return line[len(DIGEST_PREFIX):].strip()
                if not line.startswith("#"):
                    break
    except FileNotFoundError:
        return None
    return None


def self_digest(text: str) -> str:
    """The digest a lock records of itself: every line but the one that records it."""
    kept = (line for line in text.splitlines(keepends=True)
            if not line.startswith(SELF_DIGEST_PREFIX))
    return hashlib.sha256("".join(kept).encode()).hexdigest()


def sealed(text: str) -> str:
    """``text`` (a header whose last line is the inputs digest, then the body) with its own
    digest added below the inputs digest."""
    header, _, body = text.partition("\n" + DIGEST_PREFIX)
    inputs_line, _, rest = body.partition("\n")
    return (f"{header}\n{DIGEST_PREFIX}{inputs_line}\n{SELF_DIGEST_PREFIX}{self_digest(text)}\n"
            f"{rest}")


def sealed_verdict(path: Path, digest: str, inputs: str) -> str | None:
    """Why an existing lock written by us must be rewritten: edited since (EDITED), or its
    ``inputs`` (named in the message) no longer the ones of ``digest`` (STALE); None if fresh."""
    if reason := tampered(path):
        return f"{EDITED}: {reason}"
    if recorded_digest(path) != digest:
        return f"{STALE}: {inputs} changed since it was written"
    return None


def tampered(path: Path) -> str | None:
    """Why a lock file's content is not what devbox-build wrote; None when it is."""
    text = path.read_text(encoding="utf-8", errors="replace")
    recorded = [line[len(SELF_DIGEST_PREFIX):].strip() for line in text.splitlines()
                if line.startswith(SELF_DIGEST_PREFIX)]
    if len(recorded) != 1:
        return ("no lock-sha256 line: written by hand or by an older devbox-build"
                if not recorded else "more than one lock-sha256 line (a merge of two locks?)")
    if recorded[0] != self_digest(text):
        return "its content changed since it was written (edited by hand or cut short)"
    return None


def check(
    spec: ImageSpec, platforms: list[str] | None = None, variants: list[str] | None = None
) -> list[tuple[Path, str]]:
    """Locks that are missing, edited since they were written, or whose inputs changed.

    Each problem starts with its verdict (MISSING, EDITED or STALE). A lock stacked on an edited
    one is not reported as stale too: the edited file is the one to look at.
    """
    problems = []
    if spec.extends and not team_constraints_path(spec).is_file():
        problems.append((team_constraints_path(spec), f"{MISSING}: the pins of {spec.extends}"))
    edited: set[Path] = set()
    for unit in units(spec, platforms, variants):
        path, verdict = unit.path(spec), unit.verdict(spec)
        if verdict is None:
            continue
        if verdict.startswith(EDITED):
            edited.add(path)
        elif verdict.startswith(STALE) and unit.below and unit.below.path(spec) in edited:
            continue
        problems.append((path, verdict))
    from . import aptlock

    for platform in platforms or spec.platforms:
        if (verdict := aptlock.verdict(spec, platform)) is not None:
            problems.append((aptlock.path(spec, platform), verdict))
    reported = {path for path, _ in problems}
    problems += [(path, problem) for path, problem in divergences(spec, platforms, variants)
                 if path not in reported]
    return problems


def divergences(
    spec: ImageSpec, platforms: list[str] | None = None, variants: list[str] | None = None
) -> list[tuple[Path, str]]:
    """Locks whose versions differ from the first platform's, outside the spec's
    ``platform_specific`` packages: one problem per lock, naming every package."""
    allowed = {canonicalize_name(name)
               for name in (*spec.pip.platform_specific, *spec.dev.platform_specific)}
    problems = []
    for unit in units(spec, platforms, variants):
        leader = unit.leader(spec) if isinstance(unit, PipLock) else None
        path = unit.path(spec)
        if leader is None or not leader.is_file() or not path.is_file():
            continue
        theirs, ours = read_pins(leader), read_pins(path)
        differing = [f"{name} {pin.version} ({spec.platforms[0]}: {theirs[name].version})"
                     for name, pin in sorted(ours.items())
                     if name in theirs and theirs[name].version != pin.version
                     and name not in allowed]
        if differing:
            problems.append((path, f"{DIVERGED}: " + ", ".join(differing) + "; lock again, or "
                             "list a package with no wheel for one platform's version under "
                             "[pip] platform_specific"))
    return problems


def lock(
    spec: ImageSpec,
    *,
    platforms: list[str] | None = None,
    resolver: str = "uv",
    upgrade: bool = False,
    reporter: Reporter = SILENT,
    base_manifests: dict[str, dict] | None = None,
) -> list[LockResult]:
    """Write every stale or missing lock of the spec (all when ``upgrade``).

    A spec that extends an image needs ``base_manifests`` (base ref → manifest, see
    :func:`team_constraints`); the CLI reads them from the engine. Without them the team's pins
    recorded by the last lock are kept.
    """
    if resolver not in RESOLVERS:
        raise LockError(f"unknown resolver {resolver!r}; choose one of {', '.join(RESOLVERS)}")
    if spec.extends:
        path = team_constraints_path(spec)
        if base_manifests is None and not path.is_file():
            raise LockError(f"{spec.path}: key 'extends': locking needs the manifests of "
                            f"{spec.extends}'s images")
        if base_manifests is not None:  # else: the pins recorded last time are kept
            text = team_constraints(spec, base_manifests)
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                write_atomic(path, text)
    results = []
    for unit in units(spec, platforms):
        started = time.monotonic()
        if upgrade or unit.verdict(spec) is not None:
            before = read_pins(unit.path(spec)) if isinstance(unit, PipLock) else {}
            count = unit.write(spec, resolver=resolver, upgrade=upgrade)
            result = LockResult(unit.path(spec), "written", count, time.monotonic() - started)
        else:
            before = None
            result = LockResult(unit.path(spec), "up to date", unit.count(spec), 0.0)
        results.append(result)
        reporter.item("ok", f"{result.path}: {result.status} ({result.packages} packages)",
                      seconds=result.seconds if result.status == "written" else None,
                      finished=[str(result.path)] if result.status == "written" else [])
        if before is not None and isinstance(unit, PipLock):
            for warning in lock_warnings(spec, unit, before, read_pins(unit.path(spec))):
                reporter.item("fail", f"{result.path}: {warning}")
    return results


# What only a GPU layer should hold: a CPU image that installs them carries the CUDA wheels.
GPU_ONLY = ("torch", "triton", "tensorflow", "jax", "jaxlib")


def lock_warnings(spec: ImageSpec, unit: PipLock, before: dict[str, Pin],
                  after: dict[str, Pin]) -> list[str]:
    """What a lock just written did that its author should look at: an input's major version
    moved (what users import changed its API), or a GPU framework or CUDA wheel landed in a lock
    a CPU variant installs."""
    from .diff import bump

    warnings = [f"{name} {before[name].version} → {pin.version}: an input's major version moved"
                for name, pin in sorted(after.items())
                if pin.direct and name in before and before[name].version != pin.version
                and bump(before[name].version, pin.version) == "major"]
    variant = unit.name.split("-", 1)[1] if "-" in unit.name else None
    gpu = variant in spec.variants and spec.variants[variant].cuda is not None
    if not gpu:
        landed = sorted(name for name in after
                        if name in GPU_ONLY or name.startswith(("nvidia-", "cuda-")))
        if landed:
            warnings.append(f"{', '.join(landed[:6])}{' ...' if len(landed) > 6 else ''} in a "
                            "lock the CPU image installs: pin what pulled them in, or move it "
                            "to the GPU variant's pip inputs")
    return warnings


def _header(spec: ImageSpec, layer: PipLock, digest: str) -> str:
    like = f"# Like: {spec.like} (like/{spec.like.replace(':', '-')}/)\n" if spec.like else ""
    return (
        f"# Locked by devbox-build for image '{spec.name}', layer '{layer.name}' "
        f"({layer.platform}, Python {spec.python_version}). Do not edit.\n"
        f"# Regenerate with: {regenerate_command(spec)}\n"
        f"{like}{DIGEST_PREFIX}{digest}\n"
    )


def regenerate_command(spec: ImageSpec) -> str:
    """The lock command written into lock headers. It must not depend on how this run named the
    spec (the header is part of the lock's digest): a spec under images/ is named, any other
    (a project's image.toml) is locked from its own folder."""
    if spec.folder.parent.name == "images":
        return f"devbox-build lock {spec.name}"
    return "devbox-build lock . (in the folder that holds image.toml)"


def _input_bytes(spec: ImageSpec, item: Input) -> bytes:
    """An input file's bytes; for an environment.yml's pip: section, its requirements."""
    if item.section == conda.PIP_SECTION:
        return "".join(f"{line}\n" for line in conda.pip_requirements(spec)).encode()
    return spec.input_path(item.path).read_bytes()


def _input_files(spec: ImageSpec, layer: PipLock, scratch: Path) -> list[str]:
    """The layer's inputs as files a resolver reads (pip: sections written out to scratch)."""
    files = []
    for item in layer.inputs:
        if item.section:
            written = scratch / f"environment-{item.section}.in"
            written.write_bytes(_input_bytes(spec, item))
            files.append(str(written))
        else:
            files.append(item.path)
    return files


def _resolve(spec: ImageSpec, layer: PipLock, resolver: str, upgrade: bool) -> str:
    existing = layer.path(spec)
    with tempfile.TemporaryDirectory(prefix="devbox-lock-") as scratch:
        output = Path(scratch) / "lock.txt"
        inputs = _input_files(spec, layer, Path(scratch))
        # The resolvers read an existing output file as preferences: pins only move when
        # an input asks them to (or with --upgrade). Another platform's lock prefers the first
        # platform's pins instead (upgraded first, when upgrading), so every platform gets the
        # same versions wherever a wheel exists.
        leader, release = layer.leader(spec), layer.like(spec)
        if leader is not None and leader.is_file():
            shutil.copyfile(leader, output)
            upgrade = False
        elif existing.is_file() and not upgrade:
            shutil.copyfile(existing, output)
        elif release is not None:
            # Locked like a release: its pins are the preferences, its ranges constraints.
            output.write_text(release.preferences(), encoding="utf-8")
            upgrade = False
        constraints = []
        if layer.below is not None:
            constraints = ["-c", os.path.relpath(layer.below.path(spec), spec.folder)]
        elif spec.extends:
            constraints = ["-c", os.path.relpath(team_constraints_path(spec), spec.folder)]
        if release is not None:
            ranges = Path(scratch) / "like-constraints.txt"
            ranges.write_text(release.constraints(), encoding="utf-8")
            constraints += ["-c", str(ranges)]
        if resolver == "uv":
            command, env = _uv_command(spec, layer, inputs, constraints, output, upgrade)
            env = resolver_environment(Path(scratch), env)
        else:
            command, env = _pip_compile_command(spec, layer, inputs, constraints, output,
                                                upgrade)
        process = subprocess.run(
            command, cwd=spec.folder, env=env, capture_output=True, text=True, check=False
        )
        if process.returncode != 0:
            detail = "\n".join(
                f"  {line}" for line in (process.stderr or process.stdout).strip().splitlines()
            )
            raise LockError(
                f"{spec.path}: could not lock layer '{layer.name}' ({layer.platform}) "
                f"from {', '.join(map(str, layer.inputs))} with {resolver}:\n{detail}"
            )
        body = output.read_text(encoding="utf-8")
    # Drop any header the resolver kept from the previous lock; ours goes on top.
    lines = body.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    body = "".join(lines)
    for pin_line in body.splitlines():
        if " @ " in pin_line and not pin_line.startswith(("#", " ")):
            raise LockError(
                f"{spec.path}: layer '{layer.name}': '{pin_line.split()[0]}' is a direct URL "
                "requirement; hashed installs need index packages"
            )
    return body


def _uv_command(spec, layer, inputs, constraints, output, upgrade):
    from uv import find_uv_bin

    command = [
        find_uv_bin(), "pip", "compile", "--quiet", "--no-header", "--generate-hashes",
        "--python-version", spec.python_version, "--python-platform", PLATFORMS[layer.platform],
        *constraints, *inputs, "-o", str(output),
    ]
    if upgrade:
        command.append("--upgrade")
    return command, dict(os.environ)


def _pip_compile_command(spec, layer, inputs, constraints, output, upgrade):
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    machine = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}.get(host_platform.machine())
    if host != spec.python_version or machine != layer.platform or sys.platform != "linux":
        raise LockError(
            f"pip-compile resolves only for the Python and platform it runs on "
            f"({host}, {machine or host_platform.machine()}); the image needs Python "
            f"{spec.python_version} on {layer.platform}. Use --resolver uv."
        )
    executable = shutil.which("pip-compile", path=str(Path(sys.executable).parent)) or shutil.which(
        "pip-compile"
    )
    if executable is None:
        raise LockError("pip-compile is not installed; pip install 'devbox-build[pip-tools]'")
    command = [
        executable, "--quiet", "--no-header", "--generate-hashes", "--allow-unsafe",
        "--strip-extras", "--no-emit-index-url", "--no-emit-find-links",
        *constraints, *inputs, "-o", str(output),
    ]
    if upgrade:
        command.append("--upgrade")
    # The host's pip configuration (extra indexes, find-links, constraints) must not leak
    # into a lock that other machines install from.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return command, env


def write_atomic(path: Path, text: str, error: type[DevboxError] = LockError) -> None:
    """Write a file so that readers see the old content or the new, never a truncated one.

    A full disk or a read-only folder is one ``error`` naming the file; the old content stays.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
        )
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror}") from None
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # temporary files are created 0600
        os.replace(handle.name, path)
    except OSError as exc:
        Path(handle.name).unlink(missing_ok=True)
        raise error(f"cannot write {path}: {exc.strerror}; it was left as it was") from None
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def parse_pins(text: str) -> dict[str, Pin]:
    """Pins of a pip-tools-format file: ``name==version`` plus its ``--hash`` lines, and what the
    comments inside it record (the wheel and its size, the ``# via`` packages)."""
    pins: dict[str, Pin] = {}
    current: list[str] = []
    facts: dict = {}

    def flush() -> None:
        if current:
            requirement = current[0].split(";")[0].split("\\")[0].strip()
            name, _, version = requirement.partition("==")
            pin = Pin(canonicalize_name(name.split("[")[0]), version.strip(), "".join(current),
                      size=facts.get("size"), wheel=facts.get("wheel"),
                      wheel_hashes=tuple(facts.get("hashes", ())),
                      via=tuple(sorted(facts.get("via", ()))), direct=facts.get("direct", False))
            pins[pin.name] = pin
            current.clear()
            facts.clear()

    in_via = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comment = stripped[1:].strip()
            if not current or not line[0].isspace():
                in_via = False
            elif stripped.startswith(WHEEL_PREFIX):
                size, wheel, *digest = stripped[len(WHEEL_PREFIX):].split()
                if int(size) > facts.get("size", -1):
                    facts["size"], facts["wheel"] = int(size), wheel
                facts.setdefault("hashes", []).extend(digest)
                in_via = False
            elif comment == "via":
                in_via = True
            elif comment.startswith("via "):
                facts.setdefault("via", set()).update(_via_names(comment[4:]))
                facts["direct"] = facts.get("direct") or comment[4:].startswith("-r ")
                in_via = False
            elif in_via and stripped.startswith("#   "):
                facts.setdefault("via", set()).update(_via_names(comment))
                facts["direct"] = facts.get("direct") or comment.startswith("-r ")
            continue
        in_via = False
        if line[0].isspace():
            if current:
                current.append(line)
        else:
            flush()
            current.append(line)
    flush()
    return pins


def _via_names(text: str) -> set[str]:
    """Package names of a ``# via`` entry; input files (``-r x.in``, ``-c y.txt``) are not."""
    text = text.strip()
    if not text or text.startswith(("-r ", "-c ", "--")):
        return set()
    return {canonicalize_name(text.split()[0].split("[")[0])}


def _with_wheel_sizes(spec: ImageSpec, layer: PipLock, body: str) -> str:
    """``body`` with ``# wheel: <bytes> <file> sha256:<hex>`` lines in each pin: the files pip can
    install on the lock's platform and Python (an sdist where no wheel fits), from uv's
    pylock.toml export of exactly these pins."""
    from uv import find_uv_bin

    with tempfile.TemporaryDirectory(prefix="devbox-lock-") as scratch:
        pinned = Path(scratch) / "pinned.txt"
        pinned.write_text(body, encoding="utf-8")
        output = Path(scratch) / "pylock.toml"
        command = [
            find_uv_bin(), "pip", "compile", "--quiet", "--no-header", "--no-deps",
            "--generate-hashes", "--python-version", spec.python_version,
            "--python-platform", PLATFORMS[layer.platform], str(pinned), "-o", str(output),
        ]
        process = subprocess.run(command, capture_output=True, text=True, check=False,
                                 env=resolver_environment(Path(scratch)))
        if process.returncode != 0:
            detail = "\n".join(f"  {line}" for line in process.stderr.strip().splitlines())
            raise LockError(f"{spec.path}: could not read the wheel sizes of layer "
                            f"'{layer.name}' ({layer.platform}):\n{detail}")
        files = {}
        for package in tomllib.loads(output.read_text(encoding="utf-8")).get("packages", []):
            candidates = package.get("wheels") or ([package["sdist"]] if "sdist" in package else [])
            if candidates and all("size" in c and "sha256" in c.get("hashes", {})
                                  for c in candidates):
                files[canonicalize_name(package["name"])] = sorted(
                    f"{c['size']} {c.get('name') or c['url'].rsplit('/', 1)[-1]} "
                    f"sha256:{c['hashes']['sha256']}" for c in candidates)
    lines, name = [], None
    for line in body.splitlines(keepends=True):
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            name = canonicalize_name(line.split(";")[0].split("==")[0].split("[")[0].strip())
        elif name in files and (not line.rstrip().endswith("\\")) and line[0].isspace() \
                and not line.strip().startswith("#"):
            # The pin's last hash line: the wheel goes right below it.
            lines.append(line)
            lines.extend(f"    {WHEEL_PREFIX}{file}\n" for file in files.pop(name))
            continue
        lines.append(line)
    return "".join(lines)


def read_pins(path: Path) -> dict[str, Pin]:
    return parse_pins(path.read_text(encoding="utf-8")) if path.is_file() else {}


def added_pins(spec: ImageSpec, layer: PipLock, pins: dict[str, Pin],
               below: dict[str, Pin]) -> list[Pin]:
    """What a layer installs: the pins of its lock (``pins``) that the lock below (``below``)
    does not have."""
    for name, pin in pins.items():
        if name in below and below[name].version != pin.version:
            raise LockError(
                f"{layer.path(spec)}: pins {name}=={pin.version} but the layer below pins "
                f"{below[name].version}; relock with devbox-build lock {spec.name} --upgrade"
            )
    return [pin for name, pin in sorted(pins.items()) if name not in below]
