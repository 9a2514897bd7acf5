"""EC2 boxes: a cheap CPU box and a GPU box sharing one data volume, defined in ``boxes.toml``.

This module holds the box definition and ``preflight``, the offline check that runs before any
AWS call: everything EC2 would refuse, or accept and then fail at run time, is one clear error
naming the file and key. The facts come from botocore's EC2 model (which instance types exist)
and from the image itself (its labels and architecture); the tables below say what botocore
does not (which families have GPUs or Arm CPUs, what driver each AMI family ships).
"""

from __future__ import annotations

import base64
import re
import shlex
import time
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .. import __version__
from ..errors import CloudError, InputError
from ..runtime import contract
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
LOGIN_USERS = {"al2023": "ec2-user", "ubuntu-24.04": "ubuntu",
               "dlami-base-gpu-al2023": "ec2-user", "dlami-base-gpu-ubuntu-24.04": "ubuntu"}
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


class Volume(_Model):
    size_gb: Annotated[int, Field(ge=1, le=65536)] = 100
    type: Literal["gp3", "gp2", "io2", "st1"] = "gp3"
    availability_zone: str | None = None  # default: the box's
    # Where the boxes mount it; the container's home and /data live under it.
    mount_point: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9_.+-]+)+$")] = "/mnt/devbox"


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
    # Network and access: no inbound port is needed (SSM); the profile needs SSM and ECR reads.
    subnet_id: AwsId | None = None
    security_group_ids: list[AwsId] = []
    instance_profile: Annotated[str, Field(pattern=r"^[\w+=,.@-]{1,128}$")] | None = None
    # Spot: a persistent request that stops (not terminates) on interruption; the data volume is
    # separate from the instance and survives either way.
    spot: bool = False
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


# -- user data --------------------------------------------------------------------------------


