"""spec + locks → build context: the Dockerfile and the few files its layers copy.

The context is data (path → bytes) so it can be hashed into the content tag, printed by
``devbox-build render`` and streamed to the engine as a deterministic tar: the same inputs always
give the same bytes, and so the same cache hits.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

import jinja2
from packaging.utils import canonicalize_name

from . import __version__, aptlock, cache, channels, conda, layers, locking
from .errors import InputError, LockError, SpecError
from .runtime import contract
from .spec import CONDA_SUBDIRS, TEAM_CONSTRAINTS, Idle, ImageSpec

VENV = contract.VENV
# The image's runtime (devbox_build/runtime, the package devbox_runtime in the image) and the
# launchers that start its programs: context paths under devbox/, in the image /opt/devbox.
# A COPY whose source holds the image's own paths from / (`COPY final/ /`): every folder it makes
# is then an entry of the context tar, with fixed metadata, so the layer's bytes depend on the
# files alone (a COPY into a folder of its own making stamps the folder with the build's time).
FINAL_ROOT = "final"
CA_ROOT = "ca"
CA_FOLDER = "/usr/local/share/ca-certificates/devbox"
DEVBOX_CONTEXT = f"{FINAL_ROOT}{contract.DEVBOX}"
RUNTIME_BIN = f"{FINAL_ROOT}{contract.BIN}"
RUNTIME_LIB = f"{FINAL_ROOT}{contract.LIB}/{contract.PACKAGE}"
RUNTIME_HOOKS = f"{FINAL_ROOT}{contract.START_HOOKS}"
EXECUTABLE_FOLDERS = (f"{RUNTIME_BIN}/", f"{RUNTIME_HOOKS}/")
# A launcher: the system Python (isolated: no user site, no PYTHONPATH) runs one module's main.
LAUNCHER = (
    "#!/usr/bin/python3 -I\n"
    "# {command}: written by devbox-build; the program is {package}.{module}.\n"
    "import sys\n"
    "sys.path.insert(0, {lib!r})\n"
    "from {package}.{module} import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
START_HOOK = "#!/bin/sh\n# The image's own start hook, written by devbox-build.\nexec {command}\n"
# What every start of a container runs: a dev container's postStartCommand (the entrypoint runs
# the same hooks).
START_HOOKS = f"{contract.BIN}/devbox-start"
# The conda layer's installer (py-rattler and its script): context path, in the image
# /opt/devbox/conda.
CONDA_INSTALLER = "conda-installer"
CA_BUNDLE = contract.CA_BUNDLE
_CONDA_FILE = re.compile(r"[A-Za-z0-9_.+-]+\.(?:conda|tar\.bz2)")
# The name ending of a build stage that installs a private channel's packages and is thrown away.
THROWAWAY_STAGE = "-install"
# The pip install every group's layer runs, in a Dockerfile step or in assemble.py's builder.
PIP_INSTALL = ("PIP_USER=0 pip install --no-deps --require-hashes --no-cache-dir --no-compile "
               "--no-input --disable-pip-version-check --root-user-action=ignore")
# When build assembles the pip groups: the steps before them, and the steps after them (built
# FROM the assembled image), as Dockerfiles of the same context.
HEAD_DOCKERFILE = "assembled/head.Dockerfile"
TAIL_DOCKERFILE = "assembled/tail.Dockerfile"
# Printed by the Python check in the os layer; the build turns it into an error naming the spec key.
PYTHON_MISMATCH_MARKER = "devbox-build: the base image provides Python"
# apt's lists and caches go (the lists folder's own `partial` and `lock` stay: deleting what the
# base has would leave a whiteout stamped with the build's time in the layer).
APT_CLEANUP = (
    "apt-get clean; find /var/lib/apt/lists -mindepth 1 -maxdepth 1 ! -name partial "
    "! -name lock -exec rm -rf {} +; rm -rf /var/cache/apt/*.bin /root/.cache"
)
# What a package makes for one machine at install time: an ssh server's host keys (a key baked
# into an image is every container's, and anyone's who pulls it; devbox-sshd makes its own), and
# the day a system user was added (shadow's last-change field: a build's date in the layer).
INSTALL_SECRETS_CLEANUP = (
    "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; "
    "sed -i -E 's/^([^:]*:[^:]*:)[0-9]+:/\\1{day}:/' /etc/shadow"
)
# Files a RUN of apt, dpkg or ldconfig rewrites with its own time or history: each is put back as
# the layer below had it (or removed when it had none), so the layer does not carry them.
VOLATILE_FILES = (
    "/var/cache/ldconfig/aux-cache", "/var/log/dpkg.log", "/var/log/alternatives.log",
    "/var/log/apt/history.log", "/var/log/apt/term.log", "/var/log/apt/eipp.log.xz",
    "/var/cache/debconf/config.dat-old", "/var/cache/debconf/templates.dat-old",
    "/var/cache/debconf/passwords.dat-old",
)
# Every file an install layer adds gets this mtime (2000-01-01), and its bytecode is compiled
# against it: the same lock gives the same layer bytes, and so the same digest, on any machine.
LAYER_MTIME = 946684800
_LAYER_MARKER = re.compile(r"^# ---- layer: (\w+)")
# The packages that carry the CUDA runtime: PyPI's wheels (nvidia-cuda-runtime, or -cu12 before
# CUDA 13) and conda's cudart.
_CUDA_RUNTIME = re.compile(r"nvidia-cuda-runtime(-cu\d+)?|cuda-cudart")
# NVIDIA's minimum Linux driver for each CUDA major (minor version compatibility: any 12.x
# runtime on >= 525.60.13, any 13.x on >= 580.65.06), from the CUDA toolkit release notes.
CUDA_MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}


@dataclass(frozen=True)
class CudaFacts:
    """What a CUDA variant's image has: from what its locks install, checked against the spec."""

    version: str  # major.minor of the installed runtime
    min_driver: str
    runtime: str  # "nvidia-cuda-runtime 13.2.86"


