"""The image's runtime as a package (devbox_build/runtime): its rules, unit-tested without an
engine, fed recorded /proc lines and Jupyter answers. What only a container shows is in
test_idle.py and test_restore.py."""

from __future__ import annotations

import ast
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devbox_build import render
from devbox_build.runtime import contract, cron, hooks, idle, log, restore, rules, train

from .conftest import ROOT, cli

RUNTIME = ROOT / "devbox_build" / "runtime"
MODULES = sorted(RUNTIME.glob("*.py"))


# ---- the package's own rules

@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_runtime_modules_use_the_standard_library_and_python_3_9(module):
    tree = ast.parse(module.read_text(), feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: this package, under either name
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", (
                f"{module.name} imports {name}: the image's runtime may use only the standard "
                "library")


# Facts with a shape no other value has: in a string anywhere outside contract.py, a copy.
# Folder prefixes (/opt/devbox, /opt/venv) are copies only when a string is exactly them.
FACTS = {value for name, value in vars(contract).items()
         if name.isupper() and isinstance(value, str) and value.startswith("/")}
PREFIXES = {contract.DEVBOX, contract.VENV, contract.BIN, contract.LIB, contract.DATA,
            contract.CA_BUNDLE}
CONTAINED = (FACTS - PREFIXES - {contract.SHELL}) | {contract.USER}


