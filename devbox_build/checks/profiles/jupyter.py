"""jupyter: on a laptop, JupyterLab serves at / on 8888 and wants a token."""

from __future__ import annotations

import json
import secrets
import time

import pytest

from devbox_build.checks.image import IDE_PORT, running


@pytest.fixture(scope="module")
def laptop(image):
    """The image started as `docker run -p 8888:8888 IMAGE`, with a known token."""
    if not image.has_jupyterlab:
        pytest.fail(f"{image.ref} has no jupyter-lab to serve", pytrace=False)
    token = secrets.token_hex(16)
    with running(image, environment={"JUPYTER_TOKEN": token}, publish=[IDE_PORT],
                 health_interval_s=1) as container:
        yield container, token


def test_api_refuses_requests_without_the_token(laptop):
    """/api/status without the token is refused"""
    container, _ = laptop
    status, body = container.get("/api/status")
    assert status in (401, 403), f"/api/status answered {status} without a token: {body[:200]}"


def test_api_answers_with_the_token(laptop):
    """/api/status with the token answers 200, and JupyterLab is served at /lab"""
    container, token = laptop
    status, body = container.get("/api/status", headers={"Authorization": f"token {token}"})
    assert status == 200, f"/api/status with the token answered {status}: {body[:200]}"
    status, _ = container.get(f"/lab?token={token}")
    assert status == 200, f"/lab answered {status}"


def test_healthcheck_reports_healthy(laptop):
    """the image's HEALTHCHECK reports the server healthy"""
    container, _ = laptop
    health = container.wait_healthy()
    assert health == "healthy", f"health is {health!r}:\n{container.logs()[-1500:]}"


def test_python_kernel_is_registered(image_host):
    """a python3 kernel is registered"""
    result = image_host.run("jupyter kernelspec list --json")
    assert result.rc == 0, result.stderr
    assert "python3" in json.loads(result.stdout)["kernelspecs"], result.stdout


def test_docker_stop_ends_the_server_quickly(laptop):
    """`docker stop` ends the server well inside its 10 s grace period"""
    container, _ = laptop
    started = time.monotonic()
    code = container.engine.stop(container.id, timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"docker stop took {elapsed:.1f} s: SIGTERM did not end the server"
    assert code in (0, 143), f"the server exited with {code} on SIGTERM"
