"""Idle auto-stop on the real engine, with a real Jupyter server in the default image.

The timeout is shortened to seconds. Each busy scenario holds its activity for at least three
timeouts and the container must keep running; when the test ends the activity, the container
must stop by itself within the timeout and one check interval (the watcher's own log gives both
instants). Every wait is for a state (the watcher's state file, the container's state, a
server's answer), never a fixed sleep, so a busy machine makes the test slower, not flaky.

The scenarios run side by side, one container each, so the whole set costs about one scenario.
"""

from __future__ import annotations

import concurrent.futures
import http.cookiejar
import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websocket

from devbox_build.engine import Engine
from devbox_build.runtime import contract

from .support.jupyter import execute_request

pytestmark = pytest.mark.engine

TIMEOUT = 6.0
INTERVAL = 1.0
OBSERVE = 3 * TIMEOUT
STATE = "/tmp/devbox-idle/state.json"
USER = (1000, 100)  # the default image's user: /tmp is sticky, so the files must be theirs
STOP_FILE = "/tmp/stop-the-activity"

# Runs as long as it is told to: the scenarios end activity by a state (a file), not a clock.
UNTIL_STOPPED = f"import os, time\nwhile not os.path.exists({STOP_FILE!r}): time.sleep(0.2)\n"
TRAIN = (f"import os\nx = 0\nwhile not os.path.exists({STOP_FILE!r}):\n"
         "    for i in range(200000): x += i * i\n")
DOWNLOAD = (f"import os, time\nwith open('/tmp/download.bin', 'wb') as out:\n"
            f"    while not os.path.exists({STOP_FILE!r}):\n"
            "        out.write(os.urandom(1 << 20)); out.flush(); os.fsync(out.fileno())\n"
            "        time.sleep(0.3)\n")
# Whole-core jobs of 0.6 s each, one after another: no process lives through two samples.
SHORT_JOBS = (f"while [ ! -e {STOP_FILE} ]; do timeout 0.6 python3 -c 'while 1: pass'; done")
# A notebook whose one cell waits (a remote job, a queue): run by nbconvert, not the server.
WAITING_NOTEBOOK = json.dumps({
    "nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [{"cell_type": "code", "id": "wait", "metadata": {}, "outputs": [],
               "execution_count": None, "source": UNTIL_STOPPED}]})
# Holds a connection to another machine open and waits on it (a script polling a remote job).
REMOTE_WAIT = (f"import os, socket, sys, time\nremote = socket.create_connection((sys.argv[1], 8000))\n"
               f"while not os.path.exists({STOP_FILE!r}): time.sleep(0.2)\n")
REMOTE_SERVER = ("import socket, time\nserver = socket.create_server(('0.0.0.0', 8000))\n"
                 "peer = server.accept()\ntime.sleep(3600)\n")
FAKE_NVIDIA_SMI = ("#!/bin/sh\n# A GPU at 87% while /tmp/gpu-busy exists, idle otherwise.\n"
                   "if [ -e /tmp/gpu-busy ]; then echo '0, 87'; else echo '0, 0'; fi\n")


