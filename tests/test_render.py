"""The rendered Dockerfile: layer order, per-layer inputs, classic-builder syntax, hygiene."""

from __future__ import annotations

import re

import pytest

from devbox_build import locking, settings
from devbox_build.errors import DevboxError, InputError, SpecError
from devbox_build.render import render

from .conftest import HOST_CA_CERTS, ROOT, TINY, assert_clean_error, cli, load

LAYER_ORDER = ["os", "system", "conda", "pip", "variant", "dev", "final"]


def layers_in(dockerfile: str) -> list[str]:
    return re.findall(r"^# ---- layer: (\w+)", dockerfile, re.M)


def test_layer_order_and_the_accelerator_boundary():
    spec = load(TINY)
    cpu, gpu = render(spec, "cpu"), render(spec, "gpu")
    assert layers_in(cpu.dockerfile) == ["os", "pip", "dev", "final"]
    assert layers_in(gpu.dockerfile) == ["os", "pip", "variant", "dev", "final"]
    for context in (cpu, gpu):
        order = [LAYER_ORDER.index(layer) for layer in layers_in(context.dockerfile)]
        assert order == sorted(order)
    # Everything before the accelerator layer is the same text in both variants.
    boundary = gpu.dockerfile.index("# ---- layer: variant")
    assert cpu.dockerfile.startswith(gpu.dockerfile[:boundary].replace("'gpu'", "'cpu'")
                                     .replace("--variant gpu", "--variant cpu"))
    assert "NVIDIA_VISIBLE_DEVICES=all" in gpu.dockerfile[boundary:]
    assert "NVIDIA" not in cpu.dockerfile


WRITTEN = re.compile(r"printf '%s\\n' \\\n(.*?)\s+> /opt/devbox/requirements/(\S+)\.txt", re.S)


def written_requirements(dockerfile: str) -> dict[str, list[str]]:
    """Each pip step's requirements file, as the step writes it: name → lines."""
    return {name: re.findall(r"'([^']+)'", text) for text, name in WRITTEN.findall(dockerfile)}


def test_each_install_step_carries_only_its_own_pins():
    context = render(load(TINY), "gpu")
    assert re.findall(r"^COPY (\S+) ", context.dockerfile, re.M) == ["final/"]
    written = written_requirements(context.dockerfile)
    # The tiny stack's locks are small: one group each; each holds what its lock adds.
    assert {name: [line.split("==")[0] for line in lines] for name, lines in written.items()} == {
        "pip-01": ["idna", "markupsafe", "six"], "pip-gpu-01": ["nvidia-cuda-runtime-cu12"],
        "dev-gpu-01": ["iniconfig"]}
    # Only the hashes of the files this platform installs (the lock holds every platform's).
    lock = locking.read_pins(TINY / "locks" / "linux-amd64" / "pip.txt")
    for line in written["pip-01"]:
        pin = lock[line.split("==")[0]]
        assert line.split()[1:] == [f"--hash={digest}" for digest in pin.wheel_hashes]
        assert all(digest in pin.text for digest in pin.wheel_hashes)


def test_installs_from_hashes_without_solving_and_leaves_no_caches():
    dockerfile = render(load(TINY), "cpu").dockerfile
    installs = re.findall(r"pip install .*", dockerfile)
    assert installs and all("--require-hashes" in i and "--no-deps" in i for i in installs)
    assert all("--no-cache-dir" in i for i in installs)
    assert dockerfile.count("find /var/lib/apt/lists -mindepth 1") == dockerfile.count("apt-get update")


def test_classic_builder_syntax_only():
    for variant in ("cpu", "gpu"):
        dockerfile = render(load(TINY), variant).dockerfile
        assert "--mount" not in dockerfile and "--chmod" not in dockerfile
        assert "<<" not in dockerfile and "# syntax=" not in dockerfile


def test_proxies_are_never_declared():
    dockerfile = render(load(TINY), "cpu").dockerfile
    assert not re.search(r"^(ARG|ENV)\s+.*proxy", dockerfile, re.M | re.I)


