"""The conda layer: environment.yml → conda-lock.yml (py-rattler) → installed exactly, hashes checked.

No public channel is reachable here, so the tests serve their own (tests/support/conda_channel.py)
on loopback over http; builds use `--network host` to reach it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import rattler

from devbox_build import channels, conda
from devbox_build.build import BuildOptions, build
from devbox_build.errors import DevboxError, InputError, LockError
from devbox_build.render import render

from .conftest import HOST_CA_CERTS, assert_clean_error, cli, load
from .test_build import filesystem_layers, layer_index

SUBDIRS = {"linux-64", "linux-aarch64"}


def environment(url: str, *specs: str, pip: list[str] = ()) -> str:
    lines = ["channels:", f"  - {url}", "dependencies:", *[f"  - {s}" for s in specs]]
    if pip:
        lines += ["  - pip:", *[f"    - {p}" for p in pip]]
    return "\n".join(lines) + "\n"


@pytest.fixture
def conda_stack(stack: Path, channel) -> Path:
    """The tiny stack with a conda environment (greeter, ca-certificates; pip: packaging), an apt
    package, and a GPU variant adding a conda package of its own."""
    (stack / "environment.yml").write_text(
        environment(channel.url, "greeter >=2", "ca-certificates", pip=["packaging"]))
    (stack / "environment-gpu.yml").write_text(environment(channel.url, "farewell"))
    spec = (stack / "image.toml").read_text()
    spec = spec.replace("[variants.gpu]", '[system]\npackages = ["less"]\n\n[conda]\n'
                        'environment = "environment.yml"\n\n[variants.gpu]\n'
                        'conda = ["environment-gpu.yml"]')
    (stack / "image.toml").write_text(spec)
    return stack


def lock(stack: Path) -> None:
    result = cli("lock", str(stack))
    assert result.returncode == 0, result.stderr


def conda_build(engine, stack: Path, variants=("cpu", "gpu")):
    options = BuildOptions(ca_certificates=HOST_CA_CERTS, network_mode="host")
    return {r.variant: r for r in build(load(stack), list(variants), engine, options)}


def test_lock_covers_both_platforms_and_is_deterministic(conda_stack):
    lock(conda_stack)
    path = conda_stack / "locks" / "conda-lock.yml"
    first = path.read_bytes()
    lockfile = conda.read_lock(path)  # conda-lock's own model reads it
    assert set(lockfile.metadata.platforms) == SUBDIRS
    for subdir in SUBDIRS:
        names = {p.name for p in lockfile.package if p.platform == subdir}
        assert names == {"greeter", "greeting-data", "ca-certificates"}, (subdir, names)
        assert all(p.hash.sha256 for p in lockfile.package)
    # py-rattler reads the same file (it is what the image's installer uses).
    assert {str(p.name) for p in rattler.LockFile.from_path(path).default_environment()
            .platforms()} == SUBDIRS
    result = cli("lock", str(conda_stack), "--upgrade")  # re-solve everything
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == first
    # The GPU lock adds its package and keeps every shared pin.
    gpu = conda.read_lock(conda_stack / "locks" / "conda-lock-gpu.yml")
    assert {p.name for p in gpu.package} == {"greeter", "greeting-data", "ca-certificates",
                                               "farewell"}
    # The environment's pip: section went to the pip layer's lock.
    assert "packaging==" in (conda_stack / "locks/linux-amd64/pip.txt").read_text()


def test_changed_environment_makes_the_lock_stale(conda_stack, channel):
    lock(conda_stack)
    assert cli("lock", str(conda_stack), "--check").returncode == 0
    (conda_stack / "environment.yml").write_text(
        environment(channel.url, "greeter >=2", "farewell", "ca-certificates", pip=["packaging"]))
    result = cli("lock", str(conda_stack), "--check")
    assert result.returncode == 3 and "conda-lock.yml: stale" in result.stderr, result.stderr


RELEASE_URL = "https://conda.anaconda.org/conda-forge/noarch"


def like_a_release(conda_stack: Path) -> Path:
    """A release `smd:9.9.9` beside the conda stack, which its GPU variant locks through the
    conda layer (`conda_like`): farewell at 0.2 where the channel's newest is 0.3, greeter at
    2.0 where the shared layer takes 2.1. The release's folder."""
    release = conda_stack / "like" / "smd-9.9.9"
    release.mkdir(parents=True)
    (release / "gpu.env.in").write_text("conda-forge::farewell[version='>=0.2,<1']\n"
                                        "conda-forge::greeter\n")
    (release / "gpu.env.out").write_text("@EXPLICIT\n" + "".join(
        f"{RELEASE_URL}/{name}-0.tar.bz2#00\n"
        for name in ("farewell-0.2", "greeter-2.0", "greeting-data-1.0")))
    (release / "cpu.env.in").write_text("")
    (release / "cpu.env.out").write_text("@EXPLICIT\n")
    spec = conda_stack / "image.toml"
    spec.write_text(spec.read_text()
                    .replace('python = "3.11"\n', 'python = "3.11"\nlike = "smd:9.9.9"\n')
                    .replace('conda = ["environment-gpu.yml"]',
                             'conda = ["environment-gpu.yml"]\nconda_like = true'))
    return release


