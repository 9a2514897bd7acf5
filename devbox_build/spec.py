"""The image spec: one ``image.toml`` per image under ``images/<name>/``.

The spec is data, validated on load: an unknown key, a wrong type or a missing input file is a
single :class:`~devbox_build.errors.SpecError` that names the file and the key. Paths inside the
spec are relative to the spec's folder.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import credentials, refs
from .errors import SpecError
from .runtime import contract, rules

SPEC_FILENAME = "image.toml"
# What a spec that extends an image locked against: that image's shared pins, and its Python
# ("# python: 3.11"), which such a spec inherits. Written by `devbox-build lock`.
TEAM_CONSTRAINTS = Path("locks") / "team-constraints.txt"
TEAM_PYTHON_PREFIX = "# python: "

# Platforms we can lock for, as Docker names them, with uv's --python-platform target.
# manylinux_2_36 matches Debian bookworm's glibc, the default base.
PLATFORMS: dict[str, str] = {
    "linux/amd64": "x86_64-manylinux_2_36",
    "linux/arm64": "aarch64-manylinux_2_36",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# CPython minor versions a base can provide; anything else no resolver result can run on.
PYTHON_VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14")
# The python3 of well-known bases, so a mismatch is refused at load instead of after a build.
_BASE_PYTHONS = {
    r"debian:(bullseye|11)([.-].*)?": "3.9",
    r"debian:(bookworm|12)([.-].*)?": "3.11",
    r"debian:(trixie|13)([.-].*)?": "3.13",
    r"ubuntu:(jammy|22\.04)(-.*)?": "3.10",
    r"ubuntu:(noble|24\.04)(-.*)?": "3.12",
}


def _pattern(regex: str, description: str):
    """A validator: the whole value matches ``regex``; the error says what is expected."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {description}")
        return value
    return AfterValidator(check)


def _text(value: str) -> str:
    """Free text that ends up in a label or an environment value: one line, no control codes."""
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError(f"{value!r} holds a newline or control character; use one line of text")
    return value


# Each free-text field has a precise rule, so no value can change the structure of the
# Dockerfile or shell it is written into (render quotes them as well).
AbsolutePath = Annotated[str, _pattern(
    r"(/[A-Za-z0-9_+@-][A-Za-z0-9._+@-]*)+",
    "an absolute path of letters, digits and . _ + @ - (no spaces, no '..')")]
UserName = Annotated[str, _pattern(
    r"[a-z_][a-z0-9_-]{0,31}", "a user name (lower-case letters, digits, '_', '-'; at most 32)")]
