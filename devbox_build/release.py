"""Releases of an image: the next version proposed from what changed since the last release, a
CHANGELOG.md entry beside the spec, the version label and the REPOSITORY:VERSION-VARIANT tags.

The policy is data (the spec's ``[release]``): which changes make a major and which a minor
release; any other change is a patch, and no change is no release. The words:

    python          the Python version moved (3.11 → 3.12)
    cuda            the CUDA version moved, or a variant gained or lost it
    added, removed  a package (of any kind) appeared or went away
    major, minor    any package's major (minor) version moved
    input-major, input-minor, input-removed
                    the same, for the packages the spec's inputs name (requirements.in,
                    [system] packages): what users import, not what came along
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .diff import KINDS

CHANGELOG = "CHANGELOG.md"
VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
HEADING = re.compile(r"^## (\d+\.\d+\.\d+)\b", re.M)
LEVELS = ("major", "minor", "patch")


def previous_version(changelog: Path) -> str | None:
    """The newest release CHANGELOG.md records (its first ``## X.Y.Z`` heading)."""
    if not changelog.is_file():
        return None
    found = HEADING.search(changelog.read_text(encoding="utf-8"))
    return found[1] if found else None


def reasons(diff: dict, inputs: set[str]) -> dict[str, list[str]]:
    """Every policy word ``diff`` (diff.compare) gives cause for, with what caused it."""
    found: dict[str, list[str]] = {}

    def add(word: str, text: str) -> None:
        found.setdefault(word, []).append(text)

    facts = {fact["fact"]: fact for fact in diff["facts"]}
    if "python" in facts:
        old, new = facts["python"]["a"], facts["python"]["b"]
        if old.split(".")[:2] != new.split(".")[:2]:
            add("python", f"Python {old} → {new}")
    if "cuda" in facts:
        add("cuda", f"CUDA {facts['cuda']['a'] or 'none'} → {facts['cuda']['b'] or 'none'}")
    for kind in KINDS:
        entry = diff["packages"][kind]
        for package in entry["added"]:
            add("added", f"{package['name']} {package['version']} ({kind})")
        for package in entry["removed"]:
            add("removed", f"{package['name']} ({kind})")
            if package["name"] in inputs:
                add("input-removed", f"{package['name']} ({kind})")
        for package in entry["changed"]:
            text = f"{package['name']} {package['from']} → {package['to']} ({kind})"
            if package["bump"] in ("major", "minor"):
                add(package["bump"], text)
                if package["name"] in inputs:
                    add(f"input-{package['bump']}", text)
    return found


@dataclass(frozen=True)
class Proposal:
    version: str | None  # None: nothing changed since ``previous``
    previous: str | None
    level: str  # "major", "minor", "patch", "first" or "none"
    why: list[str]


def propose(previous: str | None, first: str, diffs: list[dict] | None, changed: bool,
            policy_major: list[str], policy_minor: list[str], inputs: set[str]) -> Proposal:
    """The next version: ``first`` without a previous release; else the highest level any
    variant's diff causes under the policy; None when no variant changed."""
    if previous is None:
        return Proposal(first, None, "first", ["the first release"])
    if not changed:
        return Proposal(None, previous, "none", [f"nothing changed since {previous}"])
    found: dict[str, list[str]] = {}
    for diff in diffs or []:
        for word, texts in reasons(diff, inputs).items():
            found.setdefault(word, []).extend(t for t in texts if t not in found.get(word, []))
    major, minor, patch = (int(part) for part in VERSION.fullmatch(previous).groups())
    for level, words in (("major", policy_major), ("minor", policy_minor)):
        why = [f"{word}: {text}" for word in words for text in found.get(word, [])]
        if why:
            version = f"{major + 1}.0.0" if level == "major" else f"{major}.{minor + 1}.0"
            return Proposal(version, previous, level, why)
    return Proposal(f"{major}.{minor}.{patch + 1}", previous, "patch",
                    ["no change the policy makes a major or minor one"])


def entry(proposal: Proposal, date: str, sections: list[str]) -> str:
    """The CHANGELOG.md entry: the version, why it is that level, and each variant's diff."""
    lines = [f"## {proposal.version} ({date})", "",
             f"{proposal.level.capitalize()} release"
             + (f" after {proposal.previous}" if proposal.previous else "") + ":", ""]
    lines += [f"- {reason}" for reason in proposal.why]
    lines.append("")
    for section in sections:
        lines += [section.rstrip("\n").replace("### ", "#### ", 1), ""]
    return "\n".join(lines)


def with_entry(changelog: Path, text: str) -> str:
    """CHANGELOG.md's text with ``text`` as its newest entry (a file made when missing)."""
    current = changelog.read_text(encoding="utf-8") if changelog.is_file() else ""
    found = HEADING.search(current)
    if found:
        return current[:found.start()] + text + "\n" + current[found.start():]
    head = current.rstrip("\n") or "# Changelog"
    return f"{head}\n\n{text}"
