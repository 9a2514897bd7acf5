"""sagemaker-studio: what a SageMaker Studio JupyterLab space requires of a custom image."""

from __future__ import annotations

import pytest
from packaging.version import Version

from devbox_build.checks.image import (
    IDE_PORT,
    STUDIO_GID,
    STUDIO_HOME,
    STUDIO_UID,
    running,
)
from devbox_build.runtime import contract

STUDIO_ENV = {"SAGEMAKER_APP_TYPE": contract.STUDIO_APP_TYPE}
# Studio mounts the space's volume, owned by the user, over the home directory.
EMPTY_HOME = {STUDIO_HOME: f"uid={STUDIO_UID},gid={STUDIO_GID},mode=0755"}
BASE_URL = contract.STUDIO_BASE_URL.rstrip("/")


@pytest.fixture(scope="module")
def studio(image):
    if not image.has_jupyterlab:
        pytest.fail(f"{image.ref} has no jupyter-lab to serve", pytrace=False)
    with running(image, environment=STUDIO_ENV, tmpfs=EMPTY_HOME, publish=[IDE_PORT],
                 health_interval_s=1) as container:
        yield container


def test_image_is_amd64(image):
    """the image is linux/amd64 (Studio runs x86_64 only)"""
    assert image.attrs.get("Architecture") == "amd64", (
        f"{image.ref} is {image.attrs.get('Architecture')}; build it with --platform linux/amd64"
    )


def test_studio_health_check_answers_without_a_token(studio):
    """with SAGEMAKER_APP_TYPE=JupyterLab and an empty home volume, /jupyterlab/default/api/status
    answers 200 with no token"""
    status, body = studio.get(f"{BASE_URL}/api/status")
    assert status == 200, f"{BASE_URL}/api/status answered {status}: {body[:300]}"


def test_studio_allows_other_origins(studio):
    """cross-origin requests are allowed (Studio's proxy is another origin)"""
    status, body = studio.get(f"{BASE_URL}/api/status",
                              headers={"Origin": "https://studio.example.com"})
    assert status == 200, f"a cross-origin request was answered {status}: {body[:300]}"


def test_studio_healthcheck_reports_healthy(studio):
    """the image's HEALTHCHECK reports healthy in Studio mode"""
    health = studio.wait_healthy()
    assert health == "healthy", f"health is {health!r}:\n{studio.logs()[-1500:]}"


def test_nothing_needed_lives_in_home(image, start_container):
    """Python, Jupyter and its kernels work with an empty volume over the home directory"""
    box = start_container(
        ["bash", "-lc", "python -V && jupyter --version && jupyter kernelspec list"],
        tmpfs=EMPTY_HOME,
    )
    code = image.engine.wait(box.id, timeout=60)
    assert code == 0, f"with an empty home the tools fail ({code}):\n{box.logs()[-1500:]}"


def test_user_has_sudo_curl_git_and_bash(image_host):
    """passwordless sudo, curl, git and bash (lifecycle configurations rely on them)"""
    assert image_host.run("sudo -n true").rc == 0, "sudo -n true fails for the default user"
    missing = [tool for tool in ("curl", "git", "bash") if not image_host.exists(tool)]
    assert not missing, f"missing on PATH: {', '.join(missing)}"


def test_reserved_paths_are_absent(image_root_host):
    """/opt/ml and /opt/.sagemakerinternal are absent (SageMaker owns them)"""
    present = [path for path in ("/opt/ml", "/opt/.sagemakerinternal")
               if image_root_host.file(path).exists]
    assert not present, f"the image ships {', '.join(present)}, which SageMaker mounts itself"


def test_idle_shutdown_extension_is_enabled(image, image_host):
    """jupyter-activity-monitor-extension >= 0.3.1 is installed and enabled (idle shutdown)"""
    version = image.pip_packages.get("jupyter-activity-monitor-extension")
    assert version, "jupyter-activity-monitor-extension is not installed: Studio's idle " \
                    "shutdown cannot see this image's activity"
    assert Version(version) >= Version("0.3.1"), f"jupyter-activity-monitor-extension {version}"
    listing = image_host.run("jupyter server extension list 2>&1").stdout
    enabled = [line for line in listing.splitlines()
               if "jupyter_activity_monitor_extension" in line and "enabled" in line]
    assert enabled, f"the extension is not enabled:\n{listing}"
