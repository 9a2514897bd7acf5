"""Every command the README and the guides under docs/ print is run here as printed
(placeholders filled in), or, for the few that cannot end or run on this machine, parsed and
named with the test that covers them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.engine

# Placeholders a reader replaces, and what this machine replaces them with.
PLACEHOLDERS = {
    "ECR_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/datascience:cpu",
    "ROLE": "arn:aws:iam::123456789012:role/SageMakerImages",
    "/path/to/devbox-build": str(ROOT),
    "my/image:1.2": "devbox/datascience:cpu",
}
# Printed, not run here, and where they are covered instead.
NOT_RUN = {
    "scripts/main": "CI's clean clone runs it (.ci/run: scripts/test; scripts/main by hand)",
    "scripts/test": ".ci/run runs it",
    "docker run --rm -p 8888:8888 devbox/datascience:cpu":
        "a server that does not end; tests/test_contracts.py starts the same container",
    "docker run --rm -p 8888:8888 -e SAGEMAKER_APP_TYPE=JupyterLab devbox/datascience:cpu":
        "a server that does not end; the sagemaker-studio check profile starts it",
    "docker run --rm --gpus all devbox/datascience:gpu nvidia-smi": "needs a GPU",
    "docker run --rm -e DEVBOX_IDLE_TIMEOUT=2h -e DEVBOX_IDLE_ACTION=stop -p 8888:8888 "
    "devbox/datascience:cpu": "a server that stops after 2 h idle; tests/test_idle.py runs the "
                              "same container with the timeout at 6 s",
    "jupyterhub -f jupyterhub_config.py": "a server that does not end; tests/test_hub.py starts "
                                          "a hub configured the same way (hub docker's output "
                                          "included from its own jupyterhub_config.py)",
    "devbox-conda create scratch 'python-dateutil >=2.9'": "tests/test_conda.py (conda image)",
    "devbox-conda run scratch python -c 'import dateutil'": "tests/test_conda.py (conda image)",
    "devbox-conda list; devbox-conda remove scratch": "tests/test_conda.py (conda image)",
}


def _commands(block: str) -> list[str]:
    commands = []
    for line in block.splitlines():
        line = re.split(r"\s+#\s", line)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


# The README, then the guides in reading order: one text, as a reader goes through it.
DOCS = ["README.md", "docs/building.md", "docs/running.md", "docs/projects.md",
        "docs/reference.md"]


def documentation() -> str:
    return "\n".join((ROOT / name).read_text() for name in DOCS)


def printed_commands() -> list[str]:
    return [command for block in re.findall(r"```(?:bash|sh)\n(.*?)```", documentation(), re.S)
            for command in _commands(block)]


# The walk-throughs' blocks, each run by its own test: EC2's by tests/test_ec2.py (against moto
# and the stand-in box), signing's by tests/test_signing.py (against a loopback registry),
# arm64's by tests/test_arm64.py (on the tiny stack, under emulation).
WALK_THROUGH = "<!-- ec2 walk-through"
SIGNING_WALK_THROUGH = "<!-- signing walk-through"
ARM64_WALK_THROUGH = "<!-- arm64 walk-through"


def walk_through_commands(marker: str = WALK_THROUGH) -> list[str]:
    block = re.search(re.escape(marker) + r"[^\n]*\n```bash\n(.*?)```", documentation(), re.S)
    assert block, f"no {marker} block in {', '.join(DOCS)}"
    return _commands(block.group(1))


def filled(command: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return command


def test_every_printed_command_parses():
    from devbox_build.cli import cli

    for command in printed_commands():
        command = filled(command)
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
        for part in re.split(r"\s*(?:&&|;)\s*", command):
            argv = shlex.split(re.split(r"\s+(?:>>?|<|\|)\s+", part)[0])  # less redirections
            if argv[0] == "devbox-build":
                group = cli
                while hasattr(group, "get_command") and argv[1:]:
                    sub = group.get_command(None, argv[1])
                    if sub is None:
                        break
                    group, argv = sub, argv[1:]
                group.make_context(argv[0], argv[1:])  # click's parser raises when wrong


def run(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", filled(command)], cwd=cwd, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                     f"{os.environ['PATH']}", **(env or {})})


def test_every_printed_command_runs(engine, default_images, tmp_path):
    git_identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    # What the printed commands need around them: a training job folder, a tests folder.
    (tmp_path / "job" / "code").mkdir(parents=True)
    (tmp_path / "job" / "code" / "train.py").write_text(
        "import os, pathlib; pathlib.Path(os.environ['SM_MODEL_DIR'], 'ok').write_text('1')\n")
    os.chown(tmp_path / "job", 0, 0)
    (tmp_path / "tests" / "image").mkdir(parents=True)
    (tmp_path / "tests" / "image" / "test_mine.py").write_text(
        "def test_python(image_host):\n    assert image_host.run('python -V').rc == 0\n")
    # The template as a reader has it: a clone (committed work only, as in CI's clean clone).
    clone = tmp_path / "devbox-build"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    PLACEHOLDERS["/path/to/devbox-build"] = str(clone)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "id_ed25519")], check=True)
    PLACEHOLDERS["~/.ssh/id_ed25519.pub"] = str(tmp_path / "id_ed25519.pub")
    walk_through = [command for marker in (WALK_THROUGH, SIGNING_WALK_THROUGH, ARM64_WALK_THROUGH)
                    for command in walk_through_commands(marker)]
    tags_before = set(sum((i["RepoTags"] or [] for i in engine.api.images()), []))
    ran = []
    try:
        for command in printed_commands():
            if command in NOT_RUN or command in walk_through:
                continue
            # copier asks its questions on a terminal; --defaults takes the defaults instead.
            command = command.replace("copier copy ", "copier copy --defaults ").replace(
                "copier update", "copier update --defaults")
            cwd = ROOT if command.startswith("devbox-build") and " . " not in command else tmp_path
            if command.startswith(("devbox-build sagemaker", "devbox-build check my/",
                                   "devbox-build hub",
                                   "pytest ", "docker run")):
                cwd = tmp_path
            if command.startswith("copier update"):  # in the project the line before cd-ed to
                cwd = tmp_path / "my-project"
            result = run(command, cwd, git_identity)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            ran.append(command)
        assert (tmp_path / "job" / "model" / "ok").read_text() == "1"
        assert json.loads(run("devbox-build inspect devbox/datascience:cpu --json", ROOT).stdout)[
            "variant"] == "cpu"
        assert (tmp_path / "my-project" / "locks" / "team-constraints.txt").is_file()
        hub = json.loads((tmp_path / "devbox" / "devbox-hub.json").read_text())
        assert [p["slug"] for p in hub["profiles"]] == ["cpu", "gpu"], hub
        assert "profileList" in (tmp_path / "values.yaml").read_text()
        assert len(ran) + len(NOT_RUN) + len(walk_through) == len(printed_commands()), ran
    finally:
        for tag in set(sum((i["RepoTags"] or [] for i in engine.api.images()), [])) - tags_before:
            engine.untag(tag)


def test_the_version_is_written_once_and_released_with_a_changelog_entry():
    """pyproject reads devbox_build.__version__; CHANGELOG.md's newest entry is that version; a
    version tag on this commit names it too (the tag is what a generated project records)."""
    import subprocess
    import tomllib

    from devbox_build import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "devbox_build.__version__"}
    from packaging.version import Version

    assert Version(__version__) > Version("0.0.0")
    entries = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert entries[0] == __version__, entries
    tags = subprocess.run(["git", "tag", "--points-at", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.split()
    for tag in tags:
        if re.fullmatch(r"v?\d+\.\d+\.\d+", tag):
            assert tag.lstrip("v") == __version__, tags


def test_the_readme_is_short_and_every_guide_is_linked_and_kept():
    """The README says what, the two commands and the flow, and links every guide; no
    markdown file under docs/ is left out of the command tests."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 8000, len(readme)
    for name in DOCS[1:]:
        assert f"]({name})" in readme, name
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")) == sorted(
        DOCS[1:])
    for name in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / name).read_text()):
            if not target.startswith("http"):
                assert ((ROOT / name).parent / target).exists(), (name, target)
