"""JupyterHub: the team's images served by a hub, on one host (DockerSpawner) or on Kubernetes
(Zero to JupyterHub's chart). Two targets, admitting images the same way:

    DockerHub      jupyterhub_config.py (fixed) + devbox-hub.json (data)
    KubernetesHub  the chart's values.yaml for the same profiles

A profile is one built image: its content tag (what a hub pulls never changes under it), whether
it needs GPUs (its CUDA label), and the name a user picks it by. A hub that runs only signed
images (``--verify-key``) gets each image's verified digest instead: what the hub pulls is then
exactly what was signed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...runtime import contract

CONFIG = Path(__file__).parent / "jupyterhub_config.py"
SETTINGS = "devbox-hub.json"
# What the server's own token may do: report activity, be reached, stop itself.
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", "servers!server"]
CONTENT_TAG = re.compile(r".+:(?P<variant>[a-z0-9-]+)-[0-9a-f]{12}")


@dataclass(frozen=True)
class Profile:
    slug: str
    display_name: str
    image: str  # the content tag
    gpus: bool


def admit(image) -> list[str]:
    """Why a hub cannot serve ``image`` (checks.image.ImageUnderTest); [] when it can."""
    tags = image.attrs.get("RepoTags") or []
    problems = []
    if not any(CONTENT_TAG.fullmatch(t) for t in tags):
        problems.append(f"not built by devbox-build (no content tag among "
                        f"{', '.join(tags) or 'its tags'}): devbox-build build IMAGE")
    if "jupyterhub" not in image.pip_packages:
        problems.append("has no jupyterhub, so a hub cannot start it: add jupyterhub (the "
                        "hub's major version) to its pip requirements, lock and build")
    return problems


def profile_for(image, pinned: str | None = None, keep_tag: bool = False) -> Profile:
    """The profile of an admitted image: its content tag, or the ``pinned`` REPOSITORY@DIGEST
    it was verified as (REPOSITORY:CONTENT-TAG@DIGEST with ``keep_tag``); its variant; whether
    it has CUDA."""
    content = next(t for t in image.attrs["RepoTags"] if CONTENT_TAG.fullmatch(t))
    variant = CONTENT_TAG.fullmatch(content)["variant"]
    spec = image.labels.get(contract.LABEL_SPEC, content.rsplit("/", 1)[-1].split(":")[0])
    gpus = bool(image.cuda_version)
    ref = content
    if pinned:
        name, digest = pinned.split("@")
        ref = f"{name}:{content.rsplit(':', 1)[1]}@{digest}" if keep_tag else pinned
    return Profile(slug=variant, image=ref, gpus=gpus, display_name=f"{spec} ({variant}"
                   + (", GPU" if gpus and "gpu" not in variant else "") + ")")


def docker_settings(profiles: list[Profile], network: str, idle_timeout: str | None,
                    cull_minutes: int | None, home_volume: str = "devbox-home-{username}"
                    ) -> dict:
    environment = {}
    if idle_timeout:
        environment = {"DEVBOX_IDLE_TIMEOUT": idle_timeout, "DEVBOX_IDLE_ACTION": "stop"}
    return {
        "profiles": [asdict(p) for p in profiles],
        "network": network,
        "home": contract.HOME,
        "home_volume": home_volume,
        "environment": environment,
        "server_token_scopes": SERVER_TOKEN_SCOPES,
        "cull": {"timeout_seconds": cull_minutes * 60, "every_seconds": 60}
        if cull_minutes else None,
    }


def docker_files(settings: dict) -> dict[str, str]:
    """The fixed configuration beside its data: no value ever changes the Python file."""
    return {CONFIG.name: CONFIG.read_text(), SETTINGS: json.dumps(settings, indent=2) + "\n"}


@dataclass(frozen=True)
class DockerHub:
    """A hub on one host: DockerSpawner, a home volume per user, the images as profiles."""

    network: str = "devbox-hub"
    home_volume: str = "devbox-home-{username}"
    idle_timeout: str | None = None
    cull_minutes: int | None = None
    pinned: dict[str, str] = field(default_factory=dict)  # image.ref → REPOSITORY@DIGEST
    name = "JupyterHub (DockerSpawner)"

    def admit(self, image) -> list[str]:
        return admit(image)

    def render(self, images: Sequence) -> dict[str, str]:
        profiles = [profile_for(image, self.pinned.get(image.ref)) for image in images]
        return docker_files(docker_settings(profiles, self.network, self.idle_timeout,
                                            self.cull_minutes, self.home_volume))


# The chart's own user-pod tolerations (its scheduling.userPods): a profile's tolerations replace
# the chart's, so a GPU profile lists them again beside the GPU nodes' taint.
CHART_USER_TOLERATIONS = [
    {"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user",
     "effect": "NoSchedule"},
    {"key": "hub.jupyter.org_dedicated", "operator": "Equal", "value": "user",
     "effect": "NoSchedule"},
]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _name_and_tag(image: str) -> tuple[str, str]:
    """The chart's image name and tag; a digest rides on the tag (``cpu-0123abcd@sha256:...``),
    which the chart joins back with a ':'."""
    image, at, digest = image.partition("@")
    name, _, tag = image.rpartition(":")
    return name, tag + at + digest


def chart_values(profiles: list[Profile], idle_timeout: str | None, cull_minutes: int | None,
                 gpu_node_selector: dict[str, str], resources: dict[str, dict]) -> dict:
    """Zero to JupyterHub's values: the user pods run the image as its user (uid 1000, fsGid
    100: the PVC home is group-writable), with jupyterhub-singleuser, each image a profile."""
    name, tag = _name_and_tag(profiles[0].image)
    profile_list = []
    for index, profile in enumerate(profiles):
        override: dict = {"image": profile.image}
        if profile.gpus:
            override["extra_resource_limits"] = {"nvidia.com/gpu": "1"}
            override["node_selector"] = dict(gpu_node_selector)
            override["tolerations"] = [*CHART_USER_TOLERATIONS, GPU_TOLERATION]
        profile_list.append({"display_name": profile.display_name, "slug": profile.slug,
                             "default": index == 0, "kubespawner_override": override})
    environment = ({"DEVBOX_IDLE_TIMEOUT": idle_timeout, "DEVBOX_IDLE_ACTION": "stop"}
                   if idle_timeout else {})
    return {
        "hub": {"config": {"Spawner": {"server_token_scopes": SERVER_TOKEN_SCOPES}}},
        "singleuser": {
            "image": {"name": name, "tag": tag, "pullPolicy": "IfNotPresent"},
            "uid": contract.UID,
            "fsGid": contract.GID,
            "cmd": contract.HUB_SERVER,
            "defaultUrl": "/lab",
            "storage": {"homeMountPath": contract.HOME},
            "cpu": resources["cpu"],
            "memory": resources["memory"],
            "extraEnv": environment,
            "profileList": profile_list,
        },
        "cull": {"enabled": bool(cull_minutes), "timeout": (cull_minutes or 60) * 60,
                 "every": 300},
    }


@dataclass(frozen=True)
class KubernetesHub:
    """A hub on Kubernetes through Zero to JupyterHub: the chart's values."""

    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    resources: dict[str, dict] = field(default_factory=lambda: {
        "cpu": {"guarantee": 0.5, "limit": 2.0}, "memory": {"guarantee": "1G", "limit": "4G"}})
    idle_timeout: str | None = None
    cull_minutes: int | None = None
    filename: str = "values.yaml"
    pinned: dict[str, str] = field(default_factory=dict)  # image.ref → REPOSITORY@DIGEST
    name = "JupyterHub (Zero to JupyterHub)"

    def admit(self, image) -> list[str]:
        return admit(image)

    def render(self, images: Sequence) -> dict[str, str]:
        import yaml

        values = chart_values([profile_for(image, self.pinned.get(image.ref), keep_tag=True)
                               for image in images], self.idle_timeout,
                              self.cull_minutes, self.gpu_node_selector, self.resources)
        return {self.filename: "# Zero to JupyterHub values, written by devbox-build hub k8s.\n"
                + yaml.safe_dump(values, sort_keys=False)}