@pytest.mark.skipif(not HOST_CA_CERTS, reason="this machine has no extra CA certificates")
def test_ca_certificates_are_installed_before_any_download():
    context = render(load(TINY), "cpu", ca_certificates=HOST_CA_CERTS)
    dockerfile = context.dockerfile
    assert dockerfile.index("COPY ca/ /") < dockerfile.index("apt-get update")
    assert len([p for p in context.files
                if p.startswith("ca/usr/local/share/ca-certificates/devbox/")]) == len(HOST_CA_CERTS)
    for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"):
        assert f"{variable}=/etc/ssl/certs/ca-certificates.crt" in dockerfile


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path):
    bogus = tmp_path / "corp.crt"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="is not a PEM certificate"):
        render(load(TINY), "cpu", ca_certificates=[str(bogus)])


def test_content_digest_is_stable_and_sensitive():
    spec = load(TINY)
    first, second = render(spec, "cpu"), render(spec, "cpu")
    assert first.digest("sha256:base") == second.digest("sha256:base")
    assert first.tar().read() == second.tar().read()
    assert first.digest("sha256:base") != first.digest("sha256:other-base")
    assert first.digest("sha256:base") != render(spec, "gpu").digest("sha256:base")


def test_step_layers_follow_the_markers():
    context = render(load(TINY), "gpu")
    steps = context.step_layers()
    assert steps[0] == "os" and steps[-1] == "final"
    assert steps.count("variant") == 2  # ENV NVIDIA_*, RUN
    assert len(steps) == len([l for l in context.dockerfile.splitlines()
                              if re.match(r"^[A-Z]+ ", l)])


def test_unknown_variant_and_missing_lock_are_clear(stack):
    with pytest.raises(DevboxError, match="no variant 'tpu'"):
        render(load(stack), "tpu")
    (stack / "locks" / "linux-amd64" / "pip.txt").unlink()
    with pytest.raises(DevboxError, match="missing lock .*pip.txt"):
        render(load(stack), "cpu")


def test_render_cli_prints_the_dockerfile():
    result = cli("render", str(TINY), "--variant", "gpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Rendered by devbox-build")
    # The spec's base, which a build for another platform replaces with its twin there.
    assert "ARG DEVBOX_BASE=debian:bookworm-slim\nFROM ${DEVBOX_BASE}\n" in result.stdout


# -- no value from a spec changes the Dockerfile's structure -----------------------------------

ALLOWED_INSTRUCTIONS = {"FROM", "ARG", "ENV", "COPY", "RUN", "LABEL", "USER", "WORKDIR", "EXPOSE",
                        "ENTRYPOINT", "HEALTHCHECK", "CMD"}
COMMITTED_SPECS = sorted([*ROOT.glob("images/*/image.toml"), TINY / "image.toml"])


def docker_word(word: str) -> str:
    """A word as Docker reads it: double quotes removed, \\" \\\\ \\$ unescaped (its rules)."""
    if not (len(word) >= 2 and word[0] == word[-1] == '"'):
        return word
    out, chars = [], iter(word[1:-1])
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            out.append(following if following in '"\\$' else char + following)
        else:
            out.append(char)
    return "".join(out)


def pairs(commands, kind: str) -> dict[str, str]:
    """Every KEY=VALUE an instruction kind sets, as Docker reads it (later wins)."""
    found = {}
    for command in commands:
        if command.cmd == kind:
            values = list(command.value)
            for key, value in zip(values[::2], values[1::2]):
                found[docker_word(key)] = docker_word(value)
    return found


def expected_runs(spec, context) -> int:
    """The RUN steps a variant has: os (or the extends check), system, one per install step
    (plus the conda installer), finalize."""
    installs = [line for line in context.dockerfile.splitlines()
                if re.match(r"# ---- layer: (conda|pip|variant|dev) ", line)]
    conda_installer = 1 if spec.conda else 0
    return 1 + (1 if spec.system.packages else 0) + len(installs) + conda_installer + 1


