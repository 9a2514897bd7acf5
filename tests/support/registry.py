"""A real registry on loopback: Debian's docker-registry (the CNCF distribution registry).

The engine treats 127.0.0.1 registries as insecure-allowed, so pushes and pulls need no TLS.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class LoopbackRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LoopbackRegistry:
        config = self.folder / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.folder / 'data'}\n"
            f"http:\n  addr: {self.host}\n"
        )
        self.process = subprocess.Popen(["docker-registry", "serve", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:  # until it answers (a state), bounded
            try:
                with opener.open(f"http://{self.host}/v2/", timeout=2):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    def __exit__(self, *_exc) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=30)

    def tags(self, repository: str) -> list[str]:
        import json
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.host}/v2/{repository}/tags/list", timeout=10) as response:
            return json.load(response).get("tags") or []

    def manifest(self, repository: str, tag: str) -> dict:
        """The image manifest a pull reads first: its layers, by compressed digest and size."""
        import json
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repository}/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                               "application/vnd.oci.image.manifest.v1+json"})
        with opener.open(request, timeout=10) as response:
            return json.load(response)
