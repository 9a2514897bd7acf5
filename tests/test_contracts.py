"""The laptop, EC2 and SageMaker contracts, proven on real images by `devbox-build check`.

The check suite is what users run too, so these tests run it through the command line, then show
that each check fails, naming the problem, on an image that breaks what it checks.
"""

from __future__ import annotations

import io
import json
import tarfile
from xml.etree import ElementTree

import pytest

from devbox_build.engine import Built, Engine

from .conftest import cli

pytestmark = pytest.mark.engine

# Checks each default image must pass by name, so a profile that silently stopped being selected
# (or a check that stopped being collected) fails here.
MUST_PASS = {
    ("base", "test_user_matches_the_studio_contract"),
    ("base", "test_no_file_has_an_id_above_65535"),
    ("base", "test_no_secrets_or_proxies_in_history_or_config"),
    ("base", "test_no_private_key_in_the_ca_store"),
    ("drift", "test_every_dependency_is_installed"),
    ("drift", "test_python_packages_match_the_lock"),
    ("jupyter", "test_api_refuses_requests_without_the_token"),
    ("jupyter", "test_api_answers_with_the_token"),
    ("jupyter", "test_healthcheck_reports_healthy"),
    ("jupyter", "test_docker_stop_ends_the_server_quickly"),
    ("sagemaker-studio", "test_studio_health_check_answers_without_a_token"),
    ("sagemaker-studio", "test_nothing_needed_lives_in_home"),
    ("sagemaker-studio", "test_idle_shutdown_extension_is_enabled"),
    ("sagemaker-training", "test_training_job_writes_the_model[image-user]"),
    ("sagemaker-training", "test_training_job_writes_the_model[root]"),
    ("sagemaker-training", "test_failing_job_leaves_its_reason[image-user]"),
    ("sagemaker-training", "test_failing_job_leaves_its_reason[root]"),
    ("sagemaker-training", "test_stop_reaches_the_training_program"),
    ("hub", "test_hub_server_answers_under_the_users_prefix"),
    ("hub", "test_hub_login_goes_through_the_hubs_oauth"),
    ("hub", "test_hub_mode_serves_nothing_at_the_laptop_url"),
    ("hub", "test_hub_server_reports_to_the_hub"),
}
GPU_MUST_PASS = {
    ("gpu", "test_labels_name_cuda_and_minimum_driver"),
    ("gpu", "test_no_driver_library_is_baked_in"),
    ("gpu", "test_starts_without_a_gpu"),
}
# Need a GPU on the engine's host; this machine and CI have none.
GPU_RUN_CHECKS = {("gpu", "test_nvidia_smi_sees_the_gpu"), ("gpu", "test_framework_sees_the_gpu")}