def _driver(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def cuda_facts(spec: ImageSpec, variant: str, installed: dict[str, str]) -> CudaFacts | None:
    """``installed``: every package the variant's locks install (name → version)."""
    declared = spec.variants[variant].cuda
    if declared is None:
        return None
    key = f"{spec.path}: key 'variants.{variant}.cuda"
    runtimes = sorted((name, version) for name, version in installed.items()
                      if _CUDA_RUNTIME.fullmatch(name))
    if not runtimes and spec.extends:
        return None  # the runtime, and its labels, come with the image it extends
    if not runtimes:
        raise SpecError(f"{key}': the variant's locks install no CUDA runtime (an "
                        "nvidia-cuda-runtime wheel or conda's cuda-cudart): nothing to label")
    name, full = runtimes[-1]
    version = ".".join(full.split(".")[:2])
    if declared.version and ".".join(declared.version.split(".")[:2]) != version:
        raise SpecError(f"{key}.version': says {declared.version}, but the locks install the CUDA "
                        f"{version} runtime ({name} {full}); drop the key or correct it")
    floor = CUDA_MIN_DRIVER.get(version.split(".")[0])
    min_driver = declared.min_driver or floor
    if min_driver is None:
        raise SpecError(f"{key}.min_driver': no known minimum driver for CUDA {version}; name it")
    if floor and _driver(min_driver) < _driver(floor):
        raise SpecError(f"{key}.min_driver': {min_driver} is below {floor}, the oldest driver "
                        f"that runs CUDA {version}")
    return CudaFacts(version, min_driver, f"{name} {full}")


@dataclass(frozen=True)
class InstallStep:
    """One install layer of the Dockerfile: a conda lock, or one group of a pip lock's packages."""

    kind: str  # "conda" or "pip"
    layer: str  # its lock's place in the stack: "conda", "pip", "variant" or "dev"
    name: str  # file stem in the image: requirements/<name>.txt, conda/locks/<name>.yml
    lock: str  # the lock file it comes from, relative to the spec's folder
    count: int
    title: str  # what the layer's marker line says about it
    notes: tuple[str, ...] = ()  # one line per package: why it is in this layer
    # pip: the group's requirements lines, written by the step itself (no COPY step: a layer
    # less, and its text in the step is the cache key)
    requirements: tuple[str, ...] = ()
    context_path: str = ""  # conda: the lock in the build context
    # conda: the context folder of the packages the host fetched with a private channel's
    # credentials (installed in a throwaway stage then); "" when the build fetches them all
    fetched_folder: str = ""
    packages: dict[str, str] = field(default_factory=dict)  # conda: name → version
    subdir: str = ""  # conda
    opens_variant: bool = False
    # pip: installed on its own and assembled (the first run of pip groups; see assemble.py)
    assembled: bool = False
    # pip: the packages that install from an sdist here (no wheel fits, or none recorded): their
    # build may need the spec's system packages
    from_source: tuple[str, ...] = ()
    wheel_bytes: int = 0  # pip: the size of the group's wheels, as the lock records them


@dataclass(frozen=True)
class PrivatePackage:
    """A locked conda package whose channel needs credentials this host holds."""

    url: str
    sha256: str
    credential: channels.Credential


@dataclass
class BuildContext:
    """What one variant's build sends to the engine."""

    spec: ImageSpec
    variant: str
    platform: str
    base: str
    files: dict[str, bytes] = field(default_factory=dict)  # Dockerfiles included
    install_steps: tuple[InstallStep, ...] = ()  # bottom first, as the Dockerfile has them
    # Packages of private conda channels, fetched on the host into the context: path → package.
    # Named by the lock's sha256 in the digest; their bytes come at build time (fetch_private).
    private: dict[str, PrivatePackage] = field(default_factory=dict)
    _fetched: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def dockerfile(self) -> str:
        return self.files["Dockerfile"].decode()

    @property
    def assembled_steps(self) -> tuple[InstallStep, ...]:
        """The pip groups a build installs on their own and assembles (none: one chain)."""
        return tuple(step for step in self.install_steps if step.assembled)

    def step_layers(self, dockerfile: str = "Dockerfile") -> list[str]:
        """The layer each instruction of ``dockerfile`` belongs to, in build-step order."""
        layers, current, continued = [], "os", False
        for line in self.files[dockerfile].decode().splitlines():
            stripped = line.strip()
            if marker := _LAYER_MARKER.match(stripped):
                current = marker.group(1)
            if not stripped or stripped.startswith("#"):
                continue
            if not continued:
                layers.append(current)
            continued = stripped.endswith("\\")
        return layers

    def filesystem_layers(self) -> int:
        """How many filesystem layers the Dockerfile adds to the image (each COPY and RUN makes
        one; a throwaway stage's, which installs a private channel's packages, add none)."""
        count, throwaway = 0, False
        for line in self.dockerfile.splitlines():
            if line.startswith("FROM "):
                throwaway = line.endswith(THROWAWAY_STAGE)
            elif line.startswith(("COPY ", "RUN ")) and not throwaway:
                count += 1
        return count

    def digest(self, base_image_id: str, mechanism: str = "chain") -> str:
        """Content hash: every context file (spec, locks and template are all in them), the base
        id and how the pip groups become layers (the layers differ, the content does not)."""
        digest = hashlib.sha256(f"base {base_image_id}\nmechanism {mechanism}\n".encode())
        for path in sorted(self.files):
            digest.update(f"{path} {len(self.files[path])}\n".encode())
            digest.update(self.files[path])
        for path, package in sorted(self.private.items()):
            digest.update(f"{path} sha256:{package.sha256}\n".encode())
        return digest.hexdigest()

    def fetch_private(self) -> int:
        """Fetch (or find in the host's cache) every private package; returns how many."""
        for path, package in sorted(self.private.items()):
            self._fetched[path] = channels.fetch(package.url, package.sha256, package.credential)
        return len(self.private)

    def write(self, folder: Path) -> int:
        """Write the whole context (private packages fetched) into ``folder``; returns how many
        files."""
        self.fetch_private()
        for relative, data in self.files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for relative, source in self._fetched.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / relative)
        return len(self.files) + len(self._fetched)

    def tar(self) -> BinaryIO:
        """The context as a tar with fixed metadata, so equal files give equal COPY cache keys.
        Spooled to disk past 64 MiB: private conda packages can be large."""
        buffer = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 (returned open)
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            # Every folder too, with the same fixed metadata: a COPY gives the folders it makes
            # (and the one it copies into) the source folder's time, not the build's.
            folders = sorted({str(parent) for path in [*self.files, *self.private]
                              for parent in PurePosixPath(path).parents if parent.name})
            for folder in folders:
                info = tarfile.TarInfo(folder)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                archive.addfile(info)
            for path in sorted(self.files):
                info = tarfile.TarInfo(path)
                # COPY keeps the mode: the runtime's commands must arrive executable.
                mode = 0o755 if path.startswith(EXECUTABLE_FOLDERS) else 0o644
                info.size, info.mode, info.mtime = len(self.files[path]), mode, 0
                archive.addfile(info, io.BytesIO(self.files[path]))
            for path in sorted(self.private):
                if path not in self._fetched:
                    raise RuntimeError(f"{path}: not fetched; call fetch_private() first")
                info = tarfile.TarInfo(path)
                info.size, info.mode, info.mtime = self._fetched[path].stat().st_size, 0o644, 0
                with self._fetched[path].open("rb") as package:
                    archive.addfile(info, package)
        buffer.seek(0)
        return buffer


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def ca_certificate_files(spec: ImageSpec, extra: list[str] = ()) -> dict[str, bytes]:
    """CA certificates from the spec (relative to it) and the command line: file → its
    certificate blocks. Only CERTIFICATE blocks are kept; a file holding a private key, a file
    with no certificate or a pattern matching nothing is an error naming it."""
    certificates: dict[str, bytes] = {}
    for origin, pattern in [("spec", p) for p in spec.ca_certificates] + [("cli", p) for p in extra]:
        expanded = pattern if Path(pattern).is_absolute() or origin == "cli" else str(
            spec.folder / pattern
        )
        where = f"{spec.path}: key 'ca_certificates'" if origin == "spec" else "--ca-cert"
        matches = sorted(glob.glob(expanded))
        if not matches:
            raise InputError(f"{where}: {'no file matches' if glob.has_magic(pattern) else 'file not found:'} {pattern}")
        for match in matches:
            certificates[match] = _certificate_blocks(Path(match), where)
    return certificates


