"""The host's layer cache (assemble.py) under faults: a damaged entry, a full or read-only
folder, a build killed while its groups install, the engine dropping the connection during
`docker load`. Each is one message naming the file or step, its exit code, nothing left behind.
Real engine, the tiny stack, the real command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devbox_build import assemble, locking
from devbox_build.build import build
from devbox_build.errors import DevboxError

from .conftest import assert_clean_error, cli, load
from .test_build import RecordingProgress, options, remove_repository

pytestmark = pytest.mark.engine


def unique_stack(stack: Path, six: str) -> None:
    """A pin of six no other test uses, so the group holding it (and those above) make chains
    no other image in the engine holds: the engine must read their cached tars."""
    (stack / "requirements.in").write_text(f"six=={six}\nmarkupsafe\nidna\n")
    assert locking.lock(load(stack))


def cached_entry(cache: Path, package: str) -> tuple[Path, dict]:
    for meta in cache.glob("devbox-build/layers/*.json"):
        record = json.loads(meta.read_text())
        if any(line.startswith(f"{package}==") for line in record["requirements"]):
            return meta.with_suffix(".tar"), record
    raise AssertionError(f"no cached group holds {package}")


def remove_images(engine, stack) -> None:
    remove_repository(engine, stack)


@pytest.mark.parametrize("damage", ["changed", "cut-short"])
def test_a_damaged_cached_layer_is_evicted_and_installed_again(engine, stack, tmp_path,
                                                               monkeypatch, damage):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unique_stack(stack, "1.14.0" if damage == "changed" else "1.13.0")
    remove_images(engine, stack)
    build(load(stack), ["cpu"], engine, options())
    tar, record = cached_entry(tmp_path / "cache", "six")
    data = bytearray(tar.read_bytes())
    if damage == "changed":
        data[len(data) // 2] ^= 0xFF  # same size, other bytes
    else:
        del data[len(data) // 2:]
    tar.write_bytes(bytes(data))
    # The engine must read the cached tar again: no image may hold its layer (layers are
    # reproducible, so an earlier run's image of this pin would, whatever its tag).
    holding = [(len(engine.history(image["Id"])), image["Id"])
               for image in engine.api.images(all=True)
               if record["diff_id"] in engine.image(image["Id"])["RootFS"]["Layers"]]
    for _, image_id in sorted(holding, reverse=True):  # children (longer history) first
        engine.remove_image(image_id)
    progress = RecordingProgress()
    [after] = build(load(stack), ["cpu"], engine, options(), progress)
    notes = "\n".join(progress.lines)
    why = "does not have the digest" if damage == "changed" else "cut short"
    assert f"layer cache: {tar} ({record['group']}) " in notes and why in notes, notes
    assert f"installing 1 of the pip groups on their own: {record['group']}" in notes, notes
    fixed, _ = cached_entry(tmp_path / "cache", "six")
    assert fixed.stat().st_size == record["size"]
    assert engine.image_id(after.content_tag)
    # The next build uses the repaired entry as it is.
    remove_images(engine, stack)
    progress = RecordingProgress()
    build(load(stack), ["cpu"], engine, options(), progress)
    assert not [line for line in progress.lines if "installing" in line], progress.lines
    remove_images(engine, stack)


def test_groups_are_installed_by_the_pinned_uv_and_loaded_while_the_next_installs(
        engine, stack, tmp_path, monkeypatch):
    """Each group's layer goes into the engine as soon as its tar is written (the final load
    sends nothing), the partial images that took them are removed, and the packages were
    installed by the uv devbox-build pins (fetched once into this host's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unique_stack(stack, "1.11.0")
    remove_images(engine, stack)
    progress = RecordingProgress()
    [result] = build(load(stack), ["cpu"], engine, options(), progress)
    notes = "\n".join(progress.lines)
    assert f"fetching uv {assemble.UV_VERSION} for linux/amd64" in notes, notes
    assert "loaded pip-01 into the engine while the builder goes on" in notes, notes
    assert "loading 0 of 2 group layers into the engine" in notes, notes
    layers = engine.image(result.content_tag)["RootFS"]["Layers"]
    loaded = []
    for image in engine.api.images(all=True):
        own = engine.image(image["Id"])["RootFS"]["Layers"]
        if own == layers[:len(own)] and engine.history(image["Id"])[-1]["CreatedBy"].startswith(
                "devbox-build assemble: uv "):
            loaded.append(image["Id"])
    assert len(loaded) == 1, f"partial images left behind: {loaded}"
    installer_file = "/opt/venv/lib/python3.*/site-packages/six-*.dist-info/INSTALLER"
    status, installer = engine.run(result.content_tag, ["sh", "-c", f"cat {installer_file}"],
                                   entrypoint=[])
    assert (status, installer.strip()) == (0, "uv")
    # The second build of another pin reads uv from the cache.
    unique_stack(stack, "1.10.0")
    progress = RecordingProgress()
    build(load(stack), ["cpu"], engine, options(), progress)
    assert not [line for line in progress.lines if "fetching uv" in line], progress.lines
    remove_images(engine, stack)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mounts = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, check=False).returncode != 0:
            pytest.fail("mounting a tmpfs needs root (CI runs as root)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_layer_cache_is_one_error_naming_it_and_leaves_nothing(engine, stack,
                                                                      tiny_tmpfs):
    full = tiny_tmpfs("full", "size=64k")
    result = cli("build", str(stack), "--variant", "cpu", "--no-cache",
                 env={"XDG_CACHE_HOME": str(full)})
    assert_clean_error(result, f"the layer cache {full}/devbox-build/layers cannot take",
                       "No space left on device")
    assert result.returncode == 2
    left = [p.name for p in (full / "devbox-build" / "layers").iterdir()]
    assert not [name for name in left if "partial" in name], left
    assert not engine.labelled_containers(assemble.BUILDER_LABEL)