def boot_script(box: Box, role: str, image: str, volume_id: str) -> str:
    """The script every boot of the role's instance runs (see ec2-boot.sh.j2)."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)
    environment.filters["sh"] = lambda value: shlex.quote(str(value))
    template = (Path(__file__).parent / "ec2-boot.sh.j2").read_text()
    return environment.from_string(template).render(
        version=__version__, box=box, role=role, image=image, volume_id=volume_id,
        mount=box.volume.mount_point, gpu=role == "gpu", user_ids=USER_IDS, contract=contract)


def user_data(box: Box, role: str, image: str, volume_id: str) -> str:
    """cloud-config: install the boot script and a unit that runs it on every boot."""
    _check_reference(image)
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
             "content": boot_script(box, role, image, volume_id)},
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


# -- the boxes on EC2 -------------------------------------------------------------------------

TAG_BOX, TAG_ROLE, TAG_PURPOSE = "devbox:box", "devbox:role", "devbox:purpose"
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
DATA_DEVICE = "/dev/sdf"  # the attach name; the boot script finds the volume by its id anyway
READY_MARKER = "devbox-box: ready"


class Fleet:
    """A box's instances (one per role) and its data volume, found by their tags, so a second
    `up` finds what the first made. Every call goes through boto3, whose client checks each
    request against botocore's model before sending it; AWS_ENDPOINT_URL points it elsewhere
    (the tests: moto's server on loopback)."""

    def __init__(self, box: Box, say=lambda message: None, poll_seconds: float = 5.0) -> None:
        import boto3  # here, not at the top: it costs every other command a third of a second

        self.box, self.say, self.poll = box, say, poll_seconds
        self.ec2 = boto3.client("ec2", region_name=box.region)
        self.ssm = boto3.client("ssm", region_name=box.region)

    # -- calls, each failure one CloudError naming the operation

    def call(self, client, operation: str, **request):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            return getattr(client, operation)(**request)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise CloudError(f"{client.meta.service_model.service_name} {operation}: "
                             f"{error.get('Code')}: {error.get('Message')}") from None
        except EndpointConnectionError as exc:
            raise CloudError(f"{client.meta.service_model.service_name} {operation}: {exc}",
                             hint="check the network (and AWS_ENDPOINT_URL, if set)") from None
        except NoCredentialsError as exc:
            raise CloudError(f"{client.meta.service_model.service_name} {operation}: {exc}",
                             hint="set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY") from None
        except BotoCoreError as exc:  # an invalid request (botocore's model), a timeout
            raise CloudError(f"{client.meta.service_model.service_name} {operation}: "
                             f"{exc}") from None

    def wait(self, waiter: str, **request) -> None:
        from botocore.exceptions import WaiterError

        try:
            self.ec2.get_waiter(waiter).wait(
                **request, WaiterConfig={"Delay": self.poll, "MaxAttempts": int(900 / self.poll)})
        except WaiterError as exc:
            raise CloudError(f"ec2 {waiter}: {exc}") from None

    def _tags(self, kind: str, **tags: str) -> list[dict]:
        return [{"ResourceType": kind, "Tags": [{"Key": TAG_BOX, "Value": self.box.name},
                                               *({"Key": k, "Value": v} for k, v in tags.items())]}]

    # -- what exists

    def instance(self, role: str) -> dict | None:
        reservations = self.call(self.ec2, "describe_instances", Filters=[
            {"Name": f"tag:{TAG_BOX}", "Values": [self.box.name]},
            {"Name": f"tag:{TAG_ROLE}", "Values": [role]},
            {"Name": "instance-state-name", "Values": LIVE_STATES}])["Reservations"]
        found = [i for r in reservations for i in r["Instances"]]
        return sorted(found, key=lambda i: i["LaunchTime"])[0] if found else None

    def volume(self) -> dict | None:
        volumes = self.call(self.ec2, "describe_volumes", Filters=[
            {"Name": f"tag:{TAG_BOX}", "Values": [self.box.name]},
            {"Name": f"tag:{TAG_PURPOSE}", "Values": ["data"]}])["Volumes"]
        return volumes[0] if volumes else None

    def attached_to(self, volume: dict) -> str | None:
        attached = [a["InstanceId"] for a in volume.get("Attachments", [])
                    if a["State"] in ("attaching", "attached")]
        return attached[0] if attached else None

    def ami(self, role: str) -> str:
        spec = self.box.roles[role]
        if spec.ami:
            return spec.ami
        arch = architecture(spec.instance_type)
        name = AMI_PARAMETERS[spec.ami_family].format(
            arch="x86_64" if arch == "amd64" else "arm64", deb=arch)
        return self.call(self.ssm, "get_parameter", Name=name)["Parameter"]["Value"]

    # -- actions

    def ensure_volume(self) -> dict:
        volume = self.volume()
        if volume:
            return volume
        zone = self.box.volume.availability_zone or self.box.availability_zone
        self.say(f"creating the data volume ({self.box.volume.size_gb} GB {self.box.volume.type} "
                 f"in {zone})")
        volume = self.call(self.ec2, "create_volume", AvailabilityZone=zone,
                           Size=self.box.volume.size_gb, VolumeType=self.box.volume.type,
                           Encrypted=True, TagSpecifications=self._tags(
                               "volume", **{TAG_PURPOSE: "data",
                                            "Name": f"devbox-{self.box.name}-data"}))
        self.wait("volume_available", VolumeIds=[volume["VolumeId"]])
        return self.volume() or volume

    def launch(self, role: str, image: str, volume_id: str) -> dict:
        spec = self.box.roles[role]
        request = {
            "ImageId": self.ami(role), "InstanceType": spec.instance_type,
            "MinCount": 1, "MaxCount": 1,
            "Placement": {"AvailabilityZone": self.box.availability_zone},
            "UserData": user_data(self.box, role, image, volume_id),
            # IMDSv2 only, and 2 hops so the container behind Docker's bridge reaches it.
            "MetadataOptions": {"HttpTokens": self.box.metadata.http_tokens,
                                "HttpPutResponseHopLimit": self.box.metadata.hop_limit,
                                "HttpEndpoint": "enabled"},
            "TagSpecifications": self._tags("instance", **{
                TAG_ROLE: role, "Name": f"devbox-{self.box.name}-{role}"}),
        }
        if self.box.spot:
            request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}
        else:
            # The idle watcher powers the host off; that must stop the instance, not end it.
            request["InstanceInitiatedShutdownBehavior"] = "stop"
        if self.box.subnet_id:
            request["SubnetId"] = self.box.subnet_id
        if self.box.security_group_ids:
            request["SecurityGroupIds"] = list(self.box.security_group_ids)
        if self.box.instance_profile:
            request["IamInstanceProfile"] = {"Name": self.box.instance_profile}
        self.say(f"launching the {role} box ({spec.instance_type}, {request['ImageId']}"
                 f"{', spot' if self.box.spot else ''})")
        return self.call(self.ec2, "run_instances", **request)["Instances"][0]

    def up(self, role: str, image: str) -> dict:
        volume = self.ensure_volume()
        holder = self.attached_to(volume)
        other = next((r for r in self.box.roles if r != role), None)
        other_instance = self.instance(other) if other else None
        if holder and other_instance and holder == other_instance["InstanceId"]:
            if other_instance["State"]["Name"] in ("pending", "running"):
                raise InputError(f"the data volume is attached to the running {other} box "
                              f"({holder})", hint=f"run: devbox-build ec2 move --to {role}")
            self.detach(volume)
            holder = None
        instance = self.instance(role)
        if instance is None:
            instance = self.launch(role, image, volume["VolumeId"])
            self.wait("instance_running", InstanceIds=[instance["InstanceId"]])
        instance_id = instance["InstanceId"]
        if holder != instance_id:
            if instance["State"]["Name"] == "stopping":
                self.wait("instance_stopped", InstanceIds=[instance_id])
            self.say(f"attaching the data volume {volume['VolumeId']} to {instance_id}")
            self.call(self.ec2, "attach_volume", VolumeId=volume["VolumeId"],
                      InstanceId=instance_id, Device=DATA_DEVICE)
            self.wait("volume_in_use", VolumeIds=[volume["VolumeId"]])
        if (self.instance(role) or instance)["State"]["Name"] != "running":
            self.say(f"starting {instance_id}")
            self.call(self.ec2, "start_instances", InstanceIds=[instance_id])
            self.wait("instance_running", InstanceIds=[instance_id])
        return self.status()

    def detach(self, volume: dict) -> None:
        holder = self.attached_to(volume)
        if holder:
            self.say(f"detaching the data volume from {holder}")
            self.call(self.ec2, "detach_volume", VolumeId=volume["VolumeId"], InstanceId=holder)
            self.wait("volume_available", VolumeIds=[volume["VolumeId"]])

    def down(self, role: str | None = None) -> dict:
        for name in [role] if role else list(self.box.roles):
            instance = self.instance(name)
            if instance and instance["State"]["Name"] in ("pending", "running"):
                self.say(f"stopping the {name} box ({instance['InstanceId']})")
                self.call(self.ec2, "stop_instances", InstanceIds=[instance["InstanceId"]])
                self.wait("instance_stopped", InstanceIds=[instance["InstanceId"]])
        return self.status()

    def move(self, to: str, image: str) -> dict:
        """Stop the other box, move the data volume to the ``to`` box, start it."""
        for role in self.box.roles:
            if role != to:
                self.down(role)
        volume = self.volume()
        if volume:
            holder = self.attached_to(volume)
            target = self.instance(to)
            if holder and (target is None or holder != target["InstanceId"]):
                self.detach(volume)
        return self.up(to, image)

    def wait_for_image(self, role: str, timeout: float = 900) -> bool:
        """Until the boot script says the image answers (its line on the serial console)."""
        instance = self.instance(role)
        deadline = time.monotonic() + timeout
        while instance and time.monotonic() < deadline:
            output = self.call(self.ec2, "get_console_output",
                               InstanceId=instance["InstanceId"], Latest=True).get("Output", "")
            try:
                text = base64.b64decode(output).decode(errors="replace")
            except ValueError:
                text = output
            if READY_MARKER in text:
                return True
            time.sleep(self.poll)
        return False

    def status(self) -> dict:
        volume = self.volume()
        roles = {}
        for role in self.box.roles:
            instance = self.instance(role)
            roles[role] = None if instance is None else {
                "instance_id": instance["InstanceId"],
                "state": instance["State"]["Name"],
                "instance_type": instance["InstanceType"],
                "spot": instance.get("InstanceLifecycle") == "spot",
                "private_ip": instance.get("PrivateIpAddress"),
                "has_data_volume": bool(volume) and self.attached_to(volume) == instance[
                    "InstanceId"],
            }
        return {"box": self.box.name, "region": self.box.region, "roles": roles,
                "volume": None if volume is None else {
                    "volume_id": volume["VolumeId"], "state": volume["State"],
                    "size_gb": volume["Size"], "attached_to": self.attached_to(volume)}}


def ssh_config(box: Box, role: str, instance_id: str) -> str:
    """A VS Code Remote-SSH (and plain ssh) entry through SSM: no inbound port, no public IP;
    JupyterLab's port forwarded, so a local browser or notebook client reaches the box's."""
    user = LOGIN_USERS[box.roles[role].ami_family]
    return (f"# devbox-build ec2 ssh-config: box {box.name}, role {role}\n"
            f"Host devbox-{box.name}-{role}\n"
            f"    HostName {instance_id}\n"
            f"    User {user}\n"
            "    ProxyCommand aws ssm start-session --target %h --document-name "
            f"AWS-StartSSHSession --parameters portNumber=%p --region {box.region}\n"
            f"    LocalForward {contract.IDE_PORT} 127.0.0.1:{contract.IDE_PORT}\n"
            "    ServerAliveInterval 30\n")
