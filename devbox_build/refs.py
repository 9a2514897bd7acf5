"""Image references, checked with the grammar the engine and registries use (distribution's
``reference`` package): ``[HOST[:PORT]/]path/components[:tag][@digest]``.

Everything that ends up in an engine call (a spec's repository and bases, ``--registry``,
``--tag``, ``inspect REF``) is checked here first, so a typo is one error before any engine work
instead of an engine exception after a build.
"""

from __future__ import annotations

import re

from .errors import InputError

_HOST_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
HOST = rf"{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# The same expression is written in copier.yml (the template's team-image and registry answers);
# tests/test_templates.py checks the two agree.
REPOSITORY = rf"(?:{HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*"
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
REFERENCE = rf"{REPOSITORY}(?::{TAG})?(?:@{DIGEST})?"
REGISTRY = rf"{HOST}(?:/{_COMPONENT})*"
MAX_NAME = 255  # a repository name's longest form, host included


def names_registry(repository: str) -> bool:
    """Docker's rule: a first path component with a '.' or a ':' (or 'localhost') is a host."""
    first, slash, _ = repository.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def is_repository(value: str) -> bool:
    return len(value) <= MAX_NAME and re.fullmatch(REPOSITORY, value) is not None


def is_reference(value: str) -> bool:
    name = re.split(r"[:@](?=[^/]*$)", value, maxsplit=1)[0]
    return len(name) <= MAX_NAME and re.fullmatch(REFERENCE, value) is not None


def check_reference(value: str, what: str) -> str:
    """An image reference (``repo``, ``repo:tag``, ``host:5000/repo@sha256:...``)."""
    if not is_reference(value):
        raise InputError(f"{what}: {value!r} is not an image reference "
                         "([HOST[:PORT]/]name[:tag][@digest], lower-case name)")
    return value


def check_tag(value: str, what: str) -> str:
    """A tag: letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-'."""
    if not re.fullmatch(TAG, value):
        hint = " (a tag has no ':'; the repository comes from the spec)" if ":" in value else ""
        raise InputError(f"{what}: {value!r} is not a valid tag: use letters, digits, '_', '.' "
                         f"and '-', at most 128, not starting with '.' or '-'{hint}")
    return value


def check_registry(value: str, what: str = "--registry") -> str:
    """A registry host with an optional namespace: ``HOST[:PORT][/namespace...]``."""
    stripped = value.rstrip("/")
    if not re.fullmatch(REGISTRY, stripped):
        raise InputError(f"{what}: {value!r} is not a registry (HOST[:PORT][/namespace], "
                         "lower-case namespace)")
    return stripped


def platform_twin(ref: str, platform: str) -> str:
    """The name a base image of another ``platform`` than the engine's own goes by in that
    engine (``debian:bookworm-slim`` → ``debian:bookworm-slim-arm64``): a classic engine holds
    one image per tag, so the native image and its twin need two."""
    name, _, digest = ref.partition("@")
    if digest:
        return ref  # a digest names one platform's image already
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
    repository = name[: -len(tag) - 1] if tag else name
    return f"{repository}:{tag or 'latest'}-{platform.split('/')[-1]}"
