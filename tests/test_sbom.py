"""The image's CycloneDX SBOM: every apt, conda and pip package with its package URL, the
pinned hashes, the base image; valid against CycloneDX 1.6's schema; reproducible; held by the
drift check to what is installed (read from the package databases, not from the manifest)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from devbox_build.runtime.sbom import conda_purl, deb_purl, document, pypi_purl

from .conftest import cli


def schema_problems(text: str) -> list[str]:
    """What CycloneDX's own validator (cyclonedx-python-lib, strict JSON schema) says."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    return [str(error)] if error else []


MANIFEST = {"repository": "devbox/datascience", "variant": "cpu", "content_hash": "ab" * 32,
            "platform": "linux/amd64", "tool_version": "0.2.0", "base": "debian:bookworm-slim",
            "packages": {"apt": [{"name": "libc6", "version": "2.36-9+deb12u10", "size": 1024},
                                 {"name": "tzdata", "version": "1:2025b-0+deb12u1"}],
                         "pip": [{"name": "markupsafe", "version": "3.0.4", "layer": "pip"}],
                         "conda": []}}


def test_purls_and_a_valid_reproducible_document():
    assert deb_purl("tzdata", "1:2025b-0+deb12u1", "amd64", "debian-12") == (
        "pkg:deb/debian/tzdata@1%3A2025b-0%2Bdeb12u1?arch=amd64&distro=debian-12")
    assert pypi_purl("MarkupSafe", "3.0.4") == "pkg:pypi/markupsafe@3.0.4"
    assert conda_purl({"name": "python", "version": "3.11.9", "build": "h1_0",
                       "channel": "https://conda.anaconda.org/conda-forge",
                       "subdir": "linux-64"}) == (
        "pkg:conda/python@3.11.9?build=h1_0&channel=https%3A%2F%2Fconda.anaconda.org%2F"
        "conda-forge&subdir=linux-64")
    records = [{"name": "python", "version": "3.11.9", "build": "h1_0", "subdir": "linux-64",
                "channel": "conda-forge", "sha256": "c" * 64}]
    one = document(MANIFEST, records, "amd64", "debian-12", {"markupsafe": ["d" * 64]})
    assert json.dumps(one) == json.dumps(document(MANIFEST, records, "amd64", "debian-12",
                                                  {"markupsafe": ["d" * 64]}))
    assert schema_problems(json.dumps(one)) == []
    pip = next(c for c in one["components"] if c["purl"].startswith("pkg:pypi/"))
    assert pip["hashes"] == [{"alg": "SHA-256", "content": "d" * 64}]
    assert {"name": "devbox:base-image", "value": "debian:bookworm-slim"} in one["metadata"][
        "properties"]
    broken = dict(one, components=[{"type": "library"}])  # no name: the schema refuses it
    assert schema_problems(json.dumps(broken))


@pytest.mark.engine
def test_the_sboms_of_a_built_image_are_complete_and_checked(engine, tiny_images, tmp_path):
    _, results = tiny_images
    ref = results["cpu"].content_tag
    out = tmp_path / "tiny.cdx.json"
    result = cli("sbom", ref, "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert schema_problems(text) == []
    sbom = json.loads(text)
    manifest = json.loads(engine.read_file(ref, "/opt/devbox/manifest.json"))
    kinds = [next(p["value"] for p in c["properties"] if p["name"] == "devbox:package-kind")
             for c in sbom["components"]]
    assert kinds.count("apt") == len(manifest["packages"]["apt"]) > 50
    assert kinds.count("pip") == len(manifest["packages"]["pip"])
    # Beside the image, it also names the image and its layers, base first.
    properties = sbom["metadata"]["component"]["properties"]
    assert properties[0] == {"name": "devbox:image-id", "value": engine.image(ref)["Id"]}
    assert [p["value"].split()[0] for p in properties[1:]] == engine.image(ref)["RootFS"]["Layers"]
    assert {"name": "devbox:base-image", "value": "debian:bookworm-slim"} in sbom["metadata"][
        "properties"]
    idna = next(c for c in sbom["components"] if c["name"] == "idna")
    assert idna["hashes"][0]["content"] in (engine.read_file(
        ref, "/opt/devbox/requirements/pip-01.txt").decode())

    # The drift check holds it to what is installed, and fails when they part: an image whose
    # SBOM lost a component.
    check = cli("check", ref, "--profile", "drift", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert any("SBOM" in c["description"] for c in json.loads(check.stdout)["checks"])
    tampered = f"devbox-test/sbom-tampered:{results['cpu'].content_tag.rsplit('-', 1)[-1]}"
    dockerfile = (f"FROM {ref}\nUSER root\nRUN python3 -c \"import json; p='/opt/devbox/"
                  "sbom.cdx.json'; d=json.load(open(p)); d['components']=[c for c in "
                  "d['components'] if c['name']!='idna']; json.dump(d, open(p, 'w'))\"\n"
                  "USER sagemaker-user\n").encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        member = tarfile.TarInfo("Dockerfile")
        member.size = len(dockerfile)
        archive.addfile(member, io.BytesIO(dockerfile))
    context.seek(0)
    from devbox_build.engine import Built

    image_id = [e for e in engine.build(context) if isinstance(e, Built)][-1].image_id
    engine.tag(image_id, tampered)
    try:
        check = cli("check", tampered, "--profile", "drift")
        assert check.returncode == 1
        assert "installed but not in the SBOM: ['pkg:pypi/idna@" in check.stderr
    finally:
        engine.remove_image(tampered)
