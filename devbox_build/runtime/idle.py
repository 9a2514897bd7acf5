"""devbox-idle: stop an idle container or box, and never a busy one.

    devbox-idle status [--json]        how long this container has been idle, and every signal
                                       that counts as activity right now, with its source
    devbox-idle keep-alive [--for 2h]  count as active for that long (a job calls this);
                                       `touch /tmp/devbox-keep-alive` is activity at that moment
    devbox-idle inhibit -- CMD ...     count as active while CMD runs (a download, a job that
                                       waits on a remote service), then exit with CMD's status
    devbox-idle watch [--detach]       the watcher the entrypoint starts: a check every interval,
                                       a warning before the timeout, then the action

Activity is real work, not only open connections:
  jupyter    a kernel busy (a long cell, even with no client connected), a kernel starting that
             a client is connecting to, and the last activity of kernels and terminals, through
             the server's REST API with its token
  process    the container's CPU outside the IDE/server baseline (the cgroup's usage, so a loop
             of jobs shorter than one interval counts), and any process that read or wrote the
             disk in the interval
  notebook   a kernel that a tool runs outside the server (nbconvert --execute, papermill), for
             as long as it lives, even while its cell waits
  network    a connection a process in the container opened to another machine (a download, a
             script polling a remote job, `git fetch`), while it is open
  session    a `docker exec` session (how VS Code attaches) or an ssh login, from its first
             second; a command running in any terminal (Jupyter's, tmux's, an exec shell's)
  gpu        GPU utilisation at or above the threshold (nvidia-smi, when present)
  keep-alive `devbox-idle keep-alive --for`, or the keep-alive file's modification time (touch)
  inhibit    `devbox-idle inhibit -- CMD`, while CMD runs
  sagemaker  /tmp/.sagemaker-last-active-timestamp: read, and written while active, so Studio's
             own idle shutdown and this watcher agree
  (a hub)    under JupyterHub the watcher runs whatever the action, and tells the hub's activity
             API while there is activity, so jupyterhub-idle-culler spares busy work

Not activity: the IDE server's own housekeeping, an idle kernel or an open browser tab (its
polling), a shell waiting at its prompt, the healthcheck, this watcher's own warning.

Rules: /etc/devbox/idle.toml (from the image spec's [idle]), then DEVBOX_IDLE_TIMEOUT, _ACTION,
_INTERVAL, _WARN_BEFORE, _CPU_PERCENT, _GPU_PERCENT and _IGNORE (names, comma-separated, added
to the file's). Actions: none, stop (the container's init gets SIGTERM and exits cleanly, as
with `docker stop`; under JupyterHub, the hub's API stops the server), poweroff (asks the host
through /run/devbox/host, which an EC2 box mounts; the instance's shutdown behaviour is stop).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from . import contract
from .hub import Hub, in_hub
from .log import Messages, account_housekeeping, housekeeping_seconds, write_atomic
from .rules import RuleError, Rules, duration, load_rules

STATE_FILE = f"{contract.IDLE_STATE_DIR}/state.json"
LOCK_FILE = f"{contract.IDLE_STATE_DIR}/watch.lock"
LOG_FILE = f"{contract.IDLE_STATE_DIR}/watch.log"
SAGEMAKER_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what jupyter-activity-monitor-extension parses
# The IDE/server baseline: their own CPU and I/O is housekeeping, not the user's work. Kernels
# are not in it (a kernel computing in a thread is work); their busy state is the jupyter signal.
BASELINE = ("devbox-entrypoint", "devbox-idle", "devbox-healthcheck", "devbox-cron",
            "jupyter-lab", "jupyter-server", "jupyter-notebook", "jupyterhub-singleuser",
            "jupyterhub-sing", "sshd", "tini", "docker-init")
# VS Code's server runs in the container while a window is attached and for a while after; it
# counts through its session, not through its own background CPU.
BASELINE_PATHS = ("/.vscode-server/", "/.vscode-remote/", "/.vscode-server-insiders/")
# A kernel's command line: a tool that runs a notebook starts one without the server.
KERNEL_MARKERS = ("ipykernel_launcher", "ipykernel")
# How long after the warning a Jupyter terminal's last activity may be the warning itself.
WARNING_ECHO_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# TCP states in /proc/net/tcp: LISTEN, and the ones a finished connection passes through.
_LISTEN, _CLOSED = "0A", {"06", "07"}  # TIME_WAIT, CLOSE

say = Messages("devbox-idle")


# ---- signals

@dataclass
class Signal:
    """One thing that counts as activity right now, or the time something last did."""

    signal: str
    source: str
    detail: str
    active: bool = True
    last_activity: float | None = None  # epoch seconds


@dataclass
class Process:
    pid: int
    ppid: int
    name: str
    argv: list
    ticks: int
    io: int | None
    tty: int
    session: int
    pgrp: int
    tpgid: int
    started: float  # seconds since boot

    @property
    def label(self) -> str:
        return f"pid {self.pid} ({' '.join(self.argv)[:80] or self.name})"


def parse_stat(pid: int, stat: str, argv: list, io: int | None) -> Process:
    """A process from its /proc/PID/stat line (the name may hold spaces and parentheses)."""
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return Process(pid=pid, ppid=int(fields[1]), name=name, argv=argv,
                   ticks=int(fields[11]) + int(fields[12]), io=io, tty=int(fields[4]),
                   session=int(fields[3]), pgrp=int(fields[2]), tpgid=int(fields[5]),
                   started=int(fields[19]) / CLOCK_TICKS)


def boot_seconds() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0])


def processes(proc: str = "/proc") -> dict:
    found = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"{proc}/{entry}/cmdline", "rb") as handle:
                argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
        except OSError:
            continue  # gone meanwhile
        found[int(entry)] = parse_stat(int(entry), stat, argv, _io_bytes(f"{proc}/{entry}"))
    return found


def _io_bytes(folder: str) -> int | None:
    """Bytes the process read from and wrote to storage (not pipes or sockets)."""
    try:
        with open(f"{folder}/io") as handle:
            counters = dict(line.split(": ") for line in handle.read().splitlines())
        return int(counters["read_bytes"]) + int(counters["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None  # another user's process: its CPU still counts


_BASELINE = frozenset(BASELINE)


def baseline(process: Process, rules: Rules, own: set) -> bool:
    # comm is cut at 15 characters, and a script's argv starts with its interpreter.
    if process.pid in own:
        return True
    names = {process.name, *(os.path.basename(a) for a in process.argv[:3])}
    return (not names.isdisjoint(_BASELINE) or not names.isdisjoint(rules.ignore)
            or any(p in arg for arg in process.argv[:3] for p in BASELINE_PATHS))


def own_lineage(table: dict | None = None) -> set:
    """This process and its ancestors (the entrypoint, a `docker exec` that runs status)."""
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        if table is not None and pid in table:
            pid = table[pid].ppid
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
            pid = int(stat[stat.rindex(")") + 2:].split()[1])
        except OSError:
            break
    return pids


def cgroup_cpu_seconds(root: str = "/sys/fs/cgroup") -> float | None:
    """CPU seconds used by every process of this container so far, those that exited included
    (cgroup v2 cpu.stat, or v1 cpuacct); None when neither can be read."""
    try:
        with open(f"{root}/cpu.stat") as handle:
            for line in handle:
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    except (OSError, ValueError):
        pass
    for path in (f"{root}/cpuacct/cpuacct.usage", f"{root}/cpu,cpuacct/cpuacct.usage"):
        try:
            with open(path) as handle:
                return int(handle.read()) / 1e9
        except (OSError, ValueError):
            continue
    return None


def process_signals(before: dict, after: dict, elapsed: float, rules: Rules,
                    cgroup_used: float | None = None, own: set | None = None) -> list:
    """CPU and disk work outside the baseline. ``cgroup_used``: the container's CPU seconds in
    the interval; what the baseline's processes did not use of it is the user's work, short-lived
    processes included (a loop of 0.5 s jobs never lives through one sample)."""
    signals, baseline_cpu = [], 0.0
    own = own_lineage(after) if own is None else own
    elapsed = max(elapsed, 1e-3)
    for pid, now in sorted(after.items()):
        then = before.get(pid)
        fresh = then is None or then.started != now.started
        used = (now.ticks - (0 if fresh else then.ticks)) / CLOCK_TICKS
        if baseline(now, rules, own):
            baseline_cpu += used  # a healthcheck started in the interval included
            continue
        if fresh:
            continue
        cpu = used / elapsed * 100
        io = (now.io - then.io) if now.io is not None and then.io is not None else 0
        if cpu >= max(rules.cpu_percent, 0.01):
            signals.append(Signal("process", f"/proc/{pid}/stat",
                                  f"{now.label} used {cpu:.0f}% CPU"))
        elif io >= rules.io_bytes:
            signals.append(Signal("process", f"/proc/{pid}/io",
                                  f"{now.label} read or wrote {io} bytes"))
    if cgroup_used is not None and not any(s.source.endswith("/stat") for s in signals):
        work = (cgroup_used - baseline_cpu) / elapsed * 100
        if work >= max(rules.cpu_percent, 0.01):
            signals.append(Signal("process", "cgroup cpu usage",
                                  f"processes outside the server used {work:.0f}% CPU in the "
                                  "interval (short-lived ones included)"))
    return signals


def session_signals(table: dict, rules: Rules, own: set | None = None) -> list:
    signals = []
    own = own_lineage(table) if own is None else own
    for process in table.values():
        if process.pid == 1 or process.pid in own or baseline(process, rules, own):
            continue
        if process.ppid == 0:
            # Its parent is outside the container: `docker exec` (VS Code attaches this way too):
            # activity from its first second. The healthcheck and status calls are baseline.
            kind = "interactive" if process.tty else "attached"
            signals.append(Signal("session", "docker exec",
                                  f"{kind} exec session {process.label}"))
        elif (process.pid == process.session and process.tty and process.tpgid > 0
              and process.tpgid != process.pgrp):
            # A shell whose terminal's foreground job is not the shell: a command is running.
            job = table.get(process.tpgid)
            signals.append(Signal("session", "terminal",
                                  f"a command runs in the terminal of {process.label}: "
                                  f"{job.label if job else process.tpgid}"))
    # ssh logins: sshd names a logged-in connection's process "sshd: user@pts/0" (a terminal),
    # "sshd: user@notty" (commands, VS Code) or "sshd: user" (a tunnel only, `ssh -N -L`); its
    # monitor ends in "[priv]", a connection not yet logged in carries brackets too, and the
    # listener shows its own command line ("sshd: /usr/sbin/sshd -f ... [listener] ...", cut to
    # the length of its first argv). One that asks (`ssh box devbox-idle status`) is this
    # process's lineage.
    for process in table.values():
        title = process.argv[0] if process.argv else ""
        if (title.startswith("sshd: ") and not title.endswith("]")
                and not title[6:].startswith("/") and process.pid not in own):
            signals.append(Signal("session", "sshd", f"ssh login {process.label}"))
    return signals


def notebook_signals(table: dict, rules: Rules, own: set | None = None) -> list:
    """Kernels that no Jupyter server started: a notebook run by nbconvert or papermill. Active
    while they live, whether their cell computes or waits."""
    signals = []
    own = own_lineage(table) if own is None else own
    for process in table.values():
        if not any(marker in arg for arg in process.argv[:4] for marker in KERNEL_MARKERS):
            continue
        parent = table.get(process.ppid)
        if parent is not None and baseline(parent, rules, own):
            continue  # the server's kernel: its state comes from the server's API
        by = parent.label if parent else f"pid {process.ppid}"
        signals.append(Signal("notebook", f"/proc/{process.pid}",
                              f"kernel {process.label} runs a notebook for {by}"))
    return signals


def socket_owners(table: dict, rules: Rules, own: set, proc: str = "/proc") -> dict:
    """socket inode → the non-baseline process holding it."""
    owners: dict = {}
    for process in table.values():
        if baseline(process, rules, own):
            continue
        folder = f"{proc}/{process.pid}/fd"
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{folder}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[8:-1]] = process
    return owners


def _address(text: str) -> tuple:
    """(ip, port) of a /proc/net/tcp address: hex IP (little-endian words), hex port."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in reversed(raw))
    else:
        words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
        ip = b"".join(words).hex()
        if ip.startswith("00000000000000000000ffff"):  # IPv4-mapped
            ip = ".".join(str(b) for b in bytes.fromhex(ip[24:]))
    return ip, int(port, 16)


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "0" * 31 + "1"


