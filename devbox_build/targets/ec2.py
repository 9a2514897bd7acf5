"""EC2 boxes: a cheap CPU box and a GPU box sharing one data volume, defined in ``boxes.toml``.

This module holds the box definition and ``preflight``, the offline check that runs before any
AWS call: everything EC2 would refuse, or accept and then fail at run time, is one clear error
naming the file and key. The facts come from botocore's EC2 model (which instance types exist)
and from the image itself (its labels and architecture); the tables below say what botocore
does not (which families have GPUs or Arm CPUs, what driver each AMI family ships).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

import jinja2
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .. import __version__
from ..errors import InputError
from ..runtime import contract
from ..registry import ECR_HOST
from ..spec import ImageReference, Repository, _describe

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


# Where each AMI family's current image id is published (SSM public parameters); {arch} is
# x86_64 or arm64 ({deb} amd64 or arm64 for Ubuntu's), and the user its images log in as.
AMI_PARAMETERS = {
    "al2023": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}",
    "ubuntu-24.04": "/aws/service/canonical/ubuntu/server/24.04/stable/current/{deb}/hvm/ebs-gp3/ami-id",
    "dlami-base-gpu-al2023":
        "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id",
    "dlami-base-gpu-ubuntu-24.04":
        "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id",
}
# EC2 refuses user data over 16 KB.
USER_DATA_LIMIT = 16384
# The image's user (the SageMaker Studio contract every devbox image keeps): owns home and data.
USER_IDS = f"{contract.UID}:{contract.GID}"
AwsId = Annotated[str, Field(pattern=r"^[a-z]+-[0-9a-f]{8,17}$")]


class Role(_Model):
    instance_type: str
    ami_family: Literal[tuple(AMI_FAMILIES)]  # type: ignore[valid-type]
    # An AMI id; default: the family's current one, from its SSM public parameter.
    ami: Annotated[str, Field(pattern=r"^ami-[0-9a-f]{8,17}$")] | None = None


# EBS's size limits per volume type (GiB; the EBS volume types page, 2026-11).
VOLUME_LIMITS = {"gp3": (1, 16384), "gp2": (1, 16384), "io2": (4, 65536), "st1": (125, 16384)}
# Mounting the volume over one of these would hide the host's own system.
SYSTEM_FOLDERS = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/mnt",
                  "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
                  "/var", "/var/lib", "/var/lib/docker"}


class Volume(_Model):
    size_gb: Annotated[int, Field(ge=1)] = 100
    type: Literal[tuple(VOLUME_LIMITS)] = "gp3"  # type: ignore[valid-type]
    availability_zone: str | None = None  # default: the box's
    # Where the boxes mount it; the container's home and /data live under it.
    mount_point: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9_.+-]+)+$")] = "/mnt/devbox"

    @field_validator("mount_point")
    @classmethod
    def _a_folder_of_its_own(cls, value: str) -> str:
        if any(part in (".", "..") for part in value.split("/")):
            raise ValueError(f"{value!r} has a '.' or '..' part: name the folder itself")
        if value.rstrip("/") in SYSTEM_FOLDERS:
            raise ValueError(f"{value!r} is a system folder; mounting there hides the host's "
                             "own files (use a folder of its own, like /mnt/devbox)")
        return value

    @model_validator(mode="after")
    def _size_within_the_type(self) -> Volume:
        low, high = VOLUME_LIMITS[self.type]
        if not low <= self.size_gb <= high:
            raise ValueError(f"size_gb: {self.size_gb} GiB; a {self.type} volume is {low} to "
                             f"{high} GiB")
        return self


class Metadata(_Model):
    # IMDSv2 only; 2 hops, so a container behind Docker's bridge still reaches it.
    http_tokens: Literal["required", "optional"] = "required"
    hop_limit: Annotated[int, Field(ge=1, le=64)] = 2


class Guardrails(_Model):
    """What the team allows, checked by the preflight before anything is launched."""

    # fnmatch patterns per role; empty: any type (the price cap still holds).
    allowed_types: dict[Literal["cpu", "gpu"], list[str]] = {}
    # The most an hour of each role may cost (USD, on demand; spot's MaxPrice too); a role not
    # named keeps the default cap.
    max_hourly_usd: dict[Literal["cpu", "gpu"], Annotated[float, Field(gt=0)]] = {}
    # Prices for types the shipped table lacks (USD per hour).
    prices: dict[str, Annotated[float, Field(gt=0)]] = {}
    # A GPU box with idle_minutes = 0 runs until someone stops it: only when said so here.
    allow_gpu_without_idle_stop: bool = False


DEFAULT_HOURLY_CAPS = {"cpu": 1.0, "gpu": 4.0}
# On-demand Linux prices in us-east-1, USD per hour (AWS's EC2 pricing page, 2026-11). Other
# regions differ by a few percent; a type missing here needs guardrails.prices. An estimate
# for caps and `status`, not a bill.
PRICES = {
    "t3.medium": 0.0416, "t3.large": 0.0832, "t3.xlarge": 0.1664, "t3.2xlarge": 0.3328,
    "m6i.large": 0.096, "m6i.xlarge": 0.192, "m6i.2xlarge": 0.384, "m6i.4xlarge": 0.768,
    "m7i.large": 0.1008, "m7i.xlarge": 0.2016, "m7i.2xlarge": 0.4032, "m7i.4xlarge": 0.8064,
    "m7g.large": 0.0816, "m7g.xlarge": 0.1632, "m7g.2xlarge": 0.3264,
    "c7i.large": 0.0893, "c7i.xlarge": 0.1785, "c7i.2xlarge": 0.357,
    "r7i.large": 0.1323, "r7i.xlarge": 0.2646, "r7i.2xlarge": 0.5292,
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288, "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.4xlarge": 1.3232,
    "g6.12xlarge": 4.6016, "g6e.xlarge": 1.861, "g6e.2xlarge": 2.242, "g6e.12xlarge": 10.493,
    "p4d.24xlarge": 21.9576, "p5.48xlarge": 55.04,
}
# What stays billed while the boxes are stopped: the data volume and snapshots (USD per GiB-month).
VOLUME_PRICES = {"gp3": 0.08, "gp2": 0.10, "io2": 0.125, "st1": 0.045}
SNAPSHOT_PRICE = 0.05


def hourly_price(box: Box, instance_type: str) -> float | None:
    return box.guardrails.prices.get(instance_type, PRICES.get(instance_type))


class Box(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    # [0-9], not \d: a Unicode digit (Arabic-Indic, fullwidth) is not a region.
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$")]
    availability_zone: Annotated[str, Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$")]
    image: Repository  # tags cpu and gpu, one per role; an ECR repository the boxes can read
    idle_minutes: Annotated[int, Field(ge=0)] = 60
    # When the boot script fails or the container's watcher goes quiet, the host powers off
    # after this long (time to log in and look).
    failsafe_minutes: Annotated[int, Field(ge=1, le=240)] = 15
    # Network and access: no inbound port is needed (SSM); the profile needs SSM and ECR reads.
    subnet_id: AwsId | None = None
    security_group_ids: list[AwsId] = []
    instance_profile: Annotated[str, Field(pattern=r"^[\w+=,.@-]{1,128}$")] | None = None
    # Spot: a persistent request that stops (not terminates) on interruption; the data volume is
    # separate from the instance and survives either way.
    spot: bool = False
    roles: dict[Literal["cpu", "gpu"], Role]
    # The team's public key (devbox-build generate-key-pair's .pub), relative to this file: a
    # box then runs only an image signed by it, pinned to the digest verified before launch.
    signed_by: Path | None = None
    volume: Volume = Volume()
    metadata: Metadata = Metadata()
    guardrails: Guardrails = Guardrails()
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

    @classmethod
    def of(cls, image) -> ImageFacts:
        """From an image the engine has (checks.image.ImageUnderTest)."""
        return cls(image.ref, image.attrs.get("Architecture", "amd64"),
                   image.labels.get("devbox.cuda.min-driver"))


# An ECR repository: its account, region and name.
ECR_REPOSITORY = re.compile(ECR_HOST.pattern + r"/(?P<name>[a-z0-9][a-z0-9._/-]*)")


@cache
def instance_types() -> frozenset[str]:
    """From botocore's bundled model, read without a session: no profile or credential is
    looked at (the preflight is offline, and works with AWS_PROFILE naming nothing)."""
    import botocore.loaders
    import botocore.model

    model = botocore.model.ServiceModel(
        botocore.loaders.Loader().load_service_model("ec2", "service-2"))
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
        if role == "cpu" and gpu:
            problems.append(f"{key}: {spec.instance_type} is a GPU instance; the cpu role is the "
                            "cheap box, and a GPU bills by the hour whether used or not")
        problems += _guardrails(box, role, spec.instance_type, key, gpu)
        if role in images:
            problems += image_problems(box, role, images[role])
    volume_zone = box.volume.availability_zone or box.availability_zone
    if volume_zone != box.availability_zone:
        problems.append(f"{where} 'volume.availability_zone': {volume_zone}, but the boxes run in "
                        f"{box.availability_zone}: an EBS volume attaches only in its own zone")
    if not volume_zone.startswith(box.region):
        problems.append(f"{where} 'availability_zone': {volume_zone} is not in {box.region}")
    if not ECR_REPOSITORY.fullmatch(box.image):
        problems.append(f"{where} 'image': {box.image} is not in ECR; a box pulls with its "
                        "instance role, which reads ECR (ACCOUNT.dkr.ecr.REGION.amazonaws.com/"
                        "NAME: push there with `devbox-build build ... --registry ... --push`)")
    if box.metadata.http_tokens != "required":
        problems.append(f"{where} 'metadata.http_tokens': use 'required' (IMDSv2 only)")
    if box.metadata.hop_limit < 2:
        problems.append(f"{where} 'metadata.hop_limit': {box.metadata.hop_limit}; a container "
                        "behind Docker's bridge is one hop further and needs 2 to reach IMDS")
    return problems


def image_problems(box: Box, role: str, image: ImageFacts) -> list[str]:
    """Why ``image`` would not run on the role's instance: its architecture, its CUDA driver."""
    where, spec = f"{box.path}: key", box.roles[role]
    if spec.instance_type not in instance_types():
        return []  # preflight names the instance type
    problems = []
    wanted = architecture(spec.instance_type)
    if image.architecture != wanted:
        problems.append(f"{where} 'roles.{role}.instance_type': {spec.instance_type} is "
                        f"{wanted}, but {image.ref} is linux/{image.architecture}")
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
    return problems