def test_a_variant_locks_the_release_it_is_like_through_its_conda_layer(conda_stack):
    """`conda_like`: the GPU variant's conda lock solves the release's gpu.env.in (its
    `conda-forge::` dropped: the spec's channels serve it, as a mirror would) with the release's
    env.out packages preferred: farewell at the release's 0.2, not the channel's newest 0.3. The
    shared lock keeps its pins (greeter 2.1, where the release has 2.0), and `lock` says so. The
    release's files are inputs: editing one makes the lock stale."""
    release = like_a_release(conda_stack)
    spec = conda_stack / "image.toml"
    result = cli("lock", str(conda_stack))
    assert result.returncode == 0, result.stderr

    def versions(name: str) -> dict[str, str]:
        lockfile = conda.read_lock(conda_stack / "locks" / f"{name}.yml")
        return {p.name: p.version for p in lockfile.package if p.platform == "linux-64"}

    assert versions("conda-lock-gpu")["farewell"] == "0.2"
    assert versions("conda-lock")["greeter"] == "2.1"  # the shared layer's solve decides
    assert "conda-lock-gpu.yml: 2 of 3 packages it shares with smd:9.9.9 at its version" in (
        result.stdout + result.stderr)
    assert "off: greeter 2.1 (smd:9.9.9: 2.0)" in result.stdout + result.stderr
    assert cli("lock", str(conda_stack), "--check").returncode == 0
    with (release / "gpu.env.out").open("a") as out:
        out.write(f"{RELEASE_URL}/ca-certificates-2026.1-0.tar.bz2#00\n")
    stale = cli("lock", str(conda_stack), "--check")
    assert stale.returncode == 3 and "conda-lock-gpu.yml: stale" in stale.stderr, stale.stderr
    # Without conda_like, the same environments take the channel's newest.
    spec.write_text(spec.read_text().replace("conda_like = true", ""))
    assert cli("lock", str(conda_stack)).returncode == 0
    assert versions("conda-lock-gpu")["farewell"] == "0.3"


@pytest.mark.engine
def test_a_variant_locked_like_the_release_installs_the_releases_versions(engine, conda_stack):
    like_a_release(conda_stack)
    lock(conda_stack)
    gpu = conda_build(engine, conda_stack, ["gpu"])["gpu"].content_tag
    code, out = engine.run(gpu, ["bash", "-lc", "farewell && greet"])
    assert code == 0 and "bye from conda" in out and "goodbye" not in out, out  # farewell 0.2
    manifest = json.loads(engine.read_file(gpu, "/opt/devbox/manifest.json"))
    installed = {p["name"]: p["version"] for p in manifest["packages"]["conda"]}
    assert (installed["farewell"], installed["greeter"]) == ("0.2", "2.1")


def test_conda_like_without_a_release_or_conda_is_one_clear_error(stack):
    spec = stack / "image.toml"
    spec.write_text(spec.read_text().replace("[variants.gpu]", "[variants.gpu]\nconda_like = true"))
    assert_clean_error(cli("lock", str(stack)), "variants.gpu.conda_like", "`like`")


def test_channel_credentials_never_enter_the_lock(conda_stack, channel):
    # A channel URL with user:password (the loopback channel ignores them): the solve uses it,
    # the committed lock keeps the bare URL.
    secret_url = channel.url.replace("http://", "http://alice:s3cr3t-pass@")
    (conda_stack / "environment.yml").write_text(
        environment(secret_url, "greeter >=2", "ca-certificates", pip=["packaging"]))
    lock(conda_stack)
    text = (conda_stack / "locks" / "conda-lock.yml").read_text()
    assert "s3cr3t-pass" not in text and "alice" not in text
    assert channel.url.rstrip("/") in text