DriverVersion = Annotated[str, _pattern(r"\d+\.\d+(\.\d+)?", "a driver version like '580.65.06'")]
EnvName = Annotated[str, _pattern(
    r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name (letters, digits, '_')")]
LabelKey = Annotated[str, _pattern(
    r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?",
    "a label key (letters, digits, '.', '_', '-', '/'; reverse-DNS style)")]
Text = Annotated[str, AfterValidator(_text)]
ImageReference = Annotated[str, _pattern(refs.REFERENCE, "an image reference "
                                         "([HOST[:PORT]/]name[:tag][@digest], lower-case name)")]
Repository = Annotated[str, _pattern(refs.REPOSITORY, "an image repository "
                                     "([HOST[:PORT]/]lower-case/path, no tag)")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Model):
    """The non-root user the image runs as (SageMaker Studio's defaults)."""

    name: UserName = contract.USER
    uid: Annotated[int, Field(ge=1, le=65535)] = contract.UID
    gid: Annotated[int, Field(ge=1, le=65535)] = contract.GID
    home: AbsolutePath = contract.HOME
    shell: AbsolutePath = contract.SHELL
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
    prefix: AbsolutePath = "/opt/conda"
    # Subdirs the lock covers; each of the spec's platforms must be among them to build.
    platforms: list[Literal["linux-64", "linux-aarch64"]] = ["linux-64", "linux-aarch64"]
    # Virtual packages the solve assumes for the target machines (the glibc of the base).
    glibc: Annotated[str, _pattern(r"\d+\.\d+", "a glibc version like '2.36'")] = "2.36"




class Cuda(_Model):
    """A CUDA variant. The CUDA version in labels is the one the locks install (the CUDA runtime
    wheel or conda package); ``version``, when given, must agree with it and is what a conda
    solve assumes (__cuda). ``min_driver`` defaults to NVIDIA's minimum for that CUDA major and
    may only raise it."""

    version: str | None = None
    min_driver: DriverVersion | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", value):
            raise ValueError(f"expected a CUDA version like '12.8', got {value!r}")
        return value


class Variant(_Model):
    """One build of the image (cpu, gpu, ...): its base and its accelerator-only inputs."""

    # The image to build on. With the spec's `extends`, defaults to <extends>:<variant name>.
    base: ImageReference
    pip: list[str] = []
    # Extra environment.yml-style files for this variant; with `cuda`, the solve assumes a
    # __cuda virtual package of that version, so a CPU-only machine can lock the GPU environment.
    conda: list[str] = []
    cuda: Cuda | None = None
    # Lock the release the spec is `like` through this variant's conda layer, as the release
    # itself is built: its {cpu,gpu}.env.in match specs solved from the spec's conda channels,
    # its env.out packages preferred (conda.py). Needs `like` and a [conda] section.
    conda_like: bool = False


# A duration the image's idle watcher reads: '0' or 'off' (never), seconds, or 90s / 30m / 2h.
Duration = Annotated[str, _pattern(r"0|off|\d+|(\d+[smhd])+",
                                   "a duration like '90s', '30m', '2h' or 'off'")]
ProcessName = Annotated[str, _pattern(r"[A-Za-z0-9._+-]{1,64}",
                                      "a process name (letters, digits, '.', '_', '+', '-')")]
Percent = Annotated[float, Field(ge=0, le=100)]


class Idle(_Model):
    """Idle auto-stop, written to /etc/devbox/idle.toml for the image's watcher (devbox-idle).

    Off by default (action "none"): a laptop keeps running; a dev container's template answer
    or an EC2 launch turns the action on through DEVBOX_IDLE_ACTION / DEVBOX_IDLE_TIMEOUT."""

    timeout: Duration = contract.IDLE_DEFAULTS["timeout"]
    action: Literal["none", "stop", "poweroff"] = contract.IDLE_DEFAULTS["action"]
    interval: Duration = contract.IDLE_DEFAULTS["interval"]
    warn_before: Duration = contract.IDLE_DEFAULTS["warn_before"]
    cpu_percent: Percent = contract.IDLE_DEFAULTS["cpu_percent"]
    gpu_percent: Percent = contract.IDLE_DEFAULTS["gpu_percent"]
    # Process names whose CPU and disk use is not the user's work (a metrics agent, a sync).
    ignore: list[ProcessName] = []

    @field_validator("timeout", "interval", "warn_before", "cpu_percent", "gpu_percent")
    @classmethod
    def _as_the_watcher_reads_it(cls, value, info):
        """The image's watcher reads these with the same rules (runtime/rules.py): a value it
        would refuse (an interval of 0) is refused here, before any lock or build."""
        try:
            rules.validate({info.field_name: value}, "idle")
        except rules.RuleError as exc:
            raise ValueError(str(exc).split(": ", 2)[-1]) from None
        return value


PackageName = Annotated[str, _pattern(
    r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", "a package name (letters, digits, '.', '_', '-')")]


class PipInputs(_Model):
    """pip input files (requirements.in style), locked with hashes."""

    requirements: list[str] = []
    # Packages whose version may differ between the spec's platforms (one has no wheel for the
    # other's version); every other pin is the same on all of them, or `lock --check` fails.
    platform_specific: list[PackageName] = []


class Layers(_Model):
    """How the locked pip packages are split into image layers (layers.py decides the rest)."""

    # Packages that get a layer of their own, wherever their size places it: one that moves often
    # and should rebuild nothing but itself, or one a team wants shared on its own.
    own: list[PackageName] = []
    # At most this many install layers per lock file (each costs two image layers: its
    # requirements file and its install). overlay2 stacks at most 127.
    max_per_lock: Annotated[int, Field(ge=1, le=24)] = 10


class Budget(_Model):
    """Size limits a build (and a release) must keep, in MB of installed bytes (1 MB = 10^6):
    the whole image, the packages of each layer kind, and growth against the image the build
    replaces (REPOSITORY:VARIANT before it is moved)."""

    total_mb: Annotated[int, Field(ge=1)] | None = None
    layers: dict[Literal["system", "conda", "pip", "variant", "dev"],
                 Annotated[int, Field(ge=1)]] = {}
    growth_percent: Annotated[float, Field(ge=0)] | None = None


ReleaseWord = Literal["python", "cuda", "added", "removed", "major", "minor", "input-major",
                      "input-minor", "input-removed"]


class Release(_Model):
    """How `devbox-build release` numbers releases (release.py says what each word means):
    a change named in ``major`` makes a major release, one in ``minor`` a minor one, any other
    change a patch."""

    major: list[ReleaseWord] = ["python", "input-major", "input-removed"]
    minor: list[ReleaseWord] = ["added", "cuda", "input-minor"]
    first: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")] = "1.0.0"


class ImageSpec(_Model):
    """A whole ``image.toml``."""

    name: str
    repository: Repository
    description: Text = ""
    # Required, except under `extends`: then the image it extends decides (recorded at lock time
    # in locks/team-constraints.txt); a value given here must agree with it.
    python: str | None = None
    # A devbox-built image repository this image layers on (a project on the team's image): its
    # OS layer (CA, Python, user, venv) is reused as is, variants build FROM <extends>:<variant>,
    # and the pip locks are constrained by the pins it already has (locks/team-constraints.txt).
    extends: Repository | None = None
    platforms: list[Literal["linux/amd64", "linux/arm64"]] = ["linux/amd64"]
    # A release to lock like (like.py): "smd:4.4.1", its files stored under like/smd-4.4.1/.
    like: Annotated[str, Field(pattern=r"^[a-z]+:\d+\.\d+\.\d+$")] | None = None
    ca_certificates: list[str] = []
    user: User = User()
    system: System = System()
    conda: Conda | None = None
    pip: PipInputs = PipInputs()
    dev: PipInputs = PipInputs()
    layers: Layers = Layers()
    env: dict[EnvName, Text] = {}
    labels: dict[LabelKey, Text] = {}
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = []
    # Unset under `extends`: the image below keeps its rules.
    idle: Idle | None = None
    budget: Budget | None = None
    release: Release = Release()
    # Default arguments to the image's entrypoint (CMD). Empty: the IDE server when the image has
    # one (JupyterLab), else a shell.
    command: list[str] = []
    variants: dict[str, Variant]

    # Where the spec was read from, and how the user named it; not part of the TOML.
    path: Path = Field(default=Path(SPEC_FILENAME), exclude=True)
    given: str = Field(default="", exclude=True)

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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits, '.', '_' and '-'")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(r"3\.\d+", value):
            raise ValueError(f"expected a Python minor version like '3.11', got {value!r}")
        if value not in PYTHON_VERSIONS:
            raise ValueError(f"Python {value} is not provided by any base this tool builds on "
                             f"(CPython {PYTHON_VERSIONS[0]} to {PYTHON_VERSIONS[-1]})")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if key.startswith("devbox.") or key == "org.opencontainers.image.created":
                raise ValueError(f"{key!r} is set by devbox-build from what it builds")
            if found := credentials.find(value):
                raise ValueError(f"{key}: holds {found[0][0]} ({found[0][1]}); labels are "
                                 "public in every registry the image reaches")
        return labels

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
    def _env_holds_no_proxy_or_secret(self) -> ImageSpec:
        for key, value in self.env.items():
            if key.lower() in credentials.PROXY_NAMES:
                raise ValueError(
                    f"env.{key}: proxies are passed at build time from the environment, "
                    "never baked into the image"
                )
            if found := credentials.find_in_variable(key, value):
                what, masked = found[0]
                raise ValueError(
                    f"env.{key}: holds {what} ({masked}); an image's environment is readable "
                    "by anyone who pulls it. Pass secrets at run time (docker run -e, a "
                    "mounted file) instead"
                )
        return self

    @model_validator(mode="after")
    def _conda_like_needs_a_release_and_conda(self) -> ImageSpec:
        for name, variant in self.variants.items():
            if variant.conda_like and (self.like is None or self.conda is None):
                raise ValueError(f"variants.{name}.conda_like: locks the release named by "
                                 "`like` through the conda layer; the spec needs `like` and a "
                                 "[conda] section")
        return self

    @model_validator(mode="after")
    def _known_bases_provide_python(self) -> ImageSpec:
        if self.python is None:
            if self.extends is None:
                raise ValueError("python: missing; name the image's Python (e.g. '3.11'); only "
                                 "a spec that extends an image inherits that image's")
            return self
        for name, variant in self.variants.items():
            for pattern, provided in _BASE_PYTHONS.items():
                if re.fullmatch(pattern, variant.base) and provided != self.python:
                    raise ValueError(f"python: {variant.base} (variants.{name}.base) provides "
                                     f"Python {provided}, not {self.python}")
        return self

    @property
    def folder(self) -> Path:
        return self.path.parent

    def input_path(self, relative: str) -> Path:
        return (self.folder / relative).resolve()

    @property
    def python_version(self) -> str | None:
        """The image's Python: the spec's, or under `extends` the one the last lock recorded
        for the image it extends (None until then)."""
        return self.python or team_python(self)

    @property
    def lock_command(self) -> str:
        """The lock command for this spec, named the way the user named it."""
        return f"devbox-build lock {shlex.quote(self.given or self.name)}"


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
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the "
                        "spec as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        spec = ImageSpec.model_validate({**data, "path": path, "given": str(image)})
    except ValidationError as exc:
        raise SpecError(f"{path}: " + _describe(exc)) from None
    _check_files(spec)
    return spec


def team_python(spec: ImageSpec) -> str | None:
    """The Python of the image a spec extends, as its last lock recorded it (None: not locked)."""
    try:
        with (spec.folder / TEAM_CONSTRAINTS).open(encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(TEAM_PYTHON_PREFIX):
                    return line[len(TEAM_PYTHON_PREFIX):].strip()
    except OSError:
        pass
    return None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        # A key that is itself the problem (a newline in an env name) is shown escaped.
        key = ".".join(str(part) if re.fullmatch(r"[\w\[\]-]+", str(part)) else json.dumps(part)
                       for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif error["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            message = error["msg"].removeprefix("Value error, ")
            # Checks across keys (env against proxies, python against the bases) name their key
            # first: "env.HTTP_PROXY: ...".
            if not error["loc"] and (named := re.match(r"([\w.\[\]-]+): (.*)", message, re.S)):
                key, message = named.groups()
            elif error["loc"] and error["loc"][-1] == "[key]":
                key = key.removesuffix(".[key]")
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
