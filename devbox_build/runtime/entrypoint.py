"""devbox-entrypoint, the image's ENTRYPOINT: one image for a laptop, EC2 and SageMaker.

    (no arguments)  the IDE server: JupyterLab, in laptop or SageMaker Studio mode; under
                    JupyterHub (JUPYTERHUB_API_TOKEN and JUPYTERHUB_SERVICE_PREFIX set, as
                    DockerSpawner and KubeSpawner set them) jupyterhub-singleuser, which serves
                    the hub's URL and logs in through the hub
    train           a SageMaker-style training job (devbox-train)
    anything else   that command, as `exec "$@"` would run it

Before the IDE or a command (not a training job) it runs the start hooks (devbox-start: every
file in /opt/devbox/start.d, the image's restore hook and idle watcher among them).

As PID 1 it stays as a minimal init: it forwards SIGTERM (and the other stop signals) to the
command and reaps orphaned processes, so `docker stop` ends any command within seconds, even one
that, as PID 1, would ignore SIGTERM. Not tini: SageMaker passes `train` as an argument, and the
dispatch has to happen here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess

from . import contract, hooks
from .hub import in_hub
from .log import Messages

PORT = contract.IDE_PORT
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
TRAIN = os.path.join(contract.BIN, "devbox-train")

say = Messages("devbox")


def unwritable_home(environ=os.environ) -> None:
    """A home the user cannot write (a root-owned volume): JupyterLab's runtime, data and
    settings go under /tmp instead of failing to start; say why, and what fixes it."""
    home = os.path.expanduser("~")
    if os.access(home, os.W_OK):
        return
    environ.setdefault("JUPYTER_RUNTIME_DIR", contract.JUPYTER_RUNTIME_FALLBACK)
    environ.setdefault("JUPYTER_DATA_DIR", "/tmp/devbox-jupyter-data")
    environ.setdefault("JUPYTERLAB_SETTINGS_DIR", "/tmp/devbox-jupyter-settings")
    environ.setdefault("JUPYTERLAB_WORKSPACES_DIR", "/tmp/devbox-jupyter-workspaces")
    environ.setdefault("IPYTHONDIR", "/tmp/devbox-ipython")
    try:
        info = os.stat(home)
        owner = f"uid {info.st_uid}, mode {info.st_mode & 0o7777:o}"
    except OSError:
        owner = "missing"
    say(f"the home {home} is not writable for uid {os.getuid()} ({owner}): JupyterLab keeps "
        "its runtime files and settings under /tmp, and nothing you save in the home will be "
        f"kept. Mount a volume owned by {contract.UID}:{contract.GID} (or with group "
        f"{contract.GID} writable) at {home}.")


def jupyter_command() -> list[str] | None:
    """JupyterLab's command line for where the container runs; None when it is not installed."""
    jupyter = shutil.which("jupyter-lab")
    if jupyter is None:
        return None
    command = [jupyter, "--no-browser", "--ip=0.0.0.0", f"--port={PORT}"]
    app_type = os.environ.get("SAGEMAKER_APP_TYPE")
    if app_type == contract.STUDIO_APP_TYPE:
        # Studio authenticates the user before a request reaches the container, and serves the
        # app under /jupyterlab/default; it requires token auth off and every origin allowed.
        base_url = contract.STUDIO_BASE_URL
        command += [f"--ServerApp.base_url={base_url}", "--IdentityProvider.token=",
                    "--ServerApp.allow_origin=*"]
        say(f"SageMaker Studio mode: serving {base_url} on port {PORT}, no token")
        return _marked(command, base_url)
    if app_type is not None:
        # Only Studio's exact value turns authentication off; anything else (a typo, another
        # app type) keeps the laptop's token.
        say(f"SAGEMAKER_APP_TYPE={app_type!r} is not {contract.STUDIO_APP_TYPE!r} (what Studio sets): "
            "serving in laptop mode, with a token")
    # On a laptop the port is reachable by anything on the host: keep a token. JupyterLab reads
    # JUPYTER_TOKEN itself; otherwise it makes one and prints the URL that carries it.
    token = os.environ.get("JUPYTER_TOKEN")
    if token is None:
        token = os.environ["JUPYTER_TOKEN"] = secrets.token_hex(24)
    if token:
        say(f"serving JupyterLab on port {PORT}; open http://127.0.0.1:{PORT}/lab?token={token}")
    else:
        # Jupyter treats an empty JUPYTER_TOKEN as unset and would make a random one: say what
        # the user asked for explicitly, and print a URL that works.
        command.append("--IdentityProvider.token=")
        say(f"JUPYTER_TOKEN is empty: no token, anyone who reaches port {PORT} can use this "
            f"server; open http://127.0.0.1:{PORT}/lab")
    return _marked(command, "/", token)


