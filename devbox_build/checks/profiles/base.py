"""base: the user every platform expects, and nothing in the image that should not be there."""

from __future__ import annotations

import json
import re

from devbox_build import credentials
from devbox_build.runtime import contract
from devbox_build.checks.image import (
    STUDIO_GID,
    STUDIO_HOME,
    STUDIO_SHELL,
    STUDIO_UID,
    STUDIO_USER,
)

# Where an image keeps the certificates it trusts; a private key there ships with every pull.
CA_STORE = ("/etc/ssl", "/usr/local/share/ca-certificates", "/usr/share/ca-certificates",
            "/etc/pki", "/etc/ca-certificates")


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
    """no proxy value or credential in the image's history, environment or labels (masked)"""
    found = []
    for item in image.config.get("Env") or []:
        name, _, value = item.partition("=")
        if name.lower() in credentials.PROXY_NAMES and value:
            found.append(f"a proxy setting in the environment: {name}=<masked>")
        found += [f"{what} in the environment: {masked}"
                  for what, masked in credentials.find_in_variable(name, value)]
    for key, value in image.labels.items():
        found += [f"{what} in label {key}: {masked}" for what, masked in credentials.find(value)]
    for number, step in enumerate(image.engine.history(image.ref)):
        created_by = step.get("CreatedBy", "")
        if re.search(r"\b(https?|ftp|all|no)_proxy=\S", created_by, re.IGNORECASE):
            found.append(f"a proxy setting in history step {number}: {credentials.mask(created_by)[:120]}")
        found += [f"{what} in history step {number}: {masked[:160]}"
                  for what, masked in credentials.find(created_by)]
    assert not found, "\n".join(found)


def test_no_private_key_in_the_ca_store(image_root_host):
    """no private key among the image's trusted certificates (the CA store ships with every pull)"""
    listed = image_root_host.run(
        "grep -rlsE -- '-----BEGIN ([A-Z]+ )*PRIVATE KEY-----' " + " ".join(CA_STORE)
        + " 2>/dev/null | head -n 20"
    ).stdout.split()
    assert not listed, ("private keys in the CA store (files named, contents not shown): "
                        + ", ".join(listed))


def test_idle_watcher_reads_its_rules(image_host):
    """devbox-idle is in the image and reads /etc/devbox/idle.toml: every laptop, EC2 box and
    Studio space can stop itself when idle, and never under busy work"""
    result = image_host.run("devbox-idle status --json")
    assert result.rc == 0, f"devbox-idle status failed: {result.stderr.strip()[-300:]}"
    status = json.loads(result.stdout)
    assert status["action"] in ("none", "stop", "poweroff"), status
    assert image_host.file(contract.IDLE_RULES).exists, f"no {contract.IDLE_RULES}"