# A loopback peer, as /proc/net/tcp{,6} write it (little-endian words): 127.x.x.x, ::1, and
# ::ffff:127.x.x.x. Checked on the text, so the many short local connections (the server's
# own API calls, each left in TIME_WAIT) cost no parsing.
_LOOPBACK_HEX = re.compile(r"^(?:[0-9A-F]{6}7F|0{24}01000000|0{16}FFFF0000[0-9A-F]{6}7F):")


def tcp_table(proc: str = "/proc") -> list:
    """(local ip, local port, remote ip, remote port, state, inode) of every TCP socket that
    listens or may be a connection to another machine (finished and loopback ones left out)."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] in _CLOSED:
                continue
            if parts[3] != _LISTEN and _LOOPBACK_HEX.match(parts[2].upper()):
                continue
            (lip, lport), (rip, rport) = _address(parts[1]), _address(parts[2])
            rows.append((lip, lport, rip, rport, parts[3], parts[9]))
    return rows


def outbound(rows: list) -> list:
    """The rows that are connections to other machines this container opened (not the ones a
    browser opened to the IDE's port: those arrive on a listening port)."""
    listening = {lport for _lip, lport, _rip, _rport, state, _inode in rows if state == _LISTEN}
    return [row for row in rows if row[4] != _LISTEN and row[4] not in _CLOSED
            and not _loopback(row[2]) and row[1] not in listening]


def network_signals(rows: list, owners: dict) -> list:
    """The outbound connections held by a process of the container (``owners``: inode → it)."""
    signals = []
    for _lip, _lport, rip, rport, _state, inode in outbound(rows):
        process = owners.get(inode)
        if process is None:
            continue  # the baseline's, or nobody's any more
        signals.append(Signal("network", "/proc/net/tcp",
                              f"{process.label} has a connection to {rip}:{rport}"))
    return signals


def inhibit_signals(folder: str = contract.INHIBIT_DIR) -> list:
    signals = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            pid = int(name)
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            continue  # its command ended and could not remove the file (killed)
        except PermissionError:
            pass  # another user's, alive
        try:
            with open(os.path.join(folder, name)) as handle:
                what = handle.read().strip()
        except OSError:
            what = "?"
        signals.append(Signal("inhibit", f"devbox-idle inhibit (pid {pid})",
                              f"inhibited while {what[:80]} runs"))
    return signals


# One kept-alive connection per server port: the watcher asks every interval, and a new
# connection each time would leave sockets in TIME_WAIT for the network signal to read past.
# Loopback, never through a proxy (a corporate HTTP_PROXY must not see these requests).
_CONNECTIONS: dict = {}


def _get_json(port: int, path: str, headers: dict):
    for attempt in (1, 2):
        connection = _CONNECTIONS.get(port)
        if connection is None:
            connection = _CONNECTIONS[port] = http.client.HTTPConnection("127.0.0.1", port,
                                                                          timeout=5)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            _CONNECTIONS.pop(port, None)
            if attempt == 2:
                raise OSError(str(exc) or type(exc).__name__) from None
            continue  # the server closed a kept-alive connection: once more, anew
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        return json.loads(body)
    return None


def jupyter_servers() -> list:
    """The running servers' connection files (url, token), as `jupyter server list` reads them."""
    folders = [os.environ.get("JUPYTER_RUNTIME_DIR"),
               os.path.expanduser("~/.local/share/jupyter/runtime"),
               contract.JUPYTER_RUNTIME_FALLBACK]
    servers, seen = [], set()
    for runtime in [f for f in folders if f]:
        try:
            names = sorted(os.listdir(runtime))
        except OSError:
            continue
        for name in names:
            if not (name.startswith("jpserver-") and name.endswith(".json")) or name in seen:
                continue
            try:
                with open(os.path.join(runtime, name)) as handle:
                    info = json.load(handle)
                os.kill(int(info["pid"]), 0)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a stale file from a server that is gone
            seen.add(name)
            servers.append(info)
    return servers


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def kernel_signal(item: dict, url: str) -> Signal:
    """A kernel from the server's API. Busy counts, with or without a client. Starting counts
    only while a client is connected (it is connecting): a kernel created through the API that
    nothing ever connects to stays 'starting' forever."""
    name = item.get("id")
    state = item.get("execution_state")
    last = _epoch(item.get("last_activity"))
    connections = item.get("connections")
    if state == "busy" or (state == "starting" and connections != 0):
        return Signal("jupyter", f"GET {url}", f"kernel {name} ({item.get('name')}) is {state}",
                      last_activity=last)
    return Signal("jupyter", f"GET {url}",
                  f"kernel {name} {state}, last activity {item.get('last_activity')}",
                  active=False, last_activity=last)


def jupyter_signals() -> list:
    signals = []
    for server in jupyter_servers():
        # Loopback, whatever host name the server recorded (it listens on every interface).
        base = f"http://127.0.0.1:{server['port']}{server.get('base_url', '/')}"
        # Under JupyterHub the server's file has no token; the hub's token for this server works.
        token = server.get("token") or os.environ.get("JUPYTERHUB_API_TOKEN")
        headers = {"Authorization": f"token {token}"} if token else {}
        for kind in ("kernels", "terminals"):
            url = f"{base}api/{kind}"
            try:
                items = _get_json(int(server["port"]), f"{server.get('base_url', '/')}api/{kind}",
                                  headers)
            except (OSError, ValueError) as exc:
                # Its process lives but it does not answer (overloaded, or busy in a way we
                # cannot see): counted as active, since busy work must never be stopped.
                signals.append(Signal("jupyter", f"GET {url}",
                                      f"the server (pid {server['pid']}) did not answer: {exc}"))
                continue
            for item in items:
                if kind == "kernels":
                    signals.append(kernel_signal(item, url))
                else:
                    signals.append(Signal(
                        "jupyter", f"GET {url}",
                        f"terminal {item.get('name')}, last activity {item.get('last_activity')}",
                        active=False, last_activity=_epoch(item.get("last_activity"))))
    return signals


def gpu_signals(rules: Rules) -> list:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,utilization.gpu",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [Signal("gpu", "nvidia-smi", f"no answer: {exc}", active=False)]
    signals = []
    for line in out.splitlines():
        index, _, used = (part.strip() for part in line.partition(","))
        try:
            busy = float(used) >= rules.gpu_percent
        except ValueError:
            continue
        signals.append(Signal("gpu", "nvidia-smi", f"GPU {index} at {used}% utilisation",
                              active=busy))
    return signals


def keep_alive_signals(now: float, path: str = contract.KEEP_ALIVE_FILE) -> list:
    try:
        touched = os.stat(path).st_mtime
        with open(path) as handle:
            content = handle.read().strip()
    except OSError:
        return []
    if not re.fullmatch(r"\d+(\.\d+)?", content):
        # Touched (a job's heartbeat): activity at that moment.
        return [Signal("keep-alive", path, f"touched {_iso(touched)}", active=False,
                       last_activity=touched)]
    until = float(content)
    if now < until:
        return [Signal("keep-alive", path, f"kept alive until {_iso(until)}",
                       last_activity=touched)]
    # Expired: it was activity until then.
    return [Signal("keep-alive", path, f"expired {_iso(until)}", active=False,
                   last_activity=until)]


def sagemaker_signals() -> list:
    try:
        with open(contract.SAGEMAKER_ACTIVE_FILE) as handle:
            text = handle.read().strip()
        stamp = datetime.datetime.strptime(text, SAGEMAKER_FORMAT).replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except (OSError, ValueError):
        return []
    return [Signal("sagemaker", contract.SAGEMAKER_ACTIVE_FILE, f"last active {text}",
                   active=False, last_activity=stamp)]


def mark_sagemaker_active(now: float) -> None:
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime(SAGEMAKER_FORMAT)
    try:
        write_atomic(contract.SAGEMAKER_ACTIVE_FILE, stamp)
    except OSError:
        pass  # another user's file: Studio's extension still has its own signals


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(
        timespec="seconds")


class Sampler:
    """Collects every signal; CPU and I/O are deltas since the previous sample."""

    def __init__(self, rules: Rules):
        self.rules = rules
        self.table = processes()
        self.cpu = self._container_cpu()
        self.taken = time.monotonic()

    @staticmethod
    def _container_cpu() -> float | None:
        """The container's CPU seconds less what short-lived housekeeping reported using."""
        used = cgroup_cpu_seconds()
        return None if used is None else used - housekeeping_seconds(contract.HOUSEKEEPING_CPU)

    def sample(self, now: float) -> list:
        table, cpu, taken = processes(), self._container_cpu(), time.monotonic()
        used = cpu - self.cpu if cpu is not None and self.cpu is not None else None
        own = own_lineage(table)
        # The kernel's TCP tables cost a millisecond or more to read whatever they hold: read
        # only when a process outside the baseline holds a socket (an idle box has none).
        owners = socket_owners(table, self.rules, own)
        connections = outbound(tcp_table()) if owners else []
        signals = [*jupyter_signals(),
                   *process_signals(self.table, table, taken - self.taken, self.rules, used,
                                    own),
                   *session_signals(table, self.rules, own),
                   *notebook_signals(table, self.rules, own),
                   *network_signals(connections, owners),
                   *gpu_signals(self.rules),
                   *keep_alive_signals(now),
                   *inhibit_signals(),
                   *sagemaker_signals()]
        self.table, self.cpu, self.taken = table, cpu, taken
        return signals


# ---- status and watcher

@dataclass
class Status:
    rules: Rules
    checked: float
    last_active: float
    signals: list = field(default_factory=list)
    watcher: int | None = None  # its pid, when one runs

    @property
    def active(self) -> bool:
        return any(s.active for s in self.signals)

    @property
    def idle_for(self) -> float:
        return 0.0 if self.active else max(0.0, self.checked - self.last_active)

    def as_json(self) -> dict:
        return {
            "idle": not self.active,
            "idle_for_seconds": round(self.idle_for, 1),
            "last_active": _iso(self.last_active),
            "checked": _iso(self.checked),
            "timeout_seconds": self.rules.timeout,
            "action": self.rules.action,
            "acts_in_seconds": (round(max(0.0, self.rules.timeout - self.idle_for), 1)
                                if self.rules.acting else None),
            "watcher_pid": self.watcher,
            "rules": {**asdict(self.rules), "ignore": list(self.rules.ignore)},
            "signals": [asdict(s) for s in self.signals],
        }


def newest_activity(signals: list, since: float, warned_at: float | None = None) -> float:
    """The latest last-activity time among the signals, never earlier than ``since``. A Jupyter
    terminal whose last activity falls just after the warning was written to it got it from the
    warning itself, which must not restart the idle clock."""
    stamps = []
    for item in signals:
        if item.last_activity is None:
            continue
        if (warned_at is not None and item.detail.startswith("terminal ")
                and warned_at - 1 <= item.last_activity <= warned_at + WARNING_ECHO_SECONDS):
            continue
        stamps.append(item.last_activity)
    return max([since, *stamps])


def read_state() -> dict:
    try:
        with open(STATE_FILE) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def watcher_pid() -> int | None:
    """The running watcher's pid: the holder of the lock."""
    try:
        handle = open(LOCK_FILE, "a+")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def status(rules: Rules) -> Status:
    sampler = Sampler(rules)
    time.sleep(1.0)  # one second of CPU and I/O to compare
    now = time.time()
    signals = sampler.sample(now)
    state = read_state()
    since = state.get("last_active") or state.get("started") or boot_epoch()
    return Status(rules, now, now if any(s.active for s in signals)
                  else newest_activity(signals, since, state.get("warned_at")), signals,
                  watcher_pid())


def boot_epoch() -> float:
    """When this container's init started: the activity a fresh container starts from."""
    try:
        with open("/proc/1/stat") as handle:
            stat = handle.read()
        started = int(stat[stat.rindex(")") + 2:].split()[19]) / CLOCK_TICKS
        return time.time() - (boot_seconds() - started)
    except (OSError, ValueError, IndexError):
        return time.time()


def warning_text(status: Status) -> str:
    remaining = max(0.0, status.rules.timeout - status.idle_for)
    what = "power the machine off" if status.rules.action == "poweroff" else "stop"
    return (f"idle for {status.idle_for:.0f} s: this container will {what} in {remaining:.0f} s "
            "unless something is active (run `devbox-idle keep-alive --for 2h` to keep it up)")


def warn(status: Status) -> None:
    message = warning_text(status)
    say(f"warning: {message}")
    for name in os.listdir("/dev/pts") if os.path.isdir("/dev/pts") else []:
        if not name.isdigit():
            continue
        try:
            descriptor = os.open(f"/dev/pts/{name}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(descriptor, f"\r\n*** devbox-idle: {message} ***\r\n".encode())
        except OSError:
            pass
        finally:
            os.close(descriptor)


def act(status: Status, hub: Hub | None = None) -> None:
    rules = status.rules
    if rules.action == "stop" and hub is not None and hub.stop():
        return  # the hub stops the server: the spawner ends the container
    if rules.action == "poweroff":
        channel = contract.HOST_CHANNEL
        if os.path.isdir(channel) and os.access(channel, os.W_OK):
            write_atomic(f"{channel}/poweroff", json.dumps(
                {"reason": "idle", "idle_for_seconds": round(status.idle_for, 1),
                 "at": _iso(status.checked)}) + "\n")
            say(f"asked the host to power off ({channel}/poweroff)")
        else:
            say(f"no host channel at {channel} (not an EC2 box launched by devbox-build): "
                "stopping the container instead")
    try:
        os.kill(1, signal.SIGTERM)  # the entrypoint forwards it and exits: `docker stop`
    except OSError as exc:
        say(f"could not stop the container: signalling its init failed ({exc.strerror})")


@dataclass
class Clock:
    """The watcher's idle clock, advanced by one sample at a time (no I/O: unit-tested)."""

    last_active: float
    warned_at: float | None = None
    was_active: bool = True

    def advance(self, now: float, signals: list) -> bool:
        """Take one sample's signals; returns whether anything is active."""
        active = any(s.active for s in signals)
        if active:
            self.last_active, self.warned_at = now, None
        elif self.was_active:
            # The activity ended somewhere since the previous check: count idle from now, so
            # the action never comes early (at most one interval late).
            self.last_active = now
        else:
            self.last_active = newest_activity(signals, self.last_active, self.warned_at)
            if self.warned_at is not None and self.last_active > self.warned_at + \
                    WARNING_ECHO_SECONDS:
                self.warned_at = None  # real activity after the warning: warn again next time
        self.was_active = active
        return active


def watch(rules: Rules) -> int:
    os.makedirs(contract.IDLE_STATE_DIR, exist_ok=True)
    lock = open(LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        say("a watcher already runs in this container")
        return 0
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.time()
    say(f"watching: timeout {rules.timeout:g} s, action {rules.action}, every "
        f"{rules.interval:g} s")
    sampler, clock = Sampler(rules), Clock(started)
    hub = Hub.from_environment()
    # Under JupyterHub: the hub hears of activity this often while there is some (the culler
    # reads the hub's last_activity), and stops the server when idle.
    report_every = min(60.0, rules.interval * 10)
    while True:
        now = time.time()
        check_began = time.monotonic()
        signals = sampler.sample(now)
        active = clock.advance(now, signals)
        if active:
            mark_sagemaker_active(now)
            if hub and (hub.reported is None or now - hub.reported >= report_every):
                hub.report(now)
        current = Status(rules, now, clock.last_active, signals, os.getpid())
        check_seconds = time.monotonic() - check_began
        write_atomic(STATE_FILE, json.dumps({
            **current.as_json(), "started": started, "last_active": clock.last_active,
            "warned_at": clock.warned_at, "check_seconds": round(check_seconds, 3)}))
        heartbeat(rules)
        if rules.acting and not active:
            if current.idle_for >= rules.timeout:
                say(f"idle since {_iso(clock.last_active)} ({current.idle_for:.1f} s, timeout "
                    f"{rules.timeout:g} s, this check took {check_seconds:.2f} s): "
                    f"{rules.action}; last activity epoch {clock.last_active:.3f}, acting at "
                    f"epoch {time.time():.3f}")
                act(current, hub)
                return 0
            if current.idle_for >= rules.warn_at and clock.warned_at is None:
                clock.warned_at = time.time()
                warn(current)
        # Wake at the next interval, or exactly when the warning or the action falls due.
        due = [rules.interval]
        if rules.acting and not active:
            for mark in (rules.warn_at if clock.warned_at is None else None, rules.timeout):
                if mark is not None and mark > current.idle_for:
                    due.append(mark - current.idle_for)
        time.sleep(max(0.1, min(due) - (time.time() - now)))


def heartbeat(rules: Rules, folder: str = contract.HOST_CHANNEL) -> None:
    """Tell the host this watcher still runs (an EC2 box powers off when it goes quiet)."""
    if rules.action != "poweroff" or not os.path.isdir(folder):
        return
    try:
        with open(os.path.join(folder, contract.HEARTBEAT), "w") as handle:
            handle.write(f"{time.time():.0f} {rules.interval:g}\n")
    except OSError:
        pass


def detach(rules: Rules) -> int:
    """Start the watcher in the background (once per container) and return at once."""
    if rules.action == "none" and not os.environ.get("SAGEMAKER_APP_TYPE") and not in_hub():
        return 0  # nothing to act on, nothing to tell Studio or a hub
    if watcher_pid() is not None:
        return 0
    os.makedirs(contract.IDLE_STATE_DIR, exist_ok=True)
    if os.fork():
        return 0
    os.setsid()
    if os.fork():
        os._exit(0)
    # The container's log when this user may write it (`docker logs` shows the warning beside
    # the Jupyter server's), else a file.
    descriptor = None
    for target in ("/proc/1/fd/2", LOG_FILE):
        try:
            descriptor = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            break
        except OSError:
            continue
    if descriptor is not None:
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    try:
        code = watch(rules)
    except Exception as exc:  # never a traceback in the user's log; say why the watcher ended
        say(f"the watcher stopped: {exc}")
        code = 1
    os._exit(code)


def keep_alive(seconds: float) -> int:
    now = time.time()
    write_atomic(contract.KEEP_ALIVE_FILE, f"{now + seconds:.0f}\n")
    print(f"devbox-idle: kept alive until {_iso(now + seconds)}")
    return 0


def inhibit(command: list) -> int:
    """Run ``command``; the container counts as active until it ends. Its status is ours."""
    if not command:
        raise RuleError("inhibit: name a command to run, after --")
    os.makedirs(contract.INHIBIT_DIR, mode=0o1777, exist_ok=True)
    marker = os.path.join(contract.INHIBIT_DIR, str(os.getpid()))
    write_atomic(marker, " ".join(command) + "\n")
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        os.unlink(marker)
        say(f"inhibit: {command[0]}: {exc.strerror}")
        return 127
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda number, _frame: child.send_signal(number))
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # the child got the same SIGINT from the terminal
    finally:
        try:
            os.unlink(marker)
        except OSError:
            pass


def print_status(current: Status, as_json: bool) -> None:
    if as_json:
        print(json.dumps(current.as_json(), indent=2))
        return
    rules = current.rules
    print("active" if current.active else f"idle for {current.idle_for:.0f} s "
          f"(since {_iso(current.last_active)})")
    if rules.acting:
        print(f"action: {rules.action} after {rules.timeout:g} s idle")
    else:
        print("action: none (set DEVBOX_IDLE_ACTION and DEVBOX_IDLE_TIMEOUT, or [idle] in "
              "the image spec)")
    print(f"watcher: {'pid ' + str(current.watcher) if current.watcher else 'not running'}")
    for item in current.signals:
        mark = "*" if item.active else "-"
        print(f"  {mark} {item.signal:<10} {item.detail}  [{item.source}]")


def main(argv: list) -> int:
    assert __doc__
    parser = argparse.ArgumentParser(prog="devbox-idle", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("status", help="idle for how long, and what is active")
    show.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    keep = commands.add_parser("keep-alive", help="count as active for a while")
    keep.add_argument("--for", dest="span", default=None, metavar="DURATION",
                      help="how long, like 90m or 2h (default: one idle timeout)")
    hold = commands.add_parser("inhibit", help="count as active while a command runs")
    hold.add_argument("inhibited", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    run = commands.add_parser("watch", help="check every interval and act on the timeout")
    run.add_argument("--detach", action="store_true",
                     help="run in the background, once per container")
    args = parser.parse_args(argv)
    try:
        if args.command == "inhibit":
            return inhibit([a for a in args.inhibited[args.inhibited[:1] == ["--"]:]])
        rules = load_rules()
        if args.command == "keep-alive":
            span = duration(args.span, "--for") if args.span else (rules.timeout or 3600.0)
            return keep_alive(span)
        if args.command == "status":
            try:
                print_status(status(rules), args.json)
            finally:
                account_housekeeping(contract.HOUSEKEEPING_CPU)
            return 0
        return detach(rules) if args.detach else watch(rules)
    except RuleError as exc:
        say(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
