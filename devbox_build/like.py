"""`like = "smd:4.4.1"`: lock a stack the way a SageMaker Distribution release is.

A release's files are stored beside the spec (``like/smd-4.4.1/{cpu,gpu}.env.{in,out}``, copied
from the distribution's ``build_artifacts``: offline and reviewable). conda-forge's names are
mapped to PyPI's by the table below; what has no PyPI counterpart (the C libraries, Python itself)
or whose version is not a PEP 440 one (``tzdata 2026c``) is skipped and listed.

    env.in  ``conda-forge::numpy[version='>=1.26.4,<1.27.0']``: ranges, hard constraints
    env.out the solved environment's package URLs: pins, the resolver's preferences

The lock then matches the release wherever the spec's own inputs allow; `lock` names every
shared package that ends off the release's version, and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import SpecError

SOURCES = {"smd": "SageMaker Distribution"}
LIKE = re.compile(r"(?P<source>[a-z]+):(?P<version>\d+\.\d+\.\d+)")
# conda-forge name → PyPI name, where they differ (checked in; extend as releases need).
CONDA_TO_PYPI = {
    "pytorch": "torch", "pytorch-cpu": "torch", "pytorch-gpu": "torch",
    "matplotlib-base": "matplotlib", "py-xgboost": "xgboost", "py-xgboost-cpu": "xgboost",
    "py-xgboost-gpu": "xgboost", "sagemaker-python-sdk": "sagemaker", "python-gssapi": "gssapi",
    "ray-default": "ray", "ray-core": "ray", "brotli-python": "brotli", "python-tzdata": "tzdata",
    "tensorflow-base": "tensorflow", "msgpack-python": "msgpack", "pytables": "tables",
    "python-kubernetes": "kubernetes", "python-flatbuffers": "flatbuffers",
    "amazon_sagemaker_sql_editor": "amazon-sagemaker-sql-editor",
}
# conda packages that are not Python distributions on PyPI at all.
NOT_ON_PYPI = {"python", "pip", "conda", "docker-cli", "supervisor", "uv", "python_abi",
               "ca-certificates", "openssl", "tzdata"}
ENV_IN = re.compile(r"^[\w.-]+::(?P<name>[\w.-]+)(?:\[version='(?P<spec>[^']*)'\])?\s*$")


def pypi_name(conda_name: str) -> str:
    return canonicalize_name(CONDA_TO_PYPI.get(conda_name, conda_name))


@dataclass(frozen=True)
class Release:
    """One release's ranges and pins, by PyPI name."""

    like: str  # "smd:4.4.1"
    folder: Path
    flavour: str  # "cpu" or "gpu"
    ranges: dict[str, str] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # conda name → why
    python: str = ""  # the release's Python (from env.out)
    top_level: tuple[str, ...] = ()  # what env.in asks for (PyPI names), in its order
    # The same files as conda reads them (a variant's conda_like): env.in's match specs without
    # their channel (the spec's channels serve them), env.out's packages by conda name.
    conda_specs: list[str] = field(default_factory=list)
    conda_pins: dict[str, tuple[str, str]] = field(default_factory=dict)  # → (version, build)

    @property
    def files(self) -> list[Path]:
        return [self.folder / f"{self.flavour}.env.in", self.folder / f"{self.flavour}.env.out"]

    def constraints(self) -> str:
        return "".join(f"{name}{spec}\n" for name, spec in sorted(self.ranges.items()))

    def preferences(self) -> str:
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.pins.items()))


def parse(text: str, where: str) -> tuple[str, str]:
    found = LIKE.fullmatch(text)
    if not found or found["source"] not in SOURCES:
        raise SpecError(f"{where}: {text!r} is not a release to be like: expected "
                        + " or ".join(f"{key}:X.Y.Z ({name})" for key, name in SOURCES.items()))
    return found["source"], found["version"]


