"""conda locks: environment.yml → conda-lock.yml, solved with py-rattler (no conda binary).

The conda layer is solved once, on the developer's machine, for every target subdir
(linux-64, linux-aarch64 by default) and written in conda-lock's own format with conda-lock's
own models, so ``conda-lock install`` and micromamba read it too. A build installs it exactly,
with no solve and every package's sha256 checked (dockerfile/conda/install.py).

Like the pip locks, conda locks stack per variant:

* ``locks/conda-lock.yml``: ``[conda] environment``, shared by every variant (the conda layer);
* ``locks/conda-lock-<variant>.yml``: that plus ``[variants.<v>] conda``, solved with the shared
  lock's packages pinned (installed in the variant layer, so variants still share the conda
  layer). A CUDA variant's solve assumes a ``__cuda`` virtual package of its version.

Each lock's ``metadata.content_hash`` is a digest of its inputs per subdir; a changed input makes
it stale for ``lock --check`` and ``build``. ``metadata.custom_metadata`` records a digest of the
locked packages themselves, so a hand-edited or truncated lock is refused as that file. Channel
URLs are written bare: credentials (``user:pass@``, ``/t/<token>/``) never enter a lock; a private
channel's come from the host at lock and build time (channels.py). The environment's ``pip:``
section is not conda's: it is locked with hashes in the pip layer like any other pip input (see
locking.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


from .errors import LockError, SpecError
from .lockunit import EDITED, MISSING, STALE, Input, LockUnit
from .spec import ImageSpec

LOCK_FORMAT = "devbox-conda-lock/1"
PACKAGES_DIGEST = "devbox-packages-sha256"  # metadata.custom_metadata key
PIP_SECTION = "pip"  # an environment file's pip: section, a pip-layer input (lockunit.Input)
CREDENTIALS_HINT = ("a private channel: put its credentials in a netrc file ($NETRC, else "
                    "~/.netrc) or rattler's credentials file ($RATTLER_AUTH_FILE); they never "
                    "enter a lock or an image")


@dataclass(frozen=True)
class Environment:
    """What an environment.yml asks for."""

    channels: list[str]
    specs: list[str]
    pip: list[str]


@dataclass(frozen=True)
class CondaLock(LockUnit):
    """One conda lock file of the spec, for every conda subdir it targets."""

    cuda: str | None = field(default=None, kw_only=True)  # the __cuda its solve assumes
    # A variant's conda_like: the release files (like.py) it also solves, "cpu" or "gpu".
    like: str | None = field(default=None, kw_only=True)

    def release(self, spec: ImageSpec):
        """The release this lock also solves (like.Release), or None."""
        if self.like is None:
            return None
        from . import like

        return like.load(spec, spec.like, self.like)

    def path(self, spec: ImageSpec) -> Path:
        return spec.folder / "locks" / f"{self.name}.yml"

    def verdict(self, spec: ImageSpec) -> str | None:
        path = self.path(spec)
        if not path.is_file():
            return MISSING
        lockfile = read_lock(path)
        recorded_packages = (lockfile.metadata.custom_metadata or {}).get(PACKAGES_DIGEST)
        if recorded_packages != packages_digest(lockfile.package):
            return (f"{EDITED}: its packages changed since it was written (edited by hand, cut "
                    "short, or written by an older devbox-build)")
        for subdir in spec.conda.platforms:
            if lockfile.metadata.content_hash.get(subdir) != content_hash(spec, self, subdir):
                return f"{STALE}: for {subdir}, its inputs changed since it was written"
        return None

    def write(self, spec: ImageSpec, *, resolver: str, upgrade: bool) -> int:
        import asyncio

        lockfile = asyncio.run(_solve(spec, self))  # conda locks always solve afresh
        _write(lockfile, self.path(spec))
        return len(lockfile.package)

    def count(self, spec: ImageSpec) -> int:
        return len(read_lock(self.path(spec)).package)


def read_environment(spec: ImageSpec, relative: str) -> Environment:
    import yaml  # here: only a conda spec needs it, and every command imports this module

    path = spec.input_path(relative)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with 'channels' and 'dependencies'")
    unknown = set(data) - {"name", "channels", "dependencies", "variables", "prefix"}
    if unknown:
        raise SpecError(f"{path}: unknown key '{sorted(unknown)[0]}'")
    channels = data.get("channels") or []
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise SpecError(f"{path}: key 'channels': expected a list of channel names or URLs")
    specs, pip = [], []
    for index, item in enumerate(data.get("dependencies") or []):
        if isinstance(item, str):
            specs.append(item)
        elif isinstance(item, dict) and set(item) == {"pip"} and isinstance(item["pip"], list):
            pip += [str(requirement) for requirement in item["pip"]]
        else:
            raise SpecError(f"{path}: key 'dependencies[{index}]': expected a match spec "
                            f"string or a 'pip:' list, got {item!r}")
    if specs and not channels:
        raise SpecError(f"{path}: key 'channels': name at least one channel")
    return Environment(channels, specs, pip)


def pip_requirements(spec: ImageSpec) -> list[str]:
    """The shared environment's pip: section (locked in the pip layer)."""
    if spec.conda is None:
        return []
    return read_environment(spec, spec.conda.environment).pip