@pytest.mark.parametrize("spec_path", COMMITTED_SPECS, ids=lambda p: p.parent.name)
def test_every_committed_spec_renders_exactly_the_expected_instructions(spec_path):
    import dockerfile

    spec = load(spec_path.parent)
    for variant, variant_spec in spec.variants.items():
        context = render(spec, variant, ca_certificates=HOST_CA_CERTS)
        commands = dockerfile.parse_string(context.dockerfile)
        kinds = [c.cmd for c in commands]
        assert set(kinds) <= ALLOWED_INSTRUCTIONS, set(kinds) - ALLOWED_INSTRUCTIONS
        assert kinds[:2] == ["ARG", "FROM"] and kinds.count("FROM") == 1
        assert commands[0].value == (f"DEVBOX_BASE={variant_spec.base}",)
        assert commands[1].value == ("${DEVBOX_BASE}",)
        assert kinds.count("RUN") == expected_runs(spec, context), variant
        env = pairs(commands, "ENV")
        assert {key: env[key] for key in spec.env} == spec.env
        labels = pairs(commands, "LABEL")
        assert labels["devbox.variant"] == variant and labels["devbox.spec"] == spec.name
        assert {key: labels[key] for key in spec.labels} == spec.labels
        assert [docker_word(c.value[0]) for c in commands if c.cmd == "USER"][-1] == spec.user.name
        assert [c.value for c in commands if c.cmd == "CMD"] == [tuple(spec.command)]
        assert [c.value for c in commands if c.cmd == "ENTRYPOINT"] == [
            ("/opt/devbox/bin/devbox-entrypoint",)]


def test_hostile_but_valid_values_come_back_exactly():
    import dockerfile

    value = 'a "quoted" $HOME ${X} \\ back\\slash # not a comment \\n \' single'
    spec = load(TINY)
    spec = spec.model_copy(update={"env": {"TRICKY": value},
                                   "labels": {"org.example.note": value},
                                   "description": value})
    commands = dockerfile.parse_string(render(spec, "cpu").dockerfile)
    assert pairs(commands, "ENV")["TRICKY"] == value
    assert pairs(commands, "LABEL")["org.example.note"] == value
    assert pairs(commands, "LABEL")["org.opencontainers.image.description"] == value
    assert [c.cmd for c in commands].count("RUN") == expected_runs(spec, render(spec, "cpu"))


@pytest.mark.parametrize("field, update", [
    ("env", {"env": {"A": "x\nRUN touch /pwned"}}),
    ("labels", {"labels": {"a": "x\nRUN touch /pwned"}}),
    ("user", {"user": {"name": "x\nRUN touch /pwned"}}),
])
def test_a_value_that_bypassed_validation_stops_the_render(field, update):
    spec = load(TINY)
    if field == "user":
        update = {"user": spec.user.model_copy(update=update["user"])}
    with pytest.raises(ValueError, match="control character"):
        render(spec.model_copy(update=update), "cpu")


# -- CUDA: labels say what the locks install ---------------------------------------------------


def labels_of(context) -> dict[str, str]:
    import dockerfile

    return pairs(dockerfile.parse_string(context.dockerfile), "LABEL")


def test_cuda_labels_come_from_the_installed_runtime():
    tiny = labels_of(render(load(TINY), "gpu"))
    assert tiny["devbox.cuda.version"] == "12.9"
    assert tiny["devbox.cuda.runtime"] == "nvidia-cuda-runtime-cu12 12.9.79"
    default = load(ROOT / "images" / "datascience")
    assert default.variants["gpu"].cuda.version is None  # nothing hand-written
    pins = locking.read_pins(locking.stack(default, "gpu", "linux/amd64")[-1].path(default))
    runtime = pins["nvidia-cuda-runtime"].version
    labels = labels_of(render(default, "gpu"))
    assert labels["devbox.cuda.version"] == ".".join(runtime.split(".")[:2])
    assert labels["devbox.cuda.runtime"] == f"nvidia-cuda-runtime {runtime}"
    assert labels["devbox.cuda.min-driver"] == "580.65.06"  # NVIDIA's floor for CUDA 13


