"""The image a check run looks at, and the containers the checks start from it.

Everything the checks learn from the engine goes through :class:`~devbox_build.engine.Engine`;
inside a container they use pytest-testinfra's docker backend (``Container.host``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import testinfra

from ..engine import Engine
from ..errors import DevboxError
from ..runtime import contract
from ..runtime.sbom import REQUIREMENTS  # noqa: F401 (the lock lines each group installed)

MANIFEST = contract.MANIFEST


# What SageMaker Studio requires of an image's user (its FileSystemConfig defaults), which this
# tool's images also use on laptops and EC2.
STUDIO_USER = contract.USER
STUDIO_UID = contract.UID
STUDIO_GID = contract.GID
STUDIO_HOME = contract.HOME
STUDIO_SHELL = contract.SHELL
IDE_PORT = contract.IDE_PORT


@dataclass
class ImageUnderTest:
    """An image reference with what the engine and the image itself say about it."""

    ref: str
    engine: Engine
    attrs: dict
    manifest: dict | None  # None: not built by devbox-build

    @classmethod
    def load(cls, engine: Engine, ref: str) -> ImageUnderTest:
        attrs = engine.image(ref)
        try:
            manifest = json.loads(engine.read_file(ref, MANIFEST))
        except DevboxError:
            manifest = None
        return cls(ref, engine, attrs, manifest)

    @property
    def config(self) -> dict:
        return self.attrs.get("Config") or {}

    @property
    def labels(self) -> dict[str, str]:
        return self.config.get("Labels") or {}

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env") or [])

    @property
    def cuda_version(self) -> str | None:
        return self.labels.get("devbox.cuda.version")

    @cached_property
    def pip_packages(self) -> dict[str, str]:
        """Python packages the manifest records (name → version); {} without a manifest."""
        packages = (self.manifest or {}).get("packages", {}).get("pip", [])
        return {p["name"]: p["version"] for p in packages}

    @cached_property
    def has_jupyterlab(self) -> bool:
        if self.manifest is not None:
            return "jupyterlab" in self.pip_packages
        code, _ = self.engine.run(self.ref, ["sh", "-c", "command -v jupyter-lab"],
                                  entrypoint=[])
        return code == 0


@dataclass
class Container:
    """A running container of the image under test; removed by id when the check is done."""

    id: str
    engine: Engine
    user: str | None = None
    _hosts: dict = field(default_factory=dict)

    @property
    def host(self) -> testinfra.host.Host:
        """testinfra's view of the container, as the image's default user."""
        return self.host_as(self.user)

    def host_as(self, user: str | None) -> testinfra.host.Host:
        spec = f"docker://{user}@{self.id}" if user else f"docker://{self.id}"
        if spec not in self._hosts:
            self._hosts[spec] = testinfra.get_host(spec)
        return self._hosts[spec]

    def url(self, path: str, port: int = IDE_PORT) -> str:
        return f"http://127.0.0.1:{self.engine.published_port(self.id, port)}{path}"

    def logs(self) -> str:
        return self.engine.logs(self.id)

    def get(self, path: str, *, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
        """GET ``path`` on the IDE port once the server answers (any HTTP status); proxies off."""
        return http_get(self.url(path), headers=headers, timeout=timeout,
                        still_running=lambda: self.engine.state(self.id)["Running"],
                        logs=self.logs)

    def wait_healthy(self, timeout: float = 60) -> str:
        """The container's health status once it leaves 'starting' (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            health = (self.engine.state(self.id).get("Health") or {}).get("Status", "none")
            if health != "starting" or time.monotonic() > deadline:
                return health
            time.sleep(0.3)


@contextmanager
def running(image: ImageUnderTest, command: list[str] | None = None,
            **options) -> Iterator[Container]:
    """A container of the image (Engine.start's options) for the block; removed by id after."""
    container_id = image.engine.start(image.ref, command, **options)
    try:
        yield Container(container_id, image.engine, user=options.get("user"))
    finally:
        image.engine.remove(container_id)


def http_get(url: str, *, headers=None, timeout: float = 60, still_running=lambda: True,
             logs=lambda: "") -> tuple[int, bytes]:
    # A request to the container itself must not go through a corporate proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if not still_running():
                raise AssertionError(f"the container exited before {url} answered:\n"
                                     + logs()[-2000:]) from None
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s:\n"
                                     + logs()[-2000:]) from None
            time.sleep(0.1)