@dataclass
class Box:
    """One scenario's container, with the activity it holds and how to end it."""

    engine: Engine
    id: str
    token: str  # empty in Studio mode: Studio authenticates; the server checks _xsrf on writes
    closers: list = field(default_factory=list)
    cookies: http.cookiejar.CookieJar = field(default_factory=http.cookiejar.CookieJar)

    @property
    def base(self) -> str:
        prefix = "/" if self.token else "/jupyterlab/default/"
        return f"127.0.0.1:{self.engine.published_port(self.id, 8888)}{prefix}"

    def api(self, method: str, path: str, body: dict | None = None):
        """A REST call as JupyterLab's frontend makes it: the token on a laptop; in Studio
        mode the page's _xsrf cookie, sent back as X-XSRFToken."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPCookieProcessor(self.cookies))
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        elif method != "GET":
            if not any(c.name == "_xsrf" for c in self.cookies):
                opener.open(f"http://{self.base}lab", timeout=60).close()
            headers["X-XSRFToken"] = next(c.value for c in self.cookies if c.name == "_xsrf")
        request = urllib.request.Request(
            f"http://{self.base}{path}", method=method, headers=headers,
            data=None if body is None else json.dumps(body).encode())
        with opener.open(request, timeout=60) as response:
            return json.load(response) if response.status != 204 else None

    def state(self) -> dict:
        text = self.engine.copy_out(self.id, STATE).get("state.json")
        return json.loads(text) if text else {}

    def running(self) -> bool:
        return self.engine.state(self.id)["Running"]

    def exec(self, command: str) -> None:
        exec_id = self.engine.api.exec_create(self.id, ["sh", "-c", command], user="1000")
        self.engine.api.exec_start(exec_id)
        code = self.engine.api.exec_inspect(exec_id)["ExitCode"]
        assert code == 0, f"{command}: exit {code}"

    def wait_for(self, what: str, predicate, timeout: float = 180) -> dict:
        """Poll the watcher's state file until ``predicate(state)``; the container must live."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state and predicate(state):
                return state
            assert self.running(), f"stopped while waiting for {what}:\n{self.logs()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s: {state}"
            time.sleep(0.3)

    def logs(self) -> str:
        return self.engine.logs(self.id)

    # -- the Jupyter server, as JupyterLab's frontend drives it

    def wait_for_server(self) -> None:
        deadline = time.monotonic() + 180
        while True:
            try:
                self.api("GET", "api/status")
                return
            except OSError:
                assert self.running(), self.logs()[-3000:]
                assert time.monotonic() < deadline, "the Jupyter server did not answer"
                time.sleep(0.3)

    def socket(self, path: str) -> websocket.WebSocket:
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.cookies)
        channel = websocket.create_connection(
            f"ws://{self.base}{path}" + (f"?token={self.token}" if self.token else ""),
            timeout=120, http_proxy_host=None, http_no_proxy=["127.0.0.1"],
            **({"cookie": cookie} if cookie else {}))
        self.closers.append(channel.close)
        return channel

    def run_cell(self, kernel: str, code: str) -> websocket.WebSocket:
        """Send ``code`` to the kernel and return once the kernel says it is busy with it."""
        channel = self.socket(f"api/kernels/{kernel}/channels")
        msg_id, frame = execute_request(code)
        channel.send(frame)
        while True:
            message = json.loads(channel.recv())
            if (message.get("parent_header", {}).get("msg_id") == msg_id
                    and message["msg_type"] == "status"
                    and message["content"]["execution_state"] == "busy"):
                return channel

    def terminal(self) -> websocket.WebSocket:
        name = self.api("POST", "api/terminals")["name"]
        return self.socket(f"terminals/websocket/{name}")


def start_box(engine: Engine, ref: str, *, jupyter: bool, studio: bool = False,
              binds: dict[str, str] | None = None, ssh: bool = False) -> Box:
    token = "" if studio else secrets.token_hex(16)
    environment = {"DEVBOX_IDLE_TIMEOUT": f"{TIMEOUT:g}s", "DEVBOX_IDLE_ACTION": "stop",
                   "DEVBOX_IDLE_INTERVAL": f"{INTERVAL:g}s",
                   **({"SAGEMAKER_APP_TYPE": "JupyterLab"} if studio else {"JUPYTER_TOKEN": token})}
    # Kept alive while the scenario sets its activity up; the scenario then removes this.
    keep = (f"{time.time() + 900:.0f}\n".encode(), *USER)
    container = engine.start(
        ref, None if jupyter else ["sleep", "infinity"],
        environment=environment, volumes=binds,
        publish=([8888] if jupyter else []) + ([contract.SSH_PORT] if ssh else []),
        files={"/tmp/devbox-keep-alive": keep, "/tmp/train.py": (TRAIN.encode(), *USER),
               "/tmp/until_stopped.py": (UNTIL_STOPPED.encode(), *USER),
               "/tmp/download.py": (DOWNLOAD.encode(), *USER),
               "/tmp/remote_wait.py": (REMOTE_WAIT.encode(), *USER),
               "/tmp/remote_server.py": (REMOTE_SERVER.encode(), *USER),
               "/tmp/wait.ipynb": (WAITING_NOTEBOOK.encode(), *USER)})
    return Box(engine, container, token)