def _marked(command: list[str], base_url: str, token: str = "", port: str | int = PORT
            ) -> list[str]:
    """Tell the healthcheck where this container serves the IDE, and `ec2 connect` (over ssh,
    as this user) its token; then return ``command``."""
    try:
        descriptor = os.open(contract.IDE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w") as marker:
            json.dump({"url": f"http://127.0.0.1:{port}{base_url}", "token": token}, marker)
    except OSError:
        pass  # a read-only /tmp only costs the healthcheck its target
    return command


SINGLEUSER = contract.HUB_SERVER


def hub_command(argv: list, environ=os.environ) -> list[str] | None:
    """jupyterhub-singleuser with the spawner's arguments (none from DockerSpawner by default,
    the chart's `cmd` otherwise); None, after saying what fixes it, when the image lacks it:
    serving laptop JupyterLab on / would look up to the hub and 404 for the user."""
    singleuser = shutil.which(SINGLEUSER)
    if singleuser is None:
        say(f"started by JupyterHub (JUPYTERHUB_SERVICE_PREFIX="
            f"{environ.get('JUPYTERHUB_SERVICE_PREFIX')}), but this image has no {SINGLEUSER}: "
            "add jupyterhub (the hub's major version) to the image's pip requirements, lock and "
            "rebuild. Not serving JupyterLab at a URL the hub does not proxy.")
        return None
    arguments = argv[1:] if argv and os.path.basename(argv[0]) == SINGLEUSER else []
    service = environ.get("JUPYTERHUB_SERVICE_URL", "")
    port = service.rsplit(":", 1)[-1].split("/", 1)[0] if service.count(":") >= 2 else str(PORT)
    _marked([], environ["JUPYTERHUB_SERVICE_PREFIX"], port=port)
    say(f"JupyterHub mode: {SINGLEUSER} serving {environ['JUPYTERHUB_SERVICE_PREFIX']} on port "
        f"{port}")
    return [singleuser, *arguments]


def ide_command() -> list[str]:
    command = jupyter_command()
    if command is None:
        say("this image has no IDE server (jupyterlab is not installed); starting a shell")
        return ["/bin/bash"]
    return command


def warn_about_old_driver() -> None:
    """GPU images: say so at start when the host's driver is older than the image's CUDA needs."""
    wanted = os.environ.get("DEVBOX_CUDA_MIN_DRIVER")
    if not wanted or shutil.which("nvidia-smi") is None:
        return
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return
    if found and _version(found[0]) < _version(wanted):
        say(f"the GPU driver is {found[0]}, but CUDA {os.environ.get('DEVBOX_CUDA_VERSION')} "
            f"needs {wanted} or newer: CUDA calls will fail")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def supervise(command: list[str]) -> int:
    """Run ``command`` as PID 1's only child: forward signals, reap orphans, return its status."""
    try:
        child = subprocess.Popen(command)
    except FileNotFoundError:
        say(f"{command[0]}: command not found")
        return 127
    except PermissionError:
        say(f"{command[0]}: permission denied")
        return 126

    def forward(signum, _frame):
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        pid, status = os.wait()  # any child: orphans re-parented to PID 1 are reaped here too
        if pid == child.pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def training_context() -> bool:
    """A SageMaker training job that passed no `train` (the SDK's ModelTrainer without source
    code): its configuration is mounted, or the service named the job."""
    return (os.path.isfile("/opt/ml/input/config/hyperparameters.json")
            or bool(os.environ.get("TRAINING_JOB_NAME")))


def main(argv: list) -> int:
    if not argv and training_context():
        say("a SageMaker training job (/opt/ml/input/config): running it, not the IDE")
        argv = ["train"]
    if in_hub() and (not argv or os.path.basename(argv[0]) == SINGLEUSER):
        hub = hub_command(argv)
        if hub is None:
            return 127
        command = hub
    elif not argv:
        command = ide_command()
    elif argv[0] == "train":
        command = [TRAIN, *argv[1:]]
    else:
        command = argv
    warn_about_old_driver()
    if command[0] != TRAIN:
        unwritable_home()
        hooks.run()  # a training job ends by itself and has no home to restore
    if os.getpid() != 1:
        # Not the container's init (docker run --init, or called from a shell): plain exec.
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            say(f"{command[0]}: {exc.strerror}")
            return 127
    return supervise(command)