def _certificate_blocks(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read {path}: {exc.strerror}") from None
    blocks = list(_PEM_BLOCK.finditer(data))
    if any(b"PRIVATE KEY" in block.group(1) for block in blocks) or b"PRIVATE KEY-----" in data:
        raise InputError(f"{where}: {path} holds a private key; a CA file must hold only "
                         "certificates (export the certificate alone: openssl x509 -in FILE)")
    certificates = [block.group(0).replace(b"\r\n", b"\n")
                    for block in blocks if block.group(1) == b"CERTIFICATE"]
    if not certificates:
        raise InputError(f"{where}: {path} is not a PEM certificate (no BEGIN CERTIFICATE block)")
    return b"\n".join(certificates) + b"\n"


def render(
    spec: ImageSpec,
    variant: str,
    *,
    platform: str | None = None,
    ca_certificates: list[str] = (),
) -> BuildContext:
    if variant not in spec.variants:
        raise InputError(
            f"{spec.path}: no variant {variant!r} (variants: {', '.join(spec.variants)})"
        )
    if spec.python_version is None:
        raise LockError(f"{spec.path}: the Python of {spec.extends} is not known yet (it is "
                        f"recorded in {spec.folder / TEAM_CONSTRAINTS})",
                        hint=f"run: {spec.lock_command}")
    platform = platform or spec.platforms[0]
    apt_lock = aptlock.path(spec, platform)
    apt_pins = ({section: [shlex.quote(pin) for pin in pins]
                 for section, pins in aptlock.read(apt_lock).items()}
                if apt_lock.is_file() else None)
    variant_spec = spec.variants[variant]
    context = BuildContext(spec, variant, platform, variant_spec.base)

    for index, (path, blocks) in enumerate(ca_certificate_files(spec, list(ca_certificates)).items()):
        # update-ca-certificates only picks up *.crt files; the name is kept to safe characters.
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)
        context.files[f"{CA_ROOT}{CA_FOLDER}/{index:02d}-{stem}.crt"] = blocks

    conda_steps = _conda_steps(spec, variant, platform, context)
    pip_steps, lock_digests, locked_closure = [], {}, {}
    closures: dict[str, dict[str, locking.Pin]] = {}  # lock name → its pins, each read once
    for lock in locking.stack(spec, variant, platform):
        lock_path = lock.path(spec)
        if not lock_path.is_file():
            raise LockError(f"missing lock {lock_path}", hint=f"run: {spec.lock_command}")
        closures[lock.name] = locking.read_pins(lock_path)
        below = closures[lock.below.name] if lock.below else {}
        pins = locking.added_pins(spec, lock, closures[lock.name], below)
        locked_closure = {name: pin.version for name, pin in sorted(closures[lock.name].items())}
        lock_digests[lock.name] = hashlib.sha256(lock_path.read_bytes()).hexdigest()
        groups = layers.group(pins, own=spec.layers.own, below=len(below),
                              max_per_lock=spec.layers.max_per_lock)
        for number, group in enumerate(groups, start=1):
            pip_steps.append(InstallStep(
                kind="pip", layer=lock.layer, name=f"{lock.name}-{number:02d}",
                lock=str(lock_path.relative_to(spec.folder)), count=len(group.packages),
                title=(f"group {number} of {len(groups)}, {layers.megabytes(group.size)}: "
                       f"{group.reason()}"),
                notes=tuple(layers.why(pin) for pin in group.packages),
                requirements=tuple(locking.install_line(pin) for pin in
                                   sorted(group.packages, key=lambda pin: pin.name)),
                from_source=tuple(sorted(pin.name for pin in group.packages
                                         if not (pin.wheel or "").endswith(".whl"))),
                wheel_bytes=group.size))
    _check_own_layers(spec, variant, platform)

    installed = dict(locked_closure)
    for step in conda_steps:
        installed.update(step.packages)
    cuda = cuda_facts(spec, variant, installed)
    labels = {
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.description": spec.description,
        contract.LABEL_SPEC: spec.name,
        contract.LABEL_VARIANT: variant,
        "devbox.python": spec.python_version,
        "devbox.tool-version": __version__,
        **(
            {"devbox.cuda.version": cuda.version, "devbox.cuda.min-driver": cuda.min_driver,
             "devbox.cuda.runtime": cuda.runtime}
            if cuda else {}
        ),
        **({} if spec.extends else {"devcontainer.metadata": devcontainer_metadata(spec, variant)}),
        **spec.labels,
    }
    build_info = {
        "spec": spec.name,
        "repository": spec.repository,
        "variant": variant,
        "platform": platform,
        "python": spec.python_version,
        "tool_version": __version__,
        # The one record of the image's user, read by finalize.py and the runtime's commands.
        "user": {"name": spec.user.name, "uid": spec.user.uid, "gid": spec.user.gid,
                 "home": spec.user.home},
        "locks": lock_digests,
        "pip_layers": [{"name": step.name, "layer": step.layer} for step in pip_steps],
        # The full closure the top lock promises (each lock holds everything below it): what the
        # drift check holds the installed environment to.
        "locked": locked_closure,
        "conda": {"prefix": spec.conda.prefix, "locks": [step.name for step in conda_steps]}
        if spec.conda else None,
        "cuda": {"version": cuda.version, "min_driver": cuda.min_driver,
                 "runtime": cuda.runtime} if cuda else None,
        "extends": variant_spec.base if spec.extends else None,
        "base": variant_spec.base,  # the image this one is built FROM (the SBOM names it)
        # The apt lock's versions (the drift check holds the image to them); None: no apt lock.
        "apt_locked": {pin.split("=", 1)[0]: pin.split("=", 1)[1]
                       for pins in aptlock.read(apt_lock).values() for pin in pins}
        if apt_pins else None,
        # The idle watcher's rules (finalize.py writes /etc/devbox/idle.toml); under `extends`
        # without [idle], the image below keeps its own.
        "idle": None if spec.extends and spec.idle is None
        else (spec.idle or Idle()).model_dump(),
    }
    context.files[f"{DEVBOX_CONTEXT}/build-info.json"] = (
        json.dumps(build_info, indent=2, sort_keys=True) + "\n"
    ).encode()
    context.files.update(runtime_files())
    context.install_steps = tuple(_install_order(conda_steps, pip_steps))
    template = _environment().get_template("Dockerfile.j2")
    values = dict(
        version=__version__,
        spec=spec,
        # Relative to the spec's own folder: the content hash must not depend on the checkout path.
        # JSON-quoted: a folder name is not validated and must not break the comment line.
        spec_path=json.dumps(f"{spec.folder.name}/{spec.path.name}"),
        variant=variant,
        platform=platform,
        base=variant_spec.base,
        venv=VENV,
        devbox_dir=contract.DEVBOX,
        devbox_bin=contract.BIN,
        # The user's `pip install` puts its commands here: first on PATH, in every shell.
        user_bin=f"{spec.user.home}/.local/bin",
        ca_bundle=CA_BUNDLE,
        ca_files=[p for p in context.files if p.startswith(f"{CA_ROOT}/")],
        ca_root=CA_ROOT,
        final_root=FINAL_ROOT,
        shadow_day=LAYER_MTIME // 86400,
        python_mismatch_marker=PYTHON_MISMATCH_MARKER,
        apt_cleanup=APT_CLEANUP,
        # The apt lock's pins when the spec has one (aptlock.py), else the names.
        os_install=" ".join(apt_pins["os"]) if apt_pins else " ".join(aptlock.os_packages(spec)),
        system_install=" ".join(apt_pins["system"]) if apt_pins
        else " ".join(spec.system.packages),
        # A pinned install names every dependency; apt-mark gives them back the "automatically
        # installed" mark an unpinned install leaves, so the layers are the same bytes.
        os_auto=_auto(apt_pins, "os", aptlock.os_packages(spec)),
        system_auto=_auto(apt_pins, "system", [n.split("=")[0] for n in spec.system.packages]),
        install_secrets_cleanup=INSTALL_SECRETS_CLEANUP.format(day=LAYER_MTIME // 86400),
        volatile_files=" ".join(VOLATILE_FILES),
        install_steps=context.install_steps,
        pip_install=PIP_INSTALL,
        layer_mtime=LAYER_MTIME,
        throwaway_stage=THROWAWAY_STAGE,
        site_packages_parents=[str(parent) for parent in reversed(PurePosixPath(
            f"{VENV}/lib/python{spec.python_version}/site-packages").parents) if parent.name],
        conda=spec.conda,
        has_variant_layer=any(step.layer == "variant" for step in pip_steps + conda_steps),
        cuda=cuda,
        labels=labels,
    )
    context.files["Dockerfile"] = template.render(part="chain", **values).encode()
    if context.assembled_steps:
        context.files[HEAD_DOCKERFILE] = template.render(part="head", **values).encode()
        context.files[TAIL_DOCKERFILE] = template.render(part="tail", **values).encode()
    return context


# What VS Code needs to work in the image; its Python and Jupyter extensions find the venv.
VSCODE_EXTENSIONS = ["ms-python.python", "ms-python.debugpy", "ms-toolsai.jupyter"]


def devcontainer_metadata(spec: ImageSpec, variant: str) -> str:
    """The image's `devcontainer.metadata` label: dev container defaults that ride with the image.

    A project's devcontainer.json (the copier template's) then only says what is its own, and
    `copier update` has less to merge. An image that extends this one inherits the label.
    """
    entry = {
        "remoteUser": spec.user.name,
        "updateRemoteUserUID": True,
        # Hands the environments and /data to a remapped host group; says what to do about a
        # workspace the user cannot write (a root host user).
        "onCreateCommand": f"{contract.BIN}/devbox-devcontainer-setup",
        # A dev container's entrypoint is the CLI's own, so the image's start hooks run here.
        "postStartCommand": START_HOOKS,
        "customizations": {"vscode": {
            "extensions": VSCODE_EXTENSIONS,
            "settings": {"python.defaultInterpreterPath": f"{VENV}/bin/python",
                         "python.terminal.activateEnvironment": False},
        }},
        **({"forwardPorts": spec.ports} if spec.ports else {}),
        # "optional": a GPU when the host has one, and still a working container when not.
        **({"hostRequirements": {"gpu": "optional"}} if spec.variants[variant].cuda else {}),
    }
    return json.dumps([entry], separators=(",", ":"))


def _conda_steps(spec: ImageSpec, variant: str, platform: str,
                 context: BuildContext) -> list[InstallStep]:
    """The conda locks this variant installs; adds them and the installer to the context."""
    locks = conda.stack(spec, variant)
    if not locks:
        return []
    subdir = CONDA_SUBDIRS[platform]
    if subdir not in spec.conda.platforms:
        raise SpecError(f"{spec.path}: key 'conda.platforms': building for {platform} needs "
                        f"{subdir} in the conda lock")
    for name in ("installer.txt", "install.py", "devbox-conda"):
        context.files[f"{CONDA_INSTALLER}/{name}"] = template_file(f"conda/{name}")
    steps = []
    credentials: dict[str, channels.Credential | None] = {}  # by channel host, looked up once
    for item in locks:
        path = item.path(spec)
        if not path.is_file():
            raise LockError(f"missing lock {path}", hint=f"run: {spec.lock_command}")
        context_path = f"conda/{path.name}"
        context.files[context_path] = path.read_bytes()
        locked = conda.locked_packages(spec, item, subdir)
        fetched_folder = f"conda/fetched/{item.name}"
        below = {p.hash.sha256 for p in conda.locked_packages(spec, item.below, subdir)
                 } if item.below else set()  # installed by the step below
        for package in (p for p in locked if p.hash.sha256 not in below):
            host = urlsplit(package.url).hostname or ""
            if host not in credentials:
                credentials[host] = channels.credential_for(package.url)
            if credentials[host] is not None:
                # Both name a path: in the context, the image's stage and the host's cache.
                file_name = package.url.rsplit("/", 1)[-1]
                if not (_CONDA_FILE.fullmatch(file_name)
                        and re.fullmatch(r"[0-9a-f]{64}", package.hash.sha256 or "")):
                    raise LockError(f"{path}: package {package.name!r}: not a conda package "
                                    f"file name and sha256: {package.url}",
                                    hint=f"run: {spec.lock_command}")
                context.private[f"{fetched_folder}/{file_name}"] = (
                    PrivatePackage(package.url, package.hash.sha256, credentials[host]))
        packages = {p.name: p.version for p in locked}
        steps.append(InstallStep(
            kind="conda", layer=item.layer, name=item.name,
            lock=str(path.relative_to(spec.folder)), context_path=context_path,
            count=len(packages), title=subdir, packages=packages, subdir=subdir,
            fetched_folder=fetched_folder if any(
                p.startswith(f"{fetched_folder}/") for p in context.private) else ""))
    return steps


def _check_own_layers(spec: ImageSpec, variant: str, platform: str) -> None:
    """Every package the spec gives its own layer is in some lock of the spec (a typo would
    otherwise be silently ignored)."""
    if not spec.layers.own:
        return
    locked = {name for unit in locking.units(spec, [platform])
              if isinstance(unit, locking.PipLock) for name in locking.read_pins(unit.path(spec))}
    for name in spec.layers.own:
        if canonicalize_name(name) not in locked:
            raise SpecError(f"{spec.path}: key 'layers.own': {name!r} is in none of the spec's "
                            "pip locks")


def _install_order(conda_steps: list[InstallStep],
                   pip_steps: list[InstallStep]) -> list[InstallStep]:
    """conda before pip within a layer of the stack; the first variant-only step opens the
    variant part (everything below it is shared with the other variants). The first run of pip
    groups is assembled: built on its own, layer by layer, then put onto the steps below it."""
    rank = {"conda": 0, "pip": 1, "variant": 2, "dev": 3}
    ordered = sorted([*conda_steps, *pip_steps],
                     key=lambda step: (rank[step.layer], step.kind != "conda"))
    opened, run = False, "before"  # the pip run: before it, in it, after it
    steps = []
    for step in ordered:
        opens = step.layer == "variant" and not opened
        opened = opened or opens
        if step.kind == "pip" and run != "after":
            run = "in"
        elif run == "in":
            run = "after"
        steps.append(replace(step, opens_variant=opens, assembled=run == "in"))
    return steps


def runtime_files() -> dict[str, bytes]:
    """The image's runtime: its package, a launcher per command, the built-in start hooks and
    the BASH_ENV file."""
    files = {}
    package = resources.files("devbox_build.runtime")
    for item in sorted(package.iterdir(), key=lambda entry: entry.name):
        if item.name.endswith(".py"):
            files[f"{RUNTIME_LIB}/{item.name}"] = item.read_bytes()
    for command, module in contract.COMMANDS.items():
        files[f"{RUNTIME_BIN}/{command}"] = LAUNCHER.format(
            command=command, package=contract.PACKAGE, module=module, lib=contract.LIB).encode()
    for name, argv in contract.BUILT_IN_HOOKS.items():
        files[f"{RUNTIME_HOOKS}/{name}"] = START_HOOK.format(command=shlex.join(
            [f"{contract.BIN}/{argv[0]}", *argv[1:]])).encode()
    files[f"{DEVBOX_CONTEXT}/bash-env.sh"] = template_file("bash-env.sh").replace(
        b"@BIN@", contract.BIN.encode())
    return files


def template_file(name: str) -> bytes:
    return resources.files("devbox_build").joinpath("dockerfile", *name.split("/")).read_bytes()


def _double_quoted(value: object) -> str:
    """A Dockerfile ENV/LABEL word: double-quoted, with quotes, backslashes and $ escaped.

    The spec refuses control characters in every value that reaches here; one that slipped
    through would end the instruction, so it stops the render instead.
    """
    value = str(value)
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError(f"refusing to write a control character into the Dockerfile: {value!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _shell_quoted(value: object) -> str:
    """A word in a RUN line's shell: quoted with shlex, the same checks as :func:`_double_quoted`."""
    value = str(value)
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError(f"refusing to write a control character into the Dockerfile: {value!r}")
    return shlex.quote(value)


def _auto(apt_pins: dict | None, section: str, asked: list[str]) -> str:
    """The pinned packages of a section the spec did not ask for (their dependencies)."""
    if not apt_pins:
        return ""
    names = [shlex.split(pin)[0].split("=", 1)[0] for pin in apt_pins[section]]
    return " ".join(shlex.quote(name) for name in names if name not in asked)


def _environment() -> jinja2.Environment:
    # Compiled templates are kept in the host's cache (keyed by the template's source): compiling
    # the Dockerfile template is half of a no-op build's own work.
    folder = cache.folder("templates")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        bytecode = jinja2.FileSystemBytecodeCache(str(folder))
    except OSError:  # a read-only home: compile every time
        bytecode = None
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("devbox_build", "dockerfile"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        bytecode_cache=bytecode,
    )
    env.filters["dq"] = _double_quoted
    env.filters["sh"] = _shell_quoted
    env.filters["json"] = json.dumps
    return env
