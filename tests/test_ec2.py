"""EC2 boxes: the preflight refuses each classic trap before any AWS call; up / move / down /
status / ssh-config do their work through boto3 against moto's server on loopback; the user data
passes cloud-init's schema and shellcheck."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from devbox_build.targets.ec2 import ImageFacts, architecture, load_box, preflight

from .conftest import ROOT, assert_clean_error, cli
from .support.aws import VOLUME_ID, Imds, MotoServer, StandInInstance, seed_boxes
from .support.wait import until

GOOD = (ROOT / "boxes.toml").read_text()
# A public key line in OpenSSH's format (what `ec2 up` puts on the box).
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbOaQj5DuSdW1pHcUSnlRa4Zy6ZtuazpUq2QQLu3Sv tester"
CPU = ImageFacts("devbox/datascience:cpu", "amd64", None)
GPU = ImageFacts("devbox/datascience:gpu", "amd64", "580.65.06")


def box_with(tmp_path, old: str = "", new: str = ""):
    assert old in GOOD
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace(old, new, 1))
    return load_box(path)


def test_the_committed_box_passes(tmp_path):
    assert preflight(box_with(tmp_path), {"cpu": CPU, "gpu": GPU}) == []


@pytest.mark.parametrize("old, new, images, needle", [
    ('instance_type = "g6.xlarge"', 'instance_type = "m7i.xlarge"', {"gpu": GPU},
     "key 'roles.gpu.instance_type': m7i.xlarge has no GPU"),
    ('[volume]\n', '[volume]\navailability_zone = "us-east-1b"\n', {},
     "key 'volume.availability_zone': us-east-1b, but the boxes run in us-east-1a"),
    ("hop_limit = 2", "hop_limit = 1", {},
     "key 'metadata.hop_limit': 1; a container behind Docker's bridge"),
    ('ami_family = "dlami-base-gpu-al2023"', 'ami_family = "al2023"', {"gpu": GPU},
     "key 'roles.gpu.ami_family': al2023 ships no NVIDIA driver"),
    ("", "", {"gpu": ImageFacts("devbox/datascience:gpu", "amd64", "590.10.01")},
     "ships driver 580.95.05; devbox/datascience:gpu needs 590.10.01 or newer"),
    ('instance_type = "m7i.large"', 'instance_type = "m7g.large"', {"cpu": CPU},
     "key 'roles.cpu.instance_type': m7g.large is arm64, but devbox/datascience:cpu is "
     "linux/amd64"),
    ('instance_type = "m7i.large"', 'instance_type = "m7i.huge"', {},
     "'m7i.huge' is not an EC2 instance type"),
])
def test_each_trap_is_one_error_naming_the_key(tmp_path, old, new, images, needle):
    problems = preflight(box_with(tmp_path, old, new), images)
    assert len(problems) == 1 and needle in problems[0], problems


def test_architecture_from_the_family():
    assert [architecture(t) for t in ("m7g.large", "g5g.xlarge", "t4g.small", "c7gn.large",
                                      "g4dn.xlarge", "g6e.xlarge", "m7i.large", "p5.48xlarge")
            ] == ["arm64"] * 4 + ["amd64"] * 4


def test_cli_refuses_before_any_aws_call(tmp_path):
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace("hop_limit = 2", "hop_limit = 1").replace(
        '"g6.xlarge"', '"m7i.xlarge"'))
    result = cli("ec2", "preflight", "--boxes", str(path),
                 env={"DOCKER_HOST": "unix:///nonexistent/docker.sock",
                      "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})  # nothing AWS may answer
    assert_clean_error(result, "2 problem(s) before any AWS call", "metadata.hop_limit",
                       "roles.gpu.instance_type")
    assert result.returncode == 2
    path.write_text(GOOD.replace('region = "us-east-1"', 'region = "mars"'))
    assert_clean_error(cli("ec2", "preflight", "--boxes", str(path)), "key 'region'")


@pytest.mark.engine
def test_cli_checks_the_local_images(engine, default_images):
    result = cli("ec2", "preflight", "--boxes", str(ROOT / "boxes.toml"))
    assert result.returncode == 0, result.stderr
    assert "preflight passed for cpu, gpu" in result.stderr and "skipped" not in result.stderr


# -- the boxes on EC2: every call through boto3 against moto's server on loopback ---------------


@pytest.fixture
def aws():
    """moto's EC2/SSM server on loopback (its ``env`` points boto3 and the CLI at it)."""
    with MotoServer() as server:
        yield server


def moto_boxes(tmp_path, aws, extra: str = "", push=("cpu", "gpu")) -> Path:
    return seed_boxes(aws, tmp_path, GOOD + extra, push)


