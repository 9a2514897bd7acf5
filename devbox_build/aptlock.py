"""The apt lock (``locks/<platform>/apt.txt``): the exact version of every Debian package the os
and system layers install, so those layers do not move when the mirror does (a point release).

Opt-in: ``devbox-build lock SPEC --apt`` resolves it in a throwaway container of the base image
(``apt-get install --simulate``, nothing installed) and writes one section per layer; from then
on the build installs ``name=version`` for every package, and ``lock --check`` and ``build`` hold
it to its inputs (the base reference, the user's sudo, ``[system] packages``) like the pip locks.
A version the mirror no longer carries fails the build naming it; lock again to move on.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

from .errors import LockError
from .spec import ImageSpec

FILENAME = "apt.txt"
FORMAT = "devbox-apt-lock/1"
SECTIONS = ("os", "system")
INST = re.compile(r"^Inst (?P<name>\S+) (?:\[\S+\] )?\((?P<version>\S+) ")


def os_packages(spec: ImageSpec) -> list[str]:
    """What the os layer installs on the base (Dockerfile.j2's first RUN)."""
    return ["ca-certificates", "python3", "python3-venv"] + (["sudo"] if spec.user.sudo else [])


def path(spec: ImageSpec, platform: str) -> Path:
    from .locking import lock_dir

    return lock_dir(spec, platform) / FILENAME


def base_of(spec: ImageSpec) -> str:
    bases = {variant.base for variant in spec.variants.values()}
    if len(bases) != 1:
        raise LockError(f"{spec.path}: an apt lock needs one base image for every variant; "
                        f"the variants use {', '.join(sorted(bases))}")
    return bases.pop()


def inputs_digest(spec: ImageSpec, platform: str) -> str:
    text = (f"{FORMAT}\nplatform={platform}\nbase={base_of(spec)}\nextends={spec.extends}\n"
            f"os={' '.join(os_packages(spec))}\nsystem={' '.join(spec.system.packages)}\n")
    return hashlib.sha256(text.encode()).hexdigest()


def read(lock: Path) -> dict[str, list[str]]:
    """Section → ``name=version`` pins, in the file's order."""
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    current = None
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("[") and line.strip("[] ") in SECTIONS:
            current = line.strip("[] ")
        elif current is not None:
            sections[current].append(line.strip())
    return sections


def verdict(spec: ImageSpec, platform: str) -> str | None:
    """Why the apt lock must be rewritten; None when fresh or when the spec has none."""
    from .locking import sealed_verdict

    lock = path(spec, platform)
    if not lock.is_file():
        return None
    return sealed_verdict(lock, inputs_digest(spec, platform),
                          "its inputs (base, sudo, [system] packages)")


def resolve(engine, spec: ImageSpec, platform: str, environment: dict[str, str]
            ) -> dict[str, list[str]]:
    """Every package apt would install for each layer, simulated in a throwaway container."""
    os_names = [] if spec.extends else os_packages(spec)
    wanted = [*os_names, *[name.split("=")[0] for name in spec.system.packages]]
    script = ("set -e; apt-get update -qq >/dev/null; "
              f"apt-get install -s --no-install-recommends {shlex.join(os_names) or 'apt'}; "
              "echo ---; "
              f"apt-get install -s --no-install-recommends {shlex.join(wanted) or 'apt'}")
    from .build import base_for

    # The platform's own base: the spec's, or its twin for another platform than the engine's.
    base, _ = base_for(engine, spec, next(iter(spec.variants)), platform)
    code, output = engine.run(base, ["sh", "-c", script], user="0", entrypoint=[],
                              environment=environment)
    if code != 0:
        raise LockError(f"{spec.path}: apt could not resolve {' '.join(wanted)} on "
                        f"{base}:\n  " + "\n  ".join(output.strip().splitlines()[-8:]))
    first, _, both = output.partition("\n---\n")
    pins = [[f"{m['name']}={m['version']}" for m in map(INST.match, text.splitlines()) if m]
            for text in (first, both)]
    os_pins = pins[0] if os_names else []
    return {"os": os_pins, "system": [pin for pin in pins[1] if pin not in os_pins]}


def write(spec: ImageSpec, platform: str, sections: dict[str, list[str]]) -> Path:
    from .locking import DIGEST_PREFIX, regenerate_command, sealed, write_atomic

    header = (f"# The Debian packages of image '{spec.name}' ({platform}, on {base_of(spec)}), "
              "each at the version the build installs. Do not edit.\n"
              f"# Regenerate with: {regenerate_command(spec)} --apt\n"
              f"{DIGEST_PREFIX}{inputs_digest(spec, platform)}\n")
    body = "".join(f"[{name}]\n" + "".join(f"{pin}\n" for pin in sorted(sections[name]))
                   for name in SECTIONS)
    lock = path(spec, platform)
    write_atomic(lock, sealed(header + body))
    return lock
