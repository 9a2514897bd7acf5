"""AWS without AWS: moto's server on loopback, and a stand-in EC2 instance for the boot script.

Used by tests/test_ec2.py and benchmarks/ec2.py.
"""

from __future__ import annotations

import http.server
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# The 'EBS volume' the stand-in instance boots with.
VOLUME_ID = "vol-0123456789abcdef0"


class MotoServer:
    """`moto_server` on loopback; ``env`` points boto3 (and the CLI) at it."""

    def __enter__(self) -> MotoServer:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:  # until it answers (a state), bounded
            try:
                opener.open(f"{self.url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        return self

    def client(self, service: str = "ec2"):
        import boto3

        return boto3.client(service, region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def __exit__(self, *_exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


REPOSITORY = "devbox/datascience"
# A manifest for moto's ECR to hold (a tag there is all `ec2 up` checks).
MANIFEST = ('{"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2'
            '+json", "config": {"mediaType": "application/vnd.docker.container.image.v1+json", '
            '"size": 2, "digest": "sha256:' + "0" * 64 + '"}, "layers": []}')


def seed_boxes(server: MotoServer, folder: Path, text: str, push=("cpu", "gpu")) -> Path:
    """``text`` (a boxes.toml) in ``folder``, with the GPU role on an AMI moto knows (moto
    publishes Amazon Linux's SSM parameter, which the CPU role resolves, but not the DLAMI's), its
    images pushed to moto's ECR, and an ssh key pair (``id_ed25519``) of the caller's own."""
    ami = next(i["ImageId"] for i in server.client().describe_images(Owners=["amazon"])["Images"]
               if i.get("Platform") != "windows")
    ecr = server.client("ecr")
    if not ecr.describe_repositories()["repositories"]:
        ecr.create_repository(repositoryName=REPOSITORY)
    for tag in push:
        ecr.put_image(repositoryName=REPOSITORY, imageTag=tag, imageManifest=MANIFEST)
    path = folder / "boxes.toml"
    path.write_text(text.replace('ami_family = "dlami-base-gpu-al2023"',
                                 f'ami_family = "dlami-base-gpu-al2023"\nami = "{ami}"'))
    key = folder / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tester", "-f",
                        str(key)], check=True)
    return path


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


class StandInInstance:
    """An EC2 instance stood in for by a container of ``image`` (it has bash, util-linux,
    e2fsprogs, curl): the 'EBS volume' is a sparse file attached as a loop device on the host
    (as EC2 attaches a volume before the instance sees it) and linked where udev links an EBS
    NVMe device; IMDSv2 answers on loopback; Docker is this host's engine, and the volume's
    mount point is shared with the host at the same path, so the image the script starts gets
    the volume as its home. No --privileged (not every engine can grant every capability):
    SYS_ADMIN to mount, and the one device."""

    def __init__(self, engine, image: str, folder: Path, mount: str, script: str) -> None:
        self.engine, self.image, self.folder, self.mount = engine, image, folder, mount
        (folder / "devbox-box").write_text(script)
        folder.chmod(0o755)
        with open(folder / "ebs.img", "wb") as disk:
            disk.truncate(256 << 20)  # sparse: a blank 256 MB volume

    def __enter__(self) -> StandInInstance:
        Path(self.mount).mkdir(parents=True)
        self.channel = f"{self.mount}-host"  # the host channel, at one path for both sides
        Path(self.channel).mkdir()
        subprocess.run(["mount", "--bind", self.mount, self.mount], check=True)
        subprocess.run(["mount", "--make-rshared", self.mount], check=True)
        self.imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
        threading.Thread(target=self.imds.serve_forever, daemon=True).start()
        return self

    def boot(self, env: dict | None = None, attach: bool = True, args: str = "",
             check: bool = True):
        """One boot: attach, run the boot script (with ``args``: `check`), stop (unmount,
        detach). Its output; with ``check=False``, (exit status, output). The failsafe's
        poweroff writes ``powered-off`` in the folder instead."""
        import docker

        device = subprocess.run(["losetup", "-f", "--show", str(self.folder / "ebs.img")],
                                capture_output=True, text=True, check=True).stdout.strip()
        api = self.engine.api
        stand_in = api.create_container(
            self.image, entrypoint=["sleep", "infinity"], user="root",
            host_config=api.create_host_config(
                cap_add=["SYS_ADMIN"], devices=[f"{device}:{device}:rwm"], network_mode="host",
                security_opt=["apparmor=unconfined"], mounts=[
                    docker.types.Mount(self.mount, self.mount, type="bind",
                                       propagation="rshared"),
                    docker.types.Mount(self.channel, self.channel, type="bind"),
                    docker.types.Mount("/var/run/docker.sock", "/var/run/docker.sock",
                                       type="bind"),
                    docker.types.Mount("/usr/local/bin/docker", shutil.which("docker"),
                                       type="bind", read_only=True),
                    docker.types.Mount("/stand-in", str(self.folder), type="bind")]))["Id"]
        settings = {"DEVBOX_IMDS_ENDPOINT": f"http://127.0.0.1:{self.imds.server_address[1]}",
                    "DEVBOX_HOST_CHANNEL": self.channel,
                    "DEVBOX_POWEROFF": "touch /stand-in/powered-off", **(env or {})}
        link = (f" mkdir -p /dev/disk/by-id; ln -s {device} /dev/disk/by-id/"
                f"nvme-Amazon_Elastic_Block_Store_{VOLUME_ID.replace('-', '')};" if attach else "")
        try:
            api.start(stand_in)
            script = (
                f"{link} " + " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
                + f" bash /stand-in/devbox-box {args} 2>&1; status=$?;"
                f" if mountpoint -q {self.mount}; then umount {self.mount}; fi; exit $status")
            exec_id = api.exec_create(stand_in, ["bash", "-c", script])
            out = api.exec_start(exec_id).decode(errors="replace")
            code = api.exec_inspect(exec_id)["ExitCode"]
        finally:
            self.engine.remove(stand_in)
            subprocess.run(["losetup", "-d", device], check=False)  # autoclear when unused
        if not check:
            return code, out
        if code != 0:
            raise AssertionError(f"the boot script failed ({code}):\n{out}")
        return out

    @property
    def powered_off(self) -> bool:
        return (self.folder / "powered-off").exists()

    def __exit__(self, *_exc) -> None:
        self.imds.shutdown()
        for _ in range(2):  # the bind and the propagated mount
            subprocess.run(["umount", "-l", self.mount], capture_output=True, check=False)
        shutil.rmtree(self.mount, ignore_errors=True)  # only the mount point is left
        shutil.rmtree(self.channel, ignore_errors=True)
        for line in subprocess.run(["losetup", "-j", str(self.folder / "ebs.img")],
                                   capture_output=True, text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


class FaultyAws:
    """A pass-through to moto's server that answers chosen EC2 calls itself: with the error AWS
    gives (an InsufficientInstanceCapacity on RunInstances or StartInstances, a failed
    AttachVolume), so a test sees what our code does when AWS says no mid-way, or with what moto
    cannot know (a serial console). ``rules`` maps an EC2 Action to (a predicate on the
    request's parameters, the HTTP status, the body)."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.rules, self.refused = upstream, {}, []

    def fail(self, action: str, when, code: str = "InsufficientInstanceCapacity",
             status: int = 500) -> None:
        xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
               f"<Code>{code}</Code><Message>We currently do not have sufficient capacity in the "
               "Availability Zone you requested (injected by the test).</Message></Error>"
               "</Errors><RequestID>fault</RequestID></Response>")
        self.rules[action] = (when, status, xml)

    def answer(self, action: str, when, xml: str) -> None:
        """Answer ``action`` with ``xml`` (what moto cannot: a console that shows the boot)."""
        self.rules[action] = (when, 200, xml)

    def clear(self) -> None:
        self.rules.clear()

    def __enter__(self) -> FaultyAws:
        import urllib.parse

        faulty = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                params = dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
                rule = faulty.rules.get(params.get("Action", ""))
                if rule and rule[0](params):
                    faulty.refused.append(params["Action"])
                    return self._send(rule[1], {"Content-Type": "text/xml"}, rule[2].encode())
                self._forward(body)

            def do_GET(self):
                self._forward(None)

            def _forward(self, body):
                request = urllib.request.Request(
                    faulty.upstream + self.path, data=body, method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(request, timeout=60) as answer:
                        self._send(answer.status, dict(answer.headers), answer.read())
                except urllib.error.HTTPError as answer:
                    self._send(answer.code, dict(answer.headers), answer.read())

            def _send(self, status, headers, payload):
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                           "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()
