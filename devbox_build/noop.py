"""The no-op rebuild's fast path: `devbox-build build ...` when nothing it reads has changed.

A build decides it has nothing to do from a content hash of what it read (the spec, its inputs and
locks, the template, the CA files, devbox-build's own code) and the engine's base image. Working
that out costs ~0.3 s of imports (pydantic, jinja2, the lock reader) and ~0.1 s of reading and
rendering. So the command line (``devbox-build``, ``python -m devbox_build``) watches, from its
first instruction, every file the process opens for reading and every folder it lists (Python's
audit hooks), and a successful build records a stamp: the command (its arguments, folder, and
``DEVBOX_*``, ``DOCKER_*`` and CA variables), the size, mtime, ctime and inode of each file and
folder it read, and what it ended with (each variant's content tag, image id, base image id
and tags).

The same command again finds the stamp, checks every recorded file is as it was (a changed or
new file changes it or its folder), and asks the engine whether every tag still names the
recorded image and the base is the recorded one. Then it says "up to date", as the full path
would, having imported the engine client alone. Anything else (another argument or variable, a
file touched, an image retagged or removed, a base bootstrapped again) takes the full path,
which records a new stamp. Only the standard library is imported here before the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from . import __version__, cache

# A command with these always takes the full path: it must push, rebuild, print JSON or help.
FULL_PATH_OPTIONS = ("--push", "--no-cache", "--json", "--help", "-h")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NOT_INPUTS = ("/proc/", "/sys/", "/dev/")
# A stamp holds at most this many paths; a build that read more records none.
MAX_PATHS = 5000


def command_key(argv: list[str]) -> str | None:
    """The stamp's name for this command, or None when it must take the full path."""
    if not argv or argv[0] != "build" or any(
            arg.split("=", 1)[0] in FULL_PATH_OPTIONS for arg in argv):
        return None
    environment = sorted((name, value) for name, value in os.environ.items()
                         if name.startswith(("DEVBOX_", "DOCKER_", "SSL_CERT_"))
                         or name in ("HOME", "XDG_CACHE_HOME", "REQUESTS_CA_BUNDLE"))
    return hashlib.sha256(json.dumps([argv, os.getcwd(), sys.prefix, environment]).encode()
                          ).hexdigest()


class Reads:
    """The files this process opens for reading and the folders it lists (an audit hook)."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            if mode is not None and any(c in mode for c in "wax+"):
                return
            if mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS:
                return
            self.files.add(os.path.abspath(os.fsdecode(path)))
        elif event in ("os.listdir", "os.scandir"):
            path = args[0]
            if not isinstance(path, int):
                self.folders.add(os.path.abspath(os.fsdecode(path if path is not None else ".")))


_watching: tuple[str, Reads] | None = None


def watch(argv: list[str]) -> None:
    """Start recording what this process reads, when the command may leave a stamp."""
    global _watching
    key = command_key(argv)
    if key is not None:
        reads = Reads()
        sys.addaudithook(reads)
        _watching = (key, reads)


def _signature(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _stamp(key: str) -> Path:
    return cache.folder("noop") / f"{key}.json"


def record(ca_line: str, results: list[dict]) -> None:
    """After a successful build: the stamp for the next identical command (never an error)."""
    if _watching is None:
        return
    key, reads = _watching
    own = str(cache.folder("")) + os.sep  # the layer cache and such: never an input
    paths = {path for path in reads.files | reads.folders
             if not path.startswith(_NOT_INPUTS) and not path.startswith(own)}
    # A file's folder too: a file added next to it (a new lock, a new CA) changes the folder.
    paths |= {os.path.dirname(path) for path in reads.files if path in paths}
    signatures = {path: signature for path in sorted(paths)
                  if (signature := _signature(path)) is not None}
    if len(signatures) > MAX_PATHS:
        return
    stamp = {"version": __version__, "ca": ca_line, "results": results, "read": signatures}
    target = _stamp(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(stamp))
        partial.replace(target)
    except OSError:
        pass  # a cache that cannot be written only costs the next no-op its speed


def fast_path(argv: list[str]) -> bool:
    """Whether the command was answered from its stamp (it printed what the full path would)."""
    key = command_key(argv)
    if key is None:
        return False
    try:
        stamp = json.loads(_stamp(key).read_text())
        if stamp["version"] != __version__ or any(
                _signature(path) != signature for path, signature in stamp["read"].items()):
            return False
        from .engine import Engine

        engine = Engine.connect()
        for result in stamp["results"]:
            if engine.image_id(result["base"]) != result["base_id"] or any(
                    engine.image_id(ref) != result["image_id"] for ref in result["tags"]):
                return False
    except Exception:  # noqa: BLE001  (any doubt: the full path decides, and says why)
        return False
    from .report import Reporter

    reporter = Reporter()
    reporter.console.print(stamp["ca"])
    for result in stamp["results"]:
        reporter.item("ok", f"up to date: {result['tags'][0]} (nothing to build)",
                      detail=f"also tagged: {', '.join(result['tags'][1:])}")
    return True
