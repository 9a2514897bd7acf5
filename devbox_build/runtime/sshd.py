"""devbox-sshd: ssh into the environment itself, not into the machine that runs it.

    devbox-sshd start     the start hook: when the host put public keys in
                          /run/devbox/host/authorized_keys (an EC2 box's boot script does),
                          start sshd as the image's user on port 2222; otherwise nothing
    devbox-sshd config    print the sshd configuration it would use

A login lands as the image's user with the container's environment (its PATH, so `python` is the
venv's; its CA settings), the home and /data volumes, agent and port forwarding, and sftp (scp,
VS Code Remote-SSH). Keys: the host's file, and ~/.ssh/authorized_keys as anywhere. The host key
lives on the home volume, so a box the volume moves to keeps the identity ssh already trusts.
Each login counts as activity for the idle watcher (its "sshd: user@..." process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from . import contract
from .log import Messages, write_atomic

say = Messages("devbox-sshd")

# Variables a session gets from sshd itself, or that belong to this process alone.
PER_SESSION = {"HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "USER", "LOGNAME",
               "SHELL", "MAIL", "JUPYTER_TOKEN"}


def session_environment(environ: dict) -> dict:
    """The container's environment as sessions should see it: the image's variables and the
    run's, less per-session ones and secrets, and less any value sshd's config cannot quote."""
    return {name: value for name, value in sorted(environ.items())
            if name not in PER_SESSION and name.isidentifier() and not name.startswith("SSH_")
            and '"' not in value and "\\" not in value and "\n" not in value}


def config(home: str, environ: dict, user: str) -> str:
    host_key = contract.home_path(contract.SSH_HOST_KEY, home)
    lines = [
        f"Port {contract.SSH_PORT}",
        f"HostKey {host_key}",
        f"PidFile {contract.SSH_RUN_DIR}/sshd.pid",
        f"AuthorizedKeysFile .ssh/authorized_keys {contract.SSH_AUTHORIZED_KEYS}",
        f"AllowUsers {user}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "PermitRootLogin no", "PermitUserEnvironment no",
        "AllowTcpForwarding yes", "AllowAgentForwarding yes", "X11Forwarding no",
        "PrintMotd no", "ClientAliveInterval 60",
        "Subsystem sftp internal-sftp",
    ]
    variables = session_environment(environ)
    if variables:
        lines.append("SetEnv " + " ".join(f'{name}="{value}"' for name, value in variables.items()))
    return "\n".join(lines) + "\n"


def sshd_binary() -> str | None:
    return shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/usr/bin")


def running() -> int | None:
    try:
        with open(f"{contract.SSH_RUN_DIR}/sshd.pid") as handle:
            pid = int(handle.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(environ: dict) -> int:
    if not os.path.isfile(contract.SSH_AUTHORIZED_KEYS):
        return 0  # no host asked for logins: a laptop, a dev container, SageMaker
    binary = sshd_binary()
    if binary is None:
        say("the host asks for ssh logins, but this image has no sshd: add openssh-server to "
            "its [system] packages")
        return 1
    if running():
        return 0
    home = os.path.expanduser("~")
    host_key = contract.home_path(contract.SSH_HOST_KEY, home)
    if not os.path.isfile(host_key):
        os.makedirs(os.path.dirname(host_key), mode=0o700, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "devbox",
                        "-f", host_key], check=True, stdin=subprocess.DEVNULL)
    os.makedirs(contract.SSH_RUN_DIR, mode=0o700, exist_ok=True)
    path = f"{contract.SSH_RUN_DIR}/sshd_config"
    user = os.environ.get("USER") or contract.USER
    try:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        pass
    write_atomic(path, config(home, environ, user), mode=0o600)
    checked = subprocess.run([binary, "-t", "-f", path], capture_output=True, text=True,
                             check=False)
    if checked.returncode != 0:
        say(f"sshd refused its configuration: {checked.stderr.strip()}")
        return 1
    # Daemonizes itself once listening; its log is the run folder's.
    result = subprocess.run([binary, "-f", path, "-E", f"{contract.SSH_RUN_DIR}/sshd.log"],
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        say(f"sshd did not start (exit {result.returncode}); see {contract.SSH_RUN_DIR}/sshd.log")
        return 1
    say(f"ssh logins on port {contract.SSH_PORT} as {user}")
    return 0


def main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "start":
        return start(dict(os.environ))
    if argv[0] == "config":
        print(config(os.path.expanduser("~"), dict(os.environ), contract.USER), end="")
        return 0
    print(f"devbox-sshd: unknown command {argv[0]!r}; see devbox-sshd --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
