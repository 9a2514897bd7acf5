"""EC2 boxes: the preflight refuses each classic trap before any AWS call; up / move / down /
status / ssh-config do their work through boto3 against moto's server on loopback; the user data
passes cloud-init's schema and shellcheck."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from devbox_build.targets.ec2 import ImageFacts, architecture, load_box, preflight

from .conftest import ROOT, assert_clean_error, cli
from .support.aws import VOLUME_ID, Imds, MotoServer, StandInInstance

GOOD = (ROOT / "boxes.toml").read_text()
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


def moto_boxes(tmp_path, aws, extra: str = "") -> Path:
    """The committed box definition, with the GPU role on an AMI moto knows (moto publishes
    Amazon Linux's SSM parameter, which the CPU role resolves, but not the DLAMI's)."""
    ami = next(i["ImageId"] for i in aws.client().describe_images(Owners=["amazon"])["Images"]
               if i.get("Platform") != "windows")
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace('ami_family = "dlami-base-gpu-al2023"',
                                 f'ami_family = "dlami-base-gpu-al2023"\nami = "{ami}"') + extra)
    return path


def ec2(aws, *args):
    result = cli("ec2", *args, env=aws.env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def status(aws, boxes) -> dict:
    result = ec2(aws, "status", "--boxes", str(boxes), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_up_move_down_keep_one_volume_and_find_what_they_made(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws)
    result = ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image")
    assert result.returncode == 0, result.stderr
    assert "ssh devbox-datascience-gpu" in result.stdout, result.stdout
    first = status(aws, boxes)
    gpu = first["roles"]["gpu"]
    assert gpu["state"] == "running" and gpu["has_data_volume"], first
    assert first["volume"]["attached_to"] == gpu["instance_id"], first

    # What EC2 got: IMDSv2 with 2 hops, shutdown = stop, the boot script for this volume.
    api = aws.client()
    described = api.describe_instances(InstanceIds=[gpu["instance_id"]])
    instance = described["Reservations"][0]["Instances"][0]
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    assert instance["InstanceType"] == "g6.xlarge"
    assert {"Key": "devbox:role", "Value": "gpu"} in instance["Tags"]
    behaviour = api.describe_instance_attribute(InstanceId=gpu["instance_id"],
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    data = api.describe_instance_attribute(InstanceId=gpu["instance_id"], Attribute="userData")
    text = base64.b64decode(data["UserData"]["Value"]).decode()
    script = yaml.safe_load(text)["write_files"][0]["content"]
    assert text.startswith("#cloud-config") and "--gpus all" in script
    assert f"VOLUME_ID={first['volume']['volume_id']}" in script, script[:2000]

    # A second `up` finds both by their tags: no new instance, no new volume.
    assert ec2(aws, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image").returncode == 0
    assert status(aws, boxes) == first
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
    assert "LocalForward 8888 127.0.0.1:8888" in config.stdout and "User ec2-user" in config.stdout


def test_a_spot_box_is_a_persistent_request_that_stops(tmp_path, aws):
    boxes = moto_boxes(tmp_path, aws, extra="")
    boxes.write_text(boxes.read_text().replace("idle_minutes = 60", "idle_minutes = 60\nspot = true"))
    result = ec2(aws, "up", "--role", "cpu", "--boxes", str(boxes), "--no-wait-image", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["roles"]["cpu"]["spot"] is True


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
    assert_clean_error(result, "ec2 describe_", "Could not connect to the endpoint URL")
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
    result = cli("ec2", "user-data", "--role", role, "--volume-id", "vol-0123456789abcdef0")
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
    for image, volume in (("x; reboot", "vol-0123456789abcdef0"),
                          ("devbox/datascience:cpu", "vol-1; rm -rf /")):
        with pytest.raises(InputError):
            user_data(box, "cpu", image, volume)
    script = yaml.safe_load(user_data(box, "cpu", "devbox/datascience:cpu",
                                      "vol-0123456789abcdef0"))["write_files"][0]["content"]
    assert "IMAGE=devbox/datascience:cpu\n" in script and "MOUNT=/mnt/devbox\n" in script


# -- the boot script on a stand-in instance (tests/support/aws.py) ------------------------------


@pytest.mark.engine
def test_the_boot_script_formats_once_mounts_and_starts_the_image(engine, default_images,
                                                                   tmp_path):
    from devbox_build.targets.ec2 import user_data

    image = default_images["cpu"].content_tag
    name = f"t{uuid.uuid4().hex[:10]}"
    mount = f"/mnt/devbox-{name}"
    boxes = tmp_path / "boxes.toml"
    boxes.write_text(GOOD.replace('name = "datascience"', f'name = "{name}"').replace(
        "[volume]\n", f'[volume]\nmount_point = "{mount}"\n'))
    document = yaml.safe_load(user_data(load_box(boxes), "cpu", image, VOLUME_ID))
    container = f"devbox-{name}"
    (tmp_path / "instance").mkdir()
    try:
        with StandInInstance(engine, image, tmp_path / "instance", mount,
                             document["write_files"][0]["content"]) as instance:
            first = instance.boot()
            assert "formatting /dev/loop" in first, first
            assert f"ready: {image} as {container}, JupyterLab answers" in first, first
            assert Imds.seen[0] == "PUT /latest/api/token", Imds.seen
            attrs = engine.api.inspect_container(container)
            assert attrs["HostConfig"]["PortBindings"]["8888/tcp"] == [
                {"HostIp": "127.0.0.1", "HostPort": "8888"}], attrs["HostConfig"]["PortBindings"]
            assert "DEVBOX_IDLE_ACTION=poweroff" in attrs["Config"]["Env"]
            # Home is the volume: a file written there from the container is on the volume.
            exec_id = engine.api.exec_create(container, ["sh", "-c", "echo kept > ~/notes.txt"])
            engine.api.exec_start(exec_id)
            assert engine.api.exec_inspect(exec_id)["ExitCode"] == 0
            engine.api.stop(container, timeout=10)  # the instance stops

            second = instance.boot()
            assert "formatting" not in second, second
            assert "JupyterLab answers" in second, second
            exec_id = engine.api.exec_create(container, ["cat", "/home/sagemaker-user/notes.txt"])
            assert engine.api.exec_start(exec_id).decode().strip() == "kept"
    finally:
        try:
            engine.remove(engine.api.inspect_container(container)["Id"])
        except Exception:  # never started
            pass