def _string_constants(path: Path):
    """(line, text) of every string in a module, docstrings left out (they explain)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.lineno, node.value


def _copies(text: str) -> list:
    return [fact for fact in CONTAINED if fact in text] + [p for p in PREFIXES if text == p]


def test_no_fact_of_the_image_is_written_twice():
    """Every path, name and port the image and the host share comes from contract.py."""
    found = []
    sources = [p for p in (ROOT / "devbox_build").rglob("*.py") if p.name != "contract.py"]
    for path in sources:
        for line, text in _string_constants(path):
            found += [f"{path.relative_to(ROOT)}:{line}: {fact}" for fact in _copies(text)]
    templates = [*(ROOT / "devbox_build").rglob("*.j2"), *(ROOT / "devbox_build").rglob("*.sh")]
    for path in templates:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.lstrip().startswith(("#", "{#")):
                continue
            facts = [f for f in CONTAINED | {str(contract.IDE_PORT)} if f in text]
            found += [f"{path.relative_to(ROOT)}:{number}: {fact}" for fact in facts]
    assert not found, "written outside runtime/contract.py:\n" + "\n".join(sorted(found))


def test_the_fact_check_finds_a_copy(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text(f"MANIFEST = {contract.MANIFEST!r}\n")
    assert [_copies(text) for _line, text in _string_constants(copy)] == [[contract.MANIFEST]]


def test_launchers_are_thin_and_each_starts_its_module(tmp_path):
    files = render.runtime_files()
    launchers = {p: f for p, f in files.items() if p.startswith(render.RUNTIME_BIN + "/")}
    assert set(launchers) == {f"{render.RUNTIME_BIN}/{c}" for c in contract.COMMANDS}
    assert sum(text.count(b"\n") for text in launchers.values()) < 100
    # Each launcher, pointed at this checkout's package, starts its program (--help).
    lib = tmp_path / "lib"
    for path, data in files.items():
        if path.startswith(render.RUNTIME_LIB):
            target = lib / contract.PACKAGE / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    for command in ("devbox-idle", "devbox-cron", "devbox-restore", "devbox-start"):
        text = launchers[f"{render.RUNTIME_BIN}/{command}"].decode().replace(
            repr(contract.LIB), repr(str(lib)))
        result = subprocess.run([sys.executable, "-I", "-c", text, "--help"], check=False,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert command.split("-", 1)[1] in result.stdout, result.stdout


def test_start_hooks_folder_holds_the_image_hooks_and_runs_an_added_one(tmp_path, capsys):
    files = render.runtime_files()
    assert {p.rsplit("/", 1)[1] for p in files if p.startswith(render.RUNTIME_HOOKS)} == set(
        contract.BUILT_IN_HOOKS)
    ran = tmp_path / "ran"
    (tmp_path / "20-mine").write_text(f"#!/bin/sh\necho mine >> {ran}\n")
    (tmp_path / "30-broken").write_text("#!/bin/sh\nexit 3\n")
    (tmp_path / "40-after").write_text(f"#!/bin/sh\necho after >> {ran}\n")
    (tmp_path / "50-not-executable").write_text(f"#!/bin/sh\necho no >> {ran}\n")
    for name in ("20-mine", "30-broken", "40-after"):
        (tmp_path / name).chmod(0o755)
    assert hooks.run(str(tmp_path)) == 0
    assert ran.read_text().split() == ["mine", "after"]
    assert "start hook 30-broken: exited 3" in capsys.readouterr().err


# ---- idle rules (one validation for the spec and the image)

def test_an_interval_of_zero_is_refused_by_the_spec_and_by_the_watcher(tmp_path, stack):
    with open(stack / "image.toml", "a") as spec:
        spec.write('\n[idle]\naction = "stop"\ninterval = "0"\n')
    result = cli("render", str(stack))
    assert result.returncode == 2 and "key 'idle.interval'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    file = tmp_path / "idle.toml"
    file.write_text('[idle]\ninterval = "0"\n')
    with pytest.raises(rules.RuleError, match="interval must be more than 0"):
        rules.load_rules({}, str(file))
    with pytest.raises(rules.RuleError, match="DEVBOX_IDLE_INTERVAL"):
        rules.load_rules({"DEVBOX_IDLE_INTERVAL": "off"}, str(tmp_path / "none.toml"))


def test_rules_read_the_file_then_the_environment(tmp_path):
    file = tmp_path / "idle.toml"
    file.write_text('[idle]\ntimeout = "30m"\naction = "stop"\nignore = ["agent"]\n')
    read = rules.load_rules({"DEVBOX_IDLE_TIMEOUT": "1h30m", "DEVBOX_IDLE_IGNORE": "sync, x"},
                            str(file))
    assert (read.timeout, read.action, read.ignore) == (5400, "stop", ("agent", "sync", "x"))
    assert read.warn_at == 5400 - 300
    file.write_text('[idle]\ntimout = "30m"\n')
    with pytest.raises(rules.RuleError, match="unknown key.*timout"):
        rules.load_rules({}, str(file))
    assert rules.Rules().timeout == rules.duration(contract.IDLE_DEFAULTS["timeout"], "t")


# ---- crontab

def test_a_five_field_line_whose_command_has_a_digit_or_a_path_stays_five_fields():
    tab = cron.parse("*/15 * * * * python3 ~/jobs/sync.py\n"
                     "0 2 * * * /usr/bin/env python3 job.py\n"
                     "30 * * * * * date\n")
    assert [job.command for job in tab.jobs] == ["python3 ~/jobs/sync.py",
                                                 "/usr/bin/env python3 job.py", "date"]
    five, _path, six = tab.jobs
    assert five.times[0] == frozenset({0}) and 15 in five.times[1]
    assert six.times[0] == frozenset({30}) and len(six.times[1]) == 60
    assert not tab.problems


def test_a_bad_crontab_line_is_named_and_skipped_and_the_others_run():
    tab = cron.parse("61 * * * * true\n@sometimes x\n* * * * *\n0 * * * * echo ok\n",
                     "/home/u/crontab")
    assert [job.command for job in tab.jobs] == ["echo ok"]
    assert [p.split(":")[0] for p in tab.problems] == [
        "/home/u/crontab, line 1", "/home/u/crontab, line 2", "/home/u/crontab, line 3"]
    assert "cannot read 61" in tab.problems[0]


@pytest.mark.parametrize("content, message", [
    ("0 * * * * true\n".encode("utf-16"), "NUL bytes (UTF-16? save it as UTF-8)"),
    (b"0 * * * * echo \0\n", "not a text file"),
    (b"0 * * * * echo \xff\xfe\xfa\n", "not UTF-8 text"),
    (None, "is a folder"),
])
def test_a_crontab_that_is_not_text_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "crontab"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(cron.CrontabError, match=message.replace("?", r"\?")
                       .replace("(", r"\(").replace(")", r"\)")):
        cron.read(str(path))


def test_cron_times_follow_crons_day_rule():
    (job,) = cron.parse("0 12 1 * mon true\n").jobs
    monday = datetime.datetime(2026, 12, 7, 12, 0, 0)
    first = datetime.datetime(2026, 12, 1, 12, 0, 0)  # a Tuesday
    assert job.due(monday) and job.due(first)
    assert not job.due(datetime.datetime(2026, 12, 8, 12, 0, 0))
    assert not job.every_second


# ---- activity sampling (recorded /proc lines)

def stat_line(pid, name, ppid, ticks=0, tty=0, session=None, pgrp=None, tpgid=-1, start=100):
    fields = ["S", ppid, pgrp or pid, session or pid, tty, tpgid, 0, 0, 0, 0, 0, ticks, 0,
              0, 0, 20, 0, 1, 0, start]
    return f"{pid} ({name}) " + " ".join(str(f) for f in fields)


def proc(pid, name, ppid, argv=None, **kw):
    return idle.parse_stat(pid, stat_line(pid, name, ppid, **kw), argv or [name], 0)


def test_a_stat_line_with_spaces_and_parentheses_in_the_name():
    p = idle.parse_stat(7, stat_line(7, "my (odd) job", 1, ticks=42, tty=34816), ["x"], None)
    assert (p.name, p.ppid, p.ticks, p.tty) == ("my (odd) job", 1, 42, 34816)


def test_short_jobs_count_through_the_containers_cpu():
    """A loop of jobs shorter than one interval: no process lives through two samples, but the
    cgroup's usage (minus the server's own) shows the work."""
    rules_ = rules.Rules(cpu_percent=5)
    server_then = proc(10, "jupyter-lab", 1, ticks=100)
    server_now = proc(10, "jupyter-lab", 1, ticks=100 + idle.CLOCK_TICKS // 10)
    shell = proc(20, "bash", 1)
    before, after = {10: server_then, 20: shell}, {10: server_now, 20: shell}
    busy = idle.process_signals(before, after, 2.0, rules_, cgroup_used=1.6)
    assert [s.source for s in busy] == ["cgroup cpu usage"], busy
    # The server's own 0.1 s is housekeeping: a container that only ran it is idle.
    assert idle.process_signals(before, after, 2.0, rules_, cgroup_used=0.1) == []


def test_an_attached_exec_session_counts_from_its_first_second_and_the_healthcheck_never():
    rules_ = rules.Rules()
    table = {1: proc(1, "devbox-entrypoi", 0),
             30: proc(30, "node", 0, argv=["/home/u/.vscode-server/bin/x/node", "server"]),
             31: proc(31, "sh", 0, argv=["sh", "-c", "echo"], start=999),
             32: proc(32, "python3", 0, argv=["/usr/bin/python3", "-I",
                                              "/opt/devbox/bin/devbox-healthcheck"])}
    signals = idle.session_signals(table, rules_, own=set())
    assert [s.detail.split(" exec")[0] for s in signals] == ["attached"]
    assert "pid 31" in signals[0].detail


def test_ssh_logins_count_tunnels_included_but_not_the_one_asking():
    """sshd's titles: the listener and a not-yet-logged-in connection carry brackets, a login's
    monitor ends in [priv]; a terminal, a command session (VS Code) and a bare tunnel
    (`ssh -N -L`) each count; a `devbox-idle status` asked over ssh does not count its own."""
    table = {1: proc(1, "devbox-entrypoi", 0),
             15: proc(15, "sshd", 1, argv=["sshd: /usr/sbin/sshd -f c [listener] 0 of 10-100"]),
             16: proc(16, "sshd", 1, argv=["sshd: /usr/sbin/sshd -f /tmp/devbox-sshd/sshd_con"]),
             20: proc(20, "sshd", 15, argv=["sshd: sagemaker-user [priv]"]),
             21: proc(21, "sshd", 20, argv=["sshd: sagemaker-user"]),
             30: proc(30, "sshd", 15, argv=["sshd: sagemaker-user [priv]"]),
             31: proc(31, "sshd", 30, argv=["sshd: sagemaker-user@notty"]),
             40: proc(40, "sshd", 15, argv=["sshd: unknown [net]"]),
             50: proc(50, "sshd", 15, argv=["sshd: sagemaker-user [priv]"]),
             51: proc(51, "sshd", 50, argv=["sshd: sagemaker-user@notty"]),
             52: proc(52, "python3", 51, argv=["/usr/bin/python3", "-I",
                                               "/opt/devbox/bin/devbox-idle", "status"])}
    signals = idle.session_signals(table, rules.Rules(), own={52, 51, 50, 15, 1})
    assert sorted(s.detail for s in signals if s.source == "sshd") == [
        "ssh login pid 21 (sshd: sagemaker-user)", "ssh login pid 31 (sshd: sagemaker-user@notty)"]


def test_a_kernel_run_by_nbconvert_counts_while_it_lives():
    rules_ = rules.Rules()
    table = {5: proc(5, "jupyter-lab", 1),
             6: proc(6, "python", 5, argv=["python", "-m", "ipykernel_launcher", "-f", "k.json"]),
             7: proc(7, "jupyter-nbconve", 1, argv=["python", "/opt/venv/bin/jupyter-nbconvert",
                                                   "--execute", "x.ipynb"]),
             8: proc(8, "python", 7, argv=["python", "-m", "ipykernel_launcher", "-f", "j.json"])}
    signals = idle.notebook_signals(table, rules_)
    assert [s.source for s in signals] == ["/proc/8"], signals


TCP = {
    # a download from a remote host by pid 40, and a browser's connection to the IDE port
    "listen": ("0100007F:22B8", "00000000:0000", "0A", "100"),
    "browser": ("0200110A:22B8", "0100110A:D431", "01", "101"),
    "download": ("0200110A:A3F2", "22D8B85D:01BB", "01", "102"),
    "loopback": ("0100007F:A3F3", "0100007F:22B8", "01", "103"),
    "closed": ("0200110A:A3F4", "22D8B85D:01BB", "06", "0"),
}


def test_a_connection_the_container_opened_counts_and_a_browser_tab_does_not():
    rows = [(*idle._address(local), *idle._address(remote), state, inode)
            for local, remote, state, inode in TCP.values()]
    assert rows[2][2:4] == ("93.184.216.34", 443)
    owners = {"102": proc(40, "python", 1), "101": proc(41, "x", 1), "103": proc(42, "y", 1)}
    signals = idle.network_signals(rows, owners)
    assert [s.detail for s in signals] == [
        "pid 40 (python) has a connection to 93.184.216.34:443"]
    # Nothing of the container's own holds it: the baseline's sockets are not in owners.
    assert idle.network_signals(rows, {}) == []


def test_a_kernel_created_through_the_api_and_never_connected_is_not_busy():
    url = "http://127.0.0.1:8888/api/kernels"
    never = {"id": "k1", "name": "python3", "execution_state": "starting", "connections": 0,
             "last_activity": "2026-12-06T10:00:00.000000Z"}
    connecting = {**never, "connections": 1}
    busy_alone = {**never, "execution_state": "busy"}
    assert not idle.kernel_signal(never, url).active
    assert idle.kernel_signal(never, url).last_activity == datetime.datetime(
        2026, 12, 6, 10, tzinfo=datetime.timezone.utc).timestamp()
    assert idle.kernel_signal(connecting, url).active
    assert idle.kernel_signal(busy_alone, url).active


def test_the_warning_written_to_a_jupyter_terminal_does_not_restart_the_idle_clock():
    clock = idle.Clock(last_active=1000.0, was_active=False)
    clock.warned_at = 1500.0
    echo = idle.Signal("jupyter", "GET", "terminal 1, last activity ...", active=False,
                       last_activity=1500.4)
    clock.advance(1502.0, [echo])
    assert clock.last_active == 1000.0 and clock.warned_at == 1500.0
    typed = idle.Signal("jupyter", "GET", "terminal 1, last activity ...", active=False,
                        last_activity=1520.0)
    clock.advance(1530.0, [typed])
    assert clock.last_active == 1520.0 and clock.warned_at is None


def test_inhibit_counts_while_its_command_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "INHIBIT_DIR", str(tmp_path / "inhibit"))
    probe = tmp_path / "seen"
    code = idle.inhibit([sys.executable, "-c", (
        "import json, sys; sys.path[:0] = [{!r}]\n"
        "from devbox_build.runtime import idle\n"
        "print(len(idle.inhibit_signals({!r})), file=open({!r}, 'w'))\n"
        "sys.exit(7)").format(str(ROOT), str(tmp_path / "inhibit"), str(probe))])
    assert code == 7 and probe.read_text().strip() == "1"
    assert idle.inhibit_signals(str(tmp_path / "inhibit")) == []


def test_keep_alive_file_states(tmp_path):
    path = tmp_path / "keep"
    path.write_text("2000000000\n")
    assert idle.keep_alive_signals(1_900_000_000, str(path))[0].active
    assert not idle.keep_alive_signals(2_100_000_000, str(path))[0].active
    path.write_text("")
    assert idle.keep_alive_signals(1, str(path))[0].detail.startswith("touched")


def test_cgroup_usage_is_read_from_v2_or_v1(tmp_path):
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    assert idle.cgroup_cpu_seconds(str(tmp_path)) == 2.5
    (tmp_path / "cpu.stat").unlink()
    (tmp_path / "cpuacct").mkdir()
    (tmp_path / "cpuacct" / "cpuacct.usage").write_text("1500000000\n")
    assert idle.cgroup_cpu_seconds(str(tmp_path)) == 1.5
    assert idle.cgroup_cpu_seconds(str(tmp_path / "none")) is None


# ---- restore

def test_a_token_in_the_dotfiles_url_is_never_printed():
    assert log.mask("could not clone https://ghp_secret@github.example/me/dots.git: 403") == (
        "could not clone https://***@github.example/me/dots.git: 403")
    assert log.mask("git clone ssh://git@host/x") == "git clone ssh://***@host/x"


def test_dotfiles_clone_is_masked_and_refuses_an_option_as_url(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DEVBOX_DOTFILES", "https://user:tok3n@127.0.0.1:9/dots.git")
    result = restore.restore_dotfiles(str(tmp_path / "marker"))
    assert "tok3n" not in result and "https://***@127.0.0.1:9/dots.git" in result
    monkeypatch.setenv("DEVBOX_DOTFILES", "--upload-pack=touch /tmp/pwned")
    result = restore.restore_dotfiles(str(tmp_path / "marker"))
    assert result.startswith("dotfiles: could not clone") and not Path("/tmp/pwned").exists()


def test_the_dotfiles_installer_runs_once_per_container(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "install.sh").write_text(f"#!/bin/sh\necho ran >> {tmp_path}/installs\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.email=t@t", "-c", "user.name=t",
                                                 "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=source, check=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DEVBOX_DOTFILES", str(source))
    first, second = tmp_path / "container-1", tmp_path / "container-2"
    restore.restore_dotfiles(str(first))
    restore.restore_dotfiles(str(first))  # the same container: installed already
    restore.restore_dotfiles(str(second))  # a new container, the same home volume
    assert (tmp_path / "installs").read_text().split() == ["ran", "ran"]


def test_an_empty_home_gets_skel_without_overwriting(tmp_path, monkeypatch):
    skel, home = tmp_path / "skel", tmp_path / "home"
    skel.mkdir()
    home.mkdir()
    (skel / ".bashrc").write_text("skel\n")
    (skel / ".profile").write_text("skel\n")
    monkeypatch.setenv("HOME", str(home))
    assert "got .bashrc, .profile" in restore.restore_home(str(skel))
    (home / ".bashrc").write_text("mine\n")
    (home / ".profile").unlink()
    assert restore.restore_home(str(skel)) is None  # not empty: nothing is touched
    assert (home / ".bashrc").read_text() == "mine\n" and not (home / ".profile").exists()


def test_check_counts_files_put_in_place_with_old_dates(tmp_path):
    created = 1_800_000_000.0
    old = os.stat_result((0o644, 0, 0, 1, 0, 0, 1, 0, 1_500_000_000, 1_800_000_500))  # tar -x
    written = os.stat_result((0o644, 0, 0, 1, 0, 0, 1, 0, 1_800_000_100, 1_800_000_100))
    image = os.stat_result((0o644, 0, 0, 1, 0, 0, 1, 0, 946_684_800, 1_790_000_000))  # layers
    assert restore.changed(old, created) and restore.changed(written, created)
    assert not restore.changed(image, created)


def test_git_work_deep_in_a_tree_is_found_and_a_volume_repository_is_not_lost(tmp_path):
    deep = tmp_path / "a" / "b" / "c" / "d" / "repo"
    (deep / ".git").mkdir(parents=True)
    assert restore.git_repositories([str(tmp_path)]) == [str(deep)]
    assert restore.on_volume(str(deep), [str(tmp_path / "a")])
    assert not restore.on_volume(str(deep), [str(tmp_path / "ab")])


# ---- training

@pytest.fixture
def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_training_jobs_environment(monkeypatch):
    monkeypatch.setenv("SM_HOSTS", '["algo-1"]')
    environment = train.job_environment({"epochs": 3, "lr": "0.1"}, ["--epochs", "3"])
    assert environment["SM_HP_EPOCHS"] == "3" and environment["SM_HP_LR"] == "0.1"
    assert environment["SM_MODEL_DIR"] == "/opt/ml/model"


def test_the_hosts_of_a_training_job_wait_for_each_other(unused_port):
    """Two hosts on loopback: the one whose program ends first waits for the other, and each
    ends with its own status."""
    import threading

    first = train.peers.Barrier("algo-1", ["127.0.0.1"], port=unused_port)
    second = train.peers.Barrier("127.0.0.1", ["algo-1"], port=unused_port)
    # Both sides share one port on loopback: the second is reached as 127.0.0.1, and asks the
    # first by the name the first's server does not need (it only reads the line).
    server = second.serve()
    said: list = []
    finished: dict = {}

    def host_one():
        finished["algo-1"] = (first.wait(0, said.append), time.monotonic())

    thread = threading.Thread(target=host_one)
    thread.start()
    deadline = time.monotonic() + 30
    while "algo-1" not in second.done:  # the first host told the second it is done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert thread.is_alive(), "the first host left while the second still ran"
    with second.lock:
        second.code = 3
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert finished["algo-1"][0] == {"127.0.0.1": 3}
    assert "algo-1" in second.told and second.done == {"algo-1": 0}
    server.close()
    assert any("waiting for 127.0.0.1" in line for line in said), said


def test_a_peer_that_never_answers_is_left_behind(unused_port):
    barrier = train.peers.Barrier("algo-1", ["127.0.0.1"], port=unused_port)
    now = [0.0]
    said: list = []
    result = barrier.wait(0, said.append, clock=lambda: now[0],
                          sleep=lambda s: now.__setitem__(0, now[0] + 100))
    assert result == {"127.0.0.1": -1} and "not waiting for it" in said[-1]


def test_housekeeping_cpu_is_accounted_and_not_counted_as_work(tmp_path):
    ledger = str(tmp_path / "idle" / "housekeeping-cpu")
    log.account_housekeeping(ledger)
    log.account_housekeeping(ledger)
    first = log.housekeeping_seconds(ledger)
    assert first > 0
    script = ("import sys; sys.path.insert(0, {!r}); from devbox_build.runtime import log; "
              "sum(range(3_000_000)); log.account_housekeeping({!r})").format(str(ROOT), ledger)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert log.housekeeping_seconds(ledger) > first


def test_a_hub_single_user_server_is_baseline_like_jupyterlab():
    rules_ = rules.Rules()
    for argv in (["/opt/venv/bin/python", "/opt/venv/bin/jupyterhub-singleuser"],
                 ["/opt/venv/bin/python", "/opt/venv/bin/jupyter-lab"]):
        assert idle.baseline(proc(9, "python", 1, argv=argv), rules_, own=set())
    assert not idle.baseline(proc(9, "python", 1, argv=["python", "train.py"]), rules_, set())


def test_a_submitted_source_tarball_is_unpacked_and_one_escaping_it_refused(tmp_path):
    import io
    import tarfile

    def tarball(name: str, members: dict) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    good = tarball("good.tar.gz", {"train.py": b"print(1)\n", "pkg/util.py": b"x = 1\n"})
    train.unpack(good, tmp_path / "code")
    assert (tmp_path / "code" / "pkg" / "util.py").read_text() == "x = 1\n"
    bad = tarball("bad.tar.gz", {"../escape.py": b"boom\n"})
    with pytest.raises(train.JobError, match="would be written outside"):
        train.unpack(bad, tmp_path / "code2")
    assert not (tmp_path / "escape.py").exists()


# ---- devbox-sshd

def test_ssh_sessions_get_the_containers_environment_less_secrets_and_per_session_names():
    from devbox_build.runtime import sshd

    environ = {"PATH": "/opt/venv/bin:/usr/bin", "SSL_CERT_FILE": "/etc/ssl/certs/x.crt",
               "JUPYTER_TOKEN": "secret", "HOME": "/root", "HOSTNAME": "abc", "SSH_AUTH_SOCK": "/x",
               "ODD": 'say "hi"', "LANG": "C.UTF-8", "DEVBOX_BOX": "datascience"}
    assert sshd.session_environment(environ) == {
        "DEVBOX_BOX": "datascience", "LANG": "C.UTF-8", "PATH": "/opt/venv/bin:/usr/bin",
        "SSL_CERT_FILE": "/etc/ssl/certs/x.crt"}
    text = sshd.config("/home/u", environ, contract.USER)
    for line in (f"Port {contract.SSH_PORT}",
                 f"HostKey /home/u/{contract.SSH_HOST_KEY}",
                 f"AuthorizedKeysFile .ssh/authorized_keys {contract.SSH_AUTHORIZED_KEYS}",
                 f"AllowUsers {contract.USER}", "PasswordAuthentication no",
                 "AllowAgentForwarding yes", "Subsystem sftp internal-sftp"):
        assert line + "\n" in text, text
    assert 'SetEnv DEVBOX_BOX="datascience" LANG="C.UTF-8" PATH="/opt/venv/bin:/usr/bin"' in text
    assert "secret" not in text


def test_sshd_starts_only_when_the_host_gave_keys(monkeypatch, tmp_path):
    from devbox_build.runtime import sshd

    monkeypatch.setattr(contract, "SSH_AUTHORIZED_KEYS", str(tmp_path / "authorized_keys"))
    monkeypatch.setattr(sshd, "sshd_binary", lambda: pytest.fail("looked for sshd"))
    assert sshd.start({}) == 0  # no keys: a laptop, a dev container, Studio
    (tmp_path / "authorized_keys").write_text("ssh-ed25519 AAAA laptop\n")
    monkeypatch.setattr(sshd, "sshd_binary", lambda: None)
    assert sshd.start({}) == 1  # keys, but an image without openssh-server: said, not hidden


# ---- the entrypoint under JupyterHub

HUB = {"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
       "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:8890/user/alice/"}


def test_under_a_hub_the_entrypoint_serves_the_hubs_url_or_refuses(monkeypatch, tmp_path, capsys):
    from devbox_build.runtime import entrypoint

    monkeypatch.setattr(contract, "IDE_MARKER", str(tmp_path / "ide.json"))
    assert entrypoint.in_hub(HUB) and not entrypoint.in_hub({"JUPYTER_TOKEN": "x"})
    monkeypatch.setenv("PATH", str(tmp_path))
    assert entrypoint.hub_command([], HUB) is None  # no jupyterhub in the image
    said = capsys.readouterr().err
    assert "no jupyterhub-singleuser" in said and "add jupyterhub" in said, said
    assert not (tmp_path / "ide.json").exists()  # nothing serves, nothing is marked

    singleuser = tmp_path / "jupyterhub-singleuser"
    singleuser.write_text("#!/bin/sh\n")
    singleuser.chmod(0o755)
    # DockerSpawner's default: no command; the chart's: jupyterhub-singleuser and its options.
    assert entrypoint.hub_command([], HUB) == [str(singleuser)]
    assert entrypoint.hub_command(["jupyterhub-singleuser", "--debug"], HUB) == [
        str(singleuser), "--debug"]
    marker = json.loads((tmp_path / "ide.json").read_text())
    assert marker["url"] == "http://127.0.0.1:8890/user/alice/", marker  # the healthcheck's


def test_under_a_hub_without_jupyterhub_the_container_exits_non_zero(monkeypatch, tmp_path):
    from devbox_build.runtime import entrypoint

    for name, value in HUB.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(entrypoint.hooks, "run", lambda: pytest.fail("hooks ran"))
    assert entrypoint.main([]) == 127
    assert entrypoint.main(["jupyterhub-singleuser"]) == 127


def test_the_watcher_tells_the_hub_and_asks_it_to_stop(capsys):
    """The two calls to the hub's REST API, with the server's token, against a stand-in hub
    that records them (tests/test_hub.py runs them against a real JupyterHub)."""
    import http.server
    import threading

    from devbox_build.runtime.hub import Hub

    seen, answers = [], {"POST": 200, "DELETE": 202}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, self.headers["Authorization"],
                         json.loads(body) if body else None))
            self.send_response(answers[self.command])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_DELETE = _record

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/hub/api"
    try:
        hub = Hub.from_environment({**HUB, "JUPYTERHUB_API_URL": api, "JUPYTERHUB_USER": "alice",
                                    "HTTP_PROXY": "http://127.0.0.1:9"})
        assert hub.report(1796580000.0) and hub.reported == 1796580000.0
        assert hub.stop()
        assert seen == [
            ("POST", "/hub/api/users/alice/activity", "token t", {
                "servers": {"": {"last_activity": "2026-12-06T18:00:00Z"}},
                "last_activity": "2026-12-06T18:00:00Z"}),
            ("DELETE", "/hub/api/users/alice/server", "token t", None)]
        answers["DELETE"] = 403  # the hub's server_token_scopes lack servers!server
        assert not hub.stop()
        assert "servers!server" in capsys.readouterr().err
    finally:
        server.shutdown()
    assert Hub.from_environment({"JUPYTER_TOKEN": "x"}) is None