@dataclass(frozen=True)
class Ec2:
    """One role's box (a Target): admits an image for the role's instance type and AMI, renders
    the cloud-init user data the instance boots with. The box pulls ``box.image:role`` from ECR;
    the images admitted are the local builds pushed there."""

    box: Box
    role: str
    public_key: str
    volume_id: str = "vol-00000000000000000"  # `ec2 up` passes the real one
    image: str | None = None  # default box.image:role; a verified REPOSITORY@DIGEST when signed

    @property
    def name(self) -> str:
        return f"EC2 box {self.box.name} ({self.role})"

    def admit(self, image) -> list[str]:
        return image_problems(self.box, self.role, ImageFacts.of(image))

    def render(self, images=()) -> dict[str, str]:
        return {f"user-data-{self.role}.yml": user_data(
            self.box, self.role, self.image or f"{self.box.image}:{self.role}", self.volume_id,
            self.public_key)}


def box_image(box: Box, role: str) -> str:
    """What the role's box runs: ``box.image:role``; with ``signed_by``, that image verified
    in its registry (a signature by the team's key, before anything is launched), pinned to
    the digest signed: REPOSITORY@sha256:..."""
    ref = f"{box.image}:{role}"
    if box.signed_by is None:
        return ref
    from ..signing import load_public_key, verify

    key = box.signed_by if box.signed_by.is_absolute() else box.path.parent / box.signed_by
    if not key.is_file():
        raise InputError(f"{box.path}: key 'signed_by': {key} is not a file (the team's public "
                         "key, generate-key-pair's .pub)")
    return verify(ref, load_public_key(key), want_provenance=False).pinned


