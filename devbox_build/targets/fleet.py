"""A person's EC2 boxes on AWS: their instances (one per role) and their data volume, found by
tags that name the box and its owner, so a team shares one ``boxes.toml`` and nobody touches
another's boxes.

Every call goes through boto3, whose client checks each request against botocore's model before
sending it; AWS_ENDPOINT_URL points it elsewhere (the tests: moto's server on loopback). The
order of each action is chosen so that a failure leaves the user with a working box: the target
of ``up`` or ``move`` starts before the volume leaves the box that has it, and a failure after
that puts the volume back.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from ..errors import CloudError, InputError
from ..report import SILENT, Reporter
from .ec2 import (
    AMI_PARAMETERS,
    ECR_REPOSITORY,
    VOLUME_PRICES,
    Box,
    architecture,
    hourly_cap,
    hourly_price,
    user_data,
)

TAG_BOX, TAG_OWNER, TAG_ROLE, TAG_PURPOSE = "devbox:box", "devbox:owner", "devbox:role", \
    "devbox:purpose"
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
DATA_DEVICE = "/dev/sdf"  # the attach name; the boot script finds the volume by its id anyway
READY_MARKER = "devbox-box: ready"
# EC2's answers when a zone has no room for the type right now.
CAPACITY_ERRORS = ("InsufficientInstanceCapacity", "InsufficientCapacity",
                   "InsufficientHostCapacity", "Unsupported")
LOCK_STALE_SECONDS = 1800  # a lock older than this was left by a killed command


class CapacityError(CloudError):
    """EC2 has no room for the instance type in the zone now."""


def owner_from_arn(arn: str) -> str:
    """Who is calling, as a tag value and name part: an IAM user's name, an assumed role's
    session name (SSO: the person's login), or "root"."""
    resource = arn.split(":", 5)[-1]
    name = "root" if resource == "root" else resource.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "unknown"


class Fleet:
    def __init__(self, box: Box, reporter: Reporter = SILENT, poll_seconds: float = 5.0,
                 owner: str | None = None) -> None:
        import boto3  # here, not at the top: it costs every other command a third of a second
        from botocore.exceptions import BotoCoreError

        self.box, self.reporter, self.poll = box, reporter, poll_seconds
        try:
            session = boto3.session.Session(region_name=box.region)
            self.ec2 = session.client("ec2")
            self.ssm = session.client("ssm")
            self.sts = session.client("sts")
            self._session = session
        except BotoCoreError as exc:  # AWS_PROFILE naming no profile, a broken config file
            raise InputError(f"AWS configuration: {exc}", hint="check AWS_PROFILE and "
                             "~/.aws/config (aws configure list-profiles)") from None
        self._owner = owner

    # -- calls, each failure one CloudError naming the operation

    def call(self, client, operation: str, _accept: tuple = (), **request):
        """``client.operation(**request)``; None when AWS answers with an error code in
        ``_accept``."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        service = client.meta.service_model.service_name
        try:
            return getattr(client, operation)(**request)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in _accept:
                return None
            kind = CapacityError if error.get("Code") in CAPACITY_ERRORS else CloudError
            raise kind(f"{service} {operation}: {error.get('Code')}: "
                       f"{error.get('Message')}") from None
        except EndpointConnectionError as exc:
            raise CloudError(f"{service} {operation}: {exc}",
                             hint="check the network (and AWS_ENDPOINT_URL, if set)") from None
        except NoCredentialsError as exc:
            raise CloudError(f"{service} {operation}: {exc}",
                             hint="set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY") from None
        except BotoCoreError as exc:  # an invalid request (botocore's model), a timeout
            raise CloudError(f"{service} {operation}: {exc}") from None

    def wait(self, waiter: str, **request) -> None:
        from botocore.exceptions import WaiterError

        try:
            self.ec2.get_waiter(waiter).wait(
                **request, WaiterConfig={"Delay": self.poll, "MaxAttempts": int(900 / self.poll)})
        except WaiterError as exc:
            raise CloudError(f"ec2 {waiter}: {exc}") from None

    # -- who and what

    @property
    def owner(self) -> str:
        if self._owner is None:
            self._owner = owner_from_arn(self.call(self.sts, "get_caller_identity")["Arn"])
        return self._owner

    def name(self, part: str) -> str:
        return f"devbox-{self.box.name}-{self.owner}-{part}"

    def _tags(self, kind: str, **tags: str) -> list[dict]:
        return [{"ResourceType": kind, "Tags": [
            {"Key": TAG_BOX, "Value": self.box.name}, {"Key": TAG_OWNER, "Value": self.owner},
            *({"Key": k, "Value": v} for k, v in tags.items())]}]

    def _mine(self, everyone: bool = False) -> list[dict]:
        return [{"Name": f"tag:{TAG_BOX}", "Values": [self.box.name]},
                *([] if everyone else [{"Name": f"tag:{TAG_OWNER}", "Values": [self.owner]}])]

    def instances(self, everyone: bool = False) -> list[dict]:
        reservations = self.call(self.ec2, "describe_instances", Filters=[
            *self._mine(everyone),
            {"Name": "instance-state-name", "Values": LIVE_STATES}])["Reservations"]
        return sorted((i for r in reservations for i in r["Instances"]),
                      key=lambda i: i["LaunchTime"])

    def instance(self, role: str) -> dict | None:
        found = [i for i in self.instances() if _tag(i, TAG_ROLE) == role]
        return found[0] if found else None

    def volumes(self, everyone: bool = False) -> list[dict]:
        return self.call(self.ec2, "describe_volumes", Filters=[
            *self._mine(everyone), {"Name": f"tag:{TAG_PURPOSE}", "Values": ["data"]}])["Volumes"]

    def volume(self) -> dict | None:
        volumes = self.volumes()
        return volumes[0] if volumes else None

    @staticmethod
    def attached_to(volume: dict) -> str | None:
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

    # -- checks before anything starts

    def check_image(self, role: str) -> str:
        """The role's image must be in ECR, tagged, before a box is launched to pull it."""
        ref = f"{self.box.image}:{role}"
        match = ECR_REPOSITORY.fullmatch(self.box.image)
        if match is None:  # the preflight says so first; kept for callers that skip it
            raise InputError(f"{self.box.path}: key 'image': {self.box.image} is not in ECR")
        ecr = self._session.client("ecr", region_name=match["region"])
        found = self.call(ecr, "describe_images", _accept=(
            "ImageNotFoundException", "RepositoryNotFoundException"),
            registryId=match["account"], repositoryName=match["name"],
            imageIds=[{"imageTag": role}])
        if not found:
            raise InputError(f"{self.box.path}: key 'image': {ref} is not in ECR (no such "
                             "repository or tag); the box would fail its pull",
                             hint=f"push it first: devbox-build build IMAGE --variant {role} "
                                  f"--registry {self.box.image.rsplit('/', 1)[0]} --push")
        return ref

    def check_offered(self, role: str, zone: str) -> None:
        instance_type = self.box.roles[role].instance_type
        offered = self.call(self.ec2, "describe_instance_type_offerings",
                            LocationType="availability-zone", Filters=[
                                {"Name": "location", "Values": [zone]},
                                {"Name": "instance-type", "Values": [instance_type]}])
        if not offered["InstanceTypeOfferings"]:
            raise InputError(f"{self.box.path}: key 'roles.{role}.instance_type': "
                             f"{instance_type} is not offered in {zone}, where the data volume is",
                             hint="pick a type offered there, or move the volume: "
                                  "devbox-build ec2 relocate --zone ZONE")

    def check_network(self) -> None:
        """Without subnet_id, EC2 launches into the default VPC, which many company accounts
        have deleted: say so before a launch fails on it."""
        if self.box.subnet_id:
            return
        default = self.call(self.ec2, "describe_vpcs", Filters=[
            {"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not default:
            raise InputError(f"{self.box.path}: key 'subnet_id': this account has no default VPC "
                             f"in {self.box.region}; name the subnet the boxes run in",
                             hint="a private subnet needs a NAT gateway or VPC endpoints for "
                                  "ssm, ssmmessages, ec2messages, ecr.api, ecr.dkr and s3")

    # -- one person's commands at a time (two terminals, two laptops): a conditional create

    @contextmanager
    def lock(self, operation: str):
        name = f"/devbox/{self.box.name}/{self.owner}/lock"
        value = json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}",
                            "operation": operation, "since": time.time()})
        waited = False
        deadline = time.monotonic() + LOCK_STALE_SECONDS
        while self.call(self.ssm, "put_parameter", _accept=("ParameterAlreadyExists",),
                        Name=name, Value=value, Type="String", Overwrite=False) is None:
            held = self.call(self.ssm, "get_parameter", _accept=("ParameterNotFound",),
                             Name=name)
            try:
                holder = json.loads(held["Parameter"]["Value"]) if held else {}
            except ValueError:
                holder = {}
            if held and time.time() - float(holder.get("since", 0)) > LOCK_STALE_SECONDS:
                self.reporter.note(f"taking over a stale lock left by {holder.get('holder')}")
                self.call(self.ssm, "delete_parameter", _accept=("ParameterNotFound",),
                          Name=name)
                continue
            if not waited:
                self.reporter.note(f"waiting: {holder.get('holder', 'another command')} runs "
                         f"`ec2 {holder.get('operation', '?')}` on this box")
                waited = True
            if time.monotonic() > deadline:
                raise CloudError(f"{name} stayed locked for {LOCK_STALE_SECONDS} s")
            time.sleep(1.0)
        try:
            yield
        finally:
            self.call(self.ssm, "delete_parameter", _accept=("ParameterNotFound",), Name=name)

    # -- actions

    def ensure_volume(self) -> dict:
        volume = self.volume()
        if volume:
            return volume
        zone = self.box.volume.availability_zone or self.box.availability_zone
        self.reporter.note(f"creating the data volume ({self.box.volume.size_gb} GB {self.box.volume.type} "
                 f"in {zone})")
        volume = self.call(self.ec2, "create_volume", AvailabilityZone=zone,
                           Size=self.box.volume.size_gb, VolumeType=self.box.volume.type,
                           Encrypted=True, TagSpecifications=self._tags(
                               "volume", **{TAG_PURPOSE: "data", "Name": self.name("data")}))
        self.wait("volume_available", VolumeIds=[volume["VolumeId"]])
        return self.volume() or volume

    def launch_request(self, role: str, image: str, volume_id: str, key: str) -> dict:
        spec = self.box.roles[role]
        request = {
            "ImageId": self.ami(role), "InstanceType": spec.instance_type,
            "MinCount": 1, "MaxCount": 1,
            "Placement": {"AvailabilityZone": self.box.availability_zone},
            "UserData": user_data(self.box, role, image, volume_id, key),
            # IMDSv2 only, and 2 hops so the container behind Docker's bridge reaches it.
            "MetadataOptions": {"HttpTokens": self.box.metadata.http_tokens,
                                "HttpPutResponseHopLimit": self.box.metadata.hop_limit,
                                "HttpEndpoint": "enabled"},
            "TagSpecifications": self._tags("instance", **{
                TAG_ROLE: role, "Name": self.name(role)}),
            # Powering off (the idle watcher, the failsafe) stops the instance, never ends it.
            "InstanceInitiatedShutdownBehavior": "stop",
        }
        if self.box.spot:
            request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop",
                "MaxPrice": f"{hourly_cap(self.box, role):.4f}"}}
            request.pop("InstanceInitiatedShutdownBehavior")  # a spot request's own: stop
        if self.box.subnet_id:
            request["SubnetId"] = self.box.subnet_id
        if self.box.security_group_ids:
            request["SecurityGroupIds"] = list(self.box.security_group_ids)
        if self.box.instance_profile:
            request["IamInstanceProfile"] = {"Name": self.box.instance_profile}
        return request

    def launch(self, role: str, image: str, volume_id: str, key: str) -> dict:
        request = self.launch_request(role, image, volume_id, key)
        self.reporter.note(f"launching the {role} box ({request['InstanceType']}, {request['ImageId']}"
                 f"{', spot' if self.box.spot else ''})")
        return self.call(self.ec2, "run_instances", **request)["Instances"][0]

    def drift(self, role: str, instance: dict, image: str, volume_id: str, key: str) -> dict:
        """What boxes.toml says that the instance does not have: key → (now, wanted)."""
        wanted_type = self.box.roles[role].instance_type
        changes = {}
        if instance["InstanceType"] != wanted_type:
            changes["instance type"] = (instance["InstanceType"], wanted_type)
        data = self.call(self.ec2, "describe_instance_attribute",
                         InstanceId=instance["InstanceId"], Attribute="userData")
        current = base64.b64decode((data.get("UserData") or {}).get("Value", "")).decode(
            errors="replace")
        wanted = user_data(self.box, role, image, volume_id, key)
        if current != wanted:
            changes.update(_user_data_changes(current, wanted))
        return changes

    def reconcile(self, role: str, instance: dict, image: str, volume_id: str, key: str) -> dict:
        """Bring a stopped instance to what boxes.toml says; refuse, with the command that
        does it, for a running one. Never silent."""
        changes = self.drift(role, instance, image, volume_id, key)
        if not changes:
            return instance
        listed = "; ".join(f"{what}: {now} → {wanted}" for what, (now, wanted) in changes.items())
        state = instance["State"]["Name"]
        if state in ("pending", "running"):
            raise InputError(f"the {role} box ({instance['InstanceId']}) runs, and boxes.toml "
                             f"changed: {listed}. EC2 applies these only while it is stopped",
                             hint=f"devbox-build ec2 down --role {role} --boxes {self.box.path}"
                                  f" && devbox-build ec2 up --role {role} --boxes "
                                  f"{self.box.path}")
        if state == "stopping":
            self.wait("instance_stopped", InstanceIds=[instance["InstanceId"]])
        if "instance type" in changes and instance.get("InstanceLifecycle") == "spot":
            raise InputError(f"the {role} box is a spot instance, whose type EC2 cannot change "
                             f"({listed})", hint=f"devbox-build ec2 destroy --role {role}, "
                             "then up: the data volume stays")
        self.reporter.note(f"updating the stopped {role} box to boxes.toml: {listed}")
        if "instance type" in changes:
            self.call(self.ec2, "modify_instance_attribute", InstanceId=instance["InstanceId"],
                      InstanceType={"Value": self.box.roles[role].instance_type})
        # The Attribute/Value form, as the AWS CLI's documentation gives it: the value is the
        # user data in base64, sent as it is.
        self.call(self.ec2, "modify_instance_attribute", InstanceId=instance["InstanceId"],
                  Attribute="userData", Value=base64.b64encode(user_data(
                      self.box, role, image, volume_id, key).encode()).decode())
        return self.instance(role) or instance

    def _running(self, role: str, image: str, volume_id: str, key: str) -> dict:
        """The role's instance running (launched or started), the volume not yet touched: a
        capacity error here changes nothing."""
        instance = self.instance(role)
        if instance is None:
            instance = self.launch(role, image, volume_id, key)
        else:
            instance = self.reconcile(role, instance, image, volume_id, key)
            if instance["State"]["Name"] in ("stopping", "stopped"):
                if instance["State"]["Name"] == "stopping":
                    self.wait("instance_stopped", InstanceIds=[instance["InstanceId"]])
                self.reporter.note(f"starting the {role} box ({instance['InstanceId']})")
                try:
                    self.call(self.ec2, "start_instances", InstanceIds=[instance["InstanceId"]])
                except CloudError as exc:
                    if "IncorrectSpotRequestState" not in exc.message:
                        raise
                    # A spot instance stopped by an interruption: only EC2 starts it again.
                    raise CapacityError(
                        f"the {role} box is a spot instance stopped by an interruption; EC2 "
                        "starts it again when it has capacity, and nobody else can",
                        hint=f"wait, or end it and launch anew (the data volume stays): "
                             f"devbox-build ec2 destroy --role {role}") from None
        self.wait("instance_running", InstanceIds=[instance["InstanceId"]])
        return self.instance(role) or instance

    def _attach(self, volume: dict, instance_id: str) -> None:
        self.reporter.note(f"attaching the data volume {volume['VolumeId']} to {instance_id}")
        self.call(self.ec2, "attach_volume", VolumeId=volume["VolumeId"],
                  InstanceId=instance_id, Device=DATA_DEVICE)
        self.wait("volume_in_use", VolumeIds=[volume["VolumeId"]])

    def _stop(self, instance_id: str, role: str) -> None:
        self.reporter.note(f"stopping the {role} box ({instance_id})")
        self.call(self.ec2, "stop_instances", InstanceIds=[instance_id])
        self.wait("instance_stopped", InstanceIds=[instance_id])

    def _switch(self, to: str, image: str, key: str, allow_running_holder: bool) -> dict:
        """Start ``to``, then move the volume to it; on a failure after the start, put the
        volume back where it was and start that box again."""
        volume = self.ensure_volume()
        zone = volume["AvailabilityZone"]
        holder = self.attached_to(volume)
        source = next((i for i in self.instances() if i["InstanceId"] == holder), None)
        source_role = _tag(source, TAG_ROLE) if source else None
        if source and source_role != to and source["State"]["Name"] in ("pending", "running") \
                and not allow_running_holder:
            raise InputError(f"the data volume is attached to the running {source_role} box "
                             f"({holder})", hint=f"run: devbox-build ec2 move --to {to}")
        self.check_offered(to, zone)
        self.check_network()
        try:
            target = self._running(to, image, volume["VolumeId"], key)
        except CapacityError as exc:
            kept = (f"your {source_role} box still has the data volume" if source
                    else "the data volume is unchanged")
            raise CapacityError(f"{exc.message}. Nothing was changed: {kept}",
                                hint=exc.hint or "try again in a few minutes, pick another "
                                f"type (roles.{to}.instance_type), or move the volume to a "
                                "zone with room: devbox-build ec2 relocate --zone ZONE") from None
        if holder == target["InstanceId"]:
            return self.status()
        source_was_running = bool(source) and source["State"]["Name"] in ("pending", "running")
        try:
            if source:
                if source_was_running:
                    self._stop(holder, source_role)
                self.reporter.note(f"detaching the data volume from the {source_role} box")
                self.call(self.ec2, "detach_volume", VolumeId=volume["VolumeId"],
                          InstanceId=holder)
                self.wait("volume_available", VolumeIds=[volume["VolumeId"]])
            self._attach(volume, target["InstanceId"])
        except CloudError as exc:
            self.reporter.note(f"{exc.message}: putting the data volume back")
            self._roll_back(volume["VolumeId"], holder, source_role, source_was_running,
                            target["InstanceId"], to)
            raise CloudError(f"{exc.message}. Rolled back: the data volume is on the "
                             f"{source_role or 'no'} box again") from None
        return self.status()

    def _roll_back(self, volume_id: str, holder: str | None, source_role: str | None,
                   restart: bool, target_id: str, to: str) -> None:
        volume = next((v for v in self.volumes() if v["VolumeId"] == volume_id), None)
        if volume and self.attached_to(volume) == target_id:
            self.call(self.ec2, "detach_volume", VolumeId=volume_id, InstanceId=target_id)
            self.wait("volume_available", VolumeIds=[volume_id])
            volume = None
        if holder:
            if volume is None or not self.attached_to(volume):
                self._attach({"VolumeId": volume_id}, holder)
            if restart:
                self.call(self.ec2, "start_instances", InstanceIds=[holder])
                self.wait("instance_running", InstanceIds=[holder])
        self._stop(target_id, to)

    def up(self, role: str, image: str, key: str) -> dict:
        with self.lock("up"):
            self.check_image(role)
            return self._switch(role, image, key, allow_running_holder=False)

    def move(self, to: str, image: str, key: str) -> dict:
        """Start the ``to`` box, then stop the other, move the data volume, and leave only the
        ``to`` box running."""
        with self.lock("move"):
            self.check_image(to)
            self._switch(to, image, key, allow_running_holder=True)
            for role in self.box.roles:
                instance = self.instance(role)
                if role != to and instance and instance["State"]["Name"] in ("pending",
                                                                             "running"):
                    self._stop(instance["InstanceId"], role)
            return self.status()

    def down(self, role: str | None = None, snapshot: bool = False) -> dict:
        with self.lock("down"):
            for name in [role] if role else list(self.box.roles):
                instance = self.instance(name)
                if instance and instance["State"]["Name"] in ("pending", "running"):
                    self._stop(instance["InstanceId"], name)
            if snapshot:
                self.snapshot("down --snapshot")
            return self.status()

    def snapshot(self, why: str) -> str | None:
        volume = self.volume()
        if volume is None:
            return None
        self.reporter.note(f"snapshotting the data volume {volume['VolumeId']} ({why})")
        made = self.call(self.ec2, "create_snapshot", VolumeId=volume["VolumeId"],
                         Description=f"devbox-build {self.box.name} ({self.owner}): {why}",
                         TagSpecifications=self._tags("snapshot", **{
                             TAG_PURPOSE: "data", "Name": self.name("data")}))
        self.wait("snapshot_completed", SnapshotIds=[made["SnapshotId"]])
        return made["SnapshotId"]

    def destroy(self, role: str | None = None, delete_volume: bool = False) -> dict:
        """Terminate the instances (cancelling spot requests first, which would start new
        ones); with ``delete_volume``, snapshot the volume, then delete it."""
        with self.lock("destroy"):
            ended = []
            for instance in self.instances():
                if role and _tag(instance, TAG_ROLE) != role:
                    continue
                if instance.get("SpotInstanceRequestId"):
                    self.call(self.ec2, "cancel_spot_instance_requests",
                              SpotInstanceRequestIds=[instance["SpotInstanceRequestId"]])
                self.reporter.note(f"terminating the {_tag(instance, TAG_ROLE)} box "
                         f"({instance['InstanceId']})")
                self.call(self.ec2, "terminate_instances", InstanceIds=[instance["InstanceId"]])
                ended.append(instance["InstanceId"])
            if ended:
                self.wait("instance_terminated", InstanceIds=ended)
            snapshot = None
            if delete_volume and (volume := self.volume()):
                snapshot = self.snapshot("the final snapshot before `ec2 destroy` deleted it")
                self.wait("volume_available", VolumeIds=[volume["VolumeId"]])
                self.reporter.note(f"deleting the data volume {volume['VolumeId']} (snapshot {snapshot})")
                self.call(self.ec2, "delete_volume", VolumeId=volume["VolumeId"])
            return {**self.status(), "terminated": ended, "final_snapshot": snapshot}

    def relocate(self, zone: str) -> dict:
        """When a zone has no capacity: snapshot the volume, make it again in ``zone``, and end
        the instances of the old zone (they hold nothing; the next `up` launches new ones).
        The old volume stays, tagged, until you delete it."""
        with self.lock("relocate"):
            volume = self.volume()
            if volume is None:
                raise InputError(f"{self.box.name} has no data volume to relocate yet")
            if volume["AvailabilityZone"] == zone:
                raise InputError(f"the data volume is in {zone} already")
            for instance in self.instances():
                if instance["State"]["Name"] in ("pending", "running"):
                    raise InputError(f"the {_tag(instance, TAG_ROLE)} box runs",
                                     hint=f"devbox-build ec2 down --boxes {self.box.path}")
            snapshot = self.snapshot(f"relocating to {zone}")
            self.reporter.note(f"creating the data volume in {zone} from {snapshot}")
            made = self.call(self.ec2, "create_volume", AvailabilityZone=zone,
                             SnapshotId=snapshot, VolumeType=volume["VolumeType"],
                             Encrypted=True, TagSpecifications=self._tags(
                                 "volume", **{TAG_PURPOSE: "data", "Name": self.name("data")}))
            self.wait("volume_available", VolumeIds=[made["VolumeId"]])
            self.call(self.ec2, "create_tags", Resources=[volume["VolumeId"]], Tags=[
                {"Key": TAG_PURPOSE, "Value": "relocated"}])
            ended = [i["InstanceId"] for i in self.instances()]
            if ended:
                self.call(self.ec2, "terminate_instances", InstanceIds=ended)
                self.wait("instance_terminated", InstanceIds=ended)
            return {"volume_id": made["VolumeId"], "zone": zone, "snapshot": snapshot,
                    "old_volume_id": volume["VolumeId"], "terminated": ended}

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

    def status(self, everyone: bool = False) -> dict:
        """The caller's boxes (``everyone``: the team's, by owner), what each costs."""
        now = datetime.now(timezone.utc)
        volumes = self.volumes(everyone)
        owners: dict[str, dict] = {}
        for volume in volumes:
            owners.setdefault(_tag(volume, TAG_OWNER) or "?", {"roles": {}, "volume": None})[
                "volume"] = self._volume_status(volume)
        attached = {self.attached_to(v): v["VolumeId"] for v in volumes}
        for instance in self.instances(everyone):
            entry = owners.setdefault(_tag(instance, TAG_OWNER) or "?",
                                      {"roles": {}, "volume": None})
            entry["roles"][_tag(instance, TAG_ROLE)] = self._instance_status(instance, attached,
                                                                             now)
        mine = owners.get(self.owner, {"roles": {}, "volume": None})
        roles = {role: mine["roles"].get(role) for role in self.box.roles}
        result = {"box": self.box.name, "owner": self.owner, "region": self.box.region,
                  "roles": roles, "volume": mine["volume"]}
        if everyone:
            result["team"] = {owner: {"roles": entry["roles"], "volume": entry["volume"]}
                              for owner, entry in sorted(owners.items())}
        return result

    def _instance_status(self, instance: dict, attached: dict, now: datetime) -> dict:
        running = instance["State"]["Name"] in ("pending", "running")
        price = hourly_price(self.box, instance["InstanceType"])
        hours = (now - instance["LaunchTime"]).total_seconds() / 3600 if running else 0.0
        return {
            "instance_id": instance["InstanceId"],
            "state": instance["State"]["Name"],
            "instance_type": instance["InstanceType"],
            "spot": instance.get("InstanceLifecycle") == "spot",
            "private_ip": instance.get("PrivateIpAddress"),
            "has_data_volume": instance["InstanceId"] in attached,
            "hourly_usd": price,
            # Since this run started (EC2's LaunchTime is the last start): an estimate at the
            # on-demand price, not a bill.
            "running_hours": round(hours, 2),
            "cost_this_run_usd": None if price is None else round(hours * price, 2),
        }

    def _volume_status(self, volume: dict) -> dict:
        return {"volume_id": volume["VolumeId"], "state": volume["State"],
                "size_gb": volume["Size"], "zone": volume["AvailabilityZone"],
                "attached_to": self.attached_to(volume),
                "monthly_usd": round(volume["Size"] * VOLUME_PRICES.get(
                    volume.get("VolumeType", "gp3"), 0.08), 2)}


def _tag(resource: dict | None, key: str) -> str | None:
    for tag in (resource or {}).get("Tags", []):
        if tag["Key"] == key:
            return tag["Value"]
    return None


# The boot script's settings a person changes in boxes.toml (or by a new key), by their variable.
USER_DATA_SETTINGS = {"IMAGE": "image", "IDLE_MINUTES": "idle minutes",
                      "AUTHORIZED_KEYS": "ssh key", "FAILSAFE_SECONDS": "failsafe",
                      "MOUNT": "mount point", "VOLUME_ID": "data volume"}


def _user_data_changes(current: str, wanted: str) -> dict:
    def settings(text: str) -> dict:
        found = {}
        for line in text.splitlines():
            name, _, value = line.strip().partition("=")
            if name in USER_DATA_SETTINGS and name not in found:
                found[name] = value[:60]
        return found

    now, then = settings(current), settings(wanted)
    changes = {USER_DATA_SETTINGS[name]: (now.get(name, "(none)"), value)
               for name, value in then.items() if now.get(name) != value}
    return changes or {"boot script": ("an older devbox-build's", "this one's")}
