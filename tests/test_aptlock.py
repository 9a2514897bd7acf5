"""The apt lock: every Debian package of the os and system layers at the version it records,
resolved in a throwaway container of the base; held to its inputs like the pip locks; layers the
same bytes as an unpinned build of the same versions; a version the mirror lost fails by name."""

from __future__ import annotations

import pytest

from devbox_build import aptlock

from .conftest import assert_clean_error, cli, load
from .test_build import CA, filesystem_layers


def test_apt_simulation_lines_become_pins():
    lines = ["Inst libssl3 (3.0.20-1~deb12u2 Debian-Security:12/stable-security [amd64])",
             "Inst tzdata [2025a-0+deb12u1] (2025b-0+deb12u1 Debian:12.12/stable [all])",
             "Conf libssl3 (3.0.20-1~deb12u2 Debian-Security:12/stable-security [amd64])"]
    assert [f"{m['name']}={m['version']}" for m in map(aptlock.INST.match, lines) if m] == [
        "libssl3=3.0.20-1~deb12u2", "tzdata=2025b-0+deb12u1"]


@pytest.mark.engine
def test_the_apt_lock_pins_the_os_and_system_layers(engine, stack):
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text() + '\n[system]\npackages = ["tree"]\n')
    result = cli("lock", str(stack), "--apt", env=CA)
    assert result.returncode == 0, result.stderr
    lock = stack / "locks" / "linux-amd64" / "apt.txt"
    sections = aptlock.read(lock)
    assert any(pin.startswith("python3=") for pin in sections["os"])
    assert [pin.split("=")[0] for pin in sections["system"]] == ["tree"]
    assert cli("lock", str(stack), "--check").returncode == 0

    built = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert built.returncode == 0, built.stderr
    spec = load(stack)
    pinned = filesystem_layers(engine, f"{spec.repository}:cpu")
    assert cli("check", f"{spec.repository}:cpu", "--profile", "drift").returncode == 0
    # The same versions unpinned (the lock removed): the os and system layers are the same bytes.
    lock.rename(lock.with_suffix(".kept"))
    unpinned = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert unpinned.returncode == 0, unpinned.stderr
    free = filesystem_layers(engine, f"{spec.repository}:cpu")
    assert [d for _, d in pinned[:4]] == [d for _, d in free[:4]]
    lock.with_suffix(".kept").rename(lock)

    # Its inputs moved: stale for --check and build; `lock` alone brings it up to date.
    spec_file.write_text(spec_file.read_text().replace('["tree"]', '["tree", "less"]'))
    check = cli("lock", str(stack), "--check")
    assert check.returncode == 3 and "apt.txt: stale" in check.stderr
    assert_clean_error(cli("build", str(stack), "--variant", "cpu", env=CA),
                       "refusing to build from a stale or edited lock", "apt.txt")
    assert cli("lock", str(stack), env=CA).returncode == 0
    assert [p.split("=")[0] for p in aptlock.read(lock)["system"]] == ["less", "tree"]

    # A version the mirror no longer carries: the build fails naming it.
    sections = aptlock.read(lock)
    sections["system"] = [pin if not pin.startswith("tree=") else "tree=0.0-gone"
                          for pin in sections["system"]]
    aptlock.write(load(stack), "linux-amd64".replace("-", "/"), sections)
    failed = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert_clean_error(failed, "failed in layer 'system'", "0.0-gone")
    assert failed.returncode == 5