def test_a_hand_edited_conda_lock_is_refused_as_that_file(conda_stack):
    lock(conda_stack)
    path = conda_stack / "locks" / "conda-lock.yml"
    # Drop one package entry, as a bad merge would: the file still parses.
    text = path.read_text()
    start = text.index("- name: farewell") if "- name: farewell" in text else text.index(
        "- name: greeter")
    end = text.index("- name:", start + 1)
    path.write_text(text[:start] + text[end:])
    result = cli("lock", str(conda_stack), "--check")
    assert_clean_error(result, "conda-lock.yml: edited")
    assert result.returncode == 3
    assert cli("lock", str(conda_stack)).returncode == 0  # relocking repairs it
    assert cli("lock", str(conda_stack), "--check").returncode == 0


def test_unknown_channel_is_one_clear_error(conda_stack, channel):
    missing = channel.url + "no-such-channel/"
    (conda_stack / "environment.yml").write_text(environment(missing, "greeter"))
    assert_clean_error(cli("lock", str(conda_stack)), "could not lock conda-lock",
                       "environment.yml", "no-such-channel")
    assert not (conda_stack / "locks" / "conda-lock.yml").exists()


def test_unsatisfiable_spec_is_one_clear_error(conda_stack, channel):
    (conda_stack / "environment.yml").write_text(environment(channel.url, "greeter >=9"))
    assert_clean_error(cli("lock", str(conda_stack)), "could not lock conda-lock",
                       "greeter >=9")


@pytest.mark.engine
def test_build_installs_exactly_the_lock(engine, conda_stack):
    lock(conda_stack)
    results = conda_build(engine, conda_stack)
    spec = load(conda_stack)
    for variant, result in results.items():
        item = conda.stack(spec, variant)[-1]
        locked = {(p.name, p.version, p.build)
                  for p in conda.locked_packages(spec, item, "linux-64")}
        manifest = json.loads(engine.read_file(result.content_tag, "/opt/devbox/manifest.json"))
        installed = {(p["name"], p["version"], p["build"]) for p in manifest["packages"]["conda"]}
        assert installed == locked, variant
        assert all(p["channel"] for p in manifest["packages"]["conda"])
    cpu, gpu = results["cpu"].content_tag, results["gpu"].content_tag
    code, out = engine.run(cpu, ["greet"])  # a script from a conda package, on PATH
    assert (code, out.strip()) == (0, "hello from conda"), out
    code, out = engine.run(gpu, ["bash", "-lc", "farewell && greet"])  # login shells too
    assert code == 0 and "goodbye from conda" in out and "hello from conda" in out, out
    code, out = engine.run(cpu, ["python", "-c", "import packaging; print('pip section ok')"])
    assert code == 0 and "pip section ok" in out, out
    # The SBOM of a conda + pip image: valid, and exactly what the three databases hold (the
    # drift check reads conda-meta, dpkg and the environment's own metadata).
    from .test_sbom import schema_problems

    sbom = engine.read_file(cpu, "/opt/devbox/sbom.cdx.json").decode()
    assert schema_problems(sbom) == []
    assert any(c["purl"].startswith("pkg:conda/") for c in json.loads(sbom)["components"])
    check = cli("check", cpu, "--profile", "drift")
    assert check.returncode == 0, check.stderr
    # GPU shares every layer below its first GPU-only layer (diff ids), the conda layer included.
    cpu_layers, gpu_layers = filesystem_layers(engine, cpu), filesystem_layers(engine, gpu)
    shared = next(i for i, (a, b) in enumerate(zip(cpu_layers, gpu_layers)) if a != b)
    assert shared > layer_index(gpu_layers, "install.py --lock /opt/devbox/conda/locks/conda-lock.yml")
    assert gpu_layers[shared][1] not in {diff_id for _, diff_id in cpu_layers}