@pytest.mark.parametrize("cuda, needle", [
    ('{ version = "13.0", min_driver = "580.65.06" }',
     "says 13.0, but the locks install the CUDA 12.9 runtime"),
    ('{ min_driver = "470.57.02" }', "470.57.02 is below 525.60.13"),
])
def test_cuda_declarations_that_disagree_with_the_locks_are_refused(stack_copy, cuda, needle):
    spec_file = stack_copy / "image.toml"
    spec_file.write_text(spec_file.read_text().replace(
        'cuda = { version = "12.9", min_driver = "525.60.13" }', f"cuda = {cuda}"))
    with pytest.raises(SpecError, match="key 'variants.gpu.cuda") as raised:
        render(load(stack_copy), "gpu")
    assert needle in str(raised.value)


@pytest.fixture
def stack_copy(tmp_path):
    import shutil

    shutil.copytree(TINY, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_the_assembled_build_splits_the_chain_around_the_pip_groups():
    """build installs the first run of pip groups on its own: the head Dockerfile is the chain
    up to them, the tail the chain after them, FROM the image they were assembled onto (the GPU
    tail sets the CUDA environment the chain sets at its first GPU-only group)."""
    from devbox_build.render import HEAD_DOCKERFILE, TAIL_DOCKERFILE

    for variant in ("cpu", "gpu"):
        context = render(load(TINY), variant)
        chain, head, tail = (context.files[name].decode()
                             for name in ("Dockerfile", HEAD_DOCKERFILE, TAIL_DOCKERFILE))
        steps = [step.name for step in context.assembled_steps]
        assert steps == [step.name for step in context.install_steps if step.kind == "pip"]
        assert head == chain[:chain.index("\n\n# ---- layer: pip (")] + "\n"
        assert "--require-hashes" not in head and "--require-hashes" not in tail
        assert tail.count("FROM ") == 1 and "ARG DEVBOX_ASSEMBLED\nFROM ${DEVBOX_ASSEMBLED}\n" in tail
        assert chain.endswith(tail[tail.index("\n# ---- layer: final"):])
        assert ("NVIDIA_VISIBLE_DEVICES=all" in tail) == (variant == "gpu")


def test_a_layer_archive_streams_as_a_tar(tmp_path):
    import io
    import tarfile

    from devbox_build.assemble import _archive

    layer = tmp_path / "layer.tar"
    layer.write_bytes(b"x" * 1000)
    stream = b"".join(_archive([("manifest.json", b"[]"), ("g/layer.tar", layer)]))
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        assert [(m.name, m.size) for m in archive.getmembers()] == [
            ("manifest.json", 2), ("g/layer.tar", 1000)]
        assert archive.extractfile("g/layer.tar").read() == b"x" * 1000


def test_the_layer_cache_keeps_the_build_s_own_and_the_recently_used(tmp_path, monkeypatch):
    import os
    import time

    from devbox_build.assemble import LayerCache
    from devbox_build.render import InstallStep

    cache = LayerCache(tmp_path)
    step = InstallStep(kind="pip", layer="pip", name="pip-01", lock="locks/pip.txt", count=1,
                       title="")
    for age, key in enumerate(["new", "middle", "old", "ancient-but-ours"]):
        partial = tmp_path / f"{key}.partial"
        partial.write_bytes(b"x" * 400_000)
        cache.put(step, key, partial, "0" * 64)
        used = time.time() - age * 1000  # minutes ago: none is past UNUSED_DAYS
        os.utime(tmp_path / f"{key}.json", (used, used))
    assert cache.get(step, "new").diff_id == "sha256:" + "0" * 64
    monkeypatch.setenv("DEVBOX_LAYER_CACHE_MB", "1")  # room for two
    cache.prune(keep={"ancient-but-ours"})
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "ancient-but-ours.json", "ancient-but-ours.tar", "new.json", "new.tar"]


