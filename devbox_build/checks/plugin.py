"""pytest plugin: fixtures for checking a container image with pytest-testinfra.

Installed with devbox-build (entry point ``pytest11``), so any test can use them:

    pytest --devbox-image devbox/datascience:cpu tests/image/

    def test_has_our_tool(image_host):          # testinfra Host, the image's default user
        assert image_host.exists("aws")

    def test_serves_docs(start_container):      # any container of the image, removed afterwards
        box = start_container(["python", "-m", "http.server", "8000"], publish=[8000])
        ...

``devbox-build check IMAGE`` runs the built-in profiles (devbox_build/checks/profiles/) with
these same fixtures, plus the user's own test folders when given ``--tests``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .. import settings
from ..engine import Engine
from ..errors import DevboxError
from .image import Container, ImageUnderTest, running


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("devbox", "devbox-build image checks")
    group.addoption(
        "--devbox-image", default=settings.value("DEVBOX_IMAGE"), metavar="REF",
        help="the image the image fixtures check (default: $DEVBOX_IMAGE)",
    )


@pytest.fixture(scope="session")
def devbox_engine() -> Engine:
    try:
        return Engine.connect()
    except DevboxError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest, devbox_engine: Engine) -> ImageUnderTest:
    """The image under test (--devbox-image): its config, labels and devbox manifest."""
    ref = request.config.getoption("--devbox-image")
    if not ref:
        pytest.fail("no image to check: pass --devbox-image REF (or set DEVBOX_IMAGE)",
                    pytrace=False)
    try:
        return ImageUnderTest.load(devbox_engine, ref)
    except DevboxError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def start_container(image: ImageUnderTest) -> Iterator[Callable[..., Container]]:
    """Start containers of the image (Engine.start's arguments); all removed, by id, afterwards."""
    started: list[str] = []

    def start(command: list[str] | None = None, **options) -> Container:
        container_id = image.engine.start(image.ref, command, **options)
        started.append(container_id)
        return Container(container_id, image.engine, user=options.get("user"))

    yield start
    for container_id in started:
        image.engine.remove(container_id)


@pytest.fixture(scope="session")
def idle_container(image: ImageUnderTest) -> Iterator[Container]:
    """One container of the image doing nothing, shared by the checks that only look inside."""
    with running(image, entrypoint=["sleep", "infinity"]) as container:
        yield container


@pytest.fixture(scope="session")
def image_host(idle_container: Container):
    """testinfra Host inside the image, as the image's default user."""
    return idle_container.host


@pytest.fixture(scope="session")
def image_root_host(idle_container: Container):
    """testinfra Host inside the image, as root."""
    return idle_container.host_as("root")
