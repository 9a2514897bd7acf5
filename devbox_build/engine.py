"""The one place that talks to the container engine (docker-py).

Everything above this module speaks in terms of image references, build events and plain data;
docker-py objects and exceptions do not leak out. Builds use the engine's classic builder through
the API (docker-py has no BuildKit client), so generated Dockerfiles avoid BuildKit-only syntax.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import docker
import docker.errors
import requests.exceptions

from .errors import DevboxError, EngineError, EngineUnavailable

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Builder chatter that says nothing about the step itself.
_NOISE = ("---> Running in ", "Removing intermediate container ")
# The builder's line once a step's image is committed (the short id; "---> Using cache" is not).
_COMMITTED = re.compile(r"^\s*---> ([0-9a-f]{12,64})$")


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
class Committed:
    """Step ``step``'s image is committed (built or from the cache): what the next step runs on."""

    step: Step
    image_id: str


@dataclass(frozen=True)
class Built:
    image_id: str


class StepFailed(DevboxError):
    """An instruction failed; ``step`` is the Step that failed, ``output`` its lines."""

    def __init__(self, message: str, step: Step | None, output: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.output = output


BuildEvent = Step | Output | Committed | Built


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
            raise EngineError(f"no image {ref!r} in the engine") from None

    def pull(self, ref: str, platform: str | None = None) -> str:
        """Pull ``ref`` (for ``platform``); raises DevboxError with the engine's reason."""
        try:
            self.client.images.pull(ref, platform=platform)
        except docker.errors.APIError as exc:
            raise EngineError(f"cannot pull {ref}: {_reason(exc)}") from None
        return self.api.inspect_image(ref)["Id"]

    def image_platform(self, ref: str) -> str:
        """An image's platform as Docker names it: linux/amd64, linux/arm64."""
        attrs = self.api.inspect_image(ref)
        return f"{attrs.get('Os', 'linux')}/{attrs.get('Architecture', 'amd64')}"

    # -- the engine itself ------------------------------------------------------------------------

    def platform(self) -> str:
        """The platform this engine's containers run natively."""
        version = self.api.version()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(version["Arch"], version["Arch"])
        return f"{version['Os']}/{arch}"

    def can_emulate(self, platform: str) -> bool:
        """Whether build steps of a foreign ``platform`` can run: QEMU's binfmt handler for it
        is registered with the kernel. Known only for an engine on this machine; a remote one
        is given the benefit of the doubt (the build then fails on its first RUN)."""
        if not self.api.base_url.startswith(("http+unix://", "http+docker://localhost")):
            return True
        machine = {"linux/arm64": "aarch64", "linux/amd64": "x86_64"}[platform]
        return os.path.exists(f"/proc/sys/fs/binfmt_misc/qemu-{machine}")

    def tag(self, image_id: str, ref: str) -> None:
        repository, _, tag = ref.rpartition(":")
        try:
            self.api.tag(image_id, repository, tag)
        except docker.errors.APIError as exc:
            raise EngineError(f"cannot tag {ref}: {_reason(exc)}") from None

    def untag(self, ref: str, restore: str | None = None) -> None:
        """Take tag ``ref`` away (the image stays while other tags or containers use it), or
        point it back at image ``restore``."""
        if restore is not None:
            self.tag(restore, ref)
            return
        try:
            self.api.remove_image(ref, noprune=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            # In use by a container: the tag still goes, the image stays.
            self.api.remove_image(ref, force=True, noprune=True)

    def remove_image(self, ref: str) -> None:
        try:
            self.api.remove_image(ref, force=True)
        except docker.errors.ImageNotFound:
            pass

    def history(self, ref: str) -> list[dict]:
        """Image history, bottom layer first."""
        return list(reversed(self.api.history(ref)))

    def layers(self, ref: str) -> list[tuple[str, int, str]]:
        """(diff id, bytes, the step that made it) of each filesystem layer, bottom first: the
        history's steps that made a layer (RUN, COPY, ADD, the base's import), matched with the
        image's RootFS layers."""
        steps = [(entry["Size"], entry["CreatedBy"]) for entry in self.history(ref)
                 if "#(nop) " not in entry["CreatedBy"]
                 or "#(nop) COPY" in entry["CreatedBy"] or "#(nop) ADD" in entry["CreatedBy"]]
        diff_ids = self.image(ref)["RootFS"]["Layers"]
        if len(steps) != len(diff_ids):
            raise EngineError(f"{ref}: its history names {len(steps)} layers, its root file "
                              f"system has {len(diff_ids)}")
        return [(diff_id, size, step) for diff_id, (size, step) in zip(diff_ids, steps)]

    def size(self, ref: str) -> int:
        return self.api.inspect_image(ref)["Size"]

    def push(self, ref: str) -> Iterator[str]:
        repository, _, tag = ref.rpartition(":")
        for event in self.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise EngineError(f"push of {ref} failed: {event['error']}")
            if event.get("status"):
                yield f"{event.get('id', '')} {event['status']}".strip()

    def layer_lists(self, label: str) -> list[list[str]]:
        """The layers (diff ids, bottom first) of every image carrying ``label``: whatever chain
        of layers they make, this engine holds."""
        return [self.api.inspect_image(image["Id"])["RootFS"]["Layers"]
                for image in self.api.images(filters={"label": label})]

    def load(self, archive: Iterable[bytes]) -> str:
        """``docker load`` a `docker save` archive streamed in chunks; the image id it made.
        A layer whose chain the engine already holds is not read, and may be absent."""
        try:
            events = list(self.api.load_image(archive))
        except docker.errors.APIError as exc:
            raise EngineError(f"docker load failed: {_reason(exc)}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            # The engine dropped the connection (restarted, killed, out of memory).
            raise EngineError(f"docker load failed: the engine closed the connection "
                              f"({type(exc).__name__}: {exc})") from None
        for event in events:
            if "error" in event:
                raise EngineError(f"docker load failed: {event['error']}")
            if "Loaded image ID: " in event.get("stream", ""):
                return event["stream"].split("Loaded image ID: ", 1)[1].strip()
        raise EngineError(f"docker load named no image: {events[-3:]}")

    def import_rootfs(self, tarball: str, ref: str, changes: list[str]) -> str:
        """Import a root filesystem tar file as image ``ref``."""
        repository, _, tag = ref.rpartition(":")
        try:
            # From a file name: docker-py then sends a plain body, which the engine accepts
            # (a chunked stream is refused by some engine versions).
            self.api.import_image_from_file(tarball, repository=repository, tag=tag,
                                            changes=changes)
        except docker.errors.APIError as exc:
            raise EngineError(f"importing {ref} failed: {_reason(exc)}") from None
        return self.api.inspect_image(ref)["Id"]

    # -- builds ---------------------------------------------------------------------------------

    def build(
        self,
        context: BinaryIO,
        *,
        dockerfile: str = "Dockerfile",
        platform: str | None = None,
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
            dockerfile=dockerfile,
            decode=True,
            rm=True,
            forcerm=True,  # also remove intermediate containers when a step fails
            nocache=nocache,
            buildargs=buildargs or {},
            network_mode=network_mode,
            platform=platform,  # FROM pulls and every step run for it, on any builder
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
                        if step and (match := _COMMITTED.match(line)):
                            yield Committed(step, match[1])
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
                raise EngineError(f"{ref} has no {path}") from None
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
        volumes: dict[str, str] | None = None,
        network_mode: str | None = None,
        gpus: bool = False,
    ) -> tuple[int, str]:
        """Run a command to completion in a fresh container, removed afterwards by id."""
        container = self.api.create_container(
            ref, command=command, user=user or "", environment=environment,
            entrypoint=entrypoint, host_config=self._host_config(
                volumes=volumes, network_mode=network_mode, gpus=gpus),
        )
        try:
            self.api.start(container["Id"])
            status = self.api.wait(container["Id"])["StatusCode"]
            logs = self.api.logs(container["Id"], stdout=True, stderr=True).decode(errors="replace")
            return status, logs
        finally:
            self.api.remove_container(container["Id"], force=True)

    def _host_config(self, *, publish=(), tmpfs=None, volumes=None, network_mode=None,
                     gpus=False, extra_hosts=None, host_folders=None) -> dict:
        return self.api.create_host_config(
            # A bind mount of a folder that must exist where the engine runs (else create fails;
            # never made there, as `volumes` would for a path).
            mounts=[docker.types.Mount(target, source, type="bind")
                    for source, target in (host_folders or {}).items()] or None,
            network_mode=network_mode,
            extra_hosts=extra_hosts or None,
            port_bindings={port: ("127.0.0.1", None) for port in publish},
            tmpfs=tmpfs or None,
            binds={name: {"bind": path, "mode": "rw"} for name, path in (volumes or {}).items()},
            device_requests=(
                [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpus else None
            ),
        )

    def start(
        self,
        ref: str,
        command: list[str] | None = None,
        *,
        entrypoint: list[str] | None = None,
        user: str | None = None,
        environment: dict[str, str] | None = None,
        publish: list[int] = (),
        tmpfs: dict[str, str] | None = None,
        volumes: dict[str, str] | None = None,
        health_interval_s: float | None = None,
        gpus: bool = False,
        files: dict[str, tuple[bytes, int, int]] | None = None,
        extra_hosts: dict[str, str] | None = None,
    ) -> str:
        """Start a detached container; returns its id. The caller removes it (:meth:`remove`).

        ``publish`` ports go to free ports on 127.0.0.1 (see :meth:`published_port`), ``volumes``
        maps volume names (or host paths) to mount paths, ``health_interval_s`` keeps the
        image's HEALTHCHECK command but probes more often, ``files`` (absolute path → (bytes,
        uid, gid)) are written before the entrypoint starts, ``extra_hosts`` (name → address,
        "host-gateway" for this host) are added to its /etc/hosts.
        """
        host_config = self._host_config(publish=publish, tmpfs=tmpfs, volumes=volumes,
                                        gpus=gpus, extra_hosts=extra_hosts)
        healthcheck = (
            {"interval": int(health_interval_s * 1e9), "start_period": int(60e9)}
            if health_interval_s else None
        )
        try:
            container = self.api.create_container(
                ref, command=command, entrypoint=entrypoint, user=user or "",
                environment=environment, ports=list(publish), host_config=host_config,
                healthcheck=healthcheck, detach=True,
            )
        except docker.errors.ImageNotFound:
            raise EngineError(f"no image {ref!r} in the engine") from None
        try:
            for path, (data, uid, gid) in (files or {}).items():
                folder, name = path.rsplit("/", 1)
                self.copy_into(container["Id"], folder or "/", {name: data}, uid=uid, gid=gid)
            self.api.start(container["Id"])
        except docker.errors.APIError as exc:
            self.remove(container["Id"])
            raise EngineError(f"cannot start a container of {ref}: {_reason(exc)}") from None
        return container["Id"]

    def create(self, ref: str, command: list[str], *, user: str | None = None,
               environment: dict[str, str] | None = None,
               volumes: dict[str, str] | None = None, entrypoint: list[str] | None = None,
               network_mode: str | None = None, labels: dict[str, str] | None = None,
               host_folders: dict[str, str] | None = None,
               tmpfs: dict[str, str] | None = None) -> str:
        """Create (not start) a container, e.g. to copy files in first; see :meth:`start_created`.
        ``host_folders``: this host's folder → its path in the container, when the engine can
        see it (an engine elsewhere cannot: EngineError)."""
        try:
            return self.api.create_container(
                ref, command=command, user=user or "", environment=environment,
                entrypoint=entrypoint, labels=labels,
                host_config=self._host_config(volumes=volumes, network_mode=network_mode,
                                              host_folders=host_folders, tmpfs=tmpfs),
            )["Id"]
        except docker.errors.APIError as exc:
            if not host_folders:
                raise
            raise EngineError(f"cannot create a container of {ref} with "
                              f"{', '.join(host_folders)}: {_reason(exc)}") from None

    def labelled_containers(self, label: str) -> dict[str, str]:
        """Every container (running or not) carrying ``label``: id → the label's value."""
        return {container["Id"]: container["Labels"].get(label, "")
                for container in self.api.containers(all=True, filters={"label": label})}

    def start_created(self, container_id: str) -> None:
        self.api.start(container_id)

    def wait(self, container_id: str, timeout: float) -> int:
        """Wait for a container to exit; its status code."""
        try:
            return self.api.wait(container_id, timeout=timeout)["StatusCode"]
        except requests.exceptions.RequestException:
            raise DevboxError(
                f"container {container_id[:12]} still running after {timeout} s"
            ) from None

    def stop(self, container_id: str, timeout: int = 10) -> int:
        """``docker stop``: SIGTERM, SIGKILL after ``timeout`` s; the exit status."""
        self.api.stop(container_id, timeout=timeout)
        return self.api.inspect_container(container_id)["State"]["ExitCode"]

    def remove(self, container_id: str) -> None:
        """Remove a container (and its anonymous volumes), running or not."""
        try:
            self.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass

    def state(self, container_id: str) -> dict:
        """The container's State (Status, Running, ExitCode, Health, ...)."""
        return self.api.inspect_container(container_id)["State"]

    def logs(self, container_id: str) -> str:
        return self.api.logs(container_id, stdout=True, stderr=True).decode(errors="replace")

    def follow(self, container_id: str) -> Iterator[str]:
        """A running container's output, line by line as it comes, until it exits."""
        pending = b""
        for chunk in self.api.logs(container_id, stdout=True, stderr=True, stream=True,
                                   follow=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line.decode(errors="replace") for line in lines)
        if pending:
            yield pending.decode(errors="replace")

    def published_port(self, container_id: str, port: int) -> int:
        bindings = self.api.inspect_container(container_id)["NetworkSettings"]["Ports"]
        return int(bindings[f"{port}/tcp"][0]["HostPort"])

    def copy_into(self, container_id: str, path: str, files: dict[str, bytes],
                  uid: int = 0, gid: int = 0) -> None:
        """Write ``files`` (relative path → bytes) under ``path`` in a container."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid = len(data), 0o644, uid, gid
                archive.addfile(info, io.BytesIO(data))
        self.api.put_archive(container_id, path, buffer.getvalue())

    def copy_out(self, container_id: str, path: str) -> dict[str, bytes]:
        """Regular files under ``path`` in a container (relative path → bytes); {} if absent."""
        try:
            chunks, _ = self.api.get_archive(container_id, path)
        except docker.errors.NotFound:
            return {}
        files = {}
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            for member in archive.getmembers():
                if member.isfile():
                    name = member.name.split("/", 1)[1] if "/" in member.name else member.name
                    files[name] = archive.extractfile(member).read()
        return files

    def copy_file_out(self, container_id: str, path: str, target: Path) -> str:
        """Stream one file out of a container into ``target`` (not held in memory, no bind
        mount: the engine may be remote); its sha256."""
        stream, _ = self.api.get_archive(container_id, path)
        digest = hashlib.sha256()
        with tarfile.open(fileobj=_ChunkReader(stream), mode="r|") as archive:
            member = next(iter(archive))
            source = archive.extractfile(member)
            with target.open("wb") as out:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        return digest.hexdigest()

    def create_volume(self, name: str) -> str:
        return self.api.create_volume(name)["Name"]

    def remove_volume(self, name: str) -> None:
        try:
            self.api.remove_volume(name, force=True)
        except docker.errors.NotFound:
            pass

    def memory(self) -> int:
        """The memory of the machine the engine runs on (a laptop's VM, not the laptop), in
        bytes; 0 when it does not say."""
        return int(self.api.info().get("MemTotal") or 0)

    def has_gpu(self) -> bool:
        """Whether containers here can be given GPUs (the NVIDIA runtime is configured)."""
        return "nvidia" in (self.api.info().get("Runtimes") or {})


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (an engine's streamed reply)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.pending = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            self.pending = next(self.chunks, None)
            if self.pending is None:
                self.pending = b""
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


def _reason(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    text = str(exc)
    # docker-py wraps connection failures several levels deep; the innermost reason reads best.
    for needle in ("No such file or directory", "Connection refused", "Permission denied"):
        if needle in text:
            return needle
    return text.splitlines()[0] if text else type(exc).__name__
