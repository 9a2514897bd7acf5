"""devbox-finalize: the last build step, run inside the image by its own Python.

Writes /opt/devbox/manifest.json (what was built from what, and every installed package), gives
login shells the image's PATH, and
fails the build when the image breaks a promise the tool makes: no GPU driver baked in, no
package-manager caches left behind.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import contract, sbom

DEVBOX = Path(contract.DEVBOX)
# Leftovers that only cost space. apt's lists and caches, pip's and uv's download caches.
CACHE_GLOBS = (
    "/var/lib/apt/lists/*_*",
    "/var/cache/apt/*.bin",
    "/var/cache/apt/archives/*.deb",
    "/root/.cache/pip",
    "/root/.cache/uv",
    "/home/*/.cache/pip",
    "/tmp/pip-*",
)
SKIP_WALK = {"/proc", "/sys", "/dev"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_layers(info: dict) -> dict[str, str]:
    layers = {}
    for layer in info["pip_layers"]:
        for line in (DEVBOX / "requirements" / f"{layer['name']}.txt").read_text().splitlines():
            if "==" in line and not line[0].isspace() and not line.startswith("#"):
                layers[canonical(line.split("==")[0].split("[")[0])] = layer["layer"]
    return layers


def pip_packages(info: dict, base: dict | None) -> list[dict]:
    layers = requirement_layers(info)
    # An image that extends another keeps the packages of the image below, as layer "base".
    below = {p["name"]: p["layer"] for p in (base or {}).get("packages", {}).get("pip", [])}
    packages = []
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        # Anything not from a lock came with the virtual environment itself (pip, setuptools).
        layer = layers.get(name) or ("base" if below.get(name, "seed") != "seed" else "seed")
        # Installed bytes, from the files its RECORD lists (the .pyc files compiled at build
        # are not listed: they add about a fifth).
        size = sum(record.size or 0 for record in dist.files or ())
        packages.append({"name": name, "version": dist.version, "layer": layer, "size": size})
    return sorted(packages, key=lambda p: p["name"])


def conda_records(info: dict) -> list[dict]:
    """The conda prefix's own records of what it installed."""
    if not info.get("conda"):
        return []
    return [json.loads(path.read_text())
            for path in sorted(Path(info["conda"]["prefix"], "conda-meta").glob("*.json"))]


def conda_packages(info: dict) -> list[dict]:
    """What the conda layer installed, from the prefix's own records."""
    packages = []
    for record in conda_records(info):
        paths = (record.get("paths_data") or {}).get("paths") or []
        packages.append({**{key: record.get(key) for key in ("name", "version", "build",
                                                             "channel")},
                         "size": sum(entry.get("size_in_bytes") or 0 for entry in paths)
                         or record.get("size") or 0})
    return packages


def restore_path_for_login_shells(info: dict) -> None:
    """Debian's /etc/profile resets PATH for login shells (bash -l, Studio and VS Code terminals,
    ssh); give them the image's PATH back, with ~/.local/bin (where the user's `pip install`
    puts commands) first, as the image's own PATH has it."""
    Path("/etc/profile.d/devbox.sh").write_text(
        "# Written by devbox-build: the image's PATH, which /etc/profile would reset.\n"
        f"PATH=\"{os.environ['PATH']}\"\nexport PATH\n"
    )


def make_data_folder(info: dict) -> None:
    """/data, where dev containers and EC2 boxes mount the data volume: the user's group owns it
    (setgid, group-writable), so a fresh volume mounted there starts out writable for the user."""
    data = Path(contract.DATA)
    data.mkdir(exist_ok=True)
    gid = info.get("user", {}).get("gid", contract.GID)
    os.chown(data, 0, gid)
    data.chmod(0o2775)


