"""base: the user every platform expects, and nothing in the image that should not be there."""

from __future__ import annotations

import json
import re

from devbox_build.checks.image import (
    STUDIO_GID,
    STUDIO_HOME,
    STUDIO_SHELL,
    STUDIO_UID,
    STUDIO_USER,
)

# Values that must never be baked into an image: proxy settings (they belong to the network the
# image was built on) and credentials.
SECRET_PATTERNS = {
    "a proxy setting": re.compile(r"\b(https?|ftp|all|no)_proxy=\S", re.IGNORECASE),
    "an AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret": re.compile(r"aws_secret_access_key\s*=\s*\S", re.IGNORECASE),
    "a GitHub token": re.compile(r"\b(ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password": re.compile(r"\bpassword=\S", re.IGNORECASE),
}


def test_user_matches_the_studio_contract(image_host):
    """user sagemaker-user is uid 1000, gid 100, home /home/sagemaker-user, bash"""
    user = image_host.user(STUDIO_USER)
    assert user.exists, f"no user {STUDIO_USER!r} in the image"
    assert (user.uid, user.gid) == (STUDIO_UID, STUDIO_GID), (
        f"user {STUDIO_USER} is {user.uid}:{user.gid}; SageMaker Studio needs "
        f"{STUDIO_UID}:{STUDIO_GID}"
    )
    assert user.home == STUDIO_HOME, f"home of {STUDIO_USER} is {user.home}, not {STUDIO_HOME}"
    assert user.shell == STUDIO_SHELL, f"shell of {STUDIO_USER} is {user.shell}, not bash"
    assert image_host.file(STUDIO_SHELL).exists, f"{STUDIO_SHELL} is missing"


def test_default_user_is_the_studio_user(image, image_host):
    """the image runs as uid 1000:100 by default, not root, in the home directory"""
    configured = image.config.get("User") or "root"
    assert configured not in ("root", "0") and not configured.startswith("0:"), (
        f"the image's USER is {configured}: it would run as root"
    )
    ids = image_host.run("id -u; id -g").stdout.split()
    assert ids == [str(STUDIO_UID), str(STUDIO_GID)], (
        f"USER {configured} runs as uid:gid {':'.join(ids)}, not {STUDIO_UID}:{STUDIO_GID}"
    )
    workdir = image.config.get("WorkingDir") or "/"
    assert workdir == STUDIO_HOME or workdir.startswith(STUDIO_HOME + "/"), (
        f"WORKDIR {workdir} is outside {STUDIO_HOME}, where Studio mounts the user's volume"
    )


def test_no_file_has_an_id_above_65535(image_root_host):
    """no file is owned by a uid or gid above 65535 (SageMaker refuses such images)"""
    found = image_root_host.run(
        r"find / -xdev \( -uid +65535 -o -gid +65535 \) -printf '%p %U:%G\n' 2>/dev/null"
        " | head -n 20"
    ).stdout.split("\n")
    found = [line for line in found if line]
    assert not found, "files owned by ids above 65535: " + "; ".join(found)


def test_entrypoint_is_exec_form_and_not_tini(image):
    """the ENTRYPOINT is exec form and not tini, so `train` and SIGTERM reach it"""
    entrypoint = image.config.get("Entrypoint") or []
    assert entrypoint, "the image has no ENTRYPOINT; `docker run IMAGE train` would not dispatch"
    assert entrypoint[:2] != ["/bin/sh", "-c"], (
        f"ENTRYPOINT is shell form ({' '.join(entrypoint)}): signals stop at the shell"
    )
    assert "tini" not in entrypoint[0].rsplit("/", 1)[-1], (
        f"ENTRYPOINT is {entrypoint[0]}: SageMaker warns tini mishandles the `train` argument"
    )


def test_no_secrets_or_proxies_in_history_or_config(image):
    """no proxy value or credential in the image's history, environment or labels"""
    history = image.engine.history(image.ref)
    places = [("history", step.get("CreatedBy", "")) for step in history]
    places += [("environment", item) for item in image.config.get("Env") or []]
    places += [("labels", json.dumps(image.labels))]
    found = [f"{what} in {where}: {text[:120]}"
             for where, text in places
             for what, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    assert not found, "\n".join(found)
