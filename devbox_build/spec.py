"""The image spec: one ``image.toml`` per image under ``images/<name>/``.

The spec is data, validated on load: an unknown key, a wrong type or a missing input file is a
single :class:`~devbox_build.errors.SpecError` that names the file and the key. Paths inside the
spec are relative to the spec's folder.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

SPEC_FILENAME = "image.toml"

# Platforms we can lock for, as Docker names them, with uv's --python-platform target.
# manylinux_2_36 matches Debian bookworm's glibc, the default base.
PLATFORMS: dict[str, str] = {
    "linux/amd64": "x86_64-manylinux_2_36",
    "linux/arm64": "aarch64-manylinux_2_36",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REPOSITORY = re.compile(r"^[a-z0-9]+([._/-][a-z0-9]+)*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Model):
    """The non-root user the image runs as (SageMaker Studio's defaults)."""

    name: str = "sagemaker-user"
    uid: Annotated[int, Field(ge=1, le=65535)] = 1000
    gid: Annotated[int, Field(ge=1, le=65535)] = 100
    home: str = "/home/sagemaker-user"
    shell: str = "/bin/bash"
    sudo: bool = True


class System(_Model):
    """Debian packages installed with apt in the system layer."""

    packages: list[str] = []

    @field_validator("packages")
    @classmethod
    def _package_names(cls, packages: list[str]) -> list[str]:
        for name in packages:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?", name):
                raise ValueError(f"not a Debian package name: {name!r}")
        return packages


# Docker's platform names → conda's subdirs.
CONDA_SUBDIRS: dict[str, str] = {"linux/amd64": "linux-64", "linux/arm64": "linux-aarch64"}


class Conda(_Model):
    """A conda environment.yml, locked as conda-lock.yml and installed in the conda layer."""

    environment: str
    prefix: str = "/opt/conda"
    # Subdirs the lock covers; each of the spec's platforms must be among them to build.
    platforms: list[Literal["linux-64", "linux-aarch64"]] = ["linux-64", "linux-aarch64"]
    # Virtual packages the solve assumes for the target machines (the glibc of the base).
    glibc: str = "2.36"


class PipInputs(_Model):
    """pip input files (requirements.in style), locked with hashes."""

    requirements: list[str] = []


class Cuda(_Model):
    """What a CUDA variant declares about its user-space libraries."""

    version: str
    min_driver: str

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", value):
            raise ValueError(f"expected a CUDA version like '12.8', got {value!r}")
        return value


class Variant(_Model):
    """One build of the image (cpu, gpu, ...): its base and its accelerator-only inputs."""

    # The image to build on. With the spec's `extends`, defaults to <extends>:<variant name>.
    base: str
    pip: list[str] = []
    # Extra environment.yml-style files for this variant; with `cuda`, the solve assumes a
    # __cuda virtual package of that version, so a CPU-only machine can lock the GPU environment.
    conda: list[str] = []
    cuda: Cuda | None = None


class ImageSpec(_Model):
    """A whole ``image.toml``."""

    name: str
    repository: str
    description: str = ""
    python: str
    # A devbox-built image repository this image layers on (a project on the team's image): its
    # OS layer (CA, Python, user, venv) is reused as is, variants build FROM <extends>:<variant>,
    # and the pip locks are constrained by the pins it already has (locks/team-constraints.txt).
    extends: str | None = None
    platforms: list[Literal["linux/amd64", "linux/arm64"]] = ["linux/amd64"]
    ca_certificates: list[str] = []
    user: User = User()
    system: System = System()
    conda: Conda | None = None
    pip: PipInputs = PipInputs()
    dev: PipInputs = PipInputs()
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = []
    # Default arguments to the image's entrypoint (CMD). Empty: the IDE server when the image has
    # one (JupyterLab), else a shell.
    command: list[str] = []
    variants: dict[str, Variant]

    # Where the spec was read from; not part of the TOML.
    path: Path = Field(default=Path(SPEC_FILENAME), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _bases_from_extends(cls, data):
        """Under `extends`, a variant without a base builds on the same variant of that image."""
        extends = data.get("extends") if isinstance(data, dict) else None
        variants = data.get("variants") if isinstance(data, dict) else None
        if isinstance(extends, str) and isinstance(variants, dict):
            data = {**data, "variants": {
                name: {"base": f"{extends}:{name}", **variant} if isinstance(variant, dict)
                else variant for name, variant in variants.items()}}
        return data

    @field_validator("extends")
    @classmethod
    def _extends(cls, value: str | None) -> str | None:
        if value is not None and not _REPOSITORY.match(value):
            raise ValueError(f"not an image repository name (no tag): {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits, '.', '_' and '-'")
        return value

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not _REPOSITORY.match(value):
            raise ValueError(f"not a valid image repository name: {value!r}")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"3\.\d+", value):
            raise ValueError(f"expected a Python minor version like '3.11', got {value!r}")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: dict[str, Variant]) -> dict[str, Variant]:
        if not variants:
            raise ValueError("define at least one variant, e.g. [variants.cpu]")
        for name in variants:
            if not _NAME.match(name):
                raise ValueError(f"variant name {name!r}: use lower-case letters and digits")
        return variants

    @model_validator(mode="after")
    def _env_is_not_a_proxy(self) -> ImageSpec:
        for key in self.env:
            if key.lower() in _PROXY_VARIABLES:
                raise ValueError(
                    f"env.{key}: proxies are passed at build time from the environment, "
                    "never baked into the image"
                )
        return self

    @property
    def folder(self) -> Path:
        return self.path.parent

    def input_path(self, relative: str) -> Path:
        return (self.folder / relative).resolve()