def active_signals(state: dict) -> set[str]:
    return {s["signal"] for s in state.get("signals", []) if s["active"]}


def hold_then_release(box: Box, signal: str, release: str | None, *,
                      keep_alive_is_the_activity=False, within: float = 180):
    """The scenario's activity is set: it must keep the container up for three timeouts, and
    the container must stop by itself once the activity ends."""
    box.wait_for(f"the {signal} signal", lambda s: signal in active_signals(s), within)
    if not keep_alive_is_the_activity:
        box.exec("rm /tmp/devbox-keep-alive")
        box.wait_for("the keep-alive to end", lambda s: "keep-alive" not in active_signals(s))
    held_from = time.monotonic()
    while time.monotonic() - held_from < OBSERVE:
        assert box.running(), f"stopped while busy ({signal}):\n{box.logs()[-3000:]}"
        time.sleep(0.25)
    state = box.state()
    assert signal in active_signals(state) and state["idle_for_seconds"] == 0, state
    if release:
        box.exec(release)
    for close in box.closers:
        close()
    assert_stops_in_time(box)


def assert_stops_in_time(box: Box) -> str:
    """The container exits by itself, as `docker stop` ends it, within timeout + one interval of
    the last activity the watcher saw (plus the duration of that last check, which it logs)."""
    # JupyterLab exits 0 on SIGTERM; a plain command (sleep) reports it, 128 + 15.
    assert box.engine.wait(box.id, timeout=180) in (0, 143), box.logs()[-3000:]
    logs = box.logs()
    acted = re.search(r"this check took ([\d.]+) s\): stop; last activity epoch ([\d.]+), "
                      r"acting at epoch ([\d.]+)", logs)
    assert acted, logs[-3000:]
    check, last, at = (float(x) for x in acted.groups())
    assert TIMEOUT <= at - last <= TIMEOUT + INTERVAL + check, acted.group(0)
    return logs


# ---- the scenarios: each returns once its container stopped by itself after the activity

@contextmanager
def scenario_box(engine: Engine, ref: str, **options) -> Iterator[Box]:
    box = start_box(engine, ref, **options)
    try:
        yield box
    finally:
        engine.remove(box.id)


def kernel_busy_in_a_silent_cell(engine: Engine, ref: str, studio: bool = False) -> None:
    with scenario_box(engine, ref, jupyter=True, studio=studio) as box:
        box.wait_for_server()
        kernel = box.api("POST", "api/kernels", {})["id"]
        box.run_cell(kernel, UNTIL_STOPPED).close()  # the browser tab is gone; the cell runs on
        box.closers.clear()
        hold_then_release(box, "jupyter", f"touch {STOP_FILE}")


def session_with_an_open_websocket_and_a_running_cell(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=True) as box:
        box.wait_for_server()
        session = box.api("POST", "api/sessions", {
            "path": "work.ipynb", "type": "notebook", "name": "work.ipynb",
            "kernel": {"name": "python3"}})
        box.run_cell(session["kernel"]["id"], UNTIL_STOPPED)  # kept open, as a tab would
        hold_then_release(box, "jupyter", f"touch {STOP_FILE}")


def terminal_running_a_command(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=True) as box:
        box.wait_for_server()
        terminal = box.terminal()
        terminal.send(json.dumps(["stdin", "python3 /tmp/until_stopped.py\r"]))
        hold_then_release(box, "session", f"touch {STOP_FILE}")


def background_program(engine: Engine, ref: str, program: str) -> None:
    """`nohup python PROGRAM &`: no kernel, no terminal, no session; only its work counts."""
    with scenario_box(engine, ref, jupyter=False) as box:
        box.exec(f"nohup python /tmp/{program} >/tmp/{program}.log 2>&1 &")
        hold_then_release(box, "process", f"touch {STOP_FILE}")


def attached_docker_exec_shell(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=False) as box:
        exec_id = engine.api.exec_create(box.id, ["bash"], tty=True, stdin=True, user="1000")
        shell = engine.api.exec_start(exec_id, socket=True, tty=True)
        # Leaving the shell is the release.
        box.closers += [lambda: shell._sock.sendall(b"exit\r"), shell.close]
        hold_then_release(box, "session", None)