def test_a_layer_cache_budget_that_is_not_a_number_is_refused(monkeypatch):
    from devbox_build.assemble import cache_budget

    for text in ("16GB", "²", "١٦"):  # str.isdigit() says yes to the last two
        monkeypatch.setenv("DEVBOX_LAYER_CACHE_MB", text)
        with pytest.raises(InputError, match=f"DEVBOX_LAYER_CACHE_MB: '{text}' is not a whole"):
            cache_budget()


def test_the_builder_keeps_its_trees_in_memory_only_when_the_engine_has_room(monkeypatch):
    """At most two trees exist at a time: `auto` takes a tmpfs (half the engine's memory, a
    limit, not an allocation) when the largest two neighbours, at TREE_PER_WHEEL_BYTE, fit in a
    quarter of it; never for a group built from an sdist; `on` and `off` decide alone."""
    from devbox_build.assemble import TREE_PER_WHEEL_BYTE, trees_in_memory
    from devbox_build.render import InstallStep

    def steps(*megabytes: int, sdist: bool = False) -> list[InstallStep]:
        return [InstallStep(kind="pip", layer="pip", name=f"pip-{i:02d}", lock="locks/pip.txt",
                            count=1, title="", wheel_bytes=size * 10**6,
                            from_source=("pkg",) if sdist and i == 0 else ())
                for i, size in enumerate(megabytes)]

    gib = 2**30
    cpu = steps(50, 35, 50, 59, 51, 23, 12, 6, 1)  # the default CPU stack's groups, MB of wheels
    gpu = steps(900, 700, 600, 50, 35)  # torch and the CUDA wheels first
    peak = (59 + 51) * 10**6 * TREE_PER_WHEEL_BYTE
    assert trees_in_memory(cpu, 8 * gib, "auto") == 4 * gib  # a laptop's 8 GB VM
    assert trees_in_memory(cpu, 4 * peak - 1, "auto") == 0
    assert trees_in_memory(cpu, 4 * peak, "auto") == 2 * peak
    assert trees_in_memory(gpu, 8 * gib, "auto") == 0
    assert trees_in_memory(gpu, 64 * gib, "auto") == 32 * gib
    assert trees_in_memory(steps(1, 1, sdist=True), 64 * gib, "auto") == 0
    assert trees_in_memory(gpu, 8 * gib, "on") == 4 * gib
    assert trees_in_memory(cpu, 64 * gib, "off") == 0
    assert trees_in_memory(cpu, 0, "auto") == 0  # an engine that does not say
    monkeypatch.setenv("DEVBOX_BUILDER_TMPFS", "maybe")
    with pytest.raises(InputError, match="DEVBOX_BUILDER_TMPFS: 'maybe' is not auto, on or off"):
        settings.value("DEVBOX_BUILDER_TMPFS")


def test_a_cached_layer_cut_short_or_changed_is_evicted_and_old_partials_pruned(tmp_path):
    import hashlib
    import os
    import time

    from devbox_build.assemble import PARTIAL_SECONDS, LayerCache
    from devbox_build.render import InstallStep

    from .test_build import RecordingProgress

    recorder = RecordingProgress()
    notes = recorder.lines
    cache = LayerCache(tmp_path, reporter=recorder)
    step = InstallStep(kind="pip", layer="pip", name="pip-01", lock="locks/pip.txt", count=1,
                       title="")
    data = b"layer bytes" * 1000
    for key in ("short", "changed", "good"):
        partial = tmp_path / f"{key}.partial"
        partial.write_bytes(data)
        cache.put(step, key, partial, hashlib.sha256(data).hexdigest())
    (tmp_path / "short.tar").write_bytes(data[:100])
    assert cache.get(step, "short") is None and not (tmp_path / "short.json").exists()
    assert "is 100 bytes, not the 11000 it was written with (cut short)" in notes[-1]
    (tmp_path / "changed.tar").write_bytes(data.replace(b"layer", b"LAYER"))
    changed = cache.get(step, "changed")
    assert changed is not None and cache.damaged(changed)
    assert not (tmp_path / "changed.tar").exists() and "changed on disk" in notes[-1]
    assert not cache.damaged(cache.get(step, "good"))
    old, fresh = tmp_path / "x.123.partial", tmp_path / "y.456.json-partial"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - PARTIAL_SECONDS - 5,) * 2)
    cache.prune(keep=set())
    assert not old.exists() and fresh.exists()


