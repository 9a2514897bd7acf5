"""Lose the container, keep the setup: a home volume outlives a deleted container, and the start
hook (devbox-restore, run by the entrypoint) puts the rest back into a fresh one. Real engine,
default image."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import uuid
import zipfile

import pytest

from devbox_build.engine import Engine

pytestmark = pytest.mark.engine

HOME = "/home/sagemaker-user"
USER = (1000, 100)


def wheel(name: str) -> tuple[str, bytes]:
    """A tiny pure-Python wheel, so installing needs no index."""
    files = {f"{name}/__init__.py": b"GREETING = 'hello'\n",
             f"{name}-1.0.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    files[f"{name}-1.0.dist-info/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return f"{name}-1.0-py3-none-any.whl", buffer.getvalue()


def hooks_done(engine: Engine, container: str) -> str:
    """Once the entrypoint has run its start hooks and started the command (a state: the
    command's process exists), so nothing the test does races the hooks."""
    deadline = time.monotonic() + 120
    # The command itself (the entrypoint's own arguments name it too).
    while not any(p[-1] == "sleep infinity" for p in
                  engine.api.top(container)["Processes"] or []):
        assert time.monotonic() < deadline, engine.logs(container)
        time.sleep(0.2)
    return container


def shell(engine: Engine, container: str, script: str) -> tuple[int, str]:
    exec_id = engine.api.exec_create(container, ["bash", "-lc", script], user="1000")
    out = engine.api.exec_start(exec_id).decode(errors="replace")
    return engine.api.exec_inspect(exec_id)["ExitCode"], out


SET_UP = """set -e
mkdir -p ~/.ssh && chmod 755 ~/.ssh
echo not-a-real-key > ~/.ssh/id_ed25519 && chmod 644 ~/.ssh/id_ed25519
echo ssh-ed25519 AAAA test > ~/.ssh/id_ed25519.pub
mkdir -p ~/.config/devbox
printf '# every second (six fields: seconds first)\\n* * * * * * date +%%s >> ~/cron-ran\\n' \\
    > ~/.config/devbox/crontab
git init -q ~/dotfiles-src && cd ~/dotfiles-src && echo 'export DEVBOX_RC=1' > .devbox-rc
git add . && git -c user.email=t@example.com -c user.name=t commit -qm dotfiles
python -m venv --without-pip ~/.conda/envs/scratch
echo /opt/venv/lib/python3.11/site-packages \\
    > ~/.conda/envs/scratch/lib/python3.11/site-packages/image-packages.pth
pip install --no-index -q /tmp/devbox_hello-1.0-py3-none-any.whl
PIP_USER=0 pip install --no-index -q /tmp/devbox_other-1.0-py3-none-any.whl
mkdir -p /tmp/old && echo data > /tmp/old/results.csv && touch -d 2001-01-01 /tmp/old/results.csv
tar -C /tmp/old -cf /tmp/old.tar results.csv && tar -C /opt/venv/share -xf /tmp/old.tar
git init -q ~/projects/a/b/c/d/deep && cd ~/projects/a/b/c/d/deep && echo x > x
git add . && git -c user.email=t@example.com -c user.name=t commit -qm deep
"""


def test_a_deleted_container_comes_back_with_everything_on_its_home_volume(engine,
                                                                           default_images):
    ref = default_images["cpu"].content_tag
    volume = engine.create_volume(f"devbox-test-home-{uuid.uuid4().hex[:12]}")
    wheels = dict(wheel(n) for n in ("devbox_hello", "devbox_other"))
    first = hooks_done(engine, engine.start(
        ref, ["sleep", "infinity"], volumes={volume: HOME},
        files={f"/tmp/{n}": (data, *USER) for n, data in wheels.items()}))
    second = None
    try:
        code, out = shell(engine, first, SET_UP)
        assert code == 0, out
        code, out = shell(engine, first, "devbox-restore --check --json")
        assert code == 1, out
        report = json.loads(out)
        assert HOME in report["persistent"], report
        lost = report["lost_with_container"]["files"]
        # `pip install` into the image's environment dies with the container, and is listed;
        # `pip install` (to ~/.local on the volume) is not.
        assert any("/site-packages/devbox_other" in p for p in lost), lost
        # Unpacked with its 2001 date (tar -x): still written in this container.
        assert "/opt/venv/share/results.csv" in lost, lost
        assert not any(p.startswith(HOME) or "devbox_hello" in p for p in lost), lost
        # A repository on the home volume is not lost with the container: kept only there.
        assert not report["lost_with_container"]["git"], report
        dotfiles = next(g for g in report["kept_only_on_volume"]["git"]
                        if g["repository"].endswith("dotfiles-src"))
        assert any(g["repository"].endswith("a/b/c/d/deep")
                   for g in report["kept_only_on_volume"]["git"]), report
        assert dotfiles["unpushed_commits"] == 1 and dotfiles["upstream"] is None, dotfiles
        engine.remove(first)

        started = time.time()
        second = hooks_done(engine, engine.start(
            ref, ["sleep", "infinity"], volumes={volume: HOME},
            environment={"DEVBOX_DOTFILES": f"{HOME}/dotfiles-src"}))
        deadline = time.monotonic() + 120
        while True:  # the cron job has run in the new container: a state, not a sleep
            ran = engine.copy_out(second, f"{HOME}/cron-ran").get("cron-ran", b"").split()
            if ran and float(ran[-1]) >= int(started):
                break
            assert time.monotonic() < deadline, engine.logs(second)
            time.sleep(0.3)
        code, out = shell(engine, second, (
            "stat -c %a ~/.ssh ~/.ssh/id_ed25519 ~/.ssh/id_ed25519.pub;"
            "readlink ~/.devbox-rc;"
            "python -c 'import devbox_hello; print(devbox_hello.GREETING)';"
            "python -c 'import devbox_other' 2>/dev/null || echo other-is-gone;"
            "pip freeze | grep -c . ; pip freeze | grep -ci '^devbox[-_]hello';"
            "case :$PATH: in *:$HOME/.local/bin:*) echo user-bin-on-path;; esac;"
            "jupyter kernelspec list --json"))
        assert code == 0, out
        lines = out.splitlines()
        assert lines[:3] == ["700", "600", "644"], out
        assert lines[3] == f"{HOME}/.dotfiles/.devbox-rc", out
        assert lines[4:6] == ["hello", "other-is-gone"], out
        # `pip freeze > requirements.txt` writes the whole environment, the user's installs too.
        assert int(lines[6]) > 50 and lines[7] == "1", out
        assert lines[8] == "user-bin-on-path", out
        kernels = json.loads(out[out.index("{"):])["kernelspecs"]
        assert kernels["conda-scratch"]["spec"]["argv"][0] == (
            f"{HOME}/.conda/envs/scratch/bin/python"), kernels
        logs = engine.logs(second)
        assert "~/.ssh: 2 permission(s) fixed" in logs, logs
        assert "kernel registered for scratch" in logs, logs

        # The kernel the hook registered really starts (Jupyter's own client).
        code, out = shell(engine, second, (
            "python -c \"from jupyter_client.manager import start_new_kernel;"
            " km, kc = start_new_kernel(kernel_name='conda-scratch');"
            " print(kc.execute_interactive('import sys; print(sys.prefix)', timeout=60)"
            "['content']['status']); km.shutdown_kernel()\""))
        assert code == 0 and "scratch" in out and out.strip().endswith("ok"), out
        code, out = shell(engine, second, "devbox-restore --check")
        assert "kept only on this volume: git work in" in out, out
        assert "LOST with the container: git" not in out, out
    finally:
        engine.remove(first)
        if second:
            engine.remove(second)
        engine.remove_volume(volume)


def test_a_broken_start_hook_never_keeps_the_container_from_starting(engine, default_images):
    code, out = engine.run(default_images["cpu"].content_tag, ["echo", "started"],
                           environment={"DEVBOX_DOTFILES": "/nowhere/dotfiles.git"})
    assert code == 0 and out.strip().endswith("started"), out
    assert "dotfiles: could not clone /nowhere/dotfiles.git" in out, out


def test_a_fresh_container_with_its_home_on_a_volume_loses_nothing(engine, default_images):
    volume = engine.create_volume(f"devbox-test-home-{uuid.uuid4().hex[:12]}")
    try:
        code, out = engine.run(default_images["cpu"].content_tag,
                               ["devbox-restore", "--check"], volumes={volume: HOME})
        assert code == 0 and "nothing would be lost" in out, out
    finally:
        engine.remove_volume(volume)


def test_a_bad_crontab_line_is_named(engine, default_images):
    code, out = engine.run(default_images["cpu"].content_tag, ["sh", "-c", (
        "mkdir -p ~/.config/devbox && echo '61 * * * * true' > ~/.config/devbox/crontab;"
        "devbox-cron --check")])
    assert code == 2, out
    assert "crontab, line 1: cannot read 61" in out, out


def test_a_crontab_written_in_a_running_container_runs_and_a_bad_line_skips_only_itself(
        engine, default_images):
    """The runner starts in every container and reads the crontab when it appears or changes:
    no restart. A five-field line whose command starts with `python3` is five fields; a line it
    cannot read is reported by the start hook and skipped, and the others run."""
    ref = default_images["cpu"].content_tag
    volume = engine.create_volume(f"devbox-test-home-{uuid.uuid4().hex[:12]}")
    code, out = engine.run(ref, ["sh", "-c", (
        "mkdir -p ~/.config/devbox && printf '%s\\n' '61 * * * * true'"
        " '* * * * * * date +%s >> ~/early-ran' > ~/.config/devbox/crontab")],
        volumes={volume: HOME})
    assert code == 0, out
    container = hooks_done(engine, engine.start(ref, ["sleep", "infinity"],
                                                volumes={volume: HOME}))
    try:
        deadline = time.monotonic() + 60  # the engine copies the log asynchronously
        while "BROKEN line(s) skipped" not in (logs := engine.logs(container)):
            assert time.monotonic() < deadline, logs
            time.sleep(0.2)
        assert "line 1: cannot read 61" in logs, logs
        deadline = time.monotonic() + 60  # the crontab the container started with runs
        while not engine.copy_out(container, f"{HOME}/early-ran").get("early-ran"):
            assert time.monotonic() < deadline, engine.logs(container)
            time.sleep(0.3)
        code, out = shell(engine, container, (
            "printf '%s\\n' '* * * * * * date +%s >> ~/seconds-ran'"
            " '* * * * * python3 -c \"print(1)\" >> ~/minutes-ran' > ~/.config/devbox/crontab"))
        assert code == 0, out
        deadline = time.monotonic() + 75  # the five-field job runs at the next minute
        wanted = {"seconds-ran", "minutes-ran"}
        while True:
            found = {name for name in wanted
                     if engine.copy_out(container, f"{HOME}/{name}").get(name)}
            if found == wanted:
                break
            assert time.monotonic() < deadline, (found, engine.logs(container))
            time.sleep(0.5)
    finally:
        engine.remove(container)
        engine.remove_volume(volume)


def test_an_empty_home_gets_skel_and_an_unwritable_home_still_starts_jupyterlab(
        engine, default_images, tmp_path):
    ref = default_images["cpu"].content_tag
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chown(empty, *USER)
    code, out = engine.run(ref, ["sh", "-c", "ls -A ~"], volumes={str(empty): HOME})
    assert code == 0 and ".bashrc" in out.split() and ".profile" in out.split(), out
    assert "an empty home got" in out, out

    root_owned = tmp_path / "root-owned"
    root_owned.mkdir()
    root_owned.chmod(0o755)
    container = engine.start(ref, None, volumes={str(root_owned): HOME}, publish=[8888],
                             environment={"JUPYTER_TOKEN": "t"})
    try:
        deadline = time.monotonic() + 180
        while engine.state(container).get("Health", {}).get("Status") != "healthy":
            assert engine.state(container)["Running"], engine.logs(container)[-3000:]
            assert time.monotonic() < deadline, engine.logs(container)[-3000:]
            time.sleep(0.5)
        assert "is not writable for uid 1000" in engine.logs(container)
    finally:
        engine.remove(container)
