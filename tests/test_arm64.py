"""arm64 images for Apple-silicon laptops and Graviton boxes, built on this amd64 machine under
emulation (Debian's qemu-user-static, registered by scripts/provision.sh): the tiny stack locked
for both platforms with one set of pins, built for arm64 FROM the base's arm64 twin, its checks
passing there, and pushed with its amd64 twin as one multi-platform index that `docker pull
--platform` resolves to the right architecture."""

from __future__ import annotations

import json

import pytest

from devbox_build import locking, refs
from devbox_build.spec import load_spec

from .conftest import BASE_IMAGE, IN_CI, assert_clean_error, cli
from .support.registry import LoopbackRegistry
from .test_build import CA

pytestmark = pytest.mark.engine
ARM64 = "linux/arm64"


@pytest.fixture
def emulation(engine):
    if not engine.can_emulate(ARM64):
        if IN_CI:
            pytest.fail("CI=true but no arm64 emulation is registered (scripts/provision.sh "
                        "registers it)", pytrace=False)
        pytest.skip("no arm64 emulation registered on this machine")
    twin = refs.platform_twin(BASE_IMAGE, ARM64)
    assert engine.image_id(twin), f"{twin} missing: devbox-build bootstrap-base --platform {ARM64}"
    assert engine.image_platform(twin) == ARM64
    return engine


def two_platforms(stack):
    spec_file = stack / "image.toml"
    spec_file.write_text(spec_file.read_text().replace(
        'python = "3.11"', 'python = "3.11"\nplatforms = ["linux/amd64", "linux/arm64"]'))
    result = cli("lock", str(stack))
    assert result.returncode == 0, result.stderr
    return load_spec(stack)


def test_an_arm64_image_built_checked_and_pulled_by_platform(emulation, stack, tmp_path):
    engine = emulation
    spec = two_platforms(stack)
    # One set of pins: every lock of arm64 has amd64's versions.
    for name in ("pip.txt", "dev.txt"):
        pins = {platform: {n: p.version for n, p in locking.read_pins(
            stack / "locks" / platform.replace("/", "-") / name).items()}
            for platform in spec.platforms}
        assert pins["linux/amd64"] == pins[ARM64], name

    (tmp_path / "registry").mkdir()
    with LoopbackRegistry(tmp_path / "registry") as registry:
        # docs/building.md's arm64 block as printed, on this stack and this registry.
        from .test_readme import ARM64_WALK_THROUGH, walk_through_commands

        repo = f"{registry.host}/team/{spec.repository}"
        for command in walk_through_commands(ARM64_WALK_THROUGH):
            argv = (command.replace("devbox/datascience", spec.repository)
                    .replace("127.0.0.1:5000", registry.host)
                    .replace(" datascience ", f" {stack} ").split())
            result = cli(*argv[1:], env=CA, timeout=1800)
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        arm64 = engine.image_id(f"{repo}:cpu-arm64")
        amd64 = engine.image_id(f"{repo}:cpu")
        try:
            # The arm64 build is named beside the native one, not over it.
            assert engine.image_platform(f"{repo}:cpu-arm64") == ARM64
            assert engine.image_platform(f"{repo}:cpu") == "linux/amd64"
            # Its programs are arm64's, from the base's arm64 twin.
            code, out = engine.run(arm64, ["python", "-c",
                                           "import platform; print(platform.machine())"])
            assert code == 0 and out.strip().endswith("aarch64"), out
            # The checks that make sense under emulation pass there.
            check = cli("check", f"{repo}:cpu-arm64", "--json", timeout=1200)
            assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
            assert json.loads(check.stdout)["passed"] >= 10

            # The index: a pull for each platform gets that platform's image.
            for platform, image_id in (("linux/arm64", arm64), ("linux/amd64", amd64)):
                engine.untag(f"{repo}:cpu")
                engine.pull(f"{repo}:cpu", platform)
                assert engine.image_platform(f"{repo}:cpu") == platform
                assert engine.image_id(f"{repo}:cpu") == image_id
        finally:
            for image_id in (arm64, amd64):
                for tag in engine.image(image_id).get("RepoTags") or []:
                    if tag.startswith(registry.host):
                        engine.untag(tag)

        # Nothing else goes in an index (the registry alone is asked): an index, two images of
        # one platform, another repository.
        assert_clean_error(cli("index", f"{repo}:x", f"{repo}:cpu"), "is an index already")
        assert_clean_error(cli("index", f"{repo}:y", f"{repo}:cpu-arm64", f"{repo}:cpu-arm64"),
                           "are both linux/arm64")
        assert_clean_error(cli("index", f"{repo}:z", f"{registry.host}/other:cpu"),
                           "is not in " + repo)


def test_a_foreign_platform_without_the_bases_twin_is_refused_naming_it(engine, stack):
    """A base with no arm64 twin in the engine: one error naming the key, the twin and how to
    make it, before any step (without emulation: the platform itself is refused first)."""
    two_platforms(stack)
    lonely = "devbox-test/lonely-base:1"
    engine.tag(engine.image_id(BASE_IMAGE), lonely)
    try:
        spec_file = stack / "image.toml"
        spec_file.write_text(spec_file.read_text().replace(
            f'base = "{BASE_IMAGE}"', f'base = "{lonely}"'))
        result = cli("build", str(stack), "--variant", "cpu", "--platform", ARM64, env=CA)
        if engine.can_emulate(ARM64):
            assert_clean_error(result, "key 'variants.cpu.base'", "no "
                               "devbox-test/lonely-base:1-arm64",
                               "bootstrap-base --tag devbox-test/lonely-base:1 --platform "
                               "linux/arm64")
            assert result.returncode == 2
        else:
            assert_clean_error(result, "cannot run linux/arm64", "binfmt")
            assert result.returncode == 4
    finally:
        engine.untag(lonely)
