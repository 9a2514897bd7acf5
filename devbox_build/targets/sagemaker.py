"""SageMaker: registration inputs for a built image, validated offline against botocore's model.

Registering a custom image for Studio takes three API calls (after pushing to ECR):
``create-image``, ``create-image-version`` and ``create-app-image-config``. This module writes
their inputs as JSON (``aws sagemaker <call> --cli-input-json file://...``) from what the image
says about itself, and checks every request against the SageMaker API model that botocore
ships: required members and types with botocore's own validator, then each member's length,
count and pattern limits, which botocore leaves to the server. So a too-long container argument
fails here, not half-way through a registration.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import botocore.session
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.validate import ParamValidator

from ..checks.image import STUDIO_GID, STUDIO_HOME, STUDIO_UID, ImageUnderTest
from ..errors import InputError
from ..runtime import contract


@dataclass(frozen=True)
class Request:
    operation: str  # botocore's operation name, e.g. CreateAppImageConfig
    filename: str
    params: dict

    @property
    def cli(self) -> str:
        command = re.sub(r"(?<!^)(?=[A-Z])", "-", self.operation).lower()
        return f"aws sagemaker {command} --cli-input-json file://{self.filename}"


@cache
def _model():
    return botocore.session.get_session().get_service_model("sagemaker")


def validate(operation: str, params: dict) -> list[str]:
    """Every way ``params`` breaks the SageMaker API model for ``operation``; [] when none."""
    shape = _model().operation_model(operation).input_shape
    # Idempotency tokens are filled in by the AWS CLI and SDKs when left out.
    filled = dict(params)
    for name, member in shape.members.items():
        if member.metadata.get("idempotencyToken") and name not in filled:
            filled[name] = str(uuid.uuid4())
    report = ParamValidator().validate(filled, shape)
    problems = report.generate_report().splitlines() if report.has_errors() else []
    return [p.strip() for p in problems if p.strip()] + list(_limits(filled, shape, operation))


def _limits(value, shape: Shape, path: str):
    """Length, count and pattern limits from the model (botocore itself checks only minimums)."""
    meta = shape.metadata
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        for name, member_value in value.items():
            if name in shape.members:
                yield from _limits(member_value, shape.members[name], f"{path}.{name}")
        return
    if isinstance(shape, ListShape) and isinstance(value, list):
        if "max" in meta and len(value) > meta["max"]:
            yield f"{path}: {len(value)} items, the most SageMaker accepts is {meta['max']}"
        for index, item in enumerate(value):
            yield from _limits(item, shape.member, f"{path}[{index}]")
        return
    if isinstance(shape, MapShape) and isinstance(value, dict):
        if "max" in meta and len(value) > meta["max"]:
            yield f"{path}: {len(value)} entries, the most SageMaker accepts is {meta['max']}"
        for key, item in value.items():
            yield from _limits(key, shape.key, f"{path} key {key!r}")
            yield from _limits(item, shape.value, f"{path}[{key!r}]")
        return
    if shape.type_name == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            yield (f"{path}: {value[:40]!r}... is {len(value)} characters, the most SageMaker "
                   f"accepts is {meta['max']}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            yield f"{path}: {value!r} does not match SageMaker's pattern {meta['pattern']}"


def config_name(text: str) -> str:
    """A SageMaker resource name ([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}) made from ``text``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9]", "-", text)).strip("-")[:63]


def image_name_for(image: ImageUnderTest) -> str:
    """The SageMaker image name a built image gets by default: its spec and variant."""
    labels = image.labels
    return config_name(f"{labels.get(contract.LABEL_SPEC, image.ref.rsplit('/', 1)[-1])}-"
                       f"{labels.get(contract.LABEL_VARIANT, '')}")