def load(spec, like: str, flavour: str) -> Release:
    """The release ``like`` names, from the files stored beside ``spec``."""
    source, version = parse(like, f"{spec.path}: key 'like'")
    folder = spec.folder / "like" / f"{source}-{version}"
    release = Release(like, folder, flavour)
    missing = [path for path in release.files if not path.is_file()]
    if missing:
        raise SpecError(f"{spec.path}: key 'like': {like} needs "
                        + ", ".join(str(p) for p in missing),
                        hint=f"copy {source}'s build_artifacts/.../{version}/{flavour}.env.in and "
                             f".env.out there (they are read offline)")
    env_in, env_out = (path.read_text(encoding="utf-8") for path in release.files)
    for number, line in enumerate(env_in.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        found = ENV_IN.match(line.strip())
        if not found:
            raise SpecError(f"{release.files[0]}, line {number}: cannot read {line.strip()!r}")
        name = found["name"]
        release.conda_specs.append(f"{name} {found['spec']}" if found["spec"] else name)
        if name in NOT_ON_PYPI:
            release.skipped[name] = "not a PyPI package"
            continue
        try:
            SpecifierSet(found["spec"] or "")
        except InvalidSpecifier:
            release.skipped[name] = f"range {found['spec']!r} is not a PEP 440 one"
            continue
        release.ranges[pypi_name(name)] = found["spec"] or ""
        object.__setattr__(release, "top_level", (*release.top_level, pypi_name(name)))
    for line in env_out.splitlines():
        if not line.startswith("http"):
            continue
        filename = line.split("#", 1)[0].rsplit("/", 1)[-1]
        stem = re.sub(r"\.(conda|tar\.bz2)$", "", filename)
        parts = stem.rsplit("-", 2)
        if len(parts) != 3:
            continue
        name, package_version, build = parts
        release.conda_pins[name] = (package_version, build)
        if name == "python":
            object.__setattr__(release, "python", package_version)
        if name in NOT_ON_PYPI or name.startswith(("lib", "_")):
            release.skipped.setdefault(name, "not a PyPI package")
            continue
        try:
            # Another scheme may still parse (tzdata's 2026c reads as 2026rc0): a version PEP 440
            # would write differently is not one.
            pep440 = str(Version(package_version)) == package_version
        except InvalidVersion:
            pep440 = False
        if not pep440:
            release.skipped[name] = f"version {package_version} is not a PEP 440 one"
            continue
        release.pins[pypi_name(name)] = package_version
    return release


def off_release(release: Release, locked: dict[str, str]) -> list[str]:
    """Each locked package the release also has at another version, and why."""
    lines = []
    for name, version in sorted(locked.items()):
        wanted = release.pins.get(name)
        if wanted is None or Version(wanted) == Version(version):
            continue
        if name in release.ranges and Version(version) not in SpecifierSet(release.ranges[name]):
            why = "outside the release's own range: the spec's inputs ask for it"
        else:
            why = ("the spec's inputs (or what they need) rule the release's version out, or "
                   "the index has no wheel of it for this Python and platform")
        lines.append(f"{name} {version} ({release.like}: {wanted}): {why}")
    return lines


def off_release_conda(release: Release, locked: dict[str, str]) -> list[str]:
    """Each package of a conda lock (conda names) the release has at another version."""
    return [f"{name} {version} ({release.like}: {release.conda_pins[name][0]}): the spec's "
            "environments (or what they need) or the channels rule the release's version out"
            for name, version in sorted(locked.items())
            if name in release.conda_pins and release.conda_pins[name][0] != version]


def compare_image(release: Release, manifest: dict) -> dict:
    """A built image (its manifest) against the release: shared pip packages by how far their
    versions are apart, the release's top-level packages the image lacks, the image's packages
    the release lacks, and both Pythons."""
    from .diff import bump

    installed = {p["name"]: p["version"] for p in manifest["packages"]["pip"]}
    shared = sorted(name for name in installed if name in release.pins)
    levels: dict[str, list[str]] = {"same": [], "patch": [], "minor": [], "major": [],
                                    "other": []}
    for name in shared:
        ours, theirs = installed[name], release.pins[name]
        level = "same" if Version(ours) == Version(theirs) else bump(theirs, ours)
        levels[level].append(name if level == "same" else f"{name} {ours} ({theirs})")
    return {
        "like": release.like,
        "python": {"image": manifest.get("python_version", ""), "release": release.python},
        "shared": len(shared),
        "versions": levels,
        "release_only": [name for name in release.top_level if name not in installed],
        "image_only": sorted(name for name in installed if name not in release.pins),
    }


def markdown(report: dict, flavour: str) -> str:
    """compare_image's report as a markdown table (docs, a pull request comment)."""
    versions = report["versions"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [("shared pip packages", str(report["shared"])),
            ("the same version", str(len(versions["same"]))),
            ("a patch apart", str(len(versions["patch"]))),
            ("a minor apart", str(len(versions["minor"]))),
            ("a major apart", f"{len(versions['major'])}"
             + (": " + ", ".join(versions["major"]) if versions["major"] else "")),
            ("Python", f"{report['python']['image']} (the release: "
                       f"{report['python']['release'] or '?'})"),
            ("the release's top-level packages the image lacks", str(len(report["release_only"]))),
            ("the image's packages the release lacks", str(len(report["image_only"])))]
    lines = [f"| against {report['like']} ({flavour}) | |", "|---|---|"]
    lines += [f"| {cell(name)} | {cell(value)} |" for name, value in rows]
    return "\n".join(lines) + "\n"