def _guardrails(box: Box, role: str, instance_type: str, key: str, gpu: bool) -> list[str]:
    rails, where = box.guardrails, f"{box.path}: key"
    problems = []
    allowed = rails.allowed_types.get(role)
    if allowed and not any(fnmatch.fnmatchcase(instance_type, pattern) for pattern in allowed):
        problems.append(f"{key}: {instance_type} is not allowed for the {role} role "
                        f"(guardrails.allowed_types.{role}: {', '.join(allowed)})")
    price, cap = hourly_price(box, instance_type), hourly_cap(box, role)
    if price is None:
        problems.append(f"{key}: no price known for {instance_type}; add it to "
                        f"guardrails.prices (USD per hour) so the cap can be checked")
    elif price > cap:
        problems.append(f"{key}: {instance_type} costs about ${price:.2f}/h, over the {role} "
                        f"role's cap of ${cap:.2f}/h (guardrails.max_hourly_usd.{role})")
    if gpu and box.idle_minutes == 0 and not rails.allow_gpu_without_idle_stop:
        problems.append(f"{where} 'idle_minutes': 0 turns the idle stop off, and the {role} box "
                        f"({instance_type}) has a GPU: it would bill until someone stops it "
                        "(set guardrails.allow_gpu_without_idle_stop = true to mean it)")
    return problems


def hourly_cap(box: Box, role: str) -> float:
    return box.guardrails.max_hourly_usd.get(role, DEFAULT_HOURLY_CAPS[role])


# -- user data --------------------------------------------------------------------------------


# One OpenSSH public key line: type, base64 key, an optional comment.
PUBLIC_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|"
                        r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) "
                        r"[A-Za-z0-9+/]+={0,3}( [\x20-\x7e]{0,200})?")
KEY_FILES = ("id_ed25519", "id_ecdsa", "id_ed25519_sk", "id_rsa")


