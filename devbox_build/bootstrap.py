"""A Debian base image for machines that cannot pull one: debootstrap from a mirror, then import."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .engine import Engine
from .errors import DevboxError
from .report import SILENT, Reporter

APT_SOURCES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
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
    reporter: Reporter = SILENT,
) -> str:
    """Build a minimal Debian root filesystem and import it into the engine as ``tag``."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DevboxError("debootstrap is not installed", hint="apt-get install debootstrap")
    if os.geteuid() != 0:
        raise DevboxError("bootstrap-base needs root (debootstrap creates device nodes and owners)")
    mirror = mirror or debian_mirror()
    with tempfile.TemporaryDirectory(prefix="devbox-base-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        reporter.note(f"debootstrap --variant=minbase {suite} from {mirror}")
        process = subprocess.run(
            [debootstrap, "--variant=minbase", suite, str(rootfs), mirror],
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
        reporter.note(f"importing {tarball.stat().st_size // 2**20} MiB as {tag}")
        return engine.import_rootfs(str(tarball), tag, IMAGE_CHANGES)
