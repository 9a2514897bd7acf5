"""EC2 boxes: the preflight refuses each classic trap before any AWS call; up / move / down /
status / ssh-config do their work through boto3 against moto's server on loopback; the user data
passes cloud-init's schema and shellcheck."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from devbox_build.targets.ec2 import ImageFacts, architecture, load_box, preflight

from .conftest import ROOT, assert_clean_error, cli

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
def aws(tmp_path):
    """moto's EC2/SSM server on loopback, and the environment that points boto3 at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                                "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while True:  # until it answers (a state), bounded
        try:
            opener.open(f"{url}/moto-api/", timeout=2).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    yield env
    process.terminate()
    process.wait(timeout=30)


def client(aws: dict, service: str = "ec2"):
    import boto3

    return boto3.client(service, region_name="us-east-1", endpoint_url=aws["AWS_ENDPOINT_URL"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def moto_boxes(tmp_path, aws, extra: str = "") -> Path:
    """The committed box definition, with the GPU role on an AMI moto knows (moto publishes
    Amazon Linux's SSM parameter, which the CPU role resolves, but not the DLAMI's)."""
    ami = next(i["ImageId"] for i in client(aws).describe_images(Owners=["amazon"])["Images"]
               if i.get("Platform") != "windows")
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace('ami_family = "dlami-base-gpu-al2023"',
                                 f'ami_family = "dlami-base-gpu-al2023"\nami = "{ami}"') + extra)
    return path


def ec2(aws, *args):
    result = cli("ec2", *args, env=aws)
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
    api = client(aws)
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


# -- the boot script on a stand-in instance: a privileged container, a loop device for the EBS
# -- volume, an IMDS stand-in on loopback, the host's engine for Docker --------------------------

VOLUME_ID = "vol-0123456789abcdef0"


class Imds(http.server.BaseHTTPRequestHandler):
    """IMDSv2 as EC2 serves it: a PUT for a token first, then GETs that carry it."""

    token = "stand-in-token"
    answers = {"instance-id": "i-0standin000000000", "placement/availability-zone": "us-east-1a",
               "placement/region": "us-east-1"}
    seen: list[str] = []

    def do_PUT(self):
        self.seen.append(f"PUT {self.path}")
        ok = (self.path == "/latest/api/token"
              and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
        self._answer(200 if ok else 400, self.token if ok else "")

    def do_GET(self):
        self.seen.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._answer(401, "")
        key = self.path.removeprefix("/latest/meta-data/")
        self._answer(200 if key in self.answers else 404, self.answers.get(key, ""))

    def _answer(self, code: int, body: str):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def boot(engine, image: str, tmp_path: Path, mount: str, imds_port: int) -> str:
    """One boot of the stand-in instance. As EC2 attaches the volume before the instance sees it,
    the test attaches the 'EBS volume' (a loop device on the host) and hands the instance that
    device, linked where udev links an EBS NVMe device; the instance then runs the boot script.
    No --privileged (this host's engine cannot grant every capability): SYS_ADMIN to mount, the
    one device."""
    import docker

    device = subprocess.run(["losetup", "-f", "--show", str(tmp_path / "ebs.img")],
                            capture_output=True, text=True, check=True).stdout.strip()
    stand_in = engine.api.create_container(
        image, entrypoint=["sleep", "infinity"], user="root",
        host_config=engine.api.create_host_config(
            cap_add=["SYS_ADMIN"], devices=[f"{device}:{device}:rwm"], network_mode="host",
            security_opt=["apparmor=unconfined"], mounts=[
                docker.types.Mount(mount, mount, type="bind", propagation="rshared"),
                docker.types.Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind"),
                docker.types.Mount("/usr/local/bin/docker", shutil.which("docker"), type="bind",
                                   read_only=True),
                docker.types.Mount("/stand-in", str(tmp_path), type="bind")]))["Id"]
    try:
        engine.api.start(stand_in)
        script = (
            "set -e; mkdir -p /dev/disk/by-id;"
            f" ln -s {device} /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
            f"{VOLUME_ID.replace('-', '')};"
            f" DEVBOX_IMDS_ENDPOINT=http://127.0.0.1:{imds_port} bash /stand-in/devbox-box 2>&1;"
            f" umount {mount}")  # the instance stops: its mount goes; the container keeps its own
        exec_id = engine.api.exec_create(stand_in, ["bash", "-c", script])
        out = engine.api.exec_start(exec_id).decode(errors="replace")
        code = engine.api.exec_inspect(exec_id)["ExitCode"]
    finally:
        engine.remove(stand_in)
        subprocess.run(["losetup", "-d", device], check=False)  # detached (autoclear when unused)
    assert code == 0, out
    return out


@pytest.mark.engine
def test_the_boot_script_formats_once_mounts_and_starts_the_image(engine, default_images,
                                                                   tmp_path):
    image = default_images["cpu"].content_tag
    name = f"t{uuid.uuid4().hex[:10]}"
    mount = f"/mnt/devbox-{name}"
    boxes = tmp_path / "boxes.toml"
    boxes.write_text(GOOD.replace('name = "datascience"', f'name = "{name}"').replace(
        "[volume]\n", f'[volume]\nmount_point = "{mount}"\n'))
    from devbox_build.targets.ec2 import user_data

    document = yaml.safe_load(user_data(load_box(boxes), "cpu", image, VOLUME_ID))
    (tmp_path / "devbox-box").write_text(document["write_files"][0]["content"])
    with open(tmp_path / "ebs.img", "wb") as disk:
        disk.truncate(256 << 20)  # sparse: a blank 256 MB volume
    os.chmod(tmp_path, 0o755)
    # The host sees the stand-in's mount (the script starts the image on the host's engine,
    # with the volume as its home): a shared mount point at the same path on both sides.
    os.makedirs(mount)
    subprocess.run(["mount", "--bind", mount, mount], check=True)
    subprocess.run(["mount", "--make-rshared", mount], check=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    container = f"devbox-{name}"
    try:
        first = boot(engine, image, tmp_path, mount, server.server_address[1])
        assert "formatting /dev/loop" in first, first
        assert f"ready: {image} as {container}" in first and "(health: healthy)" in first, first
        assert Imds.seen[0] == "PUT /latest/api/token", Imds.seen
        attrs = engine.api.inspect_container(container)
        assert attrs["HostConfig"]["PortBindings"]["8888/tcp"] == [
            {"HostIp": "127.0.0.1", "HostPort": "8888"}], attrs["HostConfig"]["PortBindings"]
        assert "DEVBOX_IDLE_ACTION=poweroff" in attrs["Config"]["Env"]
        # Home is the volume: a file written there from the container is on the 'EBS volume'.
        exec_id = engine.api.exec_create(container, ["sh", "-c", "echo kept > ~/notes.txt"])
        engine.api.exec_start(exec_id)
        assert engine.api.exec_inspect(exec_id)["ExitCode"] == 0
        engine.api.stop(container, timeout=10)  # the instance stops: the volume is let go

        second = boot(engine, image, tmp_path, mount, server.server_address[1])
        assert "formatting" not in second, second
        assert "(health: healthy)" in second, second
        exec_id = engine.api.exec_create(container, ["cat", "/home/sagemaker-user/notes.txt"])
        assert engine.api.exec_start(exec_id).decode().strip() == "kept"
    finally:
        server.shutdown()
        try:
            engine.remove(engine.api.inspect_container(container)["Id"])
        except Exception:  # never started
            pass
        subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(mount, ignore_errors=True)  # unmounted above: only the empty mount point
        for line in subprocess.run(["losetup", "-j", str(tmp_path / "ebs.img")],
                                   capture_output=True, text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