def public_key(path: Path | None) -> tuple[str, Path]:
    """The public key a box accepts (its line, and its file): ``path``, or the first of ssh's
    usual keys in ~/.ssh."""
    if path is None:
        candidates = [Path.home() / ".ssh" / f"{name}.pub" for name in KEY_FILES]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise InputError("no ssh public key in ~/.ssh (" + ", ".join(
                f"{n}.pub" for n in KEY_FILES) + ") to log in to the box with",
                hint="make one: ssh-keygen -t ed25519   (or pass --public-key FILE)")
    try:
        line = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the public key: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not PUBLIC_KEY.fullmatch(line):
        raise InputError(f"{path}: not one OpenSSH public key line (ssh-ed25519 AAAA... "
                         "comment)", hint="pass the .pub file, never the private key")
    return line, path


def boot_script(box: Box, role: str, image: str, volume_id: str, key: str) -> str:
    """The script every boot of the role's instance runs (see ec2-boot.sh.j2)."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)
    environment.filters["sh"] = lambda value: shlex.quote(str(value))
    template = (Path(__file__).parent / "ec2-boot.sh.j2").read_text()
    return environment.from_string(template).render(
        version=__version__, box=box, role=role, image=image, volume_id=volume_id,
        public_key=key, mount=box.volume.mount_point, gpu=role == "gpu", user_ids=USER_IDS, contract=contract)


def user_data(box: Box, role: str, image: str, volume_id: str, key: str) -> str:
    """cloud-config: install the boot script and a unit that runs it on every boot."""
    _check_reference(image)
    if not PUBLIC_KEY.fullmatch(key):
        raise InputError("not one OpenSSH public key line")
    if not re.fullmatch(r"vol-[0-9a-f]{8,17}", volume_id):
        raise InputError(f"{volume_id!r} is not an EBS volume id")
    unit = ("[Unit]\nDescription=devbox-build box: data volume, image, IDE\n"
            "Wants=network-online.target\nAfter=network-online.target docker.service\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\nTimeoutStartSec=0\n"
            "ExecStart=/usr/local/sbin/devbox-box\nStandardOutput=journal+console\n"
            "StandardError=journal+console\n\n[Install]\nWantedBy=multi-user.target\n")
    document = {
        "write_files": [
            {"path": "/usr/local/sbin/devbox-box", "permissions": "0755", "owner": "root:root",
             "content": boot_script(box, role, image, volume_id, key)},
            {"path": "/etc/systemd/system/devbox-box.service", "permissions": "0644",
             "owner": "root:root", "content": unit},
        ],
        # Enabled: every later boot runs it; --no-block: the first boot's run starts now.
        "runcmd": [["systemctl", "daemon-reload"],
                   ["systemctl", "enable", "--now", "--no-block", "devbox-box.service"]],
    }
    class Dumper(yaml.SafeDumper):
        """Multi-line strings as literal blocks: the script reads as itself in the console."""

    Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))
    text = (f"#cloud-config\n# devbox-build: box {box.name}, role {role}, image {image}\n"
            + yaml.dump(document, Dumper=Dumper, sort_keys=False, width=1000))
    if len(text.encode()) > USER_DATA_LIMIT:
        raise InputError(f"the user data for {box.name}/{role} is {len(text.encode())} bytes; "
                         f"EC2 takes at most {USER_DATA_LIMIT}")
    return text


def _check_reference(image: str) -> None:
    try:
        TypeAdapter(ImageReference).validate_python(image)
    except ValidationError:
        raise InputError(f"{image!r} is not an image reference") from None


def host_alias(box: Box, role: str) -> str:
    return f"devbox-{box.name}-{role}"


def ssh_config(box: Box, role: str, instance_id: str, identity: Path | None = None,
               profile: str | None = None) -> str:
    """An ~/.ssh/config entry that logs in to the environment itself (sshd in the container, as
    the image's user, on the host's loopback), through SSM: no inbound port, no public IP.
    VS Code Remote-SSH, scp and git over the forwarded agent work as on any host; JupyterLab's
    port is forwarded. Both roles share one host-key alias: the host key lives on the volume."""
    profile_option = f" --profile {profile}" if profile else ""
    lines = [f"# devbox-build ec2 ssh-config: box {box.name}, role {role}",
             f"Host {host_alias(box, role)}",
             f"    HostName {instance_id}",
             f"    User {contract.USER}",
             f"    Port {contract.SSH_PORT}",
             f"    HostKeyAlias devbox-{box.name}",
             ("    ProxyCommand aws ssm start-session --target %h --document-name "
              f"AWS-StartSSHSession --parameters portNumber=%p --region {box.region}"
              f"{profile_option}")]
    if identity is not None:
        lines += [f"    IdentityFile {identity}", "    IdentitiesOnly yes"]
    lines += ["    ForwardAgent yes",
              f"    LocalForward {contract.IDE_PORT} 127.0.0.1:{contract.IDE_PORT}",
              "    ServerAliveInterval 30"]
    return "\n".join(lines) + "\n"
