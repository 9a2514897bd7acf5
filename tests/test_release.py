"""`devbox-build release`: the next version from what changed since the last release, by the
spec's policy; CHANGELOG.md entries; the version label and REPOSITORY:VERSION-VARIANT tags; no
release when nothing changed; [budget] growth held against the last release."""

from __future__ import annotations

import json

import pytest

from devbox_build.release import propose, reasons, with_entry

from .conftest import assert_clean_error, cli, load
from .test_build import CA

MAJOR, MINOR = ["python", "input-major", "input-removed"], ["added", "cuda", "input-minor"]


def diff(pip_changed=(), added=(), removed=(), facts=()):
    empty = {"added": [], "removed": [], "changed": []}
    return {"packages": {
        "apt": dict(empty), "conda": dict(empty),
        "pip": {"added": [{"name": n, "version": "1"} for n in added],
                "removed": [{"name": n, "version": "1"} for n in removed],
                "changed": [{"name": n, "from": a, "to": b, "bump": k}
                            for n, a, b, k in pip_changed]}},
        "facts": [{"fact": f, "a": a, "b": b} for f, a, b in facts]}


@pytest.mark.parametrize("change, level, version, why", [
    (diff(pip_changed=[("numpy", "1.26.4", "2.4.0", "major")]), "major", "3.0.0",
     "input-major: numpy 1.26.4 → 2.4.0 (pip)"),
    (diff(pip_changed=[("urllib3", "1.26.20", "2.5.0", "major")]), "patch", "2.4.2",
     "no change the policy makes a major or minor one"),  # not an input: it came along
    (diff(facts=[("python", "3.11.2", "3.12.1")]), "major", "3.0.0", "python: Python 3.11.2 → 3.12.1"),
    (diff(facts=[("python", "3.11.2", "3.11.9")]), "patch", "2.4.2",
     "no change the policy makes a major or minor one"),
    (diff(added=["polars"]), "minor", "2.5.0", "added: polars 1 (pip)"),
    (diff(removed=["numpy"]), "major", "3.0.0", "input-removed: numpy (pip)"),
    (diff(pip_changed=[("numpy", "2.3.1", "2.4.0", "minor")]), "minor", "2.5.0",
     "input-minor: numpy 2.3.1 → 2.4.0 (pip)"),
    (diff(facts=[("cuda", "", "12.9")]), "minor", "2.5.0", "cuda: CUDA none → 12.9"),
])
def test_the_policy_names_the_level_and_why(change, level, version, why):
    proposal = propose("2.4.1", "1.0.0", [change], True, MAJOR, MINOR, {"numpy"})
    assert (proposal.level, proposal.version) == (level, version)
    assert why in proposal.why


def test_first_release_nothing_changed_and_a_policy_of_ones_own():
    assert propose(None, "0.1.0", [], True, MAJOR, MINOR, set()).version == "0.1.0"
    assert propose("1.2.3", "1.0.0", [diff()], False, MAJOR, MINOR, set()).version is None
    # A team that calls any added package a major release:
    assert propose("1.2.3", "1.0.0", [diff(added=["x"])], True, ["added"], [], set()
                   ).version == "2.0.0"
    assert set(reasons(diff(pip_changed=[("a", "1", "2", "major")]), {"a"})) == {
        "major", "input-major"}


def test_the_changelog_gets_the_newest_entry_on_top(tmp_path):
    changelog = tmp_path / "CHANGELOG.md"
    text = with_entry(changelog, "## 1.0.0 (2026-12-06)\n\nfirst\n")
    assert text == "# Changelog\n\n## 1.0.0 (2026-12-06)\n\nfirst\n"
    changelog.write_text(text)
    assert with_entry(changelog, "## 1.1.0 (2026-12-07)\n\nnext\n").index("## 1.1.0") < text.index(
        "## 1.0.0") + 30


@pytest.mark.engine
def test_a_release_sequence(engine, stack):
    spec_file, changelog = stack / "image.toml", stack / "CHANGELOG.md"
    repository = load(stack).repository

    def release(*args: str) -> dict:
        result = cli("release", str(stack), "--variant", "cpu", "--json", *args, env=CA)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = release()
    assert (first["version"], first["level"]) == ("1.0.0", "first")
    labels = engine.image(f"{repository}:1.0.0-cpu")["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == "1.0.0"
    assert "## 1.0.0 (" in changelog.read_text()

    again = release()
    assert again["version"] is None and again["why"] == ["nothing changed since 1.0.0"]

    # An environment variable: a change, but no package moved: a patch.
    spec_file.write_text(spec_file.read_text().replace(
        '[env]\n', '[env]\nTEAM = "data"\n'))
    assert (release()["version"], release("--dry-run")["version"]) == ("1.0.1", None)

    # A system package added: a minor, named in the changelog with its diff.
    spec_file.write_text(spec_file.read_text() + '\n[system]\npackages = ["tree"]\n')
    assert release("--dry-run")["version"] == "1.1.0"
    assert "## 1.1.0" not in changelog.read_text()  # a dry run writes nothing
    minor = release()
    assert (minor["level"], minor["why"]) == ("minor", ["added: tree 2.1.0-1 (apt)"])
    text = changelog.read_text()
    assert text.index("## 1.1.0") < text.index("## 1.0.1") < text.index("## 1.0.0")
    assert "| tree | – | 2.1.0-1 | added |" in text
    assert f"`{repository}:1.0.1-cpu` → `{repository}:1.1.0-cpu`" in text

    # Growth over the budget (the release's build, held against the image it replaces, which
    # is the last release's): no release, the package that grew named, no tag, no entry.
    spec_file.write_text(spec_file.read_text().replace('["tree"]', '["tree", "less"]')
                         + "\n[budget]\ngrowth_percent = 0\n")
    result = cli("release", str(stack), "--variant", "cpu", env=CA)
    assert_clean_error(result, "over its size budget", "grew most: less (+")
    assert engine.image_id(f"{repository}:1.1.1-cpu") is None
    assert engine.image_id(f"{repository}:1.2.0-cpu") is None
    assert "## 1.2.0" not in changelog.read_text()