@pytest.mark.engine
def test_conda_env_trusts_the_image_ca_and_is_shared_with_the_group(engine, conda_stack):
    lock(conda_stack)
    ref = conda_build(engine, conda_stack, ["cpu"])["cpu"].content_tag
    code, out = engine.run(ref, ["sh", "-c", (
        "readlink -f /opt/conda/ssl/cacert.pem; cat /opt/conda/ssl/cacert.pem;"
        "stat -c '%g %A' /opt/conda /opt/conda/bin/greet; cat /opt/conda/.condarc")])
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "/etc/ssl/certs/ca-certificates.crt"
    # The image's bundle, with the host's extra CA the build was given.
    host_ca = Path(HOST_CA_CERTS[0]).read_text().split("-----BEGIN CERTIFICATE-----")[1][:64]
    assert host_ca in out and "the channel's own CA bundle" not in out
    assert "100 drwxrwsr-x" in out and "100 -rwxrwxr-x" in out, out
    assert "  - ~/.conda/envs" in out and "ssl_verify: /etc/ssl/certs/ca-certificates.crt" in out
    # The image's user (remapped uids keep gid 100) can install into the prefix.
    code, out = engine.run(ref, ["sh", "-c", "touch /opt/conda/bin/mine && echo writable"],
                           user="4321:100")
    assert code == 0 and "writable" in out, out
    result = cli("inspect", ref, "--json")
    packages = json.loads(result.stdout)["packages"]["conda"]
    assert any(p["name"] == "greeter" and p["build"] == "0"
               and p["channel"].startswith("http://127.0.0.1:") for p in packages), packages


def edit_sealed(path: Path, name: str, change) -> None:
    """Change package ``name`` in a conda lock and seal it again: a lock devbox-build accepts."""
    lockfile = conda.read_lock(path)
    for package in lockfile.package:
        if package.name == name:
            change(package)
    lockfile.metadata.custom_metadata[conda.PACKAGES_DIGEST] = conda.packages_digest(
        lockfile.package)
    conda._write(lockfile, path)


