"""Builds on the real engine: layering, sharing, no-op rebuilds, tags, hygiene and failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from devbox_build import assemble, locking
from devbox_build.build import BuildOptions, apply_tags, build, content_digest, repository
from devbox_build.engine import Engine
from devbox_build.errors import Interrupted
from devbox_build.render import render
from devbox_build.report import Reporter

from .conftest import HOST_CA_CERTS, assert_clean_error, cli, load
from .support.proxy import LoopbackProxy
from .test_render import written_requirements

pytestmark = pytest.mark.engine
CA = {"DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS)}
SEEDS = {"pip", "setuptools"}


def options(**kwargs) -> BuildOptions:
    return BuildOptions(ca_certificates=HOST_CA_CERTS, **kwargs)


class CountingEngine(Engine):
    """The real engine, counting the builds it is asked for."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.client)
        self.builds = 0

    def build(self, *args, **kwargs):
        self.builds += 1
        return super().build(*args, **kwargs)


class RecordingProgress(Reporter):
    """Keeps every note a build reports (and prints nothing)."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)


def history_ids(engine: Engine, ref: str) -> list[tuple[str, str]]:
    return [(entry["Id"], entry["CreatedBy"]) for entry in engine.history(ref)]


def filesystem_layers(engine: Engine, ref: str) -> list[tuple[str, str]]:
    """(step, diff id) of each filesystem layer, bottom first."""
    return [(step, diff_id) for diff_id, _, step in engine.layers(ref)]


def index_of(history: list[tuple[str, str]], needle: str) -> int:
    return next(i for i, (_, created_by) in enumerate(history) if needle in created_by)


def layer_index(layers: list[tuple[str, str]], needle: str) -> int:
    """Where the step naming ``needle`` is in filesystem_layers()."""
    return next(i for i, (step, _) in enumerate(layers) if needle in step)


def installed(engine: Engine, ref: str) -> dict[str, str]:
    code, out = engine.run(ref, ["python", "-c", (
        "import importlib.metadata as m, json, re;"
        "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version"
        " for d in m.distributions()}))")])
    assert code == 0, out
    return json.loads(out)


def test_gpu_variant_shares_every_layer_below_its_accelerator_layer(engine, tiny_images):
    _, results = tiny_images
    cpu = filesystem_layers(engine, results["cpu"].content_tag)
    gpu = filesystem_layers(engine, results["gpu"].content_tag)
    # Byte for byte (diff ids): every layer below the first GPU-only group is the CPU image's.
    boundary = layer_index(gpu, "/opt/devbox/requirements/pip-gpu-01.txt")
    assert boundary > layer_index(gpu, "/opt/devbox/requirements/pip-01.txt")  # pip layer is below it
    assert boundary >= 4 and gpu[:boundary] == cpu[:boundary]
    assert gpu[boundary][1] not in {diff_id for _, diff_id in cpu}
    env = engine.image(results["gpu"].content_tag)["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_VISIBLE_DEVICES=all" not in engine.image(results["cpu"].content_tag)["Config"]["Env"]


def test_installed_packages_equal_the_lock_exactly(engine, tiny_images):
    spec, results = tiny_images
    for variant, result in results.items():
        top = locking.stack(spec, variant, "linux/amd64")[-1]
        locked = {name: pin.version for name, pin in locking.read_pins(top.path(spec)).items()}
        found = installed(engine, result.content_tag)
        assert {k: v for k, v in found.items() if k not in SEEDS} == locked, variant
        manifest = json.loads(engine.read_file(result.content_tag, "/opt/devbox/manifest.json"))
        from_locks = {p["name"]: p["version"] for p in manifest["packages"]["pip"]
                      if p["layer"] != "seed"}
        assert from_locks == locked


def test_second_build_is_a_no_op_with_the_same_tag(engine, tiny_images):
    spec, results = tiny_images
    counting = CountingEngine(engine)
    again = build(spec, ["cpu", "gpu"], counting, options())
    assert counting.builds == 0
    assert [r.content_tag for r in again] == [results["cpu"].content_tag,
                                              results["gpu"].content_tag]
    assert all(not r.built for r in again)
    # Typed in a plain shell (no DEVBOX_CA_CERTS): the CLI finds this host's extra CAs itself,
    # so it agrees with the build above (which named them) on the content hash.
    started = time.monotonic()
    result = cli("build", str(spec.folder), "--json", unset=("DEVBOX_CA_CERTS",))
    assert result.returncode == 0, result.stderr
    assert [r["built"] for r in json.loads(result.stdout)] == [False, False], result.stderr
    assert "up to date" in result.stderr
    if HOST_CA_CERTS:
        assert f"CA certificates: {len(HOST_CA_CERTS)} from this host's extra CAs" in result.stderr
    print(f"no-op CLI build: {time.monotonic() - started:.2f} s")


def test_changing_one_pin_rebuilds_only_its_layer_and_above(engine, stack, tmp_path,
                                                              monkeypatch):
    # A layer cache of its own: an earlier run's would already hold the moved pin's group.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # idna gets a layer of its own (bigger, so below); six and markupsafe share the top group.
    with (stack / "image.toml").open("a") as spec_file:
        spec_file.write('\n[layers]\nown = ["idna"]\n')
    # Both images are built here, one after the other, so both come from the engine's cache as
    # it is now (an image left by an earlier run may sit on another cache chain).
    assert locking.lock(load(stack))
    engine.remove_image(content_tag(engine, stack, "cpu"))
    [before] = build(load(stack), ["cpu"], engine, options())
    (stack / "requirements.in").write_text("six==1.16.0\nmarkupsafe\nidna\n")
    assert locking.lock(load(stack))
    engine.remove_image(content_tag(engine, stack, "cpu"))  # from an earlier run of this test
    progress = RecordingProgress()
    [after] = build(load(stack), ["cpu"], engine, options(), progress)
    assert after.content_tag != before.content_tag
    old = filesystem_layers(engine, before.content_tag)
    new = filesystem_layers(engine, after.content_tag)
    idna = layer_index(new, "/opt/devbox/requirements/pip-01.txt")
    written = written_requirements(render(load(stack), "cpu").dockerfile)
    assert [line.split("==")[0] for line in written["pip-01"]] == ["idna"]
    changed = layer_index(new, "/opt/devbox/requirements/pip-02.txt")
    dev = layer_index(new, "/opt/devbox/requirements/dev-01.txt")
    assert idna < changed < dev
    # base, CA, os (apt, user, venv) and idna's layer keep their ids; six's group is new; the
    # dev group above it is not installed again and keeps its bytes (a registry has it already).
    assert new[:changed] == old[:changed]
    assert new[changed][1] != old[changed][1]
    assert new[dev] == old[dev]
    assert "installing 1 of the pip groups on their own: pip-02" in progress.lines
    assert installed(engine, after.content_tag)["six"] == "1.16.0"


def test_a_lost_layer_cache_costs_installs_not_layers(engine, stack, tmp_path, monkeypatch):
    """With this host's layer cache gone (another machine, a cleaned cache), every group is
    installed again, gives the same bytes, and the engine is sent only what it lacks."""
    with (stack / "image.toml").open("a") as spec_file:
        spec_file.write('\n[layers]\nown = ["idna"]\n')  # idna's layer below six's
    assert locking.lock(load(stack))
    [before] = build(load(stack), ["cpu"], engine, options())
    # A pin no other test moves to, and this test's image from an earlier run removed (its
    # untagged parents, the loaded image among them, go with it): six's layer is new here.
    (stack / "requirements.in").write_text("six==1.15.0\nmarkupsafe\nidna\n")
    assert locking.lock(load(stack))
    old = filesystem_layers(engine, before.content_tag)
    # This test's images, of this run and earlier ones: six's layer must be new here.
    remove_repository(engine, stack)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    # Every chain of layers the engine's images hold now (this test's and the other tests').
    held = {chain for layers in engine.layer_lists("devbox.spec")
            for chain in assemble.chain_ids(layers)}
    progress = RecordingProgress()
    [after] = build(load(stack), ["cpu"], engine, options(), progress)
    groups = [step.name for step in render(load(stack), "cpu").assembled_steps]
    assert groups == ["pip-01", "pip-02", "dev-01"]
    assert "installing 3 of the pip groups on their own: pip-01, pip-02, dev-01" in progress.lines
    # Installed again, idna's and the dev group's layers are the same bytes.
    new = filesystem_layers(engine, after.content_tag)
    for group in groups[0], groups[2]:
        needle = f"/opt/devbox/requirements/{group}.txt"
        assert new[layer_index(new, needle)] == old[layer_index(old, needle)]
    # Sent: only the groups whose chain (the layer with all below it) no image held. Six's
    # group and the one above it at least; idna's too when the classic builder built the steps
    # below it again (it continues from the newest matching cache chain) or no image had it.
    chains = assemble.chain_ids([diff_id for _, diff_id in new])
    lacking = [group for group in groups
               if chains[layer_index(new, f"/requirements/{group}.txt")] not in held]
    assert lacking[-2:] == ["pip-02", "dev-01"]
    # Each group is loaded as soon as it is installed (the final load sends what is left).
    sent = [name for line in progress.lines if line.startswith("loaded ")
            for name in line.removeprefix("loaded ").split(" into ")[0].split(", ")]
    final = next(line for line in progress.lines if line.startswith("loading "))
    sent += groups[len(groups) - int(final.split()[1]):]
    assert sorted(sent) == sorted(lacking), progress.lines
    assert sorted((tmp_path / "empty-cache" / "devbox-build" / "layers").glob("*.tar"))
    assert installed(engine, after.content_tag)["six"] == "1.15.0"


def test_the_chain_mechanism_builds_the_same_environment(engine, stack):
    """--mechanism chain (one Dockerfile RUN per group) stays a working fallback: the same
    packages, the same manifest, its own content tag."""
    spec = load(stack)
    [chain] = build(spec, ["cpu"], engine, options(mechanism="chain"))
    try:
        [assembled] = build(spec, ["cpu"], engine, options())
        assert chain.content_tag != assembled.content_tag
        assert installed(engine, chain.content_tag) == installed(engine, assembled.content_tag)
        steps = [step for step, _ in filesystem_layers(engine, chain.content_tag)]
        assert any("printf" in step and "/opt/devbox/requirements/pip-01.txt" in step
                   for step in steps)
        assert not any("devbox-build assemble" in step for step in steps)
        result = cli("check", chain.content_tag)
        assert result.returncode == 0, result.stdout[-3000:]
    finally:
        engine.remove_image(chain.content_tag)


def test_every_layer_is_reproducible(engine, stack):
    """Two builds with no cache (as two machines would make them) give the same bytes in every
    layer: the CA copy, the os layer (apt, the user, the venv), every pip install layer, the
    final one. So a registry that has them never gets them again, and CPU and GPU images built
    by separate runs share every layer below the accelerator."""
    text = (stack / "image.toml").read_text()
    # A user of its own, and the images removed after each build: the classic builder continues
    # a cached chain from the newest matching step, so no-cache builds must not outlive the test.
    (stack / "image.toml").write_text(text + '\n[user]\nname = "repro"\nuid = 4242\n'
                                      'home = "/home/repro"\n')
    spec = load(stack)
    assert locking.lock(spec)
    digests = []
    for _ in range(2):
        engine.remove_image(content_tag(engine, stack, "cpu"))
        [result] = build(spec, ["cpu"], engine, options(no_cache=True))
        digests.append(filesystem_layers(engine, result.content_tag))
        # The bytecode is valid for its source (timestamp mode, the fixed mtime): imports read
        # it and never compile again.
        code, out = engine.run(result.content_tag, ["python", "-c", (
            "import idna, os, struct; flags, mtime, size = struct.unpack('<4xIII', "
            "open(idna.__cached__, 'rb').read(16)); st = os.stat(idna.__file__);"
            "print(flags, mtime == int(st.st_mtime) == 946684800, size == st.st_size)")])
        assert (code, out.split()) == (0, ["0", "True", "True"]), out
        engine.remove_image(result.content_tag)
        engine.remove_image(f"{repository(spec, None)}:cpu")
    first, second = digests
    assert len([step for step, _ in first if "/opt/devbox/requirements/" in step]) == 2
    assert len(first) >= 6  # base, CA, os, pip, dev, final files, final step
    differ = [step[:100] for (step, one), (_, two) in zip(first, second) if one != two]
    assert not differ, differ


def test_a_one_pin_change_after_the_base_was_rebuilt_installs_one_group(engine, stack,
                                                                         tmp_path,
                                                                         monkeypatch):
    """The groups are keyed by the content below them, not the engine's id for it: with the
    spec's images gone (their base steps too) and the layer cache kept, a one-pin change
    installs the changed group only."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = (stack / "image.toml").read_text()
    # A user of its own: no other test's image holds these base steps.
    (stack / "image.toml").write_text(text + '\n[user]\nname = "rebased"\nuid = 4343\n'
                                      'home = "/home/rebased"\n[layers]\nown = ["idna"]\n')
    assert locking.lock(load(stack))
    [first] = build(load(stack), ["cpu"], engine, options())
    engine.remove_image(first.content_tag)
    engine.remove_image(f"{repository(load(stack), None)}:cpu")
    # The base steps' images too (the engine's build cache for them): each one whose history
    # names this test's user, removed by id, the newest (longest history) first.
    ours = []
    for image in engine.api.images(all=True):
        history = engine.history(image["Id"])
        if any("/home/rebased" in (entry.get("CreatedBy") or "") for entry in history):
            ours.append((len(history), image["Id"]))
    assert ours
    for _, image_id in sorted(ours, reverse=True):
        engine.remove_image(image_id)
    (stack / "requirements.in").write_text("six==1.16.0\nmarkupsafe\nidna\n")
    assert locking.lock(load(stack))
    progress = RecordingProgress()
    [after] = build(load(stack), ["cpu"], engine, options(), progress)
    try:
        # Only `ARG DEBIAN_FRONTEND`, which every build on this base shares, came from the
        # engine's cache: the CA, os and final steps were built again.
        assert after.cached_steps <= 1, "the base steps were not built again"
        installing = [line for line in progress.lines if line.startswith("installing")]
        assert installing == ["installing 1 of the pip groups on their own: pip-02"], progress.lines
    finally:
        engine.remove_image(after.content_tag)


