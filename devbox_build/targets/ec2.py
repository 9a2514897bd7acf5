"""EC2 boxes: a cheap CPU box and a GPU box sharing one data volume, defined in ``boxes.toml``.

This module holds the box definition and ``preflight``, the offline check that runs before any
AWS call: everything EC2 would refuse, or accept and then fail at run time, is one clear error
naming the file and key. The facts come from botocore's EC2 model (which instance types exist)
and from the image itself (its labels and architecture); the tables below say what botocore
does not (which families have GPUs or Arm CPUs, what driver each AMI family ships).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..spec import Repository, _describe

BOXES_FILENAME = "boxes.toml"

# Instance families with NVIDIA GPUs (AWS's accelerated-computing pages, 2026-11).
GPU_FAMILIES = {"p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6e-gb200",
                "g4dn", "g5", "g5g", "g6", "g6e", "g6f", "gr6", "gr6f", "g7e"}
# The NVIDIA driver each AMI family ships (the family's release notes, 2026-11); a CPU family
# has none. An image whose CUDA needs a newer driver would start and then fail every CUDA call.
AMI_FAMILIES = {
    "al2023": None,
    "ubuntu-24.04": None,
    "dlami-base-gpu-al2023": "580.95.05",
    "dlami-base-gpu-ubuntu-24.04": "580.95.05",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(_Model):
    instance_type: str
    ami_family: Literal[tuple(AMI_FAMILIES)]  # type: ignore[valid-type]


class Volume(_Model):
    size_gb: Annotated[int, Field(ge=1, le=65536)] = 100
    type: Literal["gp3", "gp2", "io2", "st1"] = "gp3"
    availability_zone: str | None = None  # default: the box's


class Metadata(_Model):
    # IMDSv2 only; 2 hops, so a container behind Docker's bridge still reaches it.
    http_tokens: Literal["required", "optional"] = "required"
    hop_limit: Annotated[int, Field(ge=1, le=64)] = 2


class Box(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")]
    availability_zone: Annotated[str, Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d[a-z]$")]
    image: Repository  # tags cpu and gpu, one per role
    idle_minutes: Annotated[int, Field(ge=0)] = 60
    roles: dict[Literal["cpu", "gpu"], Role]
    volume: Volume = Volume()
    metadata: Metadata = Metadata()
    path: Path = Field(default=Path(BOXES_FILENAME), exclude=True)


def load_box(path: Path) -> Box:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no box definition here (see README: EC2 boxes)") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not a TOML file: {exc}") from None
    try:
        return Box.model_validate({**data, "path": path})
    except ValidationError as exc:
        raise InputError(f"{path}: " + _describe(exc)) from None


@dataclass(frozen=True)
class ImageFacts:
    """What preflight needs to know about a role's image (from the engine, or a registry)."""

    ref: str
    architecture: str  # "amd64", "arm64"
    cuda_min_driver: str | None  # the label devbox.cuda.min-driver


@cache
def instance_types() -> frozenset[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    return frozenset(model.shape_for("InstanceType").enum)


def family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def architecture(instance_type: str) -> str:
    """Graviton families carry a 'g' after their generation (m7g, c7gn, g5g, t4g, is4gen):
    arm64. x86 GPU families start with g but have none after the digit (g4dn, g6e)."""
    return "arm64" if re.fullmatch(r"[a-z]+\d+[a-z]*g[a-z]*", family(instance_type)) else "amd64"


def _driver(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def preflight(box: Box, images: dict[str, ImageFacts]) -> list[str]:
    """Every problem the box would meet on EC2, each naming the file and key; [] when none."""
    where = f"{box.path}: key"
    problems = []
    for role, spec in box.roles.items():
        key = f"{where} 'roles.{role}.instance_type'"
        if spec.instance_type not in instance_types():
            problems.append(f"{key}: {spec.instance_type!r} is not an EC2 instance type")
            continue
        gpu = family(spec.instance_type) in GPU_FAMILIES
        if role == "gpu" and not gpu:
            problems.append(f"{key}: {spec.instance_type} has no GPU, and the gpu role runs "
                            f"{box.image}:gpu (a GPU image)")
        image = images.get(role)
        if image is None:
            continue
        wanted = architecture(spec.instance_type)
        if image.architecture != wanted:
            problems.append(f"{key}: {spec.instance_type} is {wanted}, but {image.ref} is "
                            f"linux/{image.architecture}")
        driver = AMI_FAMILIES[spec.ami_family]
        if image.cuda_min_driver:
            if driver is None:
                problems.append(f"{where} 'roles.{role}.ami_family': {spec.ami_family} ships no "
                                f"NVIDIA driver; {image.ref} needs {image.cuda_min_driver} or "
                                "newer (use a dlami-base-gpu family)")
            elif _driver(driver) < _driver(image.cuda_min_driver):
                problems.append(f"{where} 'roles.{role}.ami_family': {spec.ami_family} ships "
                                f"driver {driver}; {image.ref} needs {image.cuda_min_driver} "
                                "or newer")
    volume_zone = box.volume.availability_zone or box.availability_zone
    if volume_zone != box.availability_zone:
        problems.append(f"{where} 'volume.availability_zone': {volume_zone}, but the boxes run in "
                        f"{box.availability_zone}: an EBS volume attaches only in its own zone")
    if not volume_zone.startswith(box.region):
        problems.append(f"{where} 'availability_zone': {volume_zone} is not in {box.region}")
    if box.metadata.http_tokens != "required":
        problems.append(f"{where} 'metadata.http_tokens': use 'required' (IMDSv2 only)")
    if box.metadata.hop_limit < 2:
        problems.append(f"{where} 'metadata.hop_limit': {box.metadata.hop_limit}; a container "
                        "behind Docker's bridge is one hop further and needs 2 to reach IMDS")
    return problems
