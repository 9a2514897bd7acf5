"""A Debian base image for machines that cannot pull one: debootstrap from a mirror, then import.

For another platform than the engine's own (arm64 on an amd64 machine, under QEMU's emulation),
the root file system is loaded as an image whose configuration says that platform (the engine's
`docker import --platform` is ignored outside experimental mode), under the name
refs.platform_twin gives it, beside the native image of the same name."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .engine import Engine
from .errors import DevboxError
from .refs import platform_twin
from .report import SILENT, Reporter

APT_SOURCES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
# debootstrap's name for each platform's architecture.
ARCHITECTURES = {"linux/amd64": "amd64", "linux/arm64": "arm64"}
IMAGE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["bash"]',
]


def debian_mirror(sources: list[Path] = APT_SOURCES) -> str:
    """The first Debian archive (not security) this machine's apt is configured with."""
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        # deb822 stanzas (*.sources) and one-line "deb URL suite ..." entries.
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.findall(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = " ".join(re.findall(r"^Suites:\s*(.+)$", stanza, re.M))
            if uris and "-security" not in suites and uris[0].rstrip("/").endswith("/debian"):
                return uris[0]
        for uri, suite in re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian") and "-security" not in suite:
                return uri
    raise DevboxError("no Debian mirror found in this machine's apt sources; pass --mirror URL")


def bootstrap_base(
    engine: Engine,
    tag: str,
    *,
    suite: str = "bookworm",
    mirror: str | None = None,
    platform: str | None = None,
    reporter: Reporter = SILENT,
) -> str:
    """Build a minimal Debian root filesystem and import it into the engine as ``tag`` (for
    another ``platform`` than the engine's: as its twin, refs.platform_twin)."""
    native = engine.platform()
    platform = platform or native
    if platform not in ARCHITECTURES:
        raise DevboxError(f"--platform {platform}: not one of {', '.join(ARCHITECTURES)}")
    if platform != native and not engine.can_emulate(platform):
        raise DevboxError(f"this machine runs {native} and cannot run {platform} programs, which "
                          "debootstrap's second stage needs: no emulation is registered "
                          "(binfmt_misc)", hint="scripts/provision.sh registers it on Debian "
                                                "(qemu-user-static)")
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DevboxError("debootstrap is not installed", hint="apt-get install debootstrap")
    if os.geteuid() != 0:
        raise DevboxError("bootstrap-base needs root (debootstrap creates device nodes and owners)")
    mirror = mirror or debian_mirror()
    with tempfile.TemporaryDirectory(prefix="devbox-base-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        arch = ARCHITECTURES[platform]
        reporter.note(f"debootstrap --variant=minbase --arch={arch} {suite} from {mirror}")
        process = subprocess.run(
            [debootstrap, "--variant=minbase", f"--arch={arch}", suite, str(rootfs), mirror],
            capture_output=True, text=True, check=False,
        )
        if process.returncode != 0:
            tail = "\n".join((process.stdout + process.stderr).strip().splitlines()[-20:])
            raise DevboxError(f"debootstrap of {suite} from {mirror} failed:\n{tail}")
        for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file() and path.name != "lock":
                    path.unlink()
        tarball = Path(scratch) / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True
        )
        if platform == native:
            reporter.note(f"importing {tarball.stat().st_size // 2**20} MiB as {tag}")
            return engine.import_rootfs(str(tarball), tag, IMAGE_CHANGES)
        twin = platform_twin(tag, platform)
        reporter.note(f"loading {tarball.stat().st_size // 2**20} MiB as {twin} ({platform})")
        archive = Path(scratch) / "image.tar"
        _archive(tarball, arch, archive)
        with archive.open("rb") as handle:
            image_id = engine.load(iter(lambda: handle.read(1 << 20), b""))
        engine.tag(image_id, twin)
        return image_id


def _archive(rootfs_tar: Path, arch: str, target: Path) -> None:
    """A `docker save` archive of one layer (the root file system) whose configuration says
    ``arch``."""
    digest = hashlib.sha256()
    with rootfs_tar.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    config = json.dumps({
        "architecture": arch, "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [IMAGE_CHANGES[0].removeprefix("ENV ")],
                   "Cmd": json.loads(IMAGE_CHANGES[1].removeprefix("CMD "))},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest.hexdigest()}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "debootstrap"}],
    }, sort_keys=True).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": None,
                            "Layers": ["rootfs/layer.tar"]}]).encode()
    with tarfile.open(target, mode="w") as archive:
        for name, data in (("config.json", config), ("manifest.json", manifest)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        archive.add(str(rootfs_tar), arcname="rootfs/layer.tar")