def test_stale_lock_is_refused(engine, stack):
    (stack / "dev.in").write_text("iniconfig\npluggy\n")
    result = cli("build", str(stack), "--variant", "cpu", env=CA)
    # The hint names the spec the way it was given (a path here), so it works when pasted.
    assert_clean_error(result, "stale", "dev.txt", f"devbox-build lock {stack}")
    assert result.returncode == 3
    check = cli("lock", str(stack), "--check")
    assert check.returncode == 3 and "dev.txt: stale" in check.stderr


def test_proxies_are_used_but_never_stored(engine, stack, monkeypatch):
    spec = load(stack)
    with LoopbackProxy() as proxy:
        for name in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, proxy.url)
        # Host networking lets the build reach the proxy on loopback; no cache, so every
        # download really happens during this build.
        [result] = build(spec, ["cpu"], engine, options(network_mode="host", no_cache=True))
    assert proxy.connects, "the build did not go through the proxy"
    port = proxy.url.rsplit(":", 1)[1]
    for _, created_by in history_ids(engine, result.content_tag):
        assert port not in created_by and "proxy" not in created_by.lower()
    config = engine.image(result.content_tag)["Config"]
    assert not [e for e in config["Env"] if "proxy" in e.lower() or port in e]


def test_no_package_caches_remain(engine, tiny_images):
    _, results = tiny_images
    script = (
        "import glob; found = [p for pattern in ('/var/lib/apt/lists/*_*', '/var/cache/apt/*.bin',"
        " '/var/cache/apt/archives/*.deb', '/root/.cache/*', '/home/*/.cache/*', '/tmp/*')"
        " for p in glob.glob(pattern)]; print(found); raise SystemExit(1 if found else 0)"
    )
    for result in results.values():
        # The image as built: not the start hooks' runtime files (the cron runner's lock).
        code, out = engine.run(result.content_tag, ["/opt/venv/bin/python", "-c", script],
                               user="root", entrypoint=[])
        assert code == 0, out