def stack(spec: ImageSpec, variant: str) -> list[CondaLock]:
    """The conda locks a variant installs, bottom to top ([] without a [conda] section)."""
    if spec.conda is None:
        return []
    variant_spec = spec.variants[variant]
    shared = CondaLock("conda-lock", "conda", (Input(spec.conda.environment),))
    if not variant_spec.conda and not variant_spec.conda_like:
        return [shared]
    cuda = variant_spec.cuda.version if variant_spec.cuda else None
    if variant_spec.cuda and cuda is None:
        raise SpecError(f"{spec.path}: key 'variants.{variant}.cuda.version': a conda solve for "
                        "a CUDA variant needs the CUDA version it assumes (__cuda)")
    like = ("gpu" if variant_spec.cuda else "cpu") if variant_spec.conda_like else None
    return [shared, CondaLock(f"conda-lock-{variant}", "variant",
                              shared.inputs + tuple(Input(path) for path in variant_spec.conda),
                              shared, cuda=cuda, like=like)]


def virtual_packages(spec: ImageSpec, item: CondaLock, subdir: str) -> dict[str, str]:
    """What the solve assumes about the machines the image runs on."""
    packages = {"__unix": "0", "__linux": "5.10", "__glibc": spec.conda.glibc,
                "__archspec": "x86_64" if subdir == "linux-64" else "aarch64"}
    if item.cuda:
        packages["__cuda"] = item.cuda
    return packages


def content_hash(spec: ImageSpec, item: CondaLock, subdir: str) -> str:
    digest = hashlib.sha256(f"{LOCK_FORMAT}\nsubdir={subdir}\n".encode())
    for name, version in sorted(virtual_packages(spec, item, subdir).items()):
        digest.update(f"virtual {name}={version}\n".encode())
    for item_input in item.inputs:
        digest.update(f"input {item_input}\n".encode())
        digest.update(spec.input_path(item_input.path).read_bytes())
    if item.below is not None:
        below = item.below.path(spec)
        digest.update(b"below\n" + (below.read_bytes() if below.is_file() else b"<missing>"))
    if (release := item.release(spec)) is not None:
        digest.update(f"like {release.like} {release.flavour}\n".encode())
        for path in release.files:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_lock(path: Path):
    """A conda-lock.yml as conda-lock's Lockfile model."""
    from conda_lock.lockfile import parse_conda_lock_file

    try:
        return parse_conda_lock_file(path)
    except Exception as exc:  # conda-lock raises plain and pydantic errors alike
        raise LockError(f"{path}: not a readable conda-lock file: {exc}") from None


