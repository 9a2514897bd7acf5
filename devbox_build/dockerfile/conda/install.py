"""Install a conda-lock.yml into a prefix, inside the image build: no solve, hashes checked.

Runs with py-rattler from /opt/devbox/conda/tools (installed with --require-hashes), so the
build needs no conda, mamba or micromamba binary. py-rattler verifies every package against the
lock's sha256 while it extracts it; a mismatch fails the build naming the package. A lock on top
of another (a variant's) installs only what it adds: the prefix's installed packages are passed
in, and the transaction keeps them.

After installing it makes the prefix fit the image:
  * the environment's OpenSSL trusts the image's CA bundle (<prefix>/ssl/cacert.pem → the OS
    bundle, where the build put any corporate CA);
  * <prefix>/.condarc puts user environments and caches under ~/.conda (the persisted home);
  * the prefix is group-owned, group-writable and setgid for the user's group, so a dev
    container user whose uid was remapped can still install.
The lock arrives with credentials already taken out of its URLs (render.py), so none reach
conda-meta or .condarc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import rattler


def records_for(lock_path: Path, subdir: str) -> list:
    lock = rattler.LockFile.from_path(lock_path)
    environment = lock.default_environment()
    if environment is None:
        raise SystemExit(f"devbox-build: {lock_path} has no default environment")
    platforms = {str(p.name): p for p in environment.platforms()}
    if subdir not in platforms:
        raise SystemExit(f"devbox-build: {lock_path} has no packages for {subdir} "
                         f"(it covers {', '.join(sorted(platforms))}); lock for it")
    return environment.conda_repodata_records_for_platform(platforms[subdir]) or []


def installed(prefix: Path) -> list:
    return [rattler.PrefixRecord.from_path(path)
            for path in sorted((prefix / "conda-meta").glob("*.json"))]


def trust_image_ca(prefix: Path, bundle: str) -> None:
    cacert = prefix / "ssl" / "cacert.pem"
    if cacert.exists() or cacert.is_symlink():
        cacert.unlink()
        cacert.symlink_to(bundle)


def write_condarc(prefix: Path, channels: list[str], bundle: str) -> None:
    lines = ["# Written by devbox-build. Environments you create go to ~/.conda/envs (your home",
             "# persists); the image's own environment is this prefix.",
             "channels:", *[f"  - {c}" for c in channels],
             "envs_dirs:", "  - ~/.conda/envs", f"  - {prefix}/envs",
             "pkgs_dirs:", "  - ~/.conda/pkgs",
             f"ssl_verify: {bundle}", ""]
    (prefix / ".condarc").write_text("\n".join(lines))


def share_with_group(prefix: Path, gid: int) -> None:
    for root, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(root, name)
            os.lchown(path, -1, gid)
            if not os.path.islink(path):
                mode = os.lstat(path).st_mode
                extra = 0o2070 if name in dirs else (0o060 | (0o010 if mode & 0o100 else 0))
                os.chmod(path, (mode | extra) & 0o7777)
    os.chown(prefix, -1, gid)
    os.chmod(prefix, os.stat(prefix).st_mode | 0o2070)


def channels_of(lock_path: Path) -> list[str]:
    environment = rattler.LockFile.from_path(lock_path).default_environment()
    return [str(channel.url) if hasattr(channel, "url") else str(channel)
            for channel in environment.channels()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--subdir", required=True)
    parser.add_argument("--prefix", type=Path, required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--ca-bundle", required=True)
    args = parser.parse_args()
    records = records_for(args.lock, args.subdir)
    present = installed(args.prefix) if (args.prefix / "conda-meta").is_dir() else []
    cache = tempfile.mkdtemp(prefix="devbox-conda-cache-")
    try:
        asyncio.run(rattler.install(
            records, args.prefix, cache_dir=cache, installed_packages=present,
            execute_link_scripts=False, show_progress=False,
        ))
    except Exception as exc:  # rattler's InstallerError and friends
        print(f"devbox-build: installing {args.lock.name} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    trust_image_ca(args.prefix, args.ca_bundle)
    write_condarc(args.prefix, channels_of(args.lock), args.ca_bundle)
    share_with_group(args.prefix, args.group)
    added = len(records) - len(present)
    print(f"devbox-build: {args.lock.name}: {len(records)} conda packages in {args.prefix} "
          f"({added} new), hashes checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