def test_gpu_image_declares_cuda_and_ships_no_driver(engine, tiny_images):
    _, results = tiny_images
    labels = engine.image(results["gpu"].content_tag)["Config"]["Labels"]
    assert labels["devbox.cuda.version"] == "12.9"
    assert labels["devbox.cuda.min-driver"] == "525.60.13"
    env = dict(e.split("=", 1) for e in engine.image(results["gpu"].content_tag)["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    code, out = engine.run(results["gpu"].content_tag,
                           ["sh", "-c", "find / -xdev -name 'libcuda.so*' | grep -v /stubs/ || true"],
                           user="root")
    assert code == 0 and out.strip() == ""
    code, out = engine.run(results["gpu"].content_tag, ["python", "-c",
                           "import nvidia.cuda_runtime, os; print(os.listdir(nvidia.cuda_runtime.__path__[0]))"])
    assert code == 0 and "lib" in out


def test_image_user_labels_and_inspect(engine, tiny_images):
    spec, results = tiny_images
    ref = results["cpu"].content_tag
    code, out = engine.run(ref, ["sh", "-c", "id; echo $HOME; getent passwd sagemaker-user"])
    assert code == 0
    assert "uid=1000(sagemaker-user) gid=100(users)" in out
    assert "/home/sagemaker-user:/bin/bash" in out
    labels = engine.image(ref)["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "tiny"
    assert labels["devbox.content-hash"].startswith(ref.rsplit("-", 1)[1])
    assert labels["org.opencontainers.image.created"].startswith("20")
    shown = cli("inspect", ref, "--json")
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout)
    assert (manifest["spec"], manifest["variant"]) == ("tiny", "cpu")
    assert set(manifest["locks"]) == {"pip", "dev"}
    assert any(p["name"] == "markupsafe" and p["layer"] == "pip" for p in manifest["packages"]["pip"])
    assert any(p["name"] == "python3" for p in manifest["packages"]["apt"])
    table = cli("inspect", ref)
    assert table.returncode == 0 and "markupsafe" in table.stdout and "tiny variant cpu" in table.stdout


def test_human_tags(engine, tiny_images):
    spec, results = tiny_images
    result = cli("build", str(spec.folder), "--variant", "cpu", "--tag", "2026.11", env=CA)
    assert result.returncode == 0, result.stderr
    image_id = results["cpu"].image_id
    assert engine.image_id("devbox-test/tiny:2026.11-cpu") == image_id
    assert engine.image_id("devbox-test/tiny:cpu") == image_id
    assert_clean_error(cli("build", str(spec.folder), "--push", env=CA), "--push needs a registry")


# -- failures: one clear error, nothing half-done ---------------------------------------------


def test_failing_run_step_shows_its_output_and_tags_nothing(engine, stack):
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text() + '\n[system]\npackages = ["devbox-no-such-package"]\n')
    expected = content_tag(engine, stack, "cpu")
    # As GitHub Actions runs it: the build's steps fold into a log group, closed before the
    # error, which stays in sight.
    result = cli("build", str(stack), "--variant", "cpu", env={**CA, "GITHUB_ACTIONS": "true"})
    assert_clean_error(result, "failed in layer 'system'", "Unable to locate package devbox-no-such-package",
                       "no image was tagged")
    lines = result.stderr.splitlines()
    opened = next(i for i, line in enumerate(lines) if line.startswith("::group::building "))
    closed = lines.index("::endgroup::")
    assert opened < closed < next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert "\x1b[" not in result.stderr  # no colour codes: they hide the markers from the runner
    assert engine.image_id(expected) is None
    assert engine.image_id("devbox-test/failing-run-step-shows-its-output-and-ta:cpu") is None


