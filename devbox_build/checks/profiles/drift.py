"""drift: what is installed is exactly what the image's locks say, and nothing else."""

from __future__ import annotations

import json

import pytest
from packaging.utils import canonicalize_name as canonical

from devbox_build.checks.image import REQUIREMENTS
from devbox_build.render import VENV
from devbox_build.runtime import contract

INSTALLED = (
    f"{VENV}/bin/python -c 'import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata[\"Name\"]: d.version for d in m.distributions()}))'"
)


@pytest.fixture(scope="module")
def manifest(image):
    if image.manifest is None:
        pytest.fail(f"{image.ref} has no {contract.MANIFEST}: it was not built by "
                    "devbox-build, so there is no lock to compare with", pytrace=False)
    return image.manifest


def locked_pins(host) -> dict[str, str]:
    """name → version from the lock files the build installed (/opt/devbox/requirements)."""
    pins = {}
    for name in host.run(f"ls {REQUIREMENTS}").stdout.split():
        for line in host.file(f"{REQUIREMENTS}/{name}").content_string.splitlines():
            if "==" in line and not line[:1].isspace() and not line.startswith("#"):
                package, _, version = line.partition("==")
                pins[canonical(package.split("[")[0])] = version.split()[0].rstrip("\\ ;")
    return pins


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    problems = [f"{name} {found[name]} is installed but not in the lock"
                for name in sorted(found.keys() - expected.keys())]
    problems += [f"{name} {expected[name]} is locked but not installed"
                 for name in sorted(expected.keys() - found.keys())]
    problems += [f"{name} is {found[name]}, the lock says {expected[name]}"
                 for name in sorted(found.keys() & expected.keys())
                 if found[name] != expected[name]]
    return problems


def test_python_packages_match_the_lock(image_host, manifest):
    """Python packages in the environment are the lock's, names and versions"""
    result = image_host.run(INSTALLED)
    assert result.rc == 0, result.stderr
    found = {canonical(name): version for name, version in json.loads(result.stdout).items()}
    # The environment's own pip and setuptools come with the venv, not from a lock; the build
    # recorded them as "seed". An image that extends another recorded that image's as "base".
    # The rest is the full closure the top lock promised (recorded at build), or for an image
    # built before that was recorded, the pins each layer installed.
    promised = manifest.get("locked")
    expected = {
        **{p["name"]: p["version"] for p in manifest["packages"]["pip"]
           if p["layer"] in ("seed", "base")},
        **(promised if promised is not None else locked_pins(image_host)),
    }
    problems = differences(expected, found)
    assert not problems, "the environment drifted from its lock:\n" + "\n".join(problems)


def test_every_dependency_is_installed(image_host):
    """every installed Python package has the dependencies it declares (pip check)"""
    result = image_host.run(f"{VENV}/bin/python -m pip check --disable-pip-version-check")
    assert result.rc == 0, ("installed packages miss dependencies (a lock that lost a package?):"
                            "\n" + (result.stdout or result.stderr).strip())


def test_system_packages_match_the_build(image_host, manifest):
    """Debian packages are those the build recorded"""
    result = image_host.run("dpkg-query -W -f '${Package}\\t${Version}\\n'")
    found = dict(line.split("\t") for line in result.stdout.splitlines() if line)
    expected = {p["name"]: p["version"] for p in manifest["packages"]["apt"]}
    problems = differences(expected, found)
    assert not problems, "system packages drifted from the build:\n" + "\n".join(problems)
    # With an apt lock, every package it pins is installed at its version.
    locked = manifest.get("apt_locked") or {}
    off = [f"{name} is {found.get(name, 'missing')}, the apt lock says {version}"
           for name, version in sorted(locked.items()) if found.get(name) != version]
    assert not off, "system packages differ from the apt lock:\n" + "\n".join(off)


def test_the_sbom_lists_exactly_what_is_installed(image_host, manifest):
    """the CycloneDX SBOM lists every installed apt, conda and pip package, and nothing else"""
    from devbox_build.runtime.sbom import conda_purl, deb_purl, pypi_purl

    if not image_host.file(contract.SBOM).exists:
        pytest.fail(f"no {contract.SBOM}: built by devbox-build before the SBOM was",
                    pytrace=False)
    sbom = json.loads(image_host.file(contract.SBOM).content_string)
    listed = {component["purl"] for component in sbom["components"]}
    # Read from the package databases themselves, not from the manifest the SBOM was made from.
    arch = image_host.run("dpkg --print-architecture").stdout.strip()
    distro = "debian-" + image_host.run(". /etc/os-release && echo $VERSION_ID").stdout.strip()
    apt = image_host.run("dpkg-query -W -f '${Package}\\t${Version}\\n'").stdout
    found = {deb_purl(*line.split("\t"), arch, distro) for line in apt.splitlines() if line}
    pip = json.loads(image_host.run(INSTALLED).stdout)
    found |= {pypi_purl(name, version) for name, version in pip.items()}
    conda_prefix = (manifest.get("conda") or {}).get("prefix")
    if conda_prefix:
        listing = image_host.run(f"cat {conda_prefix}/conda-meta/*.json").stdout
        decoder, at = json.JSONDecoder(), 0
        while at < len(listing.strip()):
            record, at = decoder.raw_decode(listing, at)
            found.add(conda_purl(record))
            while at < len(listing) and listing[at].isspace():
                at += 1
    missing, extra = sorted(found - listed), sorted(listed - found)
    assert not missing and not extra, (f"installed but not in the SBOM: {missing[:10]}; "
                                       f"in the SBOM but not installed: {extra[:10]}")
