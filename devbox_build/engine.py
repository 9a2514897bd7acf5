"""The one place that talks to the container engine (docker-py).

Everything above this module speaks in terms of image references, build events and plain data;
docker-py objects and exceptions do not leak out. Builds use the engine's classic builder through
the API (docker-py has no BuildKit client), so generated Dockerfiles avoid BuildKit-only syntax.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import docker
import docker.errors
import requests.exceptions

from .errors import DevboxError, EngineUnavailable

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Builder chatter that says nothing about the step itself.
_NOISE = ("---> Running in ", "Removing intermediate container ")


@dataclass(frozen=True)
class Step:
    """The builder started instruction ``number`` of ``total``."""

    number: int
    total: int
    instruction: str


@dataclass(frozen=True)
class Output:
    """A line the current step printed (or a "Using cache" note)."""

    text: str


@dataclass(frozen=True)
class Built:
    image_id: str


class StepFailed(DevboxError):
    """An instruction failed; ``step`` is the Step that failed, ``output`` its lines."""

    def __init__(self, message: str, step: Step | None, output: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.output = output


BuildEvent = Step | Output | Built


class Engine:
    """A connected engine. Use :meth:`connect`."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.api = client.api

    @classmethod
    def connect(cls) -> Engine:
        host = os.environ.get("DOCKER_HOST", "the default socket (unix:///var/run/docker.sock)")
        try:
            client = docker.from_env(timeout=600)
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable(
                f"no Docker engine reachable at {host}: {_reason(exc)}",
                hint="start Docker (on Linux: dockerd) or point DOCKER_HOST at a running engine",
            ) from None
        return cls(client)

    # -- images ---------------------------------------------------------------------------------

    def image_id(self, ref: str) -> str | None:
        try:
            return self.api.inspect_image(ref)["Id"]
        except docker.errors.ImageNotFound:
            return None

    def image(self, ref: str) -> dict:
        try:
            return self.api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            raise DevboxError(f"no image {ref!r} in the engine") from None

    def pull(self, ref: str) -> str:
        """Pull ``ref``; raises DevboxError with the engine's reason when it cannot."""
        try:
            self.client.images.pull(ref)
        except docker.errors.APIError as exc:
            raise DevboxError(f"cannot pull {ref}: {_reason(exc)}") from None
        return self.api.inspect_image(ref)["Id"]

    def tag(self, image_id: str, ref: str) -> None:
        repository, _, tag = ref.rpartition(":")
        self.api.tag(image_id, repository, tag)

    def remove_image(self, ref: str) -> None:
        try:
            self.api.remove_image(ref, force=True)
        except docker.errors.ImageNotFound:
            pass

    def history(self, ref: str) -> list[dict]:
        """Image history, bottom layer first."""
        return list(reversed(self.api.history(ref)))

    def size(self, ref: str) -> int:
        return self.api.inspect_image(ref)["Size"]

    def push(self, ref: str) -> Iterator[str]:
        repository, _, tag = ref.rpartition(":")
        for event in self.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise DevboxError(f"push of {ref} failed: {event['error']}")
            if event.get("status"):
                yield f"{event.get('id', '')} {event['status']}".strip()

    def import_rootfs(self, tarball: str, ref: str, changes: list[str]) -> str:
        """Import a root filesystem tar file as image ``ref``."""
        repository, _, tag = ref.rpartition(":")
        try:
            # From a file name: docker-py then sends a plain body, which the engine accepts
            # (a chunked stream is refused by some engine versions).
            self.api.import_image_from_file(tarball, repository=repository, tag=tag,
                                            changes=changes)
        except docker.errors.APIError as exc:
            raise DevboxError(f"importing {ref} failed: {_reason(exc)}") from None
        return self.api.inspect_image(ref)["Id"]

    # -- builds ---------------------------------------------------------------------------------

    def build(
        self,
        context: BinaryIO,
        *,
        buildargs: dict[str, str] | None = None,
        network_mode: str | None = None,
        nocache: bool = False,
    ) -> Iterator[BuildEvent]:
        """Build an untagged image from a tar context; yields events, ends with Built.

        Tagging is left to the caller, after success: a failed or interrupted build leaves no tag.
        """
        step: Step | None = None
        output: list[str] = []
        stream = self.api.build(
            fileobj=context,
            custom_context=True,
            decode=True,
            rm=True,
            forcerm=True,  # also remove intermediate containers when a step fails
            nocache=nocache,
            buildargs=buildargs or {},
            network_mode=network_mode,
        )
        try:
            for chunk in stream:
                if "error" in chunk:
                    message = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    raise StepFailed(message.strip(), step, output)
                if "aux" in chunk and "ID" in chunk["aux"]:
                    yield Built(chunk["aux"]["ID"])
                    continue
                for line in _ANSI.sub("", chunk.get("stream", "")).splitlines():
                    if line.strip().startswith(_NOISE):
                        continue
                    if match := _STEP.match(line):
                        step = Step(int(match[1]), int(match[2]), match[3])
                        output = []
                        yield step
                    elif line.strip():
                        output.append(line)
                        yield Output(line)
        except docker.errors.APIError as exc:
            raise StepFailed(_reason(exc), step, output) from None
        finally:
            stream.close()

    # -- containers -----------------------------------------------------------------------------

    def read_file(self, ref: str, path: str) -> bytes:
        """A file's bytes from an image, without starting a container."""
        container = self.api.create_container(ref, command=["true"], entrypoint=[])
        try:
            try:
                chunks, _ = self.api.get_archive(container["Id"], path)
            except docker.errors.NotFound:
                raise DevboxError(f"{ref} has no {path}") from None
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
                member = archive.extractfile(archive.getmembers()[0])
                return member.read() if member else b""
        finally:
            self.api.remove_container(container["Id"], force=True)

    def run(
        self,
        ref: str,
        command: list[str],
        *,
        user: str | None = None,
        environment: dict[str, str] | None = None,
        entrypoint: list[str] | None = None,
    ) -> tuple[int, str]:
        """Run a command to completion in a fresh container, removed afterwards by id."""
        container = self.api.create_container(
            ref, command=command, user=user or "", environment=environment,
            entrypoint=entrypoint,
        )
        try:
            self.api.start(container["Id"])
            status = self.api.wait(container["Id"])["StatusCode"]
            logs = self.api.logs(container["Id"], stdout=True, stderr=True).decode(errors="replace")
            return status, logs
        finally:
            self.api.remove_container(container["Id"], force=True)


def _reason(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    text = str(exc)
    # docker-py wraps connection failures several levels deep; the innermost reason reads best.
    for needle in ("No such file or directory", "Connection refused", "Permission denied"):
        if needle in text:
            return needle
    return text.splitlines()[0] if text else type(exc).__name__