def test_unknown_base_image_points_at_bootstrap_base(engine, stack):
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text().replace(
        'base = "debian:bookworm-slim"\npip', 'base = "devbox-test/no-such-base:1"\npip'))
    result = cli("build", str(stack), "--variant", "gpu", env=CA)
    assert_clean_error(result, "key 'variants.gpu.base'", "devbox-test/no-such-base:1",
                       "devbox-build bootstrap-base")


def test_python_the_base_cannot_provide_is_a_spec_error(engine, stack):
    # A base the spec cannot know by name (an alias of bookworm): the build finds out.
    alias = "devbox-test/unknown-base:python-check"
    engine.tag(engine.image_id("debian:bookworm-slim"), alias)
    try:
        spec_file = stack / "image.toml"
        spec_file.write_text(spec_file.read_text().replace('python = "3.11"', 'python = "3.12"')
                             .replace('base = "debian:bookworm-slim"', f'base = "{alias}"'))
        assert cli("lock", str(stack)).returncode == 0
        result = cli("build", str(stack), "--variant", "cpu", env=CA)
        assert_clean_error(result, "key 'python'", "provides Python 3.11")
        assert result.returncode == 2
    finally:
        engine.untag(alias)


def test_a_base_of_another_platform_is_refused_before_the_build(engine, stack):
    """The arm64-laptop trap, the other way round: a base image whose platform is not the
    build's would get wheels locked for another architecture. Refused on key 'base'."""
    foreign = "devbox-test/foreign-platform-base:1"
    engine.api.load_image(_image_archive(foreign, "arm64"))
    try:
        spec_file = stack / "image.toml"
        spec_file.write_text(spec_file.read_text().replace(
            'base = "debian:bookworm-slim"', f'base = "{foreign}"', 1))
        result = cli("build", str(stack), "--variant", "cpu", env=CA)
        assert_clean_error(result, "key 'variants.cpu.base'", "is linux/arm64, but this build "
                           "is for linux/amd64")
        assert result.returncode == 2
    finally:
        engine.remove_image(foreign)


