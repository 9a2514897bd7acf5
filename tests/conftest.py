"""Fixtures shared by the tests.

Engine tests run against a real Docker engine. Without one they skip on a developer's machine
but FAIL when CI=true: CI must never pass by skipping the builds it exists to check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devbox_build.engine import Engine
from devbox_build.errors import EngineUnavailable
from devbox_build.hostca import host_ca_certificates
from devbox_build.spec import ImageSpec, load_spec

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "stacks" / "tiny"
DEFAULT_SPEC = ROOT / "images" / "datascience"
BASE_IMAGE = "debian:bookworm-slim"
# The host's extra CA certificates: builds here (and behind any TLS-intercepting proxy) need them.
# The same set the CLI trusts by default, so library-level builds and CLI builds agree.
HOST_CA_CERTS = host_ca_certificates()
IN_CI = os.environ.get("CI") == "true"
# No channel credentials but the ones a test writes itself: a developer's own netrc or rattler
# credentials must not change which build path a test takes. Subprocesses inherit these.
os.environ["NETRC"] = str(ROOT / ".devbox" / "tests-have-no-netrc")
os.environ["RATTLER_AUTH_FILE"] = str(ROOT / ".devbox" / "tests-have-no-credentials.json")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)  # only outside CI, where a developer may lack an engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        engine = Engine.connect()
    except EngineUnavailable as exc:
        _unavailable(str(exc))
    if engine.image_id(BASE_IMAGE) is None:
        _unavailable(f"base image {BASE_IMAGE} missing: run devbox-build bootstrap-base")
    return engine


@pytest.fixture(scope="session")
def tiny_images(engine, tmp_path_factory):
    """The tiny stack built in both variants once per run: (spec, {variant: BuildResult})."""
    from devbox_build.build import BuildOptions, build

    folder = tmp_path_factory.mktemp("stack") / "tiny"
    shutil.copytree(TINY, folder)
    spec = load(folder)
    results = build(spec, ["cpu", "gpu"], engine, BuildOptions(ca_certificates=HOST_CA_CERTS))
    return spec, {r.variant: r for r in results}


@pytest.fixture(scope="session")
def default_images(engine):
    """The team's default image (images/datascience), both variants: {variant: BuildResult}.

    A rebuild of unchanged inputs is a no-op, so this costs time only when the image changed.
    """
    from devbox_build.build import BuildOptions, build

    spec = load_spec(DEFAULT_SPEC)
    results = build(spec, ["cpu", "gpu"], engine, BuildOptions(ca_certificates=HOST_CA_CERTS))
    return {r.variant: r for r in results}


@pytest.fixture(scope="session")
def channel(tmp_path_factory):
    """A small conda channel served over http on loopback (no public channel is reachable)."""
    from .support.conda_channel import ServedChannel, build_channel

    with ServedChannel(build_channel(tmp_path_factory.mktemp("conda-channel"))) as served:
        yield served


@pytest.fixture
def stack(tmp_path: Path, request) -> Path:
    """A private copy of the tiny stack, with its own repository name."""
    target = tmp_path / "tiny"
    shutil.copytree(TINY, target)
    name = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:40].rstrip("-")
    spec = target / "image.toml"
    spec.write_text(spec.read_text().replace('"devbox-test/tiny"', f'"devbox-test/{name}"'))
    return target


def load(stack: Path) -> ImageSpec:
    return load_spec(stack)


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None, unset: tuple[str, ...] = (),
        timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would (``unset``: variables the shell lacks)."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-m", "devbox_build.cli", *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False,
    )


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """One clear error: non-zero exit, no traceback, and the words that name the problem."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"