def test_every_devbox_setting_is_read_in_one_place(tmp_path):
    """A DEVBOX_* variable nobody reads is named with the closest real name; the image's own
    variables are not; a bad value is one error naming it, before any work."""
    from devbox_build import settings

    assert settings.check({"DEVBOX_IDLE_TIMEOUT": "2h", "DEVBOX_DOTFILES": "x",
                           "DEVBOX_NETWORK": "host", "PATH": "/bin"}) == []
    assert settings.check({"DEVBOX_LAYER_CACHE_MBS": "3"}) == [
        "DEVBOX_LAYER_CACHE_MBS is not a setting of devbox-build or its images; it is ignored "
        "(did you mean DEVBOX_LAYER_CACHE_MB?)"]
    with pytest.raises(InputError, match="DEVBOX_MECHANISM: 'fast' is not assembled or chain"):
        settings.check({"DEVBOX_MECHANISM": "fast"})

    result = cli("render", str(TINY), "--variant", "cpu", env={"DEVBOX_NETWORKS": "host"})
    assert result.returncode == 0, result.stderr
    assert "warning: DEVBOX_NETWORKS is not a setting" in result.stderr
    assert "did you mean DEVBOX_NETWORK?" in result.stderr
    for variable, text in (("DEVBOX_NO_HOST_CA", "maybe"), ("DEVBOX_LAYER_CACHE_MB", "²")):
        result = cli("render", str(TINY), "--variant", "cpu", env={variable: text})
        assert_clean_error(result, f"{variable}: {text!r}")
        assert result.returncode == 2
    # An option's default comes from its setting; the flag still wins.
    result = cli("render", str(TINY), "--variant", "cpu", env={"DEVBOX_CA_CERTS": "/nowhere.crt"})
    assert_clean_error(result, "/nowhere.crt")


def test_the_groups_install_on_the_os_layer_only_when_nothing_they_build_needs_the_rest(stack):
    """builder_step: the os layer's last head step when the head's other steps are the system
    layer alone and every group installs wheels; else 0 (the whole head's image)."""
    from dataclasses import replace

    from devbox_build.assemble import builder_step
    from devbox_build.render import HEAD_DOCKERFILE

    assert builder_step(render(load(stack), "cpu")) == 0  # no system layer: nothing to overlap
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text() + '\n[system]\npackages = ["tree"]\n')
    context = render(load(stack), "cpu")
    layers = context.step_layers(HEAD_DOCKERFILE)
    assert builder_step(context) == layers.index("system")  # the os layer's last step, 1-based
    assert all(not step.from_source for step in context.assembled_steps)
    # A group with a package built from its sdist may need a system package (a compiler).
    first = context.assembled_steps[0]
    context.install_steps = [replace(step, from_source=("markupsafe",)) if step is first else step
                             for step in context.install_steps]
    assert builder_step(context) == 0
    # What the lock records for this platform decides it: an sdist where no wheel fits.
    lock = stack / "locks" / "linux-amd64" / "pip.txt"
    lock.write_text(re.sub(r"(# wheel: \d+ markupsafe-3\.0\.4)-\S+\.whl", r"\1.tar.gz",
                           lock.read_text()))
    context = render(load(stack), "cpu")
    assert [step.from_source for step in context.assembled_steps
            if step.from_source] == [("markupsafe",)]
    assert builder_step(context) == 0