async def _solve(spec: ImageSpec, item: CondaLock):
    import rattler
    from conda_lock.lockfile.v1.models import HashModel
    from conda_lock.lockfile.v2prelim.models import LockedDependency, Lockfile, LockMeta
    from conda_lock.models.channel import Channel

    environments = [read_environment(spec, item_input.path) for item_input in item.inputs]
    channels = list(dict.fromkeys(c for env in environments for c in env.channels))
    specs = [s for env in environments for s in env.specs]
    # conda_like: the release's own match specs too, its packages preferred where they fit.
    release = item.release(spec)
    specs += release.conda_specs if release else []
    pinned = {}
    if item.below is not None:
        below = read_lock(item.below.path(spec))
        pinned = {(p.platform, p.name): p for p in below.package}
    # A private cache: a channel's repodata is fetched fresh for every lock. The authenticated
    # client reads a private channel's credentials where build does too (channels.py).
    with tempfile.TemporaryDirectory(prefix="devbox-conda-") as cache:
        gateway = rattler.Gateway(cache_dir=cache, client=rattler.Client.authenticated_client())
        packages = []
        for subdir in spec.conda.platforms:
            virtual = [
                rattler.GenericVirtualPackage(rattler.PackageName(name),
                                              rattler.Version(version),
                                              rattler.BuildString("0"))
                for name, version in virtual_packages(spec, item, subdir).items()
            ]
            # The lock below stays as it is: its pins are constraints of this solve.
            constraints = [f"{name} =={p.version} {p.build}"
                           for (platform, name), p in pinned.items() if platform == subdir]
            try:
                preferred = (await _release_records(gateway, channels, subdir, release)
                             if release else [])
                records = await rattler.solve(
                    [rattler.Channel(c) for c in channels], specs, gateway=gateway,
                    platforms=[subdir, "noarch"], virtual_packages=virtual,
                    constraints=constraints or None, locked_packages=preferred or None,
                )
            except Exception as exc:  # rattler's errors: GatewayError, SolverError, ...
                raise LockError(
                    f"{spec.path}: could not lock {item.name} ({subdir}) from "
                    f"{', '.join(map(str, item.inputs))}: {type(exc).__name__}: "
                    f"{_first_lines(exc)}",
                    hint=CREDENTIALS_HINT if re.search(r"\b40[13]\b", str(exc)) else None,
                ) from None
            for record in records:
                packages.append(LockedDependency(
                    name=record.name.normalized,
                    version=str(record.version),
                    manager="conda",
                    platform=subdir,
                    dependencies=dict(_dependency(d) for d in record.depends),
                    url=strip_credentials(record.url),
                    hash=HashModel(md5=record.md5.hex() if record.md5 else None,
                                   sha256=record.sha256.hex()),
                    categories={"main"},
                    build=str(record.build),
                ))
    packages.sort(key=lambda p: (p.platform, p.name))
    return Lockfile(
        package=packages,
        metadata=LockMeta(
            content_hash={s: content_hash(spec, item, s) for s in spec.conda.platforms},
            channels=[Channel.from_string(strip_credentials(c)) for c in channels],
            platforms=list(spec.conda.platforms),
            sources=[str(item_input) for item_input in item.inputs],
            custom_metadata={PACKAGES_DIGEST: packages_digest(packages)},
        ),
    )


async def _release_records(gateway, channels: list[str], subdir: str, release) -> list:
    """The channels' records of the release's env.out packages (by name, version and build;
    another build of the version where the channels lack that one): the solve's preferences."""
    import rattler

    result = await gateway.query([rattler.Channel(c) for c in channels], [subdir, "noarch"],
                                 list(release.conda_pins), recursive=False)
    best: dict[str, tuple[int, object]] = {}
    for records in result:
        for record in records:
            name = record.name.normalized
            version, build = release.conda_pins.get(name, ("", ""))
            if str(record.version) != version:
                continue
            rank = 0 if str(record.build) == build else 1
            if name not in best or rank < best[name][0]:
                best[name] = (rank, record)
    return [record for _, record in best.values()]


def packages_digest(packages) -> str:
    """A digest of what a lock installs: every package's subdir, name, version, build, URL and
    sha256, in a fixed order."""
    digest = hashlib.sha256()
    for package in sorted(packages, key=lambda p: (p.platform, p.name)):
        digest.update(f"{package.platform} {package.name} {package.version} {package.build} "
                      f"{package.url} {package.hash.sha256}\n".encode())
    return digest.hexdigest()


def strip_credentials(url: str) -> str:
    """A channel or package URL without ``user:password@`` or a ``/t/<token>/`` segment."""
    url = re.sub(r"(?<=://)[^/@\s]+@", "", url)
    return re.sub(r"/t/[^/\s]+(?=/)", "", url)


def _dependency(depends: str) -> tuple[str, str]:
    name, _, constraint = depends.partition(" ")
    return name, constraint.strip() or "*"


def _first_lines(exc: Exception, count: int = 4) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:count])


def _write(lockfile, path: Path) -> None:
    """conda-lock's own writer, into a temporary file renamed over the lock: never truncated."""
    from conda_lock.lockfile import write_conda_lock_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Same name in a scratch folder beside it: the writer's help text names the file.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        temporary = Path(scratch) / path.name
        write_conda_lock_file(lockfile, temporary, metadata_choices=set(),
                              include_help_text=True)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)


def locked_packages(spec: ImageSpec, item: CondaLock, subdir: str) -> list:
    """The LockedDependency entries of one subdir."""
    return [p for p in read_lock(item.path(spec)).package if p.platform == subdir]
