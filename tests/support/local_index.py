"""A package index the test serves itself: tiny wheels it makes, a PEP 691 JSON simple API on
loopback (with each file's size and sha256, as a real index gives them).

Lock tests that must be deterministic resolve against this, never against what the public index
holds today: a test adds a release when it wants one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               tag: str = "py3-none-any") -> Path:
    """A wheel with fixed timestamps (the same arguments give the same bytes); pure Python, or
    with ``tag`` one platform's (``cp311-cp311-manylinux_2_17_x86_64``)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist}.dist-info/WHEEL":
            f"Wheel-Version: 1.0\nGenerator: devbox-tests\nRoot-Is-Purelib: "
            f"{'true' if tag == 'py3-none-any' else 'false'}\nTag: {tag}\n".encode(),
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist}.dist-info/RECORD"] = (record + f"{dist}.dist-info/RECORD,,\n").encode()
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in sorted(files.items()):
            archive.writestr(zipfile.ZipInfo(member, (2000, 1, 1, 0, 0, 0)), data)
    return path


@dataclass
class LocalIndex:
    """Serves ``folder``'s wheels at ``url`` (``/simple/<name>/`` and ``/files/<wheel>``)."""

    folder: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def add(self, name: str, version: str, *requires: str, tag: str = "py3-none-any") -> Path:
        return make_wheel(self.folder, name, version, requires, tag)

    def project(self, name: str) -> dict:
        files = []
        for wheel in sorted(self.folder.glob(f"{name.replace('-', '_')}-*.whl")):
            data = wheel.read_bytes()
            files.append({"filename": wheel.name, "url": f"../../files/{wheel.name}",
                          "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                          "size": len(data)})
        return {"meta": {"api-version": "1.1"}, "name": name, "files": files,
                "versions": sorted({f["filename"].split("-")[1] for f in files})}


def serve(folder: Path):
    """Start a LocalIndex on 127.0.0.1 (a free port); returns (index, stop)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = LocalIndex(folder)

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head: bool = False):
            index.requests.append(self.path)
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if len(parts) == 2 and parts[0] == "simple":
                body, kind = json.dumps(index.project(parts[1])).encode(), JSON_TYPE
                if not json.loads(body)["files"]:
                    return self.send_error(404)
            elif len(parts) == 2 and parts[0] == "files" and (folder / parts[1]).is_file():
                body, kind = (folder / parts[1]).read_bytes(), "application/octet-stream"
            else:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    index.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return index, stop
