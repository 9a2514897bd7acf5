"""Reading what an image says about itself: /opt/devbox/manifest.json and its labels."""

from __future__ import annotations

import json

from .engine import Engine
from .errors import DevboxError
from .runtime import contract

MANIFEST_PATH = contract.MANIFEST


def read_manifest(engine: Engine, ref: str) -> dict:
    """The image's manifest plus its labels, as one document."""
    image = engine.image(ref)
    try:
        manifest = json.loads(engine.read_file(ref, MANIFEST_PATH))
    except DevboxError:
        raise DevboxError(
            f"{ref} has no {MANIFEST_PATH}: it was not built by devbox-build"
        ) from None
    manifest["image"] = {
        "ref": ref,
        "id": image["Id"],
        "size": image["Size"],
        "labels": image["Config"].get("Labels") or {},
    }
    return manifest


def locked_versions(manifest: dict) -> dict[str, str]:
    """pip packages the image installed from its own locks (not the venv's seeds, nor the
    packages of an image it extends)."""
    return {
        package["name"]: package["version"]
        for package in manifest["packages"]["pip"]
        if package["layer"] not in ("seed", "base")
    }