def test_a_builder_out_of_memory_for_its_trees_says_how_to_keep_them_on_disk(
        engine, stack, tmp_path, monkeypatch):
    """A tmpfs too small for a group's tree (an engine whose memory limit is below what it
    reports): one error whose hint names DEVBOX_BUILDER_TMPFS=off, no builder left behind."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(assemble, "trees_in_memory", lambda steps, memory, setting: 64_000)
    with pytest.raises(DevboxError) as failed:
        build(load(stack), ["cpu"], engine, options())
    assert assemble.NO_SPACE in failed.value.message, failed.value.message
    assert "DEVBOX_BUILDER_TMPFS=off" in (failed.value.hint or ""), failed.value
    assert not engine.labelled_containers(assemble.BUILDER_LABEL)


def test_a_read_only_layer_cache_is_one_error_before_any_install(engine, stack, tiny_tmpfs):
    read_only = tiny_tmpfs("read-only", "ro,size=1m")
    result = cli("build", str(stack), "--variant", "cpu", "--no-cache",
                 env={"XDG_CACHE_HOME": str(read_only)})
    assert_clean_error(result, f"the layer cache {read_only}/devbox-build/layers cannot be "
                               "written", "Read-only file system")
    assert result.returncode == 2
    assert "installing" not in result.stderr


def test_a_killed_build_leaves_no_builder_container_after_the_next(engine, stack, tmp_path):
    """SIGKILL cannot be caught: the next assembly on this host removes the builder container
    of a build that is gone."""
    unique_stack(stack, "1.12.0")
    remove_images(engine, stack)  # an earlier run's: the next build must not be a no-op
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = subprocess.Popen([sys.executable, "-m", "devbox_build.cli", "build", str(stack),
                              "--variant", "cpu", "--no-cache"], env=environment,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not (builders := engine.labelled_containers(assemble.BUILDER_LABEL)):
            assert first.poll() is None, "the build ended before its groups were installed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    [orphan] = [cid for cid, owner in builders.items() if owner.endswith(f":{first.pid}")]
    result = cli("build", str(stack), "--variant", "cpu", env={
        "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removing builder container {orphan[:12]}" in result.stderr
    assert orphan not in engine.labelled_containers(assemble.BUILDER_LABEL)
    remove_images(engine, stack)


class DroppingEngineProxy:
    """TCP on loopback → the engine's unix socket; closes the connection of the first
    `POST /images/load` once some of its body went through."""

    def __init__(self, drops: int, socket_path: str = "/var/run/docker.sock") -> None:
        self.drops = drops
        self.socket_path = socket_path
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(self.socket_path)

        def back() -> None:
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=back, daemon=True).start()
        seen = b""
        try:
            while data := client.recv(65536):
                seen = (seen + data)[-200_000:]
                if b"POST /v" in seen and b"/images/load" in seen \
                        and self.dropped < self.drops and len(seen) > 20_000:
                    self.dropped += 1
                    break
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("drops", [1, 99])
def test_the_engine_dropping_the_connection_during_load(engine, stack, tmp_path, drops):
    """Once: the load is sent again and the build succeeds. Every time: exit 4, one message."""
    unique_stack(stack, "1.11.0" if drops == 1 else "1.10.0")
    remove_images(engine, stack)
    proxy = DroppingEngineProxy(drops)
    try:
        environment = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "DOCKER_HOST": proxy.url}
        result = cli("build", str(stack), "--variant", "cpu", env=environment)
        assert proxy.dropped >= 1
        if drops == 1:
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert_clean_error(result, "docker load failed", "closed the connection")
            assert result.returncode == 4
        assert not engine.labelled_containers(assemble.BUILDER_LABEL)
    finally:
        proxy.close()
        remove_images(engine, stack)


def test_groups_install_while_the_system_layer_builds_and_outlive_its_change(engine, stack,
                                                                             tmp_path,
                                                                             monkeypatch):
    """The groups install on the os layer's image while the system layer's apt packages do
    (nothing they install depends on those), so they are keyed by the os layer: changing the
    system packages costs the system layer, and the groups come from the cache unchanged."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unique_stack(stack, "1.15.0")
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text() + '\n[system]\npackages = ["tree"]\n')
    remove_images(engine, stack)
    progress = RecordingProgress()
    [first] = build(load(stack), ["cpu"], engine, options(), progress)
    notes = "\n".join(progress.lines)
    assert "the pip groups install on the os layer (" in notes, notes
    assert "while the system layer builds" in notes, notes
    assert "installing 2 of the pip groups on their own" in notes, notes
    spec_file.write_text(spec_file.read_text().replace('["tree"]', '["tree", "less"]'))
    progress = RecordingProgress()
    [second] = build(load(stack), ["cpu"], engine, options(), progress)
    assert not [line for line in progress.lines if "installing" in line], progress.lines
    assert "2 of the pip groups' layers from this host's cache" in "\n".join(progress.lines)
    groups = [layers for layers in (engine.image(result.content_tag)["RootFS"]["Layers"]
                                    for result in (first, second))]
    # The base, the CA files, os, system, the two groups: the system layer changed, the groups'
    # bytes did not.
    assert groups[0][:3] == groups[1][:3] and groups[0][3] != groups[1][3]
    assert groups[0][4:6] == groups[1][4:6]
    command = "command -v tree less && python -c 'import six, markupsafe'"
    status, output = engine.run(second.content_tag, ["sh", "-c", command], entrypoint=[])
    assert status == 0, output
    remove_images(engine, stack)