def short_jobs_in_a_loop(engine: Engine, ref: str) -> None:
    """`for f in *.csv; do python clean.py $f; done`: each job shorter than one interval."""
    with scenario_box(engine, ref, jupyter=False) as box:
        box.exec(f"nohup sh -c {json.dumps(SHORT_JOBS)} >/dev/null 2>&1 &")
        hold_then_release(box, "process", f"touch {STOP_FILE}")


def attached_exec_without_a_terminal(engine: Engine, ref: str) -> None:
    """How VS Code attaches: an exec with no terminal, active from its first second."""
    with scenario_box(engine, ref, jupyter=False) as box:
        exec_id = engine.api.exec_create(box.id, ["python3", "/tmp/until_stopped.py"],
                                         user="1000")
        engine.api.exec_start(exec_id, detach=True)
        hold_then_release(box, "session", f"touch {STOP_FILE}", within=6 * INTERVAL + 10)


def inhibited_command(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=False) as box:
        box.exec("nohup devbox-idle inhibit -- python3 /tmp/until_stopped.py >/dev/null 2>&1 &")
        hold_then_release(box, "inhibit", f"touch {STOP_FILE}")


def notebook_run_by_nbconvert_waiting(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=False) as box:
        box.exec("cd /tmp && nohup jupyter nbconvert --to notebook --execute wait.ipynb "
                 "--ExecutePreprocessor.timeout=-1 >/tmp/nbconvert.log 2>&1 &")
        hold_then_release(box, "notebook", f"touch {STOP_FILE}")


def waiting_on_a_remote_connection(engine: Engine, ref: str) -> None:
    """A script that holds a connection to another machine (here: another container of the
    test's, on the engine's bridge) and waits: the container is not idle."""
    remote = engine.start(ref, ["python3", "/tmp/remote_server.py"],
                          files={"/tmp/remote_server.py": (REMOTE_SERVER.encode(), *USER)})
    try:
        address = engine.api.inspect_container(remote)["NetworkSettings"]["IPAddress"]
        with scenario_box(engine, ref, jupyter=False) as box:
            box.exec(f"nohup python3 /tmp/remote_wait.py {address} >/tmp/remote.log 2>&1 &")
            hold_then_release(box, "network", f"touch {STOP_FILE}")
    finally:
        engine.remove(remote)


