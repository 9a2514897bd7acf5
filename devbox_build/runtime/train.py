"""SageMaker's training contract, without the sagemaker-training toolkit and its pins.

SageMaker runs `docker run IMAGE train` with the job mounted under /opt/ml:

    /opt/ml/code/$SAGEMAKER_PROGRAM          the user's program (Python, shell or executable)
    /opt/ml/input/config/hyperparameters.json
    /opt/ml/input/data/<channel>/            one folder per input channel
    /opt/ml/model/                           what the program leaves here is the model
    /opt/ml/output/failure                   why the job failed, when it did

The program gets the hyperparameters as `--name value` arguments and the toolkit's SM_* variables
(SM_MODEL_DIR, SM_CHANNEL_<NAME>, SM_HP_<NAME>, ...). Its exit status is the job's. SIGTERM
(StopTrainingJob) is passed on to the program, which has SageMaker's 120 s to save a checkpoint.

Code submitted with the SDK's entry_point/source_dir arrives as the hyperparameter
sagemaker_submit_directory (s3://.../sourcedir.tar.gz, or a file:// path): it is fetched and
unpacked into /opt/ml/code, and its requirements.txt installed (hash-checked when it has hashes).
`devbox-train --prepare` only readies /opt/ml for the image's user (writable outputs, inputs
its own); the image's BASH_ENV runs it when an SDK replaces the entrypoint with bash.
S3 goes through the image's boto3, run by the image's Python.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from . import contract, peers
from .log import Messages

ML = Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml"))
CODE = ML / "code"
CONFIG = ML / "input" / "config"
DATA = ML / "input" / "data"
MODEL = ML / "model"
OUTPUT = ML / "output"
FAILURE = OUTPUT / "failure"
# SageMaker shows this much of the failure file as the job's FailureReason.
FAILURE_LIMIT = 1024
PYTHON = f"{contract.VENV}/bin/python"


class JobError(Exception):
    """The job cannot start; the message goes to the failure file."""


say = Messages("devbox-train")


def read_json(path: Path, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read {path}: {exc}") from None


def hyperparameters() -> dict:
    """SageMaker passes every value as a JSON-encoded string; decode those that are JSON."""
    decoded = {}
    for name, value in read_json(CONFIG / "hyperparameters.json", {}).items():
        try:
            decoded[name] = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            decoded[name] = value
    return decoded


def program(hps: dict) -> Path:
    name = os.environ.get("SAGEMAKER_PROGRAM") or hps.get("sagemaker_program")
    if not name:
        raise JobError("no training program: set SAGEMAKER_PROGRAM to a file under "
                       f"{CODE} (or the sagemaker_program hyperparameter)")
    path = CODE / name  # an absolute SAGEMAKER_PROGRAM stands as it is
    if not path.is_file():
        raise JobError(f"training program {path} not found (SAGEMAKER_PROGRAM={name})")
    return path


def command_for(path: Path, args: list[str]) -> list[str]:
    if path.suffix == ".py":
        return [PYTHON, str(path), *args]
    if path.suffix == ".sh" or not os.access(path, os.X_OK):
        return ["/bin/sh", str(path), *args]
    return [str(path), *args]


def env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def job_environment(hps: dict, user_args: list[str]) -> dict[str, str]:
    channels = sorted(read_json(CONFIG / "inputdataconfig.json", {}))
    if not channels and DATA.is_dir():
        channels = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    resources = read_json(CONFIG / "resourceconfig.json", {})
    host = resources.get("current_host", socket.gethostname())
    env = {
        "SM_MODEL_DIR": str(MODEL),
        "SM_OUTPUT_DIR": str(OUTPUT),
        "SM_OUTPUT_DATA_DIR": str(OUTPUT / "data"),
        "SM_INPUT_DIR": str(ML / "input"),
        "SM_INPUT_CONFIG_DIR": str(CONFIG),
        "SM_INPUT_DATA_DIR": str(DATA),
        "SM_MODULE_DIR": str(CODE),
        "SM_CHANNELS": json.dumps(channels),
        "SM_HPS": json.dumps(hps),
        "SM_USER_ARGS": json.dumps(user_args),
        "SM_CURRENT_HOST": host,
        "SM_HOSTS": json.dumps(resources.get("hosts", [host])),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_NUM_GPUS": str(len([d for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d)])),
    }
    # A training job has no display: matplotlib must not look for one. Only the job gets this;
    # the image's environment leaves the backend to ipykernel (inline figures in notebooks).
    env.setdefault("MPLBACKEND", os.environ.get("MPLBACKEND", "Agg"))
    env.update({f"SM_CHANNEL_{env_name(c)}": str(DATA / c) for c in channels})
    env.update({f"SM_HP_{env_name(k)}": v if isinstance(v, str) else json.dumps(v)
                for k, v in hps.items()})
    return env


def own_inputs() -> None:
    """Channels copied in by another host user (the SDK's local mode as root or a second user
    leaves them 0700, and v3's driver scripts are chmod-ed by the job itself): the job's user
    takes them over. They are the job's own copies."""
    inputs = ML / "input"  # data, config, and what v3's drivers write (sm_training.env)
    if os.geteuid() == 0 or not inputs.is_dir():
        return
    foreign = any(os.lstat(os.path.join(root, name)).st_uid != os.getuid()
                  for root, dirs, files in os.walk(inputs) for name in [".", *dirs, *files])
    if foreign:
        result = subprocess.run(["sudo", "-n", "chown", "-R", f"{os.getuid()}:{os.getgid()}",
                                 str(inputs)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise JobError(f"cannot take over {inputs}: {result.stderr.strip() or 'sudo failed'}")


def writable_outputs(extra: tuple[Path, ...] = ()) -> None:
    """SageMaker creates /opt/ml as root; a job running as the image's user needs its outputs."""
    wanted = [MODEL, OUTPUT, OUTPUT / "data", *extra]
    if os.geteuid() == 0:
        for path in wanted:
            path.mkdir(parents=True, exist_ok=True)
        return
    blocked = [p for p in wanted if not (p.is_dir() and os.access(p, os.W_OK))]
    if not blocked:
        return
    owner = f"{os.getuid()}:{os.getgid()}"
    # The image grants its user passwordless sudo (Studio's convention); use it for these only.
    result = subprocess.run(
        ["sudo", "-n", "install", "-d", "-o", str(os.getuid()), "-g", str(os.getgid()),
         *map(str, blocked)], capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise JobError(f"cannot make {', '.join(map(str, blocked))} writable for {owner}: "
                       f"{result.stderr.strip() or 'sudo failed'}")


def fetch_code(hps: dict) -> None:
    """Unpack the SDK's sagemaker_submit_directory into /opt/ml/code, then install its
    requirements.txt."""
    source = hps.get("sagemaker_submit_directory")
    if isinstance(source, str) and source:
        if source.startswith("s3://"):
            with tempfile.TemporaryDirectory(prefix="devbox-code-") as scratch:
                archive = Path(scratch) / "sourcedir.tar.gz"
                download_from_s3(source, archive)
                unpack(archive, CODE)
        else:
            path = Path(source.removeprefix("file://"))
            if path.is_file():
                unpack(path, CODE)
            elif path.is_dir() and path.resolve() != CODE.resolve():
                shutil.copytree(path, CODE, dirs_exist_ok=True)
            elif not path.exists():
                raise JobError(f"sagemaker_submit_directory {source} does not exist")
    requirements = CODE / "requirements.txt"
    if requirements.is_file():
        hashed = "--hash=" in requirements.read_text(errors="replace")
        say(f"installing {requirements}" + (" (hash-checked)" if hashed else ""))
        result = subprocess.run(
            [PYTHON, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
             *(["--require-hashes"] if hashed else []), "-r", str(requirements)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise JobError(f"pip install -r {requirements} failed:\n"
                           + (result.stderr or result.stdout).strip()[-800:])


def download_from_s3(url: str, target: Path) -> None:
    """s3://bucket/key → target, with the image's boto3 (its usual credential and endpoint
    settings: AWS_* variables, the instance's role)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    script = ("import sys, boto3; boto3.client('s3').download_file(sys.argv[1], sys.argv[2], "
              "sys.argv[3])")
    result = subprocess.run([PYTHON, "-c", script, bucket, key, str(target)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'boto3'" in result.stderr:
            detail = "this image has no boto3: add it to the spec's pip requirements"
        raise JobError(f"cannot fetch {url}: {detail}")


def unpack(archive: Path, target: Path) -> None:
    """A source tarball into ``target``; members that would land outside it are refused."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                destination = (target / member.name).resolve()
                if not str(destination).startswith(str(target.resolve()) + os.sep) and \
                        destination != target.resolve():
                    raise JobError(f"{archive.name}: {member.name} would be written outside {target}")
                if member.issym() or member.islnk() or member.isdev():
                    raise JobError(f"{archive.name}: {member.name} is a link or device")
            tar.extractall(target)
    except (tarfile.TarError, OSError) as exc:
        raise JobError(f"cannot unpack {archive}: {exc}") from None


def prepare() -> None:
    """/opt/ml ready for this user: outputs (and code, for a submit directory) writable, inputs
    its own."""
    submitted = "sagemaker_submit_directory" in read_json(CONFIG / "hyperparameters.json", {})
    writable_outputs((CODE,) if submitted else ())
    own_inputs()


def run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str]]:
    """Run the program; stream its output, keep the tail of stderr for the failure file."""
    child = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env},
                             stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)

    def forward(signum, _frame):
        say(f"got signal {signum}, passing it to the program")
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def copy_stderr():
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=copy_stderr, daemon=True)
    reader.start()
    code = child.wait()
    reader.join(timeout=5)
    return code, list(tail)


def fail(reason: str, code: int) -> int:
    say(reason.splitlines()[0])
    try:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        # Keep the end: the last lines of a traceback say the most.
        FAILURE.write_text(reason if len(reason) <= FAILURE_LIMIT else
                           "..." + reason[-(FAILURE_LIMIT - 3):])
    except OSError as exc:
        say(f"cannot write {FAILURE}: {exc}")
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["--prepare"]:
        try:
            prepare()
        except JobError as exc:
            say(str(exc))
            return 1
        return 0
    try:
        prepare()  # first: even a job that cannot start must leave its failure file
        hps = hyperparameters()
        fetch_code(hps)
        path = program(hps)
    except JobError as exc:
        return fail(str(exc), 2)
    user_hps = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    args = [part for name, value in user_hps.items()
            for part in (f"--{name}", value if isinstance(value, str) else json.dumps(value))]
    args += argv  # `docker run IMAGE train --extra` passes the extras on
    command = command_for(path, args)
    environment = job_environment(user_hps, args)
    barrier = host_barrier(environment)
    say(f"running {' '.join(command)}")
    # In /opt/ml/code as the toolkit does; beside the program when it lives elsewhere.
    code, tail = run(command, environment, CODE if CODE.is_dir() else path.parent)
    where = f" on {barrier.me}" if barrier else ""
    status = 0
    if code != 0:
        reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        status = fail(f"{path.name} {reason}{where}\n" + "\n".join(tail),
                      128 - code if code < 0 else code)
    else:
        say(f"{path.name} finished{where}; model files: {len(list(MODEL.rglob('*')))} in "
            f"{MODEL}")
    if barrier:
        others = barrier.wait(status, say)
        failed = sorted(peer for peer, peer_code in others.items() if peer_code)
        say(f"every host finished{'; failed on ' + ', '.join(failed) if failed else ''}")
    return status


def host_barrier(environment: dict) -> peers.Barrier | None:
    """A multi-instance job: every host waits for the others before it exits (local mode's
    docker-compose stops every container when the first one exits)."""
    hosts = json.loads(environment["SM_HOSTS"])
    me = environment["SM_CURRENT_HOST"]
    if len(hosts) < 2 or me not in hosts:
        return None
    barrier = peers.Barrier(me, [host for host in hosts if host != me])
    try:
        barrier.serve()
    except OSError as exc:
        say(f"cannot wait for the other hosts (port {barrier.port}: {exc.strerror}); this host "
            "exits when its program ends")
        return None
    return barrier