def test_layer_tars_are_the_same_bytes_wherever_the_builder_keeps_its_trees_and_tars(
        engine, stack, tmp_path):
    """An engine on this host sees the cache folder: the builder writes each tar there. One
    that does not (remote, or here a cache on a tmpfs in a mount namespace of the build's own)
    gets the tars copied out of its builder. The builder installs its trees in memory (a tmpfs,
    DEVBOX_BUILDER_TMPFS=on) or on its disk (off). The layers are the same bytes every way."""
    unique_stack(stack, "1.16.0")
    remove_images(engine, stack)
    cache = tmp_path / "cache"
    local = cli("build", str(stack), "--variant", "cpu", "-v",
                env={"XDG_CACHE_HOME": str(cache), "DEVBOX_BUILDER_TMPFS": "on"})
    assert local.returncode == 0, local.stderr[-3000:]
    assert f"layer tars go to {assemble.OUTBOX}\n" in local.stderr, local.stderr[-3000:]
    assert "the builder keeps its install trees in memory" in local.stderr
    assert "devbox-build: install trees in memory\n" in local.stderr  # the builder saw a tmpfs
    assert not list((cache / "devbox-build" / "layers").glob(f"{assemble.OUTBOX_PREFIX}*"))
    spec = load(stack)
    layers = engine.image(f"{spec.repository}:cpu")["RootFS"]["Layers"]
    remove_images(engine, stack)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    elsewhere = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs devbox-test "$0" && exec "$@"', str(hidden),
         sys.executable, "-m", "devbox_build.cli", "build", str(stack), "--variant", "cpu", "-v"],
        env={**os.environ, "XDG_CACHE_HOME": str(hidden), "DEVBOX_BUILDER_TMPFS": "off"},
        capture_output=True, text=True,
        check=False, timeout=900)
    if elsewhere.returncode != 0 and "mount" in elsewhere.stderr.splitlines()[0]:
        pytest.fail(f"a mount namespace needs root (CI runs as root): {elsewhere.stderr}")
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert "installing 2 of the pip groups on their own" in elsewhere.stderr
    assert f"layer tars go to {assemble.WORK}\n" in elsewhere.stderr, elsewhere.stderr[-3000:]
    assert "devbox-build: install trees on disk\n" in elsewhere.stderr
    assert engine.image(f"{spec.repository}:cpu")["RootFS"]["Layers"] == layers
    assert not list(hidden.iterdir())  # the engine saw nothing of it
    remove_images(engine, stack)
