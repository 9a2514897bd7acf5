"""Locking pip inputs.

Tests marked ``network`` resolve against the public package index and assert nothing about what it
holds today (a pinned version, a package's presence); determinism is proven against an index the
test serves itself (support/local_index.py). Whether the committed locks are still fresh is
``devbox-build lock --check``'s question, not a test's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devbox_build import locking
from devbox_build.errors import LockError

from .conftest import assert_clean_error, cli, load
from .support.local_index import serve

LOCKS = ("pip.txt", "dev.txt", "pip-gpu.txt", "dev-gpu.txt")


def lock_files(stack: Path, platform: str = "linux-amd64") -> dict[str, Path]:
    return {name: stack / "locks" / platform / name for name in LOCKS}


@pytest.mark.network
def test_lock_writes_a_hashed_stack_per_variant(stack):
    spec = load(stack)
    results = locking.lock(spec, upgrade=True)
    assert [r.path.name for r in results] == list(LOCKS)
    files = lock_files(stack)
    pins = {name: locking.read_pins(path) for name, path in files.items()}
    assert set(pins["pip.txt"]) == {"six", "markupsafe", "idna"}
    assert pins["pip.txt"]["six"].version == "1.17.0"
    # Every pin carries hashes, so installs can use --require-hashes.
    for lock in pins.values():
        assert all("--hash=sha256:" in pin.text for pin in lock.values())
    # A lock is the full closure of the one below, which it may not move.
    for upper, lower in [("pip-gpu.txt", "pip.txt"), ("dev.txt", "pip.txt"),
                         ("dev-gpu.txt", "pip-gpu.txt")]:
        for name, pin in pins[lower].items():
            assert pins[upper][name].version == pin.version
    assert "nvidia-cuda-runtime-cu12" in pins["pip-gpu.txt"]
    assert "nvidia-cuda-runtime-cu12" not in pins["dev.txt"]
    assert set(pins["dev.txt"]) - set(pins["pip.txt"]) == {"iniconfig"}
    assert locking.check(spec) == []
    text = files["pip.txt"].read_text()
    assert text.startswith("# Locked by devbox-build for image 'tiny', layer 'pip'")
    assert locking.recorded_digest(files["pip.txt"]) == locking.inputs_digest(
        spec, locking.stack(spec, "cpu", "linux/amd64")[0]
    )
    assert oct(files["pip.txt"].stat().st_mode & 0o777) != oct(0o600)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A package index served on loopback by the test, the only one uv sees: lock results depend
    on the releases the test adds, never on what a public index holds today."""
    index, stop = serve(tmp_path / "index")
    for name in [n for n in os.environ if n.startswith("UV_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UV_DEFAULT_INDEX", index.url)
    monkeypatch.setenv("UV_NO_CACHE", "1")
    monkeypatch.setenv("UV_NO_CONFIG", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1," + os.environ.get("NO_PROXY", ""))
    yield index
    stop()


def test_lock_is_deterministic_and_keeps_fresh_locks(tmp_path, local_index):
    local_index.add("alpha", "1.0", "beta>=1")
    local_index.add("beta", "1.0")
    local_index.add("gamma", "2.0")
    folder = small_stack(tmp_path / "det", "alpha\ngamma\n")
    (folder / "dev.in").write_text("gamma\n")
    spec = load(folder)
    lock = folder / "locks" / "linux-amd64" / "pip.txt"
    locking.lock(spec)
    first = lock.read_bytes()
    pins = locking.read_pins(lock)
    assert {name: pin.version for name, pin in pins.items()} == {
        "alpha": "1.0", "beta": "1.0", "gamma": "2.0"}
    # The wheel and its size come from the index's answer.
    assert pins["beta"].wheel == "beta-1.0-py3-none-any.whl" and pins["beta"].size > 0

    locking.lock(spec, upgrade=True)  # a full re-resolve of the same index gives the same bytes
    assert lock.read_bytes() == first

    local_index.add("beta", "1.1")  # a new release: a fresh lock keeps its pins
    assert {r.status for r in locking.lock(spec)} == {"up to date"}
    assert lock.read_bytes() == first
    assert cli("lock", str(folder), "--check").returncode == 0
    locking.lock(spec, upgrade=True)  # only an upgrade moves them
    assert locking.read_pins(lock)["beta"].version == "1.1"
    assert any(path.startswith("/simple/beta") for path in local_index.requests)


@pytest.mark.network
def test_changed_input_makes_its_lock_and_every_lock_above_stale(stack):
    (stack / "requirements.in").write_text("six==1.16.0\nmarkupsafe\nidna\n")
    problems = locking.check(load(stack))
    assert sorted(p.name for p, _ in problems) == sorted(LOCKS)
    (stack / "requirements.in").write_text("six==1.17.0\nmarkupsafe\nidna\n")
    (stack / "requirements-gpu.in").write_text("nvidia-cuda-runtime-cu12==12.9.79\n# note\n")
    problems = locking.check(load(stack))
    assert sorted(p.name for p, _ in problems) == ["dev-gpu.txt", "pip-gpu.txt"]

    result = cli("lock", str(stack), "--check")
    assert result.returncode == 3  # LockError: a stale lock, not a failed check
    assert "pip-gpu.txt: stale" in result.stderr and "dev-gpu.txt: stale" in result.stderr
    assert "Traceback" not in result.stderr

    assert cli("lock", str(stack)).returncode == 0
    assert cli("lock", str(stack), "--check").returncode == 0


@pytest.mark.network
def test_unresolvable_requirement_is_one_error_and_leaves_the_lock_intact(stack):
    before = lock_files(stack)["pip.txt"].read_bytes()
    (stack / "requirements.in").write_text("six==1.17.0\ndevbox-no-such-package-zzz==1.0\n")
    with pytest.raises(LockError, match="could not lock layer 'pip'.*requirements.in"):
        locking.lock(load(stack))
    assert lock_files(stack)["pip.txt"].read_bytes() == before
    assert not list((stack / "locks" / "linux-amd64").glob(".*"))  # no temporary files left
    assert_clean_error(cli("lock", str(stack)), "could not lock layer 'pip'",
                       "devbox-no-such-package-zzz")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "lock.txt"
    target.write_text("old\n")

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        locking.write_atomic(target, "new\n" * 1000)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lock.txt"]


@pytest.mark.network
def test_lock_for_arm64(stack):
    result = cli("lock", str(stack), "--platform", "linux/arm64")
    assert result.returncode == 0, result.stderr
    arm = lock_files(stack, "linux-arm64")
    assert all(path.is_file() for path in arm.values())
    assert "(linux/arm64, Python 3.11)" in arm["pip.txt"].read_text()
    # The arm64 locks are independent of the amd64 ones: checking one platform ignores the other.
    assert locking.check(load(stack), ["linux/arm64"]) == []


def small_stack(folder: Path, requirements: str, python: str = "3.11") -> Path:
    folder.mkdir()
    (folder / "requirements.in").write_text(requirements)
    (folder / "image.toml").write_text(
        f'name = "{folder.name}"\nrepository = "t/{folder.name}"\npython = "{python}"\n'
        '[pip]\nrequirements = ["requirements.in"]\n[variants.cpu]\nbase = "x"\n'
    )
    return folder


@pytest.mark.network
def test_pip_compile_writes_the_same_pins_and_hashes_as_uv(tmp_path):
    folder = small_stack(tmp_path / "small", "six\nidna\n")
    spec = load(folder)
    lock = folder / "locks" / "linux-amd64" / "pip.txt"
    locking.lock(spec, resolver="pip-compile")
    by_pip_compile = locking.read_pins(lock)
    lock.unlink()
    locking.lock(spec, resolver="uv")
    assert locking.read_pins(lock) == by_pip_compile
    assert set(by_pip_compile) == {"six", "idna"}


@pytest.mark.network
def test_pip_compile_refuses_another_python(tmp_path):
    folder = small_stack(tmp_path / "other", "six\n", python="3.12")
    with pytest.raises(LockError, match="Use --resolver uv"):
        locking.lock(load(folder), resolver="pip-compile")
    # uv locks for it from this 3.11 machine.
    locking.lock(load(folder), resolver="uv")
    assert "six==" in (folder / "locks/linux-amd64/pip.txt").read_text()


@pytest.mark.network
def test_lock_trusts_the_hosts_extra_cas_as_build_does(tmp_path):
    """Behind a TLS-intercepting proxy (this machine's, a corporate network's) `lock` works with
    no SSL_CERT_FILE set: its resolver gets the host's extra CAs, as `build` does."""
    from devbox_build.hostca import host_ca_certificates, resolver_environment

    folder = small_stack(tmp_path / "tls", "six==1.17.0\n")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "UV_NATIVE_TLS",
                                "UV_SYSTEM_CERTS")}
    result = subprocess.run([sys.executable, "-m", "devbox_build.cli", "lock", str(folder)],
                            env=environment, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "six==1.17.0" in (folder / "locks/linux-amd64/pip.txt").read_text()
    bundle = resolver_environment(tmp_path, environment)
    if host_ca_certificates():
        text = Path(bundle["SSL_CERT_FILE"]).read_text()
        assert all(Path(p).read_text().strip() in text for p in host_ca_certificates())
    else:
        assert "SSL_CERT_FILE" not in bundle


def test_every_platform_gets_the_first_platforms_pins(tmp_path, local_index):
    """An arm64 lock made after the amd64 one prefers its pins (a fresh resolve would take the
    newer release); it goes stale when they move; a version with no wheel for arm64 fails
    `lock --check` naming the package, until the spec lists it as platform-specific."""
    local_index.add("alpha", "1.0", "beta>=1")
    local_index.add("beta", "1.0")
    folder = small_stack(tmp_path / "both", "alpha\ngamma\n")
    local_index.add("gamma", "1.0")
    spec_file = folder / "image.toml"
    amd64, arm64 = (folder / "locks" / p / "pip.txt" for p in ("linux-amd64", "linux-arm64"))
    locking.lock(load(folder))  # amd64 only, as the team's lock was
    assert {n: p.version for n, p in locking.read_pins(amd64).items()} == {
        "alpha": "1.0", "beta": "1.0", "gamma": "1.0"}

    local_index.add("beta", "1.1")  # released since: a fresh arm64 resolve would take it
    spec_file.write_text(spec_file.read_text().replace(
        'python = "3.11"\n', 'python = "3.11"\nplatforms = ["linux/amd64", "linux/arm64"]\n'))
    result = cli("lock", str(folder))
    assert result.returncode == 0, result.stderr
    assert locking.read_pins(arm64)["beta"].version == "1.0"
    assert cli("lock", str(folder), "--check").returncode == 0

    # The first platform's pins move (an upgrade of it alone): the arm64 lock is stale, and
    # locking again moves it with them.
    locking.lock(load(folder), platforms=["linux/amd64"], upgrade=True)
    assert locking.read_pins(amd64)["beta"].version == "1.1"
    result = cli("lock", str(folder), "--check")
    assert result.returncode == 3 and "linux-arm64/pip.txt: stale" in result.stderr
    locking.lock(load(folder))
    assert locking.read_pins(arm64)["beta"].version == "1.1"

    # gamma 2.0 ships an x86_64 wheel only: arm64 keeps 1.0, which --check names.
    local_index.add("gamma", "2.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    locking.lock(load(folder), upgrade=True)
    assert locking.read_pins(amd64)["gamma"].version == "2.0"
    assert locking.read_pins(arm64)["gamma"].version == "1.0"
    result = cli("lock", str(folder), "--check")
    assert_clean_error(result, "linux-arm64/pip.txt: differs between platforms: gamma 1.0 "
                               "(linux/amd64: 2.0)", "platform_specific")
    assert result.returncode == 3
    spec_file.write_text(spec_file.read_text().replace(
        'requirements = ["requirements.in"]\n',
        'requirements = ["requirements.in"]\nplatform_specific = ["gamma"]\n'))
    assert cli("lock", str(folder), "--check").returncode == 0



def test_lock_warns_when_an_input_moves_a_major_or_a_gpu_framework_lands_in_cpu(
        tmp_path, local_index):
    local_index.add("alpha", "1.4")
    local_index.add("helper", "1.0")
    folder = small_stack(tmp_path / "warn", "alpha\n")
    assert cli("lock", str(folder)).returncode == 0

    local_index.add("alpha", "2.0", "helper")
    local_index.add("torch", "2.8.0")
    local_index.add("nvidia-cudnn-cu12", "9.1")
    (folder / "requirements.in").write_text("alpha\ntorch\nnvidia-cudnn-cu12\n")
    result = cli("lock", str(folder), "--upgrade")
    assert result.returncode == 0, result.stderr
    assert "alpha 1.4 → 2.0: an input's major version moved" in result.stderr
    assert "nvidia-cudnn-cu12, torch in a lock the CPU image installs" in result.stderr


@pytest.mark.parametrize("spec", sorted(p.name for p in (Path(__file__).parent.parent / "images")
                                        .iterdir() if (p / "image.toml").is_file()))
def test_every_committed_lock_matches_its_inputs(spec):
    """Offline: a commit that changes an input (devbox-dev's is this repository's
    pyproject.toml) without locking again fails here, not when someone opens the dev container."""
    from .conftest import ROOT

    result = cli("lock", spec, "--check", "--images-dir", str(ROOT / "images"))
    assert result.returncode == 0, result.stderr