_PROXY_VARIABLES = {
    "http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy",
}


def find_spec(image: str | Path, images_dir: Path = Path("images")) -> Path:
    """Resolve IMAGE (a spec name, a folder or an image.toml) to the spec file."""
    candidate = Path(image)
    if candidate.is_file():
        return candidate
    if (candidate / SPEC_FILENAME).is_file():
        return candidate / SPEC_FILENAME
    named = images_dir / str(image) / SPEC_FILENAME
    if named.is_file():
        return named
    known = sorted(p.parent.name for p in images_dir.glob(f"*/{SPEC_FILENAME}"))
    listing = ", ".join(known) if known else f"none under {images_dir}/"
    raise SpecError(f"no image spec named {str(image)!r} (known images: {listing})")


def load_spec(image: str | Path, images_dir: Path = Path("images")) -> ImageSpec:
    """Read and validate a spec; every problem is one SpecError naming the file and key."""
    path = find_spec(image, images_dir)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML: {exc}") from None
    try:
        spec = ImageSpec.model_validate({**data, "path": path})
    except ValidationError as exc:
        raise SpecError(f"{path}: " + _describe(exc)) from None
    _check_files(spec)
    return spec


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif error["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"key '{key}': {message}")
    return "; ".join(problems)


def _check_files(spec: ImageSpec) -> None:
    """Every input file the spec names must exist (CA globs may match nothing)."""
    named: list[tuple[str, str]] = []
    named += [(f"pip.requirements[{i}]", f) for i, f in enumerate(spec.pip.requirements)]
    named += [(f"dev.requirements[{i}]", f) for i, f in enumerate(spec.dev.requirements)]
    if spec.conda:
        named.append(("conda.environment", spec.conda.environment))
    for variant_name, variant in spec.variants.items():
        named += [(f"variants.{variant_name}.pip[{i}]", f) for i, f in enumerate(variant.pip)]
        named += [(f"variants.{variant_name}.conda[{i}]", f)
                  for i, f in enumerate(variant.conda)]
        if variant.conda and not spec.conda:
            raise SpecError(f"{spec.path}: key 'variants.{variant_name}.conda': needs a [conda] "
                            "environment to extend")
    for key, relative in named:
        if not spec.input_path(relative).is_file():
            raise SpecError(
                f"{spec.path}: key '{key}': file not found: {spec.folder / relative}"
            )
