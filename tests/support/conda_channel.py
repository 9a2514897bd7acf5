"""A small conda channel for the tests, built here and served over http on loopback.

No public channel is reachable from CI, so the conda tests make their own: a few noarch
packages (one depending on another, one with a command in bin/, a stand-in ca-certificates with
ssl/cacert.pem), indexed with py-rattler. Served over plain http so that the installer checks
each package's sha256 against the lock rather than relying on TLS.
"""

from __future__ import annotations

import asyncio
import base64
import bz2
import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

GREETER_SCRIPT = b'#!/bin/sh\ncat "$(dirname "$0")/../share/greeting/words.txt"\n'
PACKAGES = {
    # name: (version, depends, files)
    "greeting-data": ("1.0", [], {"share/greeting/words.txt": b"hello from conda\n"}),
    "greeter": ("2.1", ["greeting-data >=1.0"], {"bin/greet": GREETER_SCRIPT}),
    "ca-certificates": ("2026.1", [], {"ssl/cacert.pem": b"# the channel's own CA bundle\n"}),
    "farewell": ("0.3", [], {"bin/farewell": b"#!/bin/sh\necho goodbye from conda\n"}),
}
# Older versions the channel serves too (a solve picks the newest unless told otherwise).
OLDER = [("greeter", "2.0", ["greeting-data >=1.0"], {"bin/greet": GREETER_SCRIPT}),
         ("farewell", "0.2", [], {"bin/farewell": b"#!/bin/sh\necho bye from conda\n"})]


def make_package(channel: Path, name: str, version: str, depends: list[str],
                 files: dict[str, bytes]) -> Path:
    """A noarch .tar.bz2 conda package with index.json and paths.json."""
    index = {"name": name, "version": version, "build": "0", "build_number": 0,
             "depends": depends, "noarch": "generic", "subdir": "noarch", "license": "MIT",
             "timestamp": 1767225600000}
    paths = {"paths_version": 1, "paths": [
        {"_path": path, "path_type": "hardlink", "sha256": hashlib.sha256(data).hexdigest(),
         "size_in_bytes": len(data)} for path, data in sorted(files.items())]}
    members = {"info/index.json": json.dumps(index).encode(),
               "info/paths.json": json.dumps(paths).encode(),
               "info/files": "".join(f"{p}\n" for p in sorted(files)).encode(), **files}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, data in sorted(members.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            info.mode = 0o755 if path.startswith("bin/") else 0o644
            archive.addfile(info, io.BytesIO(data))
    target = channel / "noarch" / f"{name}-{version}-0.tar.bz2"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bz2.compress(buffer.getvalue()))
    return target


def build_channel(channel: Path) -> Path:
    import rattler

    for name, (version, depends, files) in PACKAGES.items():
        make_package(channel, name, version, depends, files)
    for name, version, depends, files in OLDER:
        make_package(channel, name, version, depends, files)
    for subdir in ("linux-64", "linux-aarch64"):
        (channel / subdir).mkdir(parents=True, exist_ok=True)
    # Plain repodata.json only: what any conda client (and python's http.server) handles.
    asyncio.run(rattler.index.index_fs(channel, write_zst=False, write_shards=False))
    return channel


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    authorization: str | None = None  # the Authorization header a private channel wants
    requests: list[tuple[str, str | None]]  # (path, Authorization header) of each request

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Authorization")))
        if self.authorization and self.headers.get("Authorization") != self.authorization:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private channel"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class ServedChannel:
    """Serve a channel folder on 127.0.0.1 (a free port) for as long as the context lasts;
    with ``login`` (user, password), a private channel that answers 401 without them."""

    def __init__(self, folder: Path, login: tuple[str, str] | None = None) -> None:
        self.requests: list[tuple[str, str | None]] = []
        authorization = ("Basic " + base64.b64encode(":".join(login).encode()).decode()
                         if login else None)
        handler_class = type("ChannelHandler", (_QuietHandler,),
                             {"authorization": authorization, "requests": self.requests})
        handler = functools.partial(handler_class, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.folder = folder
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self) -> ServedChannel:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
