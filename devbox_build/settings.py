"""Every ``DEVBOX_*`` environment variable, defined once.

``HOST`` holds what devbox-build itself reads (most are an option's default: ``--network``'s is
``DEVBOX_NETWORK``); ``IMAGE`` what the image's runtime and the EC2 boot script read, which the
host tool passes on but never interprets. :func:`check` runs once, before any command does its
work: a value that does not parse is one error naming the variable, and a ``DEVBOX_*`` variable
that is neither (``DEVBOX_LAYER_CACHE_MBS``, a typo that would otherwise be silently ignored) is
named in a warning with the closest real name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import InputError
from .runtime import rules

PREFIX = "DEVBOX_"


def _text(value: str) -> str:
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not 1/true/yes/on or 0/false/no/off")


def _whole(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()):  # not str.isdigit: '²' is a digit to it
        raise ValueError(f"{value!r} is not a whole number of megabytes")
    return int(value)


def _words(value: str) -> tuple[str, ...]:
    return tuple(value.split())


def _auto_on_off(value: str) -> str:
    if value.strip().lower() not in ("auto", "on", "off"):
        raise ValueError(f"{value!r} is not auto, on or off")
    return value.strip().lower()


def _mechanism(value: str) -> str:
    if value not in ("assembled", "chain"):
        raise ValueError(f"{value!r} is not assembled or chain")
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    parse: Callable[[str], object] = _text
    default: object = None


HOST = {setting.name: setting for setting in (
    Setting("DEVBOX_IMAGES_DIR", "where image specs live (--images-dir)"),
    Setting("DEVBOX_CA_CERTS", "CA certificates or globs to trust, space-separated "
            "(--ca-cert)", _words, ()),
    Setting("DEVBOX_NO_HOST_CA", "1: do not trust this host's extra CAs (--no-host-ca)", _flag,
            False),
    Setting("DEVBOX_NETWORK", "the network of build steps (--network)"),
    Setting("DEVBOX_MECHANISM", "how the pip groups become layers (--mechanism)", _mechanism,
            "assembled"),
    Setting("DEVBOX_LAYER_CACHE_MB", "the layer cache's size budget in MB", _whole,
            16_384),
    Setting("DEVBOX_BUILDER_TMPFS", "auto, on or off: the pip groups' builder keeps its install "
            "trees in memory (auto: when the engine's memory holds them with room to spare)",
            _auto_on_off, "auto"),
    Setting("DEVBOX_IMAGE", "the image the check plugin checks (pytest --devbox-image)"),
    Setting("DEVBOX_SIGNING_PASSPHRASE", "the signing key's passphrase (generate-key-pair, "
            "sign, release --sign-key; asked for on a terminal when unset)"),
)}

# Read inside the image (runtime/) or by the EC2 boot script: set on a container, not here.
IMAGE = frozenset({
    *rules.VARIABLES.values(), rules.IGNORE_VARIABLE,
    "DEVBOX_DOTFILES", "DEVBOX_CUDA_VERSION", "DEVBOX_CUDA_MIN_DRIVER", "DEVBOX_CONTENT_HASH",
    "DEVBOX_BUILD_TIME", "DEVBOX_ASSEMBLED", "DEVBOX_CONDA_ENVS", "DEVBOX_TRAINING_READY",
    "DEVBOX_BOX", "DEVBOX_ROLE", "DEVBOX_HOST_CHANNEL", "DEVBOX_IMDS_ENDPOINT",
    "DEVBOX_FAILSAFE_SECONDS", "DEVBOX_POWEROFF", "DEVBOX_VOLUME_WAIT_SECONDS",
})


# Read by this repository's scripts (provision.sh's base image, .ci/run's benchmark switch).
SCRIPTS = frozenset({"DEVBOX_BASE_IMAGE", "DEVBOX_CI_BENCHMARK"})


def value(name: str, environ: Mapping[str, str] | None = None):
    """``name``'s value, parsed; its default when unset or empty; an InputError naming it."""
    setting = HOST[name]
    text = (os.environ if environ is None else environ).get(name, "")
    if not text.strip():
        return setting.default
    try:
        return setting.parse(text)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}", hint=f"{name} is {setting.help}") from None


def default(name: str) -> Callable[[], object]:
    """An option's default, read when the option is (click calls it)."""
    return lambda: value(name)


def check(environ: Mapping[str, str] | None = None) -> list[str]:
    """Parse every host setting that is set (the first bad one raises); the warnings for the
    ``DEVBOX_*`` variables nothing reads."""
    environ = os.environ if environ is None else environ
    warnings = []
    for name in sorted(key for key in environ if key.startswith(PREFIX)):
        if name in HOST:
            value(name, environ)
        elif name not in IMAGE | SCRIPTS:
            close = difflib.get_close_matches(name, [*HOST, *IMAGE], n=1, cutoff=0.8)
            warnings.append(f"{name} is not a setting of devbox-build or its images; it is "
                            "ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return warnings
