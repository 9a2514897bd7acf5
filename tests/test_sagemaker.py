"""`devbox-build sagemaker config`: registration inputs that SageMaker's API model accepts."""

from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.validate import ParamValidator

from devbox_build.targets.sagemaker import validate

from .conftest import assert_clean_error, cli

ROLE = "arn:aws:iam::123456789012:role/SageMakerImages"
ECR = "registry.example.com/team/datascience:cpu-3f2a9c1d4e5b"
OPERATIONS = {
    "create-image.json": "CreateImage",
    "create-image-version.json": "CreateImageVersion",
    "app-image-config-jupyterlab.json": "CreateAppImageConfig",
    "app-image-config-kernelgateway.json": "CreateAppImageConfig",
}


def app_config(**container_config) -> dict:
    return {"AppImageConfigName": "datascience-cpu-jupyterlab",
            "JupyterLabAppImageConfig": {"ContainerConfig": container_config}}


def test_a_valid_request_has_no_problems():
    assert validate("CreateAppImageConfig", app_config(
        ContainerEntrypoint=["/opt/devbox/bin/devbox-entrypoint"],
        ContainerArguments=["--ServerApp.port=8888"],
        ContainerEnvironmentVariables={"MPLBACKEND": "Agg"},
    )) == []


@pytest.mark.parametrize("container_config, needle", [
    ({"ContainerEntrypoint": ["/bin/sh", "-c"]},
     "ContainerEntrypoint: 2 items, the most SageMaker accepts is 1"),
    ({"ContainerArguments": ["-v"] * 51},
     "ContainerArguments: 51 items, the most SageMaker accepts is 50"),
    ({"ContainerArguments": ["--x=" + "a" * 61]},
     "is 65 characters, the most SageMaker accepts is 64"),
    ({"ContainerEnvironmentVariables": {f"V{i}": "1" for i in range(26)}},
     "ContainerEnvironmentVariables: 26 entries, the most SageMaker accepts is 25"),
    ({"ContainerArguments": "--not-a-list"}, "Invalid type for parameter"),
])
def test_container_config_limits_are_enforced(container_config, needle):
    problems = validate("CreateAppImageConfig", app_config(**container_config))
    assert any(needle in problem for problem in problems), problems


def test_names_and_arns_follow_the_model_patterns():
    problems = validate("CreateImage", {"ImageName": "no_underscores", "RoleArn": "role"})
    assert any("ImageName" in p and "pattern" in p for p in problems), problems
    assert any("RoleArn" in p for p in problems), problems
    assert any("Missing required parameter" in p
               for p in validate("CreateImageVersion", {"ImageName": "x"})), "BaseImage"


@pytest.mark.engine
def test_config_for_the_default_image_passes_botocore_validation(default_images, tmp_path):
    result = cli("sagemaker", "config", default_images["cpu"].content_tag, "--role-arn", ROLE,
                 "--image-uri", ECR, "--output", str(tmp_path), "--env", "TEAM=data")
    assert result.returncode == 0, result.stderr
    written = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert set(written) == set(OPERATIONS)
    # Validate again here, with botocore alone, so the test does not trust the code it tests.
    model = botocore.session.get_session().get_service_model("sagemaker")
    for name, params in written.items():
        shape = model.operation_model(OPERATIONS[name]).input_shape
        if "ClientToken" in shape.required_members:
            params = {**params, "ClientToken": "token-filled-in-by-the-aws-cli"}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), report.generate_report()
    container = written["app-image-config-jupyterlab.json"]["JupyterLabAppImageConfig"][
        "ContainerConfig"]
    assert container == {"ContainerEntrypoint": ["/opt/devbox/bin/devbox-entrypoint"],
                         "ContainerEnvironmentVariables": {"TEAM": "data"}}
    assert written["create-image-version.json"]["BaseImage"] == ECR
    assert "aws sagemaker create-image-version --cli-input-json" in result.stdout


@pytest.mark.engine
def test_over_long_argument_is_refused_and_nothing_is_written(default_images, tmp_path):
    target = tmp_path / "config"
    result = cli("sagemaker", "config", default_images["cpu"].content_tag, "--role-arn", ROLE,
                 "--image-uri", ECR, "--output", str(target),
                 "--arg", "--ServerApp.identity_provider_class=" + "x" * 60)
    assert_clean_error(result, "ContainerArguments[0]", "the most SageMaker accepts is 64")
    assert not target.exists()


@pytest.mark.engine
def test_local_image_without_an_ecr_uri_is_refused(default_images):
    result = cli("sagemaker", "config", default_images["cpu"].content_tag, "--role-arn", ROLE)
    assert_clean_error(result, "a local image name, not a registry URI", "--image-uri")