def _image_archive(ref: str, architecture: str) -> bytes:
    """A `docker save` archive of an empty image of another architecture (nothing to run)."""
    def member(archive, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    layer = io.BytesIO()
    tarfile.open(fileobj=layer, mode="w").close()
    layer = layer.getvalue()
    config = json.dumps({"architecture": architecture, "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    name = hashlib.sha256(config).hexdigest() + ".json"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        member(archive, "layer.tar", layer)
        member(archive, name, config)
        member(archive, "manifest.json", json.dumps(
            [{"Config": name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode())
    return out.getvalue()


def test_no_engine_reachable(stack):
    result = cli("build", str(stack), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert_clean_error(result, "no Docker engine reachable", "DOCKER_HOST")


def interrupt_a_running_build(engine: Engine, stack: Path, signum: int) -> tuple[int, str]:
    """Start a CLI build the way CI starts background jobs (SIGINT ignored, inherited), wait
    until the engine runs one of its steps (a container start event: a state, not a timer or a
    progress line), send ``signum``; the exit status and stderr."""
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "devbox_build.cli", "build", str(stack), "--variant", "cpu",
         "--no-cache"], env={**os.environ, **CA}, stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and the
        # ignore is inherited across exec: this is how the interrupt used to be lost.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        events = engine.api.events(since=int(started) - 1, until=int(started) + 600, decode=True,
                                   filters={"type": "container", "event": "start"})
        # The first step container started after this build began (an earlier test's events
        # fall in the same second).
        ours = (event for event in events if event["timeNano"] >= started * 1e9)
        assert next(ours, None) is not None, "the build never started a step"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        return process.returncode, stderr
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_build_leaves_no_tag(engine, stack, signum):
    expected = content_tag(engine, stack, "cpu")
    code, stderr = interrupt_a_running_build(engine, stack, signum)
    assert code == 128 + signum, stderr
    assert f"interrupted ({signal.Signals(signum).name}): nothing was tagged" in stderr
    assert "Traceback" not in stderr
    assert engine.image_id(expected) is None


class InterruptedAtSecondTag(Engine):
    """The real engine; Ctrl-C arrives between the first and the second tag call."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.client)
        self.calls = 0

    def tag(self, image_id: str, ref: str) -> None:
        self.calls += 1
        if self.calls == 2:
            raise Interrupted(signal.SIGINT)
        super().tag(image_id, ref)


def test_interrupt_between_tag_calls_tags_nothing(engine, tiny_images):
    _, results = tiny_images
    cpu, gpu = results["cpu"].image_id, results["gpu"].image_id
    refs = ["devbox-test/rollback:content", "devbox-test/rollback:cpu",
            "devbox-test/rollback:2026.11-cpu"]
    engine.tag(gpu, refs[1])  # an older image already holds the human tag
    try:
        with pytest.raises(Interrupted):
            apply_tags(InterruptedAtSecondTag(engine), cpu, refs)
        assert engine.image_id(refs[0]) is None  # the tag applied first was taken back
        assert engine.image_id(refs[1]) == gpu  # the moved tag points where it did
        assert engine.image_id(refs[2]) is None
        apply_tags(engine, cpu, refs)  # and uninterrupted, all of them
        assert {engine.image_id(ref) for ref in refs} == {cpu}
    finally:
        for ref in refs:
            engine.untag(ref)


@pytest.mark.skipif(not HOST_CA_CERTS, reason="this host has no extra CA: no TLS interception "
                    "to fail on")
def test_certificate_failure_names_the_ca_option(engine, stack):
    # --no-host-ca on a TLS-intercepting network: pip cannot verify the index.
    result = cli("build", str(stack), "--variant", "cpu", "--no-host-ca", "--no-cache",
                 unset=("DEVBOX_CA_CERTS",))
    assert_clean_error(result, "failed in layer 'pip'", "on their own", "--ca-cert", "DEVBOX_CA_CERTS")
    assert result.returncode == 5
    assert "CA certificates: 0 from none (--no-host-ca)" in result.stderr


def remove_repository(engine: Engine, stack: Path) -> None:
    """Every image of the stack's repository, by id: an earlier run's too, whatever its content
    tag (its layers are the same bytes, so it would hold the chains a test wants new)."""
    for image in engine.api.images(name=repository(load(stack), None)):
        engine.remove_image(image["Id"])


def content_tag(engine: Engine, stack: Path, variant: str) -> str:
    spec = load(stack)
    context = render(spec, variant, ca_certificates=HOST_CA_CERTS)
    base = engine.image_id(spec.variants[variant].base)
    return f"{repository(spec, None)}:{variant}-{content_digest(context, base, options())[:12]}"


def test_a_cpu_and_gpu_project_locks_and_builds_cpu_without_the_gpu_team_image(
        engine, tiny_images, tmp_path):
    """A project on a cpu+gpu team image opens its CPU dev container (`lock`, then `build
    --variant cpu`) with only the team's CPU image in the engine, once its locks record the
    team's pins. The first lock needs both, and says so on the key the project wrote."""
    _, results = tiny_images
    team = f"devbox-test/team-{os.getpid()}"
    for variant, result in results.items():
        engine.tag(result.image_id, f"{team}:{variant}")
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.in").write_text("iniconfig\n")
    (project / "image.toml").write_text(
        f'name = "project"\nrepository = "devbox-test/project-{os.getpid()}"\n'
        f'extends = "{team}"\n[pip]\nrequirements = ["requirements.in"]\n'
        "[variants.cpu]\n[variants.gpu]\n")
    try:
        assert cli("lock", str(project)).returncode == 0
        engine.remove_image(f"{team}:gpu")  # the GPU team image is not on this laptop
        again = cli("lock", str(project))
        assert again.returncode == 0, again.stderr
        assert f"{team}:gpu not in this engine: keeping the team's pins" in again.stderr
        built = cli("build", str(project), "--variant", "cpu", env=CA)
        assert built.returncode == 0, built.stderr[-3000:]
        (project / "locks" / "team-constraints.txt").unlink()
        first = cli("lock", str(project))
        assert_clean_error(first, "key 'extends'", f"{team}:gpu", "variant gpu")
        assert first.returncode == 2
    finally:
        for variant in ("cpu", "gpu"):
            engine.remove_image(f"{team}:{variant}")
        if project_image := engine.image_id(f"devbox-test/project-{os.getpid()}:cpu"):
            engine.remove_image(project_image)
