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

A private channel's packages arrive already fetched (--packages: the host fetched them with its
credentials, channels.py). This runs in a throwaway build stage then, and --delta copies what the
install added or changed into a tree the image's stage copies over the prefix: the packages and
the stage's other files never reach the image. The prefix records each package's lock URL, as if
it had been downloaded here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import stat
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


CREDENTIALS_HINT = ("a private channel: give devbox-build its credentials on the host (a netrc "
                    "entry, or $RATTLER_AUTH_FILE); it fetches the packages there, and the "
                    "credentials never enter the image")


def use_fetched(records: list, folder: Path) -> dict[str, str]:
    """Point each record whose package is in ``folder`` at that file; returns file URL → the
    lock's URL, to put back in the prefix's records."""
    restore = {}
    for record in records:
        path = folder / record.file_name
        if path.is_file():
            restore[path.as_uri()] = record.url
            record.url = path.as_uri()
    return restore


def restore_urls(prefix: Path, restore: dict[str, str]) -> None:
    for path in (prefix / "conda-meta").glob("*.json"):
        text = original = path.read_text()
        for fetched, url in restore.items():
            text = text.replace(json.dumps(fetched), json.dumps(url))
        if text != original:
            path.write_text(text)


def snapshot(prefix: Path) -> dict[str, tuple]:
    """Every path under the prefix with what a COPY would carry of it."""
    entries = {}
    if not prefix.exists():
        return entries
    for root, dirs, files in os.walk(prefix):
        for name in [".", *dirs, *files] if root == str(prefix) else [*dirs, *files]:
            path = os.path.normpath(os.path.join(root, name))
            info = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            entries[os.path.relpath(path, prefix)] = (
                info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns, target)
    return entries


def write_delta(prefix: Path, before: dict[str, tuple], delta: Path) -> int:
    """Copy what the install added or changed under the prefix into ``delta`` (with the folders
    above each, as they are now); refuses a removal, which a COPY cannot carry."""
    after = snapshot(prefix)
    removed = sorted(set(before) - set(after))
    if removed:
        raise SystemExit(f"devbox-build: installing removed {prefix / removed[0]}, which the "
                         "image's stage cannot express; a variant's lock only adds packages")
    changed = [path for path, entry in after.items() if before.get(path) != entry]
    keep = set(changed)
    for path in changed:  # the folders above each, so the copy lands in place
        parent = os.path.dirname(path)
        while parent:
            keep.add(parent)
            parent = os.path.dirname(parent)
    keep.add(".")
    for path in sorted(keep):
        source, target = prefix / path, delta / path
        mode = after[path][0]
        if stat.S_ISDIR(mode):
            target.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
        os.lchown(target, after[path][1], after[path][2])
    # Folders last, deepest first: adding their entries changed their times.
    for path in sorted((p for p in keep if stat.S_ISDIR(after[p][0])), key=len, reverse=True):
        shutil.copystat(prefix / path, delta / path)
    for path in keep:
        if stat.S_ISLNK(after[path][0]):
            os.utime(delta / path, ns=(after[path][4], after[path][4]), follow_symlinks=False)
    return len(changed)


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
    parser.add_argument("--packages", type=Path, help="packages the host already fetched")
    parser.add_argument("--delta", type=Path,
                        help="copy what the install changed here, under the prefix's name")
    args = parser.parse_args()
    records = records_for(args.lock, args.subdir)
    present = installed(args.prefix) if (args.prefix / "conda-meta").is_dir() else []
    restore = use_fetched(records, args.packages) if args.packages else {}
    before = snapshot(args.prefix) if args.delta else {}
    cache = tempfile.mkdtemp(prefix="devbox-conda-cache-")
    try:
        asyncio.run(rattler.install(
            records, args.prefix, cache_dir=cache, installed_packages=present,
            execute_link_scripts=False, show_progress=False,
        ))
    except Exception as exc:  # rattler's InstallerError and friends
        print(f"devbox-build: installing {args.lock.name} failed: {exc}", file=sys.stderr)
        if re.search(r"\b40[13]\b", str(exc)):
            print(f"hint: {CREDENTIALS_HINT}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    trust_image_ca(args.prefix, args.ca_bundle)
    write_condarc(args.prefix, channels_of(args.lock), args.ca_bundle)
    share_with_group(args.prefix, args.group)
    restore_urls(args.prefix, restore)
    if args.delta:  # the prefix itself inside: a COPY sets a folder's mode only below its target
        write_delta(args.prefix, before, args.delta / args.prefix.name)
    added = len(records) - len(present)
    print(f"devbox-build: {args.lock.name}: {len(records)} conda packages in {args.prefix} "
          f"({added} new, {len(restore)} fetched by the host), hashes checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
