"""The image's software bill of materials: every apt, conda and pip package installed, as a
CycloneDX 1.6 JSON document with package URLs, written by the build's last step (finalize.py)
from the package databases themselves and the hashes the locks pinned.

Standard library only (it runs inside the image). Reproducible: no timestamp, and the serial
number is derived from the image's content hash, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from urllib.parse import quote

from . import contract

SPEC_VERSION = "1.6"
REQUIREMENTS = f"{contract.DEVBOX}/requirements"  # the lock lines each pip group installed
# The purl types (github.com/package-url/purl-spec): Debian's, conda's, PyPI's.
PURL_SAFE = ".-_~"


def _v(text: str) -> str:
    return quote(str(text), safe=PURL_SAFE)


def deb_purl(name: str, version: str, arch: str, distro: str) -> str:
    return f"pkg:deb/debian/{_v(name)}@{_v(version)}?arch={arch}&distro={distro}"


def pypi_purl(name: str, version: str) -> str:
    return f"pkg:pypi/{_v(re.sub(r'[-_.]+', '-', name).lower())}@{_v(version)}"


def conda_purl(record: dict) -> str:
    qualifiers = "&".join(f"{key}={_v(record[key])}" for key in ("build", "channel", "subdir")
                          if record.get(key))
    return f"pkg:conda/{_v(record['name'])}@{_v(record['version'])}" + (
        f"?{qualifiers}" if qualifiers else "")


def pinned_hashes(folder: str = REQUIREMENTS) -> dict[str, list[str]]:
    """name → the sha256 digests its lock lines allowed pip to install."""
    hashes: dict[str, list[str]] = {}
    for path in sorted(Path(folder).glob("*.txt")):
        for line in path.read_text().splitlines():
            if "==" in line and not line[:1].isspace() and not line.startswith("#"):
                name = re.sub(r"[-_.]+", "-", line.split("==")[0].split("[")[0]).lower()
                hashes[name] = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
    return hashes


def _component(purl: str, name: str, version: str, kind: str, hashes=(), size=None) -> dict:
    component = {"type": "library", "bom-ref": purl, "name": name, "version": version,
                 "purl": purl,
                 "properties": [{"name": "devbox:package-kind", "value": kind}]}
    if size:
        component["properties"].append({"name": "devbox:installed-bytes", "value": str(size)})
    if hashes:
        component["hashes"] = [{"alg": "SHA-256", "content": digest} for digest in hashes]
    return component


def document(manifest: dict, conda_records: list[dict], arch: str, distro: str,
             hashes: dict[str, list[str]]) -> dict:
    """The CycloneDX document for ``manifest`` (finalize's), the conda prefix's own records
    and the pinned hashes."""
    packages = manifest["packages"]
    components = [_component(deb_purl(p["name"], p["version"], arch, distro), p["name"],
                             p["version"], "apt", size=p.get("size"))
                  for p in packages["apt"]]
    components += [_component(conda_purl(r), r["name"], r["version"], "conda",
                              [r["sha256"]] if r.get("sha256") else (), r.get("size"))
                   for r in conda_records]
    components += [_component(pypi_purl(p["name"], p["version"]), p["name"], p["version"],
                              "pip", hashes.get(p["name"], ()), p.get("size"))
                   for p in packages["pip"]]
    content = manifest.get("content_hash", "unknown")
    image = {"type": "container", "bom-ref": "image", "name": manifest.get("repository", ""),
             "version": f"{manifest.get('variant', '')}-{content[:12]}"}
    base = manifest.get("base")
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'devbox:' + content)}",
        "version": 1,
        "metadata": {
            "component": image,
            "tools": {"components": [{"type": "application", "name": "devbox-build",
                                      "version": manifest.get("tool_version", "")}]},
            "properties": [{"name": "devbox:content-hash", "value": content},
                           {"name": "devbox:platform", "value": manifest.get("platform", "")}]
            + ([{"name": "devbox:base-image", "value": base}] if base else []),
        },
        "components": components,
        "dependencies": [{"ref": "image",
                          "dependsOn": [component["bom-ref"] for component in components]}],
    }


def with_layers(sbom: dict, image_id: str, layers: list[tuple[str, int, str]]) -> dict:
    """``sbom`` with what only the host knows once the image exists: its id and its layers
    (diff id and bytes, bottom first; the base image's are the first), as properties of the
    image component. The copy inside the image cannot hold them: it is in the last layer."""
    image = dict(sbom["metadata"]["component"])
    image["properties"] = [{"name": "devbox:image-id", "value": image_id}] + [
        {"name": "devbox:layer", "value": f"{diff_id} {size}"} for diff_id, size, _ in layers]
    return {**sbom, "metadata": {**sbom["metadata"], "component": image}}


def write(manifest: dict, conda_records: list[dict], path: str = contract.SBOM) -> int:
    """Write the image's SBOM; the number of components."""
    arch = {"linux/amd64": "amd64", "linux/arm64": "arm64"}.get(manifest.get("platform", ""),
                                                                 "amd64")
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
                   if "=" in line)
    distro = f"debian-{release.get('VERSION_ID', '').strip(chr(34))}"
    sbom = document(manifest, conda_records, arch, distro, pinned_hashes())
    Path(path).write_text(json.dumps(sbom, indent=1, sort_keys=True) + "\n")
    return len(sbom["components"])