def write_idle_rules(info: dict) -> None:
    """/etc/devbox/idle.toml, the rules devbox-idle reads. Values were validated by the spec;
    JSON strings and numbers are TOML as well."""
    rules = info.get("idle")
    if rules is None:
        return  # an image that extends another keeps the rules of the image below
    lines = ["# Written by devbox-build from the image spec's [idle]. DEVBOX_IDLE_* variables",
             "# override these at run time; `devbox-idle status` shows what applies.", "[idle]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in sorted(rules.items())]
    Path(contract.IDLE_RULES).parent.mkdir(exist_ok=True)
    Path(contract.IDLE_RULES).write_text("\n".join(lines) + "\n")


def let_pip_install_for_the_user(info: dict) -> None:
    """`pip install` by the user goes to ~/.local, which lives on the home volume and so outlives
    the container: the environment's own pip.conf says so for `install` alone, so `pip freeze`,
    `pip list` and `pip uninstall` see the whole environment (PIP_USER=1 would make `pip freeze`
    print only the user's packages). PIP_USER=0 (what build steps set) installs into the
    environment. A virtual environment hides the user site unless it includes the system site
    (Debian's, empty unless the spec adds python3-* packages)."""
    if info.get("extends"):
        return  # the environment below was opened already
    Path(contract.PIP_CONFIG).write_text(
        "# Written by devbox-build: the user's `pip install` goes to ~/.local (on the home\n"
        "# volume). PIP_USER=0 installs into the environment instead.\n"
        "[install]\nuser = true\n")
    config = Path(os.environ["VIRTUAL_ENV"], "pyvenv.cfg")
    text = config.read_text()
    config.write_text(re.sub(r"include-system-site-packages = false",
                             "include-system-site-packages = true", text))


def apt_packages() -> list[dict]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Installed-Size}\n"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [
        # dpkg records the installed size in KiB.
        {"name": name, "version": version, "size": int(size or 0) * 1024}
        for name, version, size in (line.split("\t") for line in out.splitlines() if line)
    ]


def driver_libraries() -> list[str]:
    found = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in SKIP_WALK]
        if "stubs" in root.split(os.sep):
            continue
        found += [os.path.join(root, f) for f in files if f.startswith("libcuda.so")]
    return found


def main(argv: list) -> int:
    info = json.loads(Path(contract.BUILD_INFO).read_text())
    problems = []
    leftovers = sorted(path for pattern in CACHE_GLOBS for path in glob.glob(pattern))
    if leftovers:
        problems.append("package caches left in the image: " + ", ".join(leftovers[:10]))
    runtime = (info.get("cuda") or {}).get("runtime")
    if runtime:
        # The label was taken from the lock; the image must hold exactly that runtime.
        name, _, version = runtime.partition(" ")
        found = {canonical(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions()}.get(name)
        if found is None and info.get("conda"):
            found = next((p["version"] for p in conda_packages(info) if p["name"] == name), None)
        if found != version:
            problems.append(f"the CUDA runtime the labels name ({runtime}) is not what is "
                            f"installed ({name} {found or 'missing'})")
    drivers = driver_libraries()
    if drivers:
        problems.append(
            "a GPU driver library is baked into the image (the host's NVIDIA runtime must "
            "provide it): " + ", ".join(drivers[:10])
        )
    if problems:
        for problem in problems:
            print(f"devbox-build: {problem}", file=sys.stderr)
        return 1
    # The manifest of the image this one extends (a project on the team image), if any.
    previous = Path(contract.MANIFEST)
    base = json.loads(previous.read_text()) if info.get("extends") and previous.is_file() else None
    if base:
        info["cuda"] = info.get("cuda") or base.get("cuda")  # the accelerator comes from below
        info["extends"] = {"ref": info["extends"], "spec": base.get("spec"),
                           "content_hash": base.get("content_hash")}
    manifest = {
        **info,
        "content_hash": os.environ.get("DEVBOX_CONTENT_HASH", "unknown"),
        "python_version": sys.version.split()[0],
        "packages": {"pip": pip_packages(info, base), "conda": conda_packages(info),
                     "apt": apt_packages()},
    }
    restore_path_for_login_shells(info)
    make_data_folder(info)
    write_idle_rules(info)
    let_pip_install_for_the_user(info)
    previous.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    records = [{**record, "size": package["size"]}
               for record, package in zip(conda_records(info), manifest["packages"]["conda"])]
    components = sbom.write(manifest, records)
    print(
        f"devbox-build: manifest written: {len(manifest['packages']['pip'])} pip, "
        f"{len(manifest['packages']['conda'])} conda and {len(manifest['packages']['apt'])} "
        f"apt packages; SBOM: {components} components"
    )
    return 0