@dataclass(frozen=True)
class SageMaker:
    """A Studio image registration (a Target): create-image, create-image-version and one
    create-app-image-config per app the image serves."""

    image_name: str
    role_arn: str
    image_uri: str
    entrypoint: list[str] | None = None  # None: the image's ENTRYPOINT
    arguments: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    name = "SageMaker"

    def admit(self, image: ImageUnderTest) -> list[str]:
        if image.manifest is None:
            return [f"not built by devbox-build: nothing says it keeps Studio's contract (user "
                    f"{contract.UID}:{contract.GID}, JupyterLab on {contract.IDE_PORT} under "
                    f"{contract.STUDIO_BASE_URL.rstrip('/')}, no token); build it with "
                    f"devbox-build, then: devbox-build check {image.ref}"]
        problems = []
        if not image.has_jupyterlab:
            problems.append("has no JupyterLab, so a Studio JupyterLab space on it would not "
                            "start: add jupyterlab to the spec's pip requirements and rebuild")
        if image.attrs.get("Architecture") != "amd64":
            problems.append(f"is linux/{image.attrs.get('Architecture')}: SageMaker runs "
                            "linux/amd64 only; build the image for linux/amd64")
        return problems

    def requests(self, image: ImageUnderTest) -> list[Request]:
        """The registration requests, validated; an InputError lists every problem."""
        entrypoint = list(self.entrypoint if self.entrypoint is not None
                          else image.config.get("Entrypoint") or [])
        container_config = {
            "ContainerEntrypoint": entrypoint,
            "ContainerArguments": list(self.arguments),
            "ContainerEnvironmentVariables": dict(self.environment),
        }
        container_config = {key: value for key, value in container_config.items() if value}
        apps = {"ContainerConfig": container_config} if container_config else {}
        requests = [
            Request("CreateImage", "create-image.json", {
                "ImageName": self.image_name,
                "RoleArn": self.role_arn,
                "DisplayName": self.image_name,
                "Description": (image.labels.get("org.opencontainers.image.description")
                                or image.ref)[:512],
            }),
            Request("CreateImageVersion", "create-image-version.json", {
                "ImageName": self.image_name,
                "BaseImage": self.image_uri,
            }),
            # Studio starts the image's entrypoint with SAGEMAKER_APP_TYPE=JupyterLab, which
            # serves /jupyterlab/default on 8888 without a token: nothing else has to be passed.
            Request("CreateAppImageConfig", "app-image-config-jupyterlab.json", {
                "AppImageConfigName": config_name(f"{self.image_name}-jupyterlab"),
                "JupyterLabAppImageConfig": apps,
            }),
        ]
        if "sagemaker-code-editor" in image.pip_packages:
            requests.append(Request("CreateAppImageConfig", "app-image-config-codeeditor.json", {
                "AppImageConfigName": config_name(f"{self.image_name}-codeeditor"),
                "CodeEditorAppImageConfig": apps,
            }))
        if "ipykernel" in image.pip_packages:
            # Studio Classic starts its own kernel gateway and only needs the kernels and user.
            requests.append(Request("CreateAppImageConfig", "app-image-config-kernelgateway.json", {
                "AppImageConfigName": config_name(f"{self.image_name}-kernelgateway"),
                "KernelGatewayImageConfig": {
                    "KernelSpecs": [{"Name": "python3",
                                     "DisplayName": f"Python 3 ({self.image_name})"}],
                    "FileSystemConfig": {"MountPath": STUDIO_HOME, "DefaultUid": STUDIO_UID,
                                         "DefaultGid": STUDIO_GID},
                },
            }))
        problems = [f"{request.filename}: {problem}" for request in requests
                    for problem in validate(request.operation, request.params)]
        if problems:
            raise InputError("the SageMaker request would be refused:\n  "
                             + "\n  ".join(problems))
        return requests

    def render(self, images: Sequence[ImageUnderTest]) -> dict[str, str]:
        (image,) = images  # one registration is one image
        return {request.filename: json.dumps(request.params, indent=2, sort_keys=True) + "\n"
                for request in self.requests(image)}