@pytest.mark.engine
def test_hash_mismatch_fails_the_build(engine, conda_stack):
    lock(conda_stack)
    path = conda_stack / "locks" / "conda-lock.yml"
    # The channel now serves other bytes than the lock recorded (a package re-published under
    # the same name): a sealed lock whose greeter sha256 differs from what is served.
    edit_sealed(path, "greeter", lambda package: setattr(package.hash, "sha256", "ab" * 32))
    # A lock devbox-build would accept:
    assert [unit.verdict(load(conda_stack)) for unit in conda.stack(load(conda_stack), "cpu")] == [None]
    spec = load(conda_stack)
    result = cli("build", str(conda_stack), "--variant", "cpu", "--network", "host",
                 env={"DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS)})
    assert_clean_error(result, "hash mismatch", "greeter-2.1-0.tar.bz2")
    assert engine.image_id(f"{spec.repository}:cpu") is None


@pytest.mark.engine
def test_layers_rebuild_only_from_what_changed(engine, conda_stack, channel):
    lock(conda_stack)
    before = filesystem_layers(engine, conda_build(engine, conda_stack, ["cpu"])["cpu"].content_tag)
    conda_step = layer_index(before, "install.py --lock /opt/devbox/conda/locks/conda-lock.yml")
    apt_step = layer_index(before, "apt-get install -y --no-install-recommends less")

    # A pip pin moves: the conda layer (and all below it) is reused.
    requirements = conda_stack / "requirements.in"
    requirements.write_text(requirements.read_text().replace("six==1.17.0", "six==1.16.0"))
    lock(conda_stack)
    after_pip = filesystem_layers(engine,
                                  conda_build(engine, conda_stack, ["cpu"])["cpu"].content_tag)
    assert after_pip[:conda_step + 1] == before[:conda_step + 1]
    assert after_pip != before

    # The conda lock changes: the apt layer is reused, the conda layer is not.
    (conda_stack / "environment.yml").write_text(
        environment(channel.url, "greeter >=2", "farewell", "ca-certificates", pip=["packaging"]))
    lock(conda_stack)
    after_conda = filesystem_layers(engine,
                                    conda_build(engine, conda_stack, ["cpu"])["cpu"].content_tag)
    assert after_conda[:apt_step + 1] == after_pip[:apt_step + 1]
    assert after_conda[conda_step][1] != after_pip[conda_step][1]


@pytest.mark.engine
def test_users_create_their_own_environments_in_the_persisted_home(engine, conda_stack, channel):
    lock(conda_stack)
    spec = load(conda_stack)
    ref = conda_build(engine, conda_stack, ["cpu"])["cpu"].content_tag
    home = engine.create_volume(f"devbox-test-conda-home-{os.getpid()}")
    try:
        def run(script: str) -> tuple[int, str]:
            return engine.run(ref, ["bash", "-c", script], network_mode="host",
                              volumes={home: spec.user.home})

        # Solved at run time against the image's own channels (from its .condarc).
        code, out = run("devbox-conda create mine greeter ca-certificates && devbox-conda run mine greet")
        assert code == 0 and "hello from conda" in out, out
        code, out = run("devbox-conda create bad no-such-package")
        assert code == 1 and "could not solve no-such-package" in out, out
        assert "Traceback" not in out
        # A new container on the same home volume (a rebuilt dev container) still has it.
        code, out = run("devbox-conda list; ~/.conda/envs/mine/bin/greet;"
                        "readlink ~/.conda/envs/mine/ssl/cacert.pem")
        assert code == 0, out
        assert f"mine\t{spec.user.home}/.conda/envs/mine" in out and "hello from conda" in out
        assert "bad" not in out.split("hello")[0]  # the failed create left nothing behind
        # Its OpenSSL trusts the image's bundle (with any corporate CA), as /opt/conda's does.
        assert out.splitlines()[-1] == "/etc/ssl/certs/ca-certificates.crt", out
    finally:
        engine.remove_volume(home)


def test_variant_conda_without_a_conda_section_is_a_spec_error(stack):
    (stack / "environment-gpu.yml").write_text("channels: [x]\ndependencies: [farewell]\n")
    spec = (stack / "image.toml").read_text()
    (stack / "image.toml").write_text(
        spec.replace("[variants.gpu]", '[variants.gpu]\nconda = ["environment-gpu.yml"]'))
    with pytest.raises(DevboxError, match="variants.gpu.conda"):
        load(stack)


# -- a private channel: credentials from the host, never in a lock, a context or an image --------

SECRET = "s3cr3t-channel-pass"
LOGIN = ("alice", SECRET)


@pytest.fixture
def private_channel(tmp_path_factory):
    """The same channel, answering 401 unless the request carries alice's password."""
    from .support.conda_channel import ServedChannel, build_channel

    folder = build_channel(tmp_path_factory.mktemp("private-channel"))
    with ServedChannel(folder, login=LOGIN) as served:
        yield served


@pytest.fixture
def private_stack(conda_stack: Path, private_channel) -> Path:
    """conda_stack with both environments on the private channel, named by its bare URL."""
    (conda_stack / "environment.yml").write_text(
        environment(private_channel.url, "greeter >=2", "ca-certificates", pip=["packaging"]))
    (conda_stack / "environment-gpu.yml").write_text(
        environment(private_channel.url, "farewell"))
    return conda_stack


@pytest.fixture
def conda_stack_public(conda_stack: Path, channel, tmp_path: Path) -> Path:
    """A copy of conda_stack (its own repository) on the public channel."""
    target = tmp_path / "public"
    shutil.copytree(conda_stack, target)
    (target / "environment.yml").write_text(
        environment(channel.url, "greeter >=2", "ca-certificates", pip=["packaging"]))
    (target / "environment-gpu.yml").write_text(environment(channel.url, "farewell"))
    spec = target / "image.toml"
    spec.write_text(re.sub(r'(repository = "[^"]+)"', r'\1-public"', spec.read_text()))
    return target


@pytest.fixture
def netrc(tmp_path: Path, monkeypatch) -> Path:
    """A netrc with the private channel's password, and an empty package cache; both reach the
    CLI's subprocesses too."""
    path = tmp_path / "secrets" / "netrc"
    path.parent.mkdir()
    path.write_text(f"machine 127.0.0.1 login alice password {SECRET}\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return path


def secrets_in(data: bytes) -> list[bytes]:
    basic = base64.b64encode(":".join(LOGIN).encode())
    return [needle for needle in (SECRET.encode(), basic) if needle in data]


def test_a_private_channel_locks_with_credentials_from_netrc_or_rattlers_file(
        private_stack, private_channel, tmp_path, monkeypatch):
    result = cli("lock", str(private_stack))
    assert_clean_error(result, "401", "netrc", "RATTLER_AUTH_FILE")
    assert result.returncode == 3
    assert not (private_stack / "locks" / "conda-lock.yml").exists()

    # rattler's own credentials file (what pixi writes) works as well as a netrc.
    auth = tmp_path / "credentials.json"
    auth.write_text(json.dumps({"127.0.0.1": {"BasicHTTP": {"username": "alice",
                                                            "password": SECRET}}}))
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(auth))
    lock(private_stack)
    text = (private_stack / "locks" / "conda-lock.yml").read_text()
    assert private_channel.url.rstrip("/") in text and not secrets_in(text.encode())


def test_credentials_are_applied_as_each_kind_says():
    basic = channels.Credential("here", "basic", "alice", "pw")
    assert basic.request("https://c.example/ch/noarch/p.conda") == (
        "https://c.example/ch/noarch/p.conda",
        {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()})
    assert channels.Credential("here", "bearer", secret="tok").request("https://c.example/x")[1] \
        == {"Authorization": "Bearer tok"}
    token = channels.Credential("here", "conda-token", secret="tk-123")
    assert "tk-123" not in repr(token)
    assert token.request("https://conda.example/ch/noarch/p.conda") == (
        "https://conda.example/t/tk-123/ch/noarch/p.conda", {})


def test_credentials_are_found_by_host_in_the_auth_file_then_netrc(tmp_path, monkeypatch):
    auth, netrc_path = tmp_path / "credentials.json", tmp_path / "netrc"
    auth.write_text(json.dumps({"*.corp.example": {"CondaToken": "tk-1"},
                                "exact.example": {"BearerToken": "b-1"}}))
    netrc_path.write_text("machine exact.example login bob password nope\n"
                          "machine other.example login bob password pw2\n")
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(auth))
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert channels.credential_for("https://conda.corp.example/ch/").kind == "conda-token"
    assert channels.credential_for("https://exact.example/ch/").kind == "bearer"
    found = channels.credential_for("https://other.example/ch/")
    assert (found.kind, found.username, found.secret) == ("basic", "bob", "pw2")
    assert "pw2" not in found.source and str(netrc_path) in found.source
    assert channels.credential_for("https://public.example/ch/") is None
    netrc_path.write_text("hostname other.example login bob password pw2\n")  # not netrc
    with pytest.raises(InputError, match=r"not a readable netrc file \(line 1\)$") as caught:
        channels.credential_for("https://other.example/ch/")
    assert "pw2" not in str(caught.value)


def test_render_sends_a_private_channels_packages_not_its_credentials(private_stack, netrc,
                                                                      tmp_path, monkeypatch):
    lock(private_stack)
    context = render(load(private_stack), "gpu")
    shared = sorted(p for p in context.private if p.startswith("conda/fetched/conda-lock/"))
    variant = sorted(p for p in context.private if p.startswith("conda/fetched/conda-lock-gpu/"))
    assert [Path(p).name for p in shared] == [
        "ca-certificates-2026.1-0.tar.bz2", "greeter-2.1-0.tar.bz2",
        "greeting-data-1.0-0.tar.bz2"]
    assert [Path(p).name for p in variant] == ["farewell-0.3-0.tar.bz2"]  # only what it adds
    dockerfile = context.dockerfile
    assert "ARG DEVBOX_BASE=debian:bookworm-slim\nFROM ${DEVBOX_BASE} AS image" in dockerfile
    assert "FROM image AS conda-lock-install" in dockerfile
    assert "FROM conda-lock-installed AS conda-lock-gpu-install" in dockerfile
    assert ('COPY --from=conda-lock-gpu-install --chown=0:100 ["/tmp/devbox-conda-delta/", '
            '"/opt/"]') in dockerfile
    # What the engine would receive: every file of the context, packages included.
    written = tmp_path / "context"
    result = cli("render", str(private_stack), "--variant", "gpu", "--output", str(written))
    assert result.returncode == 0, result.stderr
    files = [path for path in written.rglob("*") if path.is_file()]
    assert written / "conda/fetched/conda-lock-gpu/farewell-0.3-0.tar.bz2" in files
    assert not [path for path in files if secrets_in(path.read_bytes())]
    # Without the credentials the same lock renders the plain way (the build fetches).
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not render(load(private_stack), "gpu").private


def test_a_private_package_url_cannot_name_a_path_outside_its_folder(private_stack, netrc):
    lock(private_stack)
    path = private_stack / "locks" / "conda-lock.yml"
    edit_sealed(path, "greeter", lambda package: setattr(
        package, "url", package.url.replace("greeter-2.1-0.tar.bz2", "..")))
    with pytest.raises(LockError, match="'greeter': not a conda package file name"):
        render(load(private_stack), "cpu")


def saved_layers(engine, ref: str, folder: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of each member of every layer of ``ref`` as `docker save` writes it, and of
    its config and manifest."""
    archive_path = folder / "image.tar"
    with archive_path.open("wb") as out:
        for chunk in engine.api.get_image(ref):
            out.write(chunk)
    members = []
    with tarfile.open(archive_path) as image:
        for member in image.getmembers():
            if not member.isfile():
                continue
            data = image.extractfile(member).read()
            if member.name.endswith("layer.tar"):
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    members += [(f"{member.name}:{m.name}", layer.extractfile(m).read())
                                for m in layer.getmembers() if m.isfile()]
            else:
                members.append((member.name, data))
    archive_path.unlink()
    return members


def prefix_listing(engine, ref: str) -> list[str]:
    code, out = engine.run(ref, ["find", "/opt/conda", "-printf", "%P %M %U:%G %l\n"])
    assert code == 0, out
    return sorted(out.splitlines())


@pytest.mark.engine
def test_a_private_channel_builds_and_its_credentials_never_reach_the_image(
        engine, private_stack, private_channel, conda_stack_public, netrc, tmp_path, monkeypatch):
    lock(private_stack)
    private_channel.requests.clear()
    results = conda_build(engine, private_stack)
    cpu, gpu = results["cpu"].content_tag, results["gpu"].content_tag
    code, out = engine.run(gpu, ["bash", "-lc", "farewell && greet"])
    assert code == 0 and "goodbye from conda" in out and "hello from conda" in out, out
    # The host fetched each package once, with the password; nothing asked without it.
    fetched = [path for path, _ in private_channel.requests]
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) == 4, fetched
    assert all(header for _, header in private_channel.requests)
    # The prefix records the lock's URL, as if the build had downloaded it.
    code, out = engine.run(cpu, ["sh", "-c", "cat /opt/conda/conda-meta/greeter-*.json"])
    assert json.loads(out)["url"] == f"{private_channel.url}noarch/greeter-2.1-0.tar.bz2"
    # No layer, config or history entry holds the password; no package archive was kept.
    for ref in (cpu, gpu):
        members = saved_layers(engine, ref, tmp_path)
        assert not [name for name, data in members if secrets_in(data)]
        assert not [name for name, _ in members if name.endswith(".tar.bz2")]
        assert not secrets_in(json.dumps(engine.history(ref)).encode())
    # The variant's layer holds what it added, not the shared packages again.
    variant_layer = {name.split(":")[0] for name, _ in saved_layers(engine, gpu, tmp_path)
                     if name.endswith("opt/conda/bin/farewell")}
    assert len(variant_layer) == 1
    assert not [name for name, _ in saved_layers(engine, gpu, tmp_path)
                if name.startswith(next(iter(variant_layer))) and name.endswith("bin/greet")]
    # The same prefix, entry for entry (mode, owner, group, link), as a build that fetched the
    # packages itself from a public channel.
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # the public stack: the plain way
    lock(conda_stack_public)
    public = conda_build(engine, conda_stack_public, ["gpu"])["gpu"].content_tag
    assert prefix_listing(engine, gpu) == prefix_listing(engine, public)


@pytest.mark.engine
def test_a_private_channel_with_wrong_or_no_credentials_is_one_clear_error(
        engine, private_stack, netrc):
    lock(private_stack)
    spec = load(private_stack)
    netrc.write_text("machine 127.0.0.1 login alice password wrong-password\n")
    result = cli("build", str(private_stack), "--variant", "cpu", "--network", "host")
    assert_clean_error(result, "refused the credentials", f"{netrc} (machine 127.0.0.1)", "401")
    assert result.returncode == 5 and "wrong-password" not in result.stderr
    netrc.unlink()  # none at all: the build fetches, and the channel refuses it
    result = cli("build", str(private_stack), "--variant", "cpu", "--network", "host")
    assert_clean_error(result, "401", "netrc")
    assert engine.image_id(f"{spec.repository}:cpu") is None