def ec2(aws, *args, env=None):
    boxes = Path(args[args.index("--boxes") + 1]) if "--boxes" in args else None
    if boxes and args[0] in ("up", "move", "user-data", "ssh-config"):
        args = (*args, "--public-key", str(boxes.parent / "id_ed25519.pub"))
    result = cli("ec2", *args, env={**aws.env, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def status(aws, boxes, *extra) -> dict:
    result = ec2(aws, "status", "--boxes", str(boxes), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def steady(state: dict) -> dict:
    """A status without what moves with the clock (hours run, cost so far)."""
    return json.loads(json.dumps(state), object_hook=lambda d: {
        k: v for k, v in d.items() if k not in ("running_hours", "cost_this_run_usd")})


def test_up_move_down_keep_one_volume_and_find_what_they_made(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    result = ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image")
    assert result.returncode == 0, result.stderr
    assert "ssh devbox-datascience-gpu" in result.stdout, result.stdout
    assert "ec2 connect --role gpu" in result.stdout, result.stdout
    first = status(aws, boxes)
    gpu = first["roles"]["gpu"]
    assert first["owner"] == "moto", first  # moto's caller: arn:aws:sts::123456789012:user/moto
    assert gpu["state"] == "running" and gpu["has_data_volume"], first
    assert gpu["hourly_usd"] == 0.8048 and gpu["cost_this_run_usd"] is not None, gpu
    assert first["volume"]["attached_to"] == gpu["instance_id"], first
    assert first["volume"]["monthly_usd"] == 8.0, first

    # What EC2 got: IMDSv2 with 2 hops, shutdown = stop, the boot script for this volume, the
    # owner's tags and name, the owner's public key.
    api = aws.client()
    described = api.describe_instances(InstanceIds=[gpu["instance_id"]])
    instance = described["Reservations"][0]["Instances"][0]
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    assert instance["InstanceType"] == "g6.xlarge"
    assert {"Key": "devbox:role", "Value": "gpu"} in instance["Tags"]
    assert {"Key": "devbox:owner", "Value": "moto"} in instance["Tags"]
    assert {"Key": "Name", "Value": "devbox-datascience-moto-gpu"} in instance["Tags"]
    behaviour = api.describe_instance_attribute(InstanceId=gpu["instance_id"],
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    data = api.describe_instance_attribute(InstanceId=gpu["instance_id"], Attribute="userData")
    text = base64.b64decode(data["UserData"]["Value"]).decode()
    script = yaml.safe_load(text)["write_files"][0]["content"]
    assert text.startswith("#cloud-config") and "--gpus all" in script
    assert f"VOLUME_ID={first['volume']['volume_id']}" in script, script[:2000]
    key = (tmp_path / "id_ed25519.pub").read_text().strip()
    assert f"AUTHORIZED_KEYS='{key}'" in script

    # A second `up` finds both by their tags: no new instance, no new volume.
    assert ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    assert steady(status(aws, boxes)) == steady(first)
    assert len(api.describe_volumes()["Volumes"]) == 1 + 1  # the data volume + the root volume

    # The CPU box cannot take the volume from a running GPU box: move does.
    refused = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image")
    assert_clean_error(refused, "attached to the running gpu box", "ec2 move --to cpu")
    assert refused.returncode == 2
    moved = ec2(aws, "move", "--to", "cpu", "--boxes", str(boxes), "--json")
    assert moved.returncode == 0, moved.stderr
    after = json.loads(moved.stdout)
    assert after["roles"]["gpu"]["state"] == "stopped", after
    assert after["roles"]["cpu"]["state"] == "running", after
    assert after["volume"]["attached_to"] == after["roles"]["cpu"]["instance_id"], after
    assert after["volume"]["volume_id"] == first["volume"]["volume_id"]
    # The target started before the volume left the GPU box.
    assert moved.stderr.index("launching the cpu box") < moved.stderr.index(
        "stopping the gpu box"), moved.stderr

    down = ec2(aws, "down", "--boxes", str(boxes), "--json")
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)
    assert {r["state"] for r in stopped["roles"].values()} == {"stopped"}, stopped
    # Back to the GPU box from everything stopped: the volume follows.
    back = ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image", "--json")
    assert back.returncode == 0, back.stderr
    final = json.loads(back.stdout)
    assert final["roles"]["gpu"]["instance_id"] == gpu["instance_id"]
    assert final["volume"]["attached_to"] == gpu["instance_id"], final

    config = ec2(aws, "ssh-config", "--role", "gpu", "--boxes", str(boxes))
    assert config.returncode == 0, config.stderr
    assert f"HostName {gpu['instance_id']}" in config.stdout
    assert ("ProxyCommand aws ssm start-session --target %h --document-name "
            "AWS-StartSSHSession --parameters portNumber=%p --region us-east-1") in config.stdout
    for line in ("LocalForward 8888 127.0.0.1:8888", "User sagemaker-user", "Port 2222",
                 "ForwardAgent yes", f"IdentityFile {tmp_path / 'id_ed25519'}",
                 "HostKeyAlias devbox-datascience"):
        assert f"    {line}\n" in config.stdout, config.stdout


def test_a_spot_box_is_a_persistent_request_that_stops(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws, extra="")
    boxes.write_text(boxes.read_text().replace("idle_minutes = 60", "idle_minutes = 60\nspot = true"))
    result = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["roles"]["cpu"]["spot"] is True
    # What EC2 is asked for (moto keeps no spot request to read back): a persistent request,
    # stopping on interruption, at most the role's hourly cap.
    from devbox_build.targets.fleet import Fleet

    box = load_box(boxes)
    request = Fleet(box, owner="tester").launch_request(
        "gpu", f"{box.image}:gpu", "vol-0123456789abcdef0", KEY)
    assert request["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop",
        "MaxPrice": "4.0000"}}, request
    # destroy ends the box (cancelling its spot request first, where EC2 has one) and keeps
    # the volume
    gone = ec2(aws, "destroy", "--boxes", str(boxes), "--json")
    assert gone.returncode == 0, gone.stderr
    state = json.loads(gone.stdout)
    assert state["roles"] == {"cpu": None, "gpu": None} and state["volume"], state


def test_every_command_runs_the_preflight_first(tmp_path):
    boxes = tmp_path / "boxes.toml"
    boxes.write_text(GOOD.replace("hop_limit = 2", "hop_limit = 1"))
    nowhere = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "x"}
    for args in (["up", "--role", "gpu"], ["move", "--to", "cpu"], ["down"], ["status"],
                 ["user-data", "--role", "cpu"]):
        result = cli("ec2", *args, "--boxes", str(boxes), env=nowhere)
        assert_clean_error(result, "key 'metadata.hop_limit'")
        assert result.returncode == 2


def test_aws_out_of_reach_is_one_error_with_its_own_exit_code(tmp_path):
    result = cli("ec2", "status", "--boxes", str(ROOT / "boxes.toml"), env={
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"})
    assert_clean_error(result, "sts get_caller_identity", "Could not connect to the endpoint URL")
    assert result.returncode == 6


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess:
    """cloud-init's own `schema` command, from its unpacked Debian package (provision.sh)."""
    package = ROOT / ".devbox/cloud-init/usr/lib/python3/dist-packages"
    if not package.is_dir():
        message = "cloud-init's package is not unpacked in .devbox (scripts/provision.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cloudinit.cmd.main import main; "
         "sys.argv = ['cloud-init', 'schema', '--config-file', sys.argv[1]]; sys.exit(main())",
         str(path)], env={**os.environ, "PYTHONPATH": str(package)},
        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("role", ["cpu", "gpu"])
def test_user_data_passes_cloud_init_schema_and_shellcheck(tmp_path, role):
    (tmp_path / "key.pub").write_text(KEY + "\n")
    result = cli("ec2", "user-data", "--role", role, "--volume-id", "vol-0123456789abcdef0",
                 "--public-key", str(tmp_path / "key.pub"))
    assert result.returncode == 0, result.stderr
    (tmp_path / "user-data.yml").write_text(result.stdout)
    checked = cloud_init_schema(tmp_path / "user-data.yml")
    assert checked.returncode == 0 and "Valid cloud-config" in checked.stdout, (
        checked.stdout + checked.stderr)
    script = yaml.safe_load(result.stdout)["write_files"][0]["content"]
    (tmp_path / "devbox-box").write_text(script)
    shellcheck = Path(sys.executable).parent / "shellcheck"
    linted = subprocess.run([str(shellcheck), str(tmp_path / "devbox-box")],
                            capture_output=True, text=True, check=False)
    assert linted.returncode == 0, linted.stdout
    assert f"GPU={'yes' if role == 'gpu' else 'no'}\n" in script


def test_no_box_value_can_change_the_boot_script(tmp_path):
    """Values are validated, then written shell-quoted: a hostile image reference or volume id
    is refused, and what passes comes back as one quoted word."""
    from devbox_build.errors import InputError
    from devbox_build.targets.ec2 import user_data

    box = load_box(ROOT / "boxes.toml")
    for image, volume, key in (("x; reboot", "vol-0123456789abcdef0", KEY),
                               ("devbox/datascience:cpu", "vol-1; rm -rf /", KEY),
                               ("devbox/datascience:cpu", "vol-0123456789abcdef0",
                                KEY + "\nreboot"),
                               ("devbox/datascience:cpu", "vol-0123456789abcdef0",
                                "ssh-ed25519 AAAA'; reboot; '")):
        with pytest.raises(InputError):
            user_data(box, "cpu", image, volume, key)
    script = yaml.safe_load(user_data(box, "cpu", "devbox/datascience:cpu",
                                      "vol-0123456789abcdef0", KEY))["write_files"][0]["content"]
    assert "IMAGE=devbox/datascience:cpu\n" in script and "MOUNT=/mnt/devbox\n" in script
    assert f"AUTHORIZED_KEYS='{KEY}'\n" in script


# -- what a real account does that moto alone does not: AWS saying no mid-way -------------------


@pytest.fixture
def faulty(aws):
    """moto behind a proxy that answers chosen calls with AWS's errors."""
    from .support.aws import FaultyAws

    with FaultyAws(aws.url) as proxy:
        yield proxy


def through(aws, faulty):
    class Route:
        env = {**aws.env, "AWS_ENDPOINT_URL": faulty.url, "AWS_MAX_ATTEMPTS": "2"}
    return Route


def instance_of(aws, role: str) -> str:
    found = [i for r in aws.client().describe_instances(Filters=[
        {"Name": "tag:devbox:role", "Values": [role]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    ])["Reservations"] for i in r["Instances"]]
    return found[0]["InstanceId"]


def test_no_capacity_for_the_target_leaves_the_box_you_had(tmp_path, aws, faulty):
    boxes = moto_boxes(tmp_path, aws)
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    before = steady(status(aws, boxes))
    # The GPU box's first launch: no g6.xlarge capacity in the zone.
    faulty.fail("RunInstances", lambda p: p.get("InstanceType") == "g6.xlarge")
    refused = ec2(through(aws, faulty), "move", "--to", "gpu", "--boxes", str(boxes))
    assert_clean_error(refused, "InsufficientInstanceCapacity",
                       "Nothing was changed: your cpu box still has the data volume",
                       "ec2 relocate --zone")
    assert refused.returncode == 6
    assert steady(status(aws, boxes)) == before  # cpu running, with the volume; no gpu box

    # Launched once, stopped, then no capacity to start it again: still the cpu box.
    faulty.clear()
    assert ec2(aws, "move", "--to", "gpu", "--boxes", str(boxes)).returncode == 0
    assert ec2(aws, "move", "--to", "cpu", "--boxes", str(boxes)).returncode == 0
    before = steady(status(aws, boxes))
    gpu = before["roles"]["gpu"]["instance_id"]
    faulty.fail("StartInstances", lambda p: p.get("InstanceId.1") == gpu)
    refused = ec2(through(aws, faulty), "move", "--to", "gpu", "--boxes", str(boxes))
    assert_clean_error(refused, "InsufficientInstanceCapacity", "Nothing was changed")
    assert steady(status(aws, boxes)) == before

    # `up` from everything stopped: the gpu box cannot start; the volume stays on the cpu box.
    assert ec2(aws, "down", "--boxes", str(boxes)).returncode == 0
    before = steady(status(aws, boxes))
    refused = ec2(through(aws, faulty), "up", "--role", "gpu", "--boxes", str(boxes),
                  "--no-wait-image")
    assert_clean_error(refused, "InsufficientInstanceCapacity", "your cpu box still has")
    assert steady(status(aws, boxes)) == before
    # ... and the cpu box starts as before.
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0


def test_a_failed_attach_puts_the_volume_back(tmp_path, aws, faulty):
    boxes = moto_boxes(tmp_path, aws)
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    cpu = instance_of(aws, "cpu")
    faulty.fail("AttachVolume", lambda p: p.get("InstanceId") != cpu, code="IncorrectState",
                status=400)
    refused = ec2(through(aws, faulty), "move", "--to", "gpu", "--boxes", str(boxes))
    assert_clean_error(refused, "IncorrectState", "Rolled back: the data volume is on the cpu box")
    after = status(aws, boxes)
    assert after["roles"]["cpu"]["state"] == "running" and after["roles"]["cpu"][
        "has_data_volume"], after
    assert after["roles"]["gpu"]["state"] == "stopped", after  # started for nothing, stopped again


def test_a_type_offered_nowhere_near_the_volume_is_refused_first(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws, extra='\n[guardrails]\nmax_hourly_usd = {gpu = 100}\n')
    boxes.write_text(boxes.read_text().replace('"g6.xlarge"', '"p4de.24xlarge"').replace(
        "max_hourly_usd = {gpu = 100}", "max_hourly_usd = {gpu = 100}\nprices = "
        '{"p4de.24xlarge" = 40.97}'))
    refused = ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image")
    assert_clean_error(refused, "key 'roles.gpu.instance_type': p4de.24xlarge is not offered "
                       "in us-east-1a")
    assert aws.client().describe_instances()["Reservations"] == []


def test_two_ups_at_once_make_one_box(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    args = ["ec2", "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image",
            "--public-key", str(tmp_path / "id_ed25519.pub")]
    env = {**os.environ, **aws.env}
    runs = [subprocess.Popen([sys.executable, "-m", "devbox_build.cli", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    reservations = aws.client().describe_instances()["Reservations"]
    assert len([i for r in reservations for i in r["Instances"]]) == 1, reservations
    data = aws.client().describe_volumes(Filters=[{"Name": "tag:devbox:purpose",
                                                   "Values": ["data"]}])["Volumes"]
    assert len(data) == 1, data
    assert any("waiting:" in err for _, err in results), results


def test_boxes_belong_to_the_caller(tmp_path, aws):
    """Two people, one boxes.toml: each `up` makes the caller's own box; `down` stops only the
    caller's; `status --all` lists both by owner."""
    boxes = moto_boxes(tmp_path, aws)
    iam = aws.client("iam")
    people = {}
    for name in ("alice", "Bob.Smith"):
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        people[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    for person in people.values():
        assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image",
                   env=person).returncode == 0
    assert ec2(aws, "down", "--boxes", str(boxes), env=people["alice"]).returncode == 0
    everyone = status(aws, boxes, "--all")["team"]
    assert sorted(everyone) == ["alice", "bob-smith"], everyone
    assert everyone["alice"]["roles"]["cpu"]["state"] == "stopped"
    assert everyone["bob-smith"]["roles"]["cpu"]["state"] == "running"
    assert everyone["alice"]["volume"]["volume_id"] != everyone["bob-smith"]["volume"]["volume_id"]
    mine = json.loads(ec2(aws, "status", "--boxes", str(boxes), "--json",
                          env=people["Bob.Smith"]).stdout)
    assert mine["owner"] == "bob-smith" and mine["roles"]["cpu"]["state"] == "running"


def test_a_changed_definition_is_applied_while_stopped_and_refused_while_running(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    boxes.write_text(boxes.read_text().replace('"m7i.large"', '"m7i.xlarge"').replace(
        "idle_minutes = 60", "idle_minutes = 30"))
    refused = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image")
    assert_clean_error(refused, "runs, and boxes.toml changed", "instance type: m7i.large → "
                       "m7i.xlarge", "idle minutes: 60 → 30", "ec2 down --role cpu")
    assert ec2(aws, "down", "--boxes", str(boxes)).returncode == 0
    applied = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image", "--json")
    assert applied.returncode == 0, applied.stderr
    assert "updating the stopped cpu box" in applied.stderr
    assert json.loads(applied.stdout)["roles"]["cpu"]["instance_type"] == "m7i.xlarge"
    data = aws.client().describe_instance_attribute(InstanceId=instance_of(aws, "cpu"),
                                                    Attribute="userData")
    assert "IDLE_MINUTES=30\n" in base64.b64decode(data["UserData"]["Value"]).decode()


def test_an_image_missing_from_ecr_is_refused_before_launch(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws, push=("cpu",))
    refused = ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image")
    assert_clean_error(refused, "key 'image'", "datascience:gpu is not in ECR", "--push")
    assert refused.returncode == 2
    assert aws.client().describe_instances()["Reservations"] == []


def test_destroy_snapshots_then_deletes_the_volume_and_relocate_moves_it(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    assert ec2(aws, "down", "--snapshot", "--boxes", str(boxes)).returncode == 0
    moved = ec2(aws, "relocate", "--zone", "us-east-1b", "--boxes", str(boxes), "--json")
    assert moved.returncode == 0, moved.stderr
    relocated = json.loads(moved.stdout)
    volume = aws.client().describe_volumes(VolumeIds=[relocated["volume_id"]])["Volumes"][0]
    assert volume["AvailabilityZone"] == "us-east-1b" and volume["SnapshotId"]
    boxes.write_text(boxes.read_text().replace('"us-east-1a"', '"us-east-1b"'))
    up = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["volume"]["volume_id"] == relocated["volume_id"]

    gone = ec2(aws, "destroy", "--delete-volume", "--yes", "--boxes", str(boxes), "--json")
    assert gone.returncode == 0, gone.stderr
    result = json.loads(gone.stdout)
    assert result["volume"] is None and result["final_snapshot"], result
    snapshots = aws.client().describe_snapshots(SnapshotIds=[result["final_snapshot"]])
    assert snapshots["Snapshots"][0]["VolumeId"] == relocated["volume_id"]


def test_iam_policies_pass_parliament(tmp_path):
    import parliament

    boxes = tmp_path / "boxes.toml"
    boxes.write_text(GOOD.replace("idle_minutes = 60",
                                  'idle_minutes = 60\ninstance_profile = "devbox-box"\n'
                                  'signed_by = "team-signing.pub"'))
    for args in (["--for", "user"], ["--for", "box", "--bucket", "team-data"],
                 ["--for", "user", "--kms-key",
                  "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"]):
        result = cli("ec2", "iam-policy", *args, "--boxes", str(boxes))
        assert result.returncode == 0, result.stderr
        policy = parliament.analyze_policy_string(result.stdout)
        findings = [f"{f.issue} {f.detail}" for f in policy.findings]
        assert findings == [], findings
        actions = json.dumps(json.loads(result.stdout))
        assert '"*"' not in actions.replace('"Resource": "*"', ""), actions  # no action "*"
    user = json.loads(cli("ec2", "iam-policy", "--for", "user", "--boxes", str(boxes)).stdout)
    passes = [s for s in user["Statement"] if s["Action"] == "iam:PassRole"]
    assert passes and passes[0]["Resource"].endswith(":role/devbox-box"), passes
    # signed_by: the person's credentials read the image's signature before a launch.
    reads = next(s for s in user["Statement"] if s["Sid"] == "ReadSignatures")
    assert reads["Action"] == ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
    assert reads["Resource"].endswith(":repository/devbox/datascience")


# -- bad input: each one error naming the key, its exit code, no traceback ---------------------


@pytest.mark.parametrize("old, new, needle", [
    ('region = "us-east-1"', 'region = "us-east-١"', "key 'region'"),
    ("size_gb = 100", "size_gb = 50000", "a gp3 volume is 1 to 16384 GiB"),
    ("[volume]\n", '[volume]\nmount_point = "/mnt/../.."\n', "has a '.' or '..' part"),
    ("[volume]\n", '[volume]\nmount_point = "/usr"\n', "is a system folder"),
])
def test_bad_box_values_are_refused_by_name(tmp_path, old, new, needle):
    path = tmp_path / "boxes.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    result = cli("ec2", "preflight", "--boxes", str(path))
    assert_clean_error(result, needle)
    assert result.returncode == 2


@pytest.mark.parametrize("old, new, needle", [
    ('instance_type = "m7i.large"', 'instance_type = "p5.48xlarge"',
     "p5.48xlarge is a GPU instance; the cpu role is the cheap box"),
    ('instance_type = "g6.xlarge"', 'instance_type = "g6e.12xlarge"',
     "g6e.12xlarge costs about $10.49/h, over the gpu role's cap of $4.00/h"),
    ("idle_minutes = 60", "idle_minutes = 0", "key 'idle_minutes': 0 turns the idle stop off"),
    ("[metadata]", '[guardrails]\nallowed_types = {cpu = ["t3.*"]}\n\n[metadata]',
     "m7i.large is not allowed for the cpu role"),
    ('instance_type = "m7i.large"', 'instance_type = "m7i.48xlarge"',
     "no price known for m7i.48xlarge; add it to guardrails.prices"),
    ('image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/devbox/datascience"',
     'image = "devbox/datascience"', "key 'image': devbox/datascience is not in ECR"),
])
def test_guardrails_refuse_what_would_cost_unwatched(tmp_path, old, new, needle):
    problems = preflight(box_with(tmp_path, old, new), {})
    assert any(needle in p for p in problems), problems


def test_gpu_without_idle_stop_needs_an_explicit_opt_in(tmp_path):
    box = box_with(tmp_path, "idle_minutes = 60", "idle_minutes = 0\n\n[guardrails]\n"
                   "allow_gpu_without_idle_stop = true\n")
    assert preflight(box, {}) == []


def test_a_profile_that_does_not_exist_is_one_error(tmp_path):
    env = {"AWS_PROFILE": "no-such-profile", "AWS_CONFIG_FILE": str(tmp_path / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    # offline: passes
    assert cli("ec2", "preflight", "--boxes", str(ROOT / "boxes.toml"),
               env={**env, "DOCKER_HOST": "unix:///nonexistent"}).returncode == 0
    result = cli("ec2", "status", "--boxes", str(ROOT / "boxes.toml"), env=env)
    assert_clean_error(result, "AWS configuration", "no-such-profile", "AWS_PROFILE")
    assert result.returncode == 2


# -- the failsafe and the login, on the stand-in instance ---------------------------------------


@pytest.fixture
def stand_in(engine, default_images, tmp_path):
    """A box definition of the test's own name and mount, and a stand-in instance for it."""
    from devbox_build.targets.ec2 import user_data

    image = default_images["cpu"].content_tag
    name = f"t{uuid.uuid4().hex[:10]}"
    mount = f"/mnt/devbox-{name}"
    boxes = tmp_path / "boxes.toml"
    boxes.write_text(GOOD.replace('name = "datascience"', f'name = "{name}"').replace(
        "[volume]\n", f'[volume]\nmount_point = "{mount}"\n'))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop", "-f",
                    str(tmp_path / "id_ed25519")], check=True)
    key = (tmp_path / "id_ed25519.pub").read_text().strip()

    def script(reference: str = image) -> str:
        return yaml.safe_load(user_data(load_box(boxes), "cpu", reference, VOLUME_ID, key))[
            "write_files"][0]["content"]

    (tmp_path / "instance").mkdir()
    container = f"devbox-{name}"
    with StandInInstance(engine, image, tmp_path / "instance", mount, script()) as instance:
        instance.name, instance.boxes, instance.script, instance.container = (
            name, boxes, script, container)
        try:
            yield instance
        finally:
            try:
                engine.remove(engine.api.inspect_container(container)["Id"])
            except Exception:  # never started
                pass


FAST_FAILSAFE = {"DEVBOX_FAILSAFE_SECONDS": "0", "DEVBOX_VOLUME_WAIT_SECONDS": "2"}


@pytest.mark.engine
def test_the_failsafe_powers_off_a_box_whose_boot_fails(stand_in):
    # No data volume attached: the script waits, gives up, and the host powers off.
    code, out = stand_in.boot(env=FAST_FAILSAFE, attach=False, check=False)
    assert code != 0 and "is not attached after 2 s" in out, out
    assert "FAILSAFE: the boot script failed" in out and stand_in.powered_off, out
    (stand_in.folder / "powered-off").unlink()

    # The image cannot be pulled (a registry that refuses): the same.
    (stand_in.folder / "devbox-box").write_text(stand_in.script("127.0.0.1:9/devbox/none:cpu"))
    code, out = stand_in.boot(env=FAST_FAILSAFE, check=False)
    assert code != 0 and "FAILSAFE: the boot script failed" in out, out
    assert stand_in.powered_off


@pytest.mark.engine
def test_the_failsafe_powers_off_a_box_whose_watcher_or_container_died(engine, stand_in):
    out = stand_in.boot()
    assert "ready:" in out and not stand_in.powered_off, out
    # Running and watched: the check leaves the box alone.
    _, checked = stand_in.boot(env=FAST_FAILSAFE, args="check", check=False)
    assert "FAILSAFE" not in checked and not stand_in.powered_off, checked
    assert (Path(stand_in.channel) / "heartbeat").is_file()  # the watcher reports

    # The watcher dies and its last report ages: the box is no longer watched.
    exec_id = engine.api.exec_create(stand_in.container, [
        "sh", "-c", "pkill -f '^[^ ]*python3 -I [^ ]*/devbox-idle watch' && "
        "touch -d '-20 minutes' /run/devbox/host/heartbeat"])
    engine.api.exec_start(exec_id)
    assert engine.api.exec_inspect(exec_id)["ExitCode"] == 0
    _, checked = stand_in.boot(env=FAST_FAILSAFE, args="check", check=False)
    assert "FAILSAFE: the idle watcher in" in checked and "has not reported" in checked, checked
    assert stand_in.powered_off
    (stand_in.folder / "powered-off").unlink()

    engine.api.kill(stand_in.container)
    _, checked = stand_in.boot(env=FAST_FAILSAFE, args="check", check=False)
    assert f"FAILSAFE: the container {stand_in.container} is not running" in checked, checked
    assert stand_in.powered_off


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.engine
def test_openssh_logs_in_to_the_environment(stand_in, tmp_path):
    """The real OpenSSH client, with the entry `ec2 ssh-config` prints (its ProxyCommand, SSM's
    tunnel to the host's loopback, replaced by a relay to this machine's): a login as the image's
    user in the container, its venv's Python, scp to the home volume, a forwarded JupyterLab, a
    key from the laptop's agent used by git inside, the session seen by the idle watcher, and
    `ec2 connect`'s URL working through the tunnel."""
    import urllib.request

    from devbox_build.targets.ec2 import ssh_config

    out = stand_in.boot()
    assert "ssh on 127.0.0.1:2222" in out, out
    box = load_box(stand_in.boxes)
    entry = ssh_config(box, "cpu", "i-0standin000000000", tmp_path / "id_ed25519")
    relay = Path(__file__).parent / "support" / "relay.py"
    entry = re.sub(r"ProxyCommand .*", f"ProxyCommand {sys.executable} {relay} 127.0.0.1 %p",
                   entry)
    config = tmp_path / "ssh_config"
    config.write_text(entry + f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n"
                      "    StrictHostKeyChecking accept-new\n    BatchMode yes\n")
    host = f"devbox-{stand_in.name}-cpu"
    agent = tmp_path / "agent.sock"
    agent_process = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent)],
                                     stdout=subprocess.DEVNULL)
    env = {**os.environ, "SSH_AUTH_SOCK": str(agent)}
    tunnel = None
    try:
        until(agent.exists, timeout=30, every=0.05, what="ssh-agent did not start")
        subprocess.run(["ssh-add", "-q", str(tmp_path / "id_ed25519")], env=env, check=True)

        def ssh(*command: str, check: bool = True) -> str:
            result = subprocess.run(["ssh", "-F", str(config), host, *command], env=env,
                                    capture_output=True, text=True, timeout=120, check=False)
            assert not check or result.returncode == 0, result.stderr
            return result.stdout

        assert ssh("whoami; echo $HOME; python -c 'import sys; print(sys.prefix)'").split() == [
            "sagemaker-user", "/home/sagemaker-user", "/opt/venv"]
        (tmp_path / "notes.txt").write_text("from the laptop\n")
        subprocess.run(["scp", "-q", "-F", str(config), str(tmp_path / "notes.txt"),
                        f"{host}:notes.txt"], env=env, check=True, timeout=120)
        assert (Path(stand_in.mount) / "home" / "notes.txt").read_text() == "from the laptop\n"

        # git over ssh inside the box, authenticated by the laptop's agent (no key in the box).
        assert "id_ed25519" not in ssh("ls ~/.ssh 2>/dev/null || true")
        cloned = ssh("git init -q --bare ~/origin.git && GIT_SSH_COMMAND='ssh -p 2222 -o "
                     "StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes'"
                     " git clone -q sagemaker-user@127.0.0.1:origin.git /tmp/clone 2>&1 && "
                     "ssh-add -l && echo cloned")
        assert "cloned" in cloned and "laptop" in cloned, cloned

        # A tunnel as VS Code keeps one: JupyterLab through it, and the watcher sees a session.
        port = free_port()
        # (the entry's own LocalForward 8888 is taken here by the box's published port: ssh
        # says so and goes on)
        tunnel = subprocess.Popen(["ssh", "-F", str(config), "-N", "-L",
                                   f"{port}:127.0.0.1:8888", host], env=env,
                                  stderr=subprocess.DEVNULL)
        def through_the_tunnel() -> str | None:
            """`ec2 connect`'s URL, once its token works on the forwarded port."""
            connect = subprocess.run(
                [sys.executable, "-m", "devbox_build.cli", "ec2", "connect", "--role", "cpu",
                 "--boxes", str(stand_in.boxes), "--ssh-config", str(config)], env=env,
                capture_output=True, text=True, check=False, timeout=120)
            url = connect.stdout.strip()
            if connect.returncode != 0 or "token=" not in url:
                return None
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{port}/api/status?token="
                             f"{url.split('token=', 1)[1]}", timeout=5) as answer:
                return url if answer.status == 200 else None

        url = until(through_the_tunnel, timeout=60, every=0.5,
                    what="JupyterLab did not answer through the tunnel")
        assert url.startswith("http://127.0.0.1:8888/lab?token="), url
        def ssh_sessions() -> list:
            """What the watcher counts (the asking command's own session is its own lineage)."""
            watched = json.loads(ssh("devbox-idle status --json"))
            return [s for s in watched["signals"] if s["source"] == "sshd" and s["active"]]

        assert len(ssh_sessions()) == 1  # the tunnel keeps the box up
        tunnel.terminate()
        tunnel.wait(timeout=30)
        until(lambda: not ssh_sessions(), timeout=30,  # sshd's session process ends
              what=lambda: ssh("ps -eo pid,ppid,args"))
    finally:
        if tunnel:
            tunnel.terminate()
            tunnel.wait(timeout=30)
        agent_process.terminate()
        agent_process.wait(timeout=30)


@pytest.mark.engine
def test_the_boot_script_formats_once_mounts_and_starts_the_image(engine, stand_in):
    container, image = stand_in.container, stand_in.image
    first = stand_in.boot()
    assert "formatting /dev/loop" in first, first
    assert f"ready: {image} as {container}, JupyterLab answers" in first, first
    assert Imds.seen[0] == "PUT /latest/api/token", Imds.seen
    attrs = engine.api.inspect_container(container)
    assert attrs["HostConfig"]["PortBindings"]["8888/tcp"] == [
        {"HostIp": "127.0.0.1", "HostPort": "8888"}], attrs["HostConfig"]["PortBindings"]
    assert attrs["HostConfig"]["PortBindings"]["2222/tcp"] == [
        {"HostIp": "127.0.0.1", "HostPort": "2222"}]
    # Only the boot script starts it, after the volume is mounted: never Docker at boot.
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    assert "DEVBOX_IDLE_ACTION=poweroff" in attrs["Config"]["Env"]
    # Home is the volume: a file written there from the container is on the volume.
    exec_id = engine.api.exec_create(container, ["sh", "-c", "echo kept > ~/notes.txt"])
    engine.api.exec_start(exec_id)
    assert engine.api.exec_inspect(exec_id)["ExitCode"] == 0
    engine.api.stop(container, timeout=10)  # the instance stops

    second = stand_in.boot()
    assert "formatting" not in second and "recreating" not in second, second
    assert "JupyterLab answers" in second, second
    exec_id = engine.api.exec_create(container, ["cat", "/home/sagemaker-user/notes.txt"])
    assert engine.api.exec_start(exec_id).decode().strip() == "kept"
    engine.api.stop(container, timeout=10)

    # boxes.toml names another image now: the container is recreated on it; home stays.
    other = f"{image.rsplit(':', 1)[0]}:standin-{stand_in.name}"
    engine.api.tag(image, *other.rsplit(":", 1))
    built = engine.api.build(fileobj=io.BytesIO(
        f"FROM {image}\nLABEL devbox.test={stand_in.name}\n".encode()), tag=other, rm=True)
    list(built)
    try:
        (stand_in.folder / "devbox-box").write_text(stand_in.script(other))
        third = stand_in.boot()
        assert f"the image changed ({other}" in third, third
        assert engine.api.inspect_container(container)["Config"]["Image"] == other
        exec_id = engine.api.exec_create(container, ["cat", "/home/sagemaker-user/notes.txt"])
        assert engine.api.exec_start(exec_id).decode().strip() == "kept"
    finally:
        engine.remove(engine.api.inspect_container(container)["Id"])
        engine.api.remove_image(other)




@pytest.mark.engine
def test_the_readme_walk_through(engine, default_images, tmp_path, aws):
    """The README's walk-through, command by command, as a new data scientist runs it: moto is
    AWS (behind the proxy that shows the serial console), the stand-in is the box (both roles
    reach it), `aws` on PATH is the Session Manager tunnel (a relay to the stand-in's port), and
    `ssh` is the real client reading the temporary home's ~/.ssh/config."""
    import shutil

    from devbox_build.targets.ec2 import user_data

    from .support.aws import FaultyAws
    from .test_readme import walk_through_commands

    home, bin_ = tmp_path / "home", tmp_path / "bin"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    bin_.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "scientist", "-f",
                    str(home / ".ssh" / "id_ed25519")], check=True)
    key = (home / ".ssh" / "id_ed25519.pub").read_text().strip()
    relay = Path(__file__).parent / "support" / "relay.py"
    # `aws ssm start-session --target ID --document-name AWS-StartSSHSession --parameters
    # portNumber=P ...`: Session Manager's tunnel to the host's loopback port P.
    (bin_ / "aws").write_text(
        "#!/bin/bash\nfor a in \"$@\"; do case $a in portNumber=*) port=${a#portNumber=};; esac;"
        f" done\nexec {sys.executable} {relay} 127.0.0.1 \"$port\"\n")
    # OpenSSH reads ~/.ssh from the passwd entry's home, not $HOME.
    (bin_ / "ssh").write_text(
        f"#!/bin/bash\nexec {shutil.which('ssh')} -F \"$HOME/.ssh/config\" -o "
        "UserKnownHostsFile=\"$HOME/.ssh/known_hosts\" -o StrictHostKeyChecking=accept-new "
        "-o BatchMode=yes \"$@\"\n")
    (bin_ / "scp").write_text(
        f"#!/bin/bash\nexec {shutil.which('scp')} -S {bin_ / 'ssh'} \"$@\"\n")
    for tool in ("aws", "ssh", "scp"):
        (bin_ / tool).chmod(0o755)

    image = default_images["cpu"].content_tag
    mount = f"/mnt/devbox-w{uuid.uuid4().hex[:8]}"
    boxes = seed_boxes(aws, tmp_path, GOOD.replace("[volume]\n",
                                                   f'[volume]\nmount_point = "{mount}"\n'))
    (tmp_path / "results.csv").write_text("epoch,loss\n1,0.5\n")
    script = yaml.safe_load(user_data(load_box(boxes), "cpu", image, VOLUME_ID, key))[
        "write_files"][0]["content"]
    (tmp_path / "instance").mkdir()
    with FaultyAws(aws.url) as proxy, StandInInstance(engine, image, tmp_path / "instance",
                                                     mount, script) as box:
        try:
            booted = box.boot()
            console = base64.b64encode(booted.encode()).decode()
            proxy.answer("GetConsoleOutput", lambda _: True,
                         '<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/'
                         f'2016-11-15/"><requestId>r</requestId><output>{console}</output>'
                         "</GetConsoleOutputResponse>")
            env = {**os.environ, **aws.env, "AWS_ENDPOINT_URL": proxy.url, "HOME": str(home),
                   "PATH": f"{bin_}:{os.environ['PATH']}"}
            outputs = {}
            for command in walk_through_commands():
                if command.startswith("code "):
                    continue  # VS Code: not installable here (README: not tested, and why)
                result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=600,
                                        check=False)
                assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
                assert "Traceback" not in result.stderr, result.stderr
                outputs[command] = result.stdout
        finally:
            try:
                engine.remove(engine.api.inspect_container("devbox-datascience")["Id"])
            except Exception:  # never started
                pass
    said = "\n".join(outputs.values())
    assert "/opt/venv/bin/python" in said, said
    assert re.search(r"http://127\.0\.0\.1:8888/lab\?token=[0-9a-f]{48}", said), said
    assert "results.csv" in outputs["ssh devbox-datascience-gpu ls /data"]
    final = outputs["devbox-build ec2 status"]
    assert "cpu: i-" in final and "gpu: i-" in final and "stopped" in final, final


def test_an_account_without_a_default_vpc_needs_a_subnet(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    api = aws.client()
    for vpc in api.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]:
        for subnet in api.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [
                vpc["VpcId"]]}])["Subnets"]:
            api.delete_subnet(SubnetId=subnet["SubnetId"])
        api.delete_vpc(VpcId=vpc["VpcId"])
    refused = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image")
    assert_clean_error(refused, "key 'subnet_id': this account has no default VPC",
                       "VPC endpoints")
    assert refused.returncode == 2
    assert api.describe_instances()["Reservations"] == []


def test_an_interrupted_spot_box_is_left_to_ec2_and_says_so(tmp_path, aws, faulty):
    """Only EC2 restarts a spot instance its interruption stopped: StartInstances answers
    IncorrectSpotRequestState. `up` says so, with the way out, and changes nothing."""
    boxes = moto_boxes(tmp_path, aws)
    boxes.write_text(boxes.read_text().replace("idle_minutes = 60", "idle_minutes = 60\nspot = true"))
    assert ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    assert ec2(aws, "down", "--boxes", str(boxes)).returncode == 0
    before = steady(status(aws, boxes))
    faulty.fail("StartInstances", lambda _: True, code="IncorrectSpotRequestState", status=400)
    refused = ec2(through(aws, faulty), "up", "--role", "cpu", "--boxes", str(boxes),
                  "--no-wait-image")
    assert_clean_error(refused, "spot instance stopped by an interruption",
                       "ec2 destroy --role cpu")
    assert steady(status(aws, boxes)) == before
