"""What counts as a credential, and how to show where one is without showing it.

One list, used twice: the spec refuses ``[env]`` and label values that hold one (they would be
baked into every layer and every registry the image reaches), and the ``base`` check profile
flags them in a built image's environment, labels and history. Reports name the place and mask
the value: CI logs and JUnit files are public in many teams.
"""

from __future__ import annotations

import re

# Values that are secrets whatever they are called.
VALUE_PATTERNS: dict[str, re.Pattern[str]] = {
    "a password in a URL": re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),
    "a token in a URL": re.compile(r"(?<=://)[A-Za-z0-9_\-.~%]{20,}(?=@)"),
    "a conda channel token": re.compile(r"(?<=/t/)[^/\s]{8,}(?=/)"),
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "a GitLab token": re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "an API key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"),
    # The whole block, body included (to the end of the text when it was cut short).
    "a private key": re.compile(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL),
    "a password assignment": re.compile(r"(?i)\b(?:password|passwd|secret)=(?!\$)\S+"),
}
# Variable names whose non-empty value is a secret by definition.
SECRET_NAME = re.compile(
    r"(?i)(?:^|_)(?:PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?)"
    r"(?:_|$)"
)
# Proxies belong to the network an image was built on, not to the image.
PROXY_NAMES = {"http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"}


def find(text: str) -> list[tuple[str, str]]:
    """The credentials in ``text``: (what, the text with each of them masked)."""
    found = []
    for what, pattern in VALUE_PATTERNS.items():
        if pattern.search(text):
            found.append((what, mask(text)))
    return found


def find_in_variable(name: str, value: str) -> list[tuple[str, str]]:
    """Credentials in an environment variable: by its name (``*_TOKEN=...``) or by its value."""
    if value and SECRET_NAME.search(name):
        return [(f"a secret by its name ({name})", f"{name}={_stars(value)}")]
    return [(what, f"{name}={masked}") for what, masked in find(value)]


def mask(text: str) -> str:
    """``text`` with every credential replaced by a mask that keeps only its length."""
    for pattern in VALUE_PATTERNS.values():
        text = pattern.sub(lambda match: _stars(match.group(0)), text)
    return text


def _stars(secret: str) -> str:
    return f"<masked, {len(secret)} chars>"