def check(ref: str, *args: str) -> tuple[int, dict]:
    result = cli("check", ref, "--json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def outcomes(report: dict) -> dict[tuple[str, str], dict]:
    return {(c["profile"], c["name"]): c for c in report["checks"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_check_suite_passes_on_the_default_image(engine, default_images, variant, tmp_path):
    junit = tmp_path / "checks.xml"
    code, report = check(default_images[variant].content_tag, "--junit", str(junit))
    found = outcomes(report)
    failed = {key: c["message"] for key, c in found.items() if c["outcome"] == "failed"}
    assert code == 0 and not failed, failed
    expected = MUST_PASS | (GPU_MUST_PASS if variant == "gpu" else set())
    assert {key for key in expected if found.get(key, {}).get("outcome") == "passed"} == expected
    skipped = {key for key, c in found.items() if c["outcome"] == "skipped"}
    assert skipped == (GPU_RUN_CHECKS if variant == "gpu" and not engine.has_gpu() else set())
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert int(suite.get("tests")) == len(found) and int(suite.get("failures")) == 0


# -- the checks fail, naming the problem, on images that break them ----------------------------


@pytest.fixture(scope="module")
def derive(engine: Engine, default_images):
    """Build images FROM an image (default: the default CPU image) with extra Dockerfile lines."""
    made: list[str] = []

    def build(name: str, *lines: str, base: str | None = None) -> str:
        base = base or default_images["cpu"].content_tag
        dockerfile = "\n".join([f"FROM {base}", *lines]) + "\n"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            archive.addfile(info, io.BytesIO(dockerfile.encode()))
        buffer.seek(0)
        [built] = [event for event in engine.build(buffer) if isinstance(event, Built)]
        ref = f"devbox-test/derived:{name}"
        engine.tag(built.image_id, ref)
        made.append(ref)
        return ref

    yield build
    for ref in made:
        engine.remove_image(ref)


def failed_check(ref: str, profile: str, name: str) -> str:
    code, report = check(ref, "--profile", profile)
    assert code == 1, report
    outcome = outcomes(report)[(profile, name)]
    assert outcome["outcome"] == "failed", outcome
    return outcome["message"]


def test_wrong_uid_fails_the_user_check(derive):
    ref = derive("wrong-uid", "USER root", "RUN usermod --uid 1234 sagemaker-user",
                 "USER sagemaker-user")
    message = failed_check(ref, "base", "test_user_matches_the_studio_contract")
    assert "sagemaker-user is 1234:100" in message and "1000:100" in message, message


def test_package_outside_the_lock_fails_the_drift_check(derive):
    # What `pip install rogue-package` leaves behind, without needing an index.
    dist_info = "/opt/venv/lib/python3.11/site-packages/rogue_package-6.6.6.dist-info"
    ref = derive("outside-the-lock", "USER root",
                 f"RUN mkdir {dist_info} && printf 'Metadata-Version: 2.1\\nName: rogue-package"
                 f"\\nVersion: 6.6.6\\n' > {dist_info}/METADATA")
    message = failed_check(ref, "drift", "test_python_packages_match_the_lock")
    assert "rogue-package 6.6.6 is installed but not in the lock" in message, message


def test_file_owned_by_a_large_uid_fails_the_id_check(derive):
    ref = derive("uid-70000", "USER root",
                 "RUN touch /opt/owned-by-70000 && chown 70000:70000 /opt/owned-by-70000",
                 "USER sagemaker-user")
    message = failed_check(ref, "base", "test_no_file_has_an_id_above_65535")
    assert "/opt/owned-by-70000 70000:70000" in message, message


def test_proxy_baked_into_the_environment_fails_the_secrets_check(derive):
    ref = derive("baked-proxy", "ENV HTTPS_PROXY=http://proxy.corp.example:3128")
    message = failed_check(ref, "base", "test_no_secrets_or_proxies_in_history_or_config")
    assert "a proxy setting in the environment" in message, message


def test_credential_in_the_environment_is_flagged_masked(derive):
    secret = "ghp_" + "a1b2c3d4e5" * 4
    ref = derive("baked-token", f"ENV PIP_INDEX_URL=https://bob:hunter2hunter2@pypi.corp.example/simple GH={secret}")
    code, report = check(ref, "--profile", "base")
    outcome = outcomes(report)[("base", "test_no_secrets_or_proxies_in_history_or_config")]
    assert code == 1 and outcome["outcome"] == "failed", outcome
    message = outcome["message"]
    assert "a password in a URL in the environment: PIP_INDEX_URL=https://<masked" in message
    assert "a GitHub token in the environment: GH=<masked" in message, message
    # Never the values: not in the check's message, not in the JSON report.
    assert "hunter2hunter2" not in json.dumps(report) and secret not in json.dumps(report)


def test_private_key_in_the_ca_store_is_flagged(derive, tmp_path):
    ref = derive("key-in-ca-store", "USER root",
                 "RUN printf -- '-----BEGIN PRIVATE KEY-----\\nMIIBsecretbits\\n"
                 "-----END PRIVATE KEY-----\\n' > /usr/local/share/ca-certificates/corp.crt",
                 "USER sagemaker-user")
    junit = tmp_path / "checks.xml"
    result = cli("check", ref, "--profile", "base", "--junit", str(junit))
    assert result.returncode == 1, result.stderr
    assert "/usr/local/share/ca-certificates/corp.crt" in result.stderr
    assert "MIIBsecretbits" not in result.stderr + junit.read_text()


# -- the runtime on an image without JupyterLab, and user checks -------------------------------


def test_only_studios_exact_app_type_turns_the_token_off(engine, default_images):
    from devbox_build.checks.image import ImageUnderTest, running

    image = ImageUnderTest.load(engine, default_images["cpu"].content_tag)
    with running(image, environment={"SAGEMAKER_APP_TYPE": "jupyterlab"},
                 publish=[8888]) as container:
        status, _ = container.get("/api/status")
        assert status in (401, 403), status  # laptop mode: a token is required
        assert "is not 'JupyterLab' (what Studio sets)" in container.logs()


def test_an_empty_token_prints_a_url_that_works(engine, default_images):
    from devbox_build.checks.image import ImageUnderTest, running

    image = ImageUnderTest.load(engine, default_images["cpu"].content_tag)
    with running(image, environment={"JUPYTER_TOKEN": ""}, publish=[8888]) as container:
        status, _ = container.get("/api/status")
        logs = container.logs()
        assert status == 200, logs
        url = next(line for line in logs.splitlines() if "open http://" in line)
        assert "token=" not in url and url.rstrip().endswith("/lab"), url
        status, _ = container.get("/lab")
        assert status == 200


def test_sagemaker_config_refuses_an_image_without_jupyterlab(tiny_images, tmp_path):
    _, results = tiny_images
    result = cli("sagemaker", "config", results["cpu"].content_tag, "--role-arn",
                 "arn:aws:iam::123456789012:role/R", "--image-uri",
                 "123456789012.dkr.ecr.us-east-1.amazonaws.com/tiny:cpu", "-o", str(tmp_path / "sm"))
    assert result.returncode == 2 and "has no JupyterLab" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "sm").exists()


def test_image_without_an_ide_starts_a_shell(engine, tiny_images):
    _, results = tiny_images
    code, logs = engine.run(results["cpu"].content_tag, [])
    assert code == 0, logs
    assert "no IDE server (jupyterlab is not installed); starting a shell" in logs


def test_entrypoint_warns_when_the_gpu_driver_is_too_old(engine, tiny_images, derive):
    """A fake nvidia-smi reporting an old driver stands in for an old GPU host."""
    _, results = tiny_images
    ref = derive("old-driver", "USER root",
                 "RUN printf '#!/bin/sh\\necho 470.57.02\\n' > /usr/local/bin/nvidia-smi"
                 " && chmod 0755 /usr/local/bin/nvidia-smi",
                 "USER sagemaker-user", base=results["gpu"].content_tag)
    code, logs = engine.run(ref, ["true"])
    assert code == 0, logs
    assert "the GPU driver is 470.57.02, but CUDA 12.9 needs 525.60.13 or newer" in logs, logs


def test_users_add_their_own_checks_with_the_same_fixtures(tiny_images, tmp_path):
    _, results = tiny_images
    own = tmp_path / "image_checks"
    own.mkdir()
    (own / "test_our_image.py").write_text(
        "def test_has_python(image_host):\n"
        "    assert image_host.run('python -V').rc == 0\n\n"
        "def test_has_terraform(image_host):\n"
        "    assert image_host.exists('terraform'), 'terraform is not installed'\n"
    )
    code, report = check(results["cpu"].content_tag, "--profile", "base", "--tests", str(own))
    found = {c["name"]: c for c in report["checks"]}
    assert code == 1
    assert found["test_has_python"]["outcome"] == "passed"
    assert found["test_has_terraform"]["outcome"] == "failed"
    assert found["test_has_terraform"]["message"] == "terraform is not installed"
    assert found["test_user_matches_the_studio_contract"]["outcome"] == "passed"