def kernel_created_and_never_connected(engine: Engine, ref: str) -> None:
    """A kernel started through the API that no client ever connects to stays 'starting': it
    is not work, and the container stops."""
    with scenario_box(engine, ref, jupyter=True) as box:
        box.wait_for_server()
        box.api("POST", "api/kernels", {})
        box.exec("rm /tmp/devbox-keep-alive")
        assert_stops_in_time(box)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ssh_tunnel_held_open(engine: Engine, ref: str, key: Path) -> None:
    """VS Code Remote-SSH's way in: an ssh connection that only forwards a port (`ssh -N -L`),
    to sshd in the container (what an EC2 box's host publishes on its loopback)."""
    channel = key.parent / "host-channel"  # as an EC2 box's host shares it, with the key
    channel.mkdir()
    (channel / os.path.basename(contract.SSH_AUTHORIZED_KEYS)).write_text(
        key.with_suffix(".pub").read_text())
    with scenario_box(engine, ref, jupyter=True, ssh=True,
                      binds={str(channel): contract.HOST_CHANNEL}) as box:
        box.wait_for_server()
        port = engine.published_port(box.id, contract.SSH_PORT)
        tunnel = subprocess.Popen(
            ["ssh", "-N", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-L", f"{free_port()}:127.0.0.1:8888", f"{contract.USER}@127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def close() -> None:
            tunnel.terminate()
            tunnel.wait(timeout=30)

        box.closers.append(close)
        hold_then_release(box, "session", None)


def keep_alive_command(engine: Engine, ref: str) -> None:
    with scenario_box(engine, ref, jupyter=False) as box:
        box.exec("rm /tmp/devbox-keep-alive && devbox-idle keep-alive --for 10m")
        hold_then_release(box, "keep-alive", "rm /tmp/devbox-keep-alive",
                          keep_alive_is_the_activity=True)


def gpu_busy(engine: Engine, ref: str, fake_nvidia_smi: str) -> None:
    with scenario_box(engine, ref, jupyter=False,
                      binds={fake_nvidia_smi: "/usr/local/bin/nvidia-smi"}) as box:
        box.exec("touch /tmp/gpu-busy")
        hold_then_release(box, "gpu", "rm /tmp/gpu-busy")


def idle_with_an_open_terminal_is_warned_then_stopped(engine: Engine, ref: str) -> None:
    """An open Jupyter terminal whose shell waits at its prompt is not work: the container
    stops, and the terminal (and the container's log) got the warning first."""
    with scenario_box(engine, ref, jupyter=True) as box:
        box.wait_for_server()
        terminal = box.terminal()
        box.exec("rm /tmp/devbox-keep-alive")
        seen = ""
        while "devbox-idle:" not in seen:
            message = json.loads(terminal.recv())
            if message[0] == "stdout":
                seen += message[1]
        warned_at = time.time()
        assert box.running(), "the warning came after the stop"
        assert re.search(r"will stop in \d+ s", seen), seen
        logs = assert_stops_in_time(box)
        assert logs.index("devbox-idle: warning:") < logs.index(": stop; last activity"), logs
        # The warning itself (written to the terminal) is not the terminal's activity: the
        # idle clock runs from before it, so the stop is not pushed back by a timeout.
        last = float(re.search(r"last activity epoch ([\d.]+)", logs).group(1))
        assert last < warned_at - 1.0, (last, warned_at)


def test_busy_containers_are_never_stopped_and_idle_ones_are(engine, default_images,
                                                             tmp_path):
    ref = default_images["cpu"].content_tag
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    fake.chmod(0o755)
    tmp_path.chmod(0o755)
    scenarios = {
        "a kernel busy in a long cell with no output": kernel_busy_in_a_silent_cell,
        "the same, in SageMaker Studio mode (no token, base URL /jupyterlab/default)":
            lambda e, r: kernel_busy_in_a_silent_cell(e, r, studio=True),
        "a Jupyter session with an open websocket and a running cell":
            session_with_an_open_websocket_and_a_running_cell,
        "an open terminal running a command": terminal_running_a_command,
        "nohup python train.py & (no kernel, no terminal)":
            lambda e, r: background_program(e, r, "train.py"),
        "a download writing a file": lambda e, r: background_program(e, r, "download.py"),
        "an attached docker exec shell session": attached_docker_exec_shell,
        "an ssh connection that only forwards a port (VS Code Remote-SSH's tunnel)":
            lambda e, r: ssh_tunnel_held_open(e, r, key),
        "devbox-idle keep-alive": keep_alive_command,
        "a loop of jobs each shorter than one interval": short_jobs_in_a_loop,
        "an attached exec with no terminal (VS Code), from its first second":
            attached_exec_without_a_terminal,
        "devbox-idle inhibit -- CMD": inhibited_command,
        "a notebook run by nbconvert whose cell waits": notebook_run_by_nbconvert_waiting,
        "a script waiting on a connection to another machine": waiting_on_a_remote_connection,
        "idle, with a kernel created through the API and never connected":
            kernel_created_and_never_connected,
        "GPU busy (nvidia-smi)": lambda e, r: gpu_busy(e, r, str(fake)),
        "idle, with an open terminal: warned, then stopped":
            idle_with_an_open_terminal_is_warned_then_stopped,
    }
    with concurrent.futures.ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(run, engine, ref) for name, run in scenarios.items()}
    failures = {}
    for name, future in futures.items():
        try:
            future.result()
        except Exception as exc:  # collect every scenario's failure, not just the first
            failures[name] = f"{type(exc).__name__}: {exc}"
    assert not failures, json.dumps(failures, indent=2)


def test_status_names_each_signal_and_its_source_as_json(engine, default_images):
    ref = default_images["cpu"].content_tag
    code, out = engine.run(ref, ["sh", "-c", (
        "devbox-idle keep-alive --for 1h >/dev/null;"
        "python3 -c 'x=0\nwhile True: x+=1' & busy=$!; devbox-idle status --json;"
        "kill $busy")],
        environment={"DEVBOX_IDLE_TIMEOUT": "30m", "DEVBOX_IDLE_ACTION": "stop"})
    assert code == 0, out
    status = json.loads(out[out.index("{"):])
    active = {(s["signal"], s["source"]) for s in status["signals"] if s["active"]}
    assert ("keep-alive", "/tmp/devbox-keep-alive") in active, status
    assert any(signal == "process" and source.startswith("/proc/") for signal, source in active)
    assert status["idle"] is False and status["idle_for_seconds"] == 0
    assert status["timeout_seconds"] == 1800 and status["action"] == "stop"


def test_bad_idle_rules_are_one_clear_error(engine, default_images):
    code, out = engine.run(default_images["cpu"].content_tag, ["devbox-idle", "status"],
                           environment={"DEVBOX_IDLE_TIMEOUT": "soon"})
    assert code == 2 and "DEVBOX_IDLE_TIMEOUT: 'soon' is not a duration" in out, out
    assert "Traceback" not in out


def test_studio_and_the_watcher_agree_on_the_last_activity(engine, default_images):
    """Read: Studio's timestamp file counts as activity. Written: while something is active,
    the watcher stamps it in the format jupyter-activity-monitor-extension parses."""
    ref = default_images["cpu"].content_tag
    # Studio's stamp, newer than the container's start (which counts as activity too).
    code, out = engine.run(ref, ["sh", "-c", (
        "sleep 2; date -u -d '-1 seconds' +%Y-%m-%dT%H:%M:%S.000000Z"
        " > /tmp/.sagemaker-last-active-timestamp; devbox-idle status --json")])
    assert code == 0, out
    status = json.loads(out[out.index("{"):])
    read = next(s for s in status["signals"] if s["signal"] == "sagemaker")
    assert status["last_active"] == time.strftime(
        "%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(read["last_activity"])), status
    container = engine.start(ref, ["sleep", "infinity"], environment={
        "SAGEMAKER_APP_TYPE": "JupyterLab", "DEVBOX_IDLE_INTERVAL": "1s"},
        files={"/tmp/devbox-keep-alive": (f"{time.time() + 600:.0f}\n".encode(), *USER)})
    try:
        deadline = time.monotonic() + 120
        stamp = b""
        while not stamp:
            stamp = engine.copy_out(container, "/tmp/.sagemaker-last-active-timestamp").get(
                ".sagemaker-last-active-timestamp", b"")
            assert time.monotonic() < deadline, engine.logs(container)
            time.sleep(0.3)
        parsed = subprocess_parse(engine, ref, stamp)
        assert parsed.startswith("20"), parsed
    finally:
        engine.remove(container)


def subprocess_parse(engine: Engine, ref: str, stamp: bytes) -> str:
    """What Studio's activity extension reads from ``stamp`` (None if it cannot parse it)."""
    code, out = engine.run(ref, ["python", "-c", (
        "from jupyter_activity_monitor_extension.idle_status_detector import "
        "LocalFileActiveTimestampChecker as C; import pathlib, sys;"
        "pathlib.Path('/tmp/t').write_text(sys.argv[1]);"
        "print(C().read_last_active_timestamp('/tmp/t'))"), stamp.decode()])
    assert code == 0, out
    return out.strip().splitlines()[-1]


def test_poweroff_asks_the_host_then_stops_the_container(engine, default_images, tmp_path):
    """On an EC2 box the action is poweroff: the watcher writes the request into the host
    channel (a folder the boot script binds at /run/devbox/host; a systemd path unit powers the
    instance off), and the container stops."""
    channel = tmp_path / "host"
    channel.mkdir()
    os.chown(channel, *USER)
    container = engine.start(default_images["cpu"].content_tag, ["sleep", "infinity"],
                             environment={"DEVBOX_IDLE_TIMEOUT": "3s",
                                          "DEVBOX_IDLE_ACTION": "poweroff",
                                          "DEVBOX_IDLE_INTERVAL": "1s"},
                             volumes={str(channel): "/run/devbox/host"})
    try:
        assert engine.wait(container, timeout=180) in (0, 143), engine.logs(container)
        request = json.loads((channel / "poweroff").read_text())
        assert request["reason"] == "idle" and request["idle_for_seconds"] >= 3, request
        assert "asked the host to power off" in engine.logs(container)
    finally:
        engine.remove(container)
