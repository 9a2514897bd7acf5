"""The copier template: `copier copy` → a project that opens with the Dev Container CLI.

The reference CLI (`@devcontainers/cli`, installed by scripts/provision.sh) stands in for VS Code's
"Reopen in Container". The team image is the tiny test stack (devbox-test/tiny:cpu/gpu); a
project's conda channel is the conda tests' loopback channel, so conda builds use the host's
network (DEVBOX_NETWORK=host).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import docker.errors
import jsonschema
import pytest
import yaml

from devbox_build import refs
from devbox_build.spec import load_spec

from .conftest import IN_CI, ROOT
from .support.postgres import ensure_postgres_image
from .support.registry import LoopbackRegistry

SCHEMA = json.loads((ROOT / "tests/support/devcontainer/devContainer.base.schema.json").read_text())
HOME = "/home/sagemaker-user"
NO_GPU_NOTE = "this engine's host has no NVIDIA runtime"


# -- helpers ---------------------------------------------------------------------------------


def devcontainer_cli() -> str:
    found = shutil.which("devcontainer") or ROOT / ".devbox/node/node_modules/.bin/devcontainer"
    if not Path(found).exists():
        message = "the Dev Container CLI is missing: run scripts/provision.sh (npm @devcontainers/cli)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return str(found)


def make_template_repo(folder: Path, versions: dict[str, callable]) -> Path:
    """This repository as a template repo: copier.yml, templates/ and the package itself (a
    project installs devbox-build from its template's source), one tag per version.

    Each version's callable edits the template before its commit (None: as it is here).
    """
    folder.mkdir(parents=True)
    for name in ("copier.yml", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, folder / name)
    for name in ("templates", "devbox_build"):
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    git(folder, "init", "-q", "-b", "main")
    for tag, edit in versions.items():
        if edit:
            edit(folder)
        git(folder, "add", "-A")
        git(folder, "commit", "-q", "--allow-empty", "-m", f"template {tag}")
        git(folder, "tag", tag)
    return folder


def git(folder: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=folder, env=env, check=True,
                          capture_output=True, text=True).stdout


def copier(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "copier", *args], cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=120)


def copy_project(template: Path, target: Path, **answers: str) -> Path:
    data = [arg for key, value in answers.items() for arg in ("--data", f"{key}={value}")]
    result = copier("copy", "--defaults", "--vcs-ref", "1.0.0", *data, str(template), str(target))
    assert result.returncode == 0, result.stderr
    return target


def configs(project: Path) -> dict[str, Path]:
    """variant → devcontainer.json of a generated project."""
    single = project / ".devcontainer" / "devcontainer.json"
    if single.is_file():
        return {"gpu" if "(GPU)" in json.loads(single.read_text())["name"] else "cpu": single}
    return {v: project / ".devcontainer" / v / "devcontainer.json" for v in ("cpu", "gpu")
            if (project / ".devcontainer" / v / "devcontainer.json").is_file()}


def validate(config: Path) -> dict:
    document = json.loads(config.read_text())
    jsonschema.validate(document, SCHEMA)
    return document


class DevContainers:
    """`devcontainer up` / `exec` on a workspace; removes what it started, by id."""

    def __init__(self, engine, env: dict[str, str]) -> None:
        self.engine, self.env, self.started = engine, env, []

    def run(self, *args: str, user: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
        command = [devcontainer_cli(), *args]
        if user:  # the CLI as another host user: it remaps the container user to this uid/gid
            docker_gid = str(os.stat("/var/run/docker.sock").st_gid)
            command = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}",
                       f"--groups={docker_gid}", *command]
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              check=False, timeout=600)

    def up(self, project: Path, config: Path, user=None) -> str:
        result = self.run("up", "--workspace-folder", str(project), "--config", str(config),
                          user=user)
        self.log = result.stderr
        outcome = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout else {}
        assert outcome.get("outcome") == "success", result.stdout[-3000:] + result.stderr[-3000:]
        self.started.append(outcome["containerId"])
        return outcome["containerId"]

    def shell(self, command: str, project: Path) -> subprocess.CompletedProcess:
        """A command as a user pastes it, in the project's folder."""
        return subprocess.run(["bash", "-c", command], cwd=project, env=self.env,
                              capture_output=True, text=True, check=False, timeout=900)

    def up_printed(self, command: str, project: Path) -> str:
        """A README's `devcontainer up ...`, run as printed; the container's id."""
        result = self.shell(command, project)
        outcome = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout else {}
        assert outcome.get("outcome") == "success", result.stdout[-3000:] + result.stderr[-3000:]
        self.started.append(outcome["containerId"])
        return outcome["containerId"]

    def exec_printed(self, command: str, project: Path, script: str) -> str:
        """A README's `devcontainer exec ... bash`, with the script for that bash."""
        result = self.shell(f"{command} -lc {shlex.quote(script)}", project)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def exec(self, project: Path, config: Path, script: str, user=None) -> str:
        result = self.run("exec", "--workspace-folder", str(project), "--config", str(config),
                          "bash", "-lc", script, user=user)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def remove(self, container_id: str) -> None:
        """The container and, for a compose project, every container of that project."""
        try:
            labels = self.engine.api.inspect_container(container_id)["Config"]["Labels"] or {}
        except docker.errors.NotFound:  # removed with its compose project already
            return
        ids = [container_id]
        project = labels.get("com.docker.compose.project")
        if project:
            ids += [c["Id"] for c in self.engine.api.containers(
                all=True, filters={"label": f"com.docker.compose.project={project}"})]
        for each in dict.fromkeys(ids):
            self.engine.remove(each)
        if project:  # and the network compose made for the project
            for network in self.engine.api.networks(
                    filters={"label": f"com.docker.compose.project={project}"}):
                self.engine.api.remove_network(network["Id"])

    def close(self, volume_prefix: str) -> None:
        for container_id in self.started:
            try:
                self.remove(container_id)
            except Exception:  # already removed by the test
                pass
        for volume in self.engine.api.volumes().get("Volumes") or []:
            if volume["Name"].startswith(volume_prefix):
                self.engine.remove_volume(volume["Name"])


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    return make_template_repo(tmp_path_factory.mktemp("template") / "devbox-template",
                              {"1.0.0": None})


@pytest.fixture(scope="session")
def team(tiny_images) -> str:
    """The team image repository: the tiny stack, both variants built."""
    spec, _ = tiny_images
    return spec.repository


@pytest.fixture
def devcontainers(engine, request):
    # As a user's shell has it: devbox-build on PATH, no DEVBOX_CA_CERTS (the CLI finds the
    # host's CAs), the host network for the conda tests' loopback channel.
    env = {**os.environ, "DEVBOX_NETWORK": "host",
           "PATH": f"{Path(sys.executable).parent}:{Path(devcontainer_cli()).parent}:"
                   f"{os.environ['PATH']}"}
    env.pop("DEVBOX_CA_CERTS", None)
    containers = DevContainers(engine, env)
    yield containers
    containers.close(volume_prefix=f"t{os.getpid()}")


@pytest.fixture
def host_user_1234():
    """A host account with uid 1234: the Dev Container CLI asks the host for its user's name."""
    if subprocess.run(["getent", "passwd", "1234"], capture_output=True).returncode == 0:
        yield
        return
    subprocess.run(["useradd", "--uid", "1234", "--no-create-home", "devbox-remap"], check=True)
    yield
    subprocess.run(["userdel", "devbox-remap"], check=False)


def slug(name: str) -> str:
    return f"t{os.getpid()}-{name}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real registry on loopback (Debian's docker-registry), for the session."""
    with LoopbackRegistry(tmp_path_factory.mktemp("registry")) as running:
        yield running


# -- what a generated project prints, and whether it parses -----------------------------------

# Tools whose inline `code` in a README is a command to paste (the rest is prose).
PASTED = ("devbox-build ", "devcontainer ")


def printed_commands(project: Path) -> list[str]:
    """Every command the project's README and CI workflow print: the README's ```bash blocks,
    its inline devbox-build / devcontainer commands, and the workflow's run: steps."""
    readme = (project / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line:
                commands.append(line)
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    commands += [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith(PASTED)]
    workflow = yaml.safe_load((project / ".github/workflows/devbox.yml").read_text())
    commands += [step["run"] for step in workflow["jobs"]["image"]["steps"] if "run" in step]
    return commands


def github_expressions(command: str, variant: str = "cpu") -> str:
    """A workflow command with GitHub's ${{ }} expressions as the runner would fill them."""
    command = command.replace("${{ matrix.variant }}", variant)
    return re.sub(r"\$\{\{ secrets\.(\w+) \}\}", lambda m: f"test-{m[1].lower()}", command)


@functools.cache
def devcontainer_options(subcommand: str) -> frozenset[str]:
    result = subprocess.run([devcontainer_cli(), subcommand, "--help"], capture_output=True,
                            text=True, check=True)
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def assert_parses(command: str) -> None:
    """The shell accepts it, and each tool accepts its subcommand, options and arguments."""
    command = github_expressions(command)
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    for part in re.split(r"\s*(?:&&|\|)\s*", command):
        argv = shlex.split(part)
        tool, args = argv[0], argv[1:]
        if tool == "devbox-build":
            from devbox_build.cli import cli as devbox_cli

            subcommand = devbox_cli.get_command(None, args[0])
            assert subcommand is not None, command
            subcommand.make_context(args[0], args[1:])  # click's own parser: raises if wrong
        elif tool == "devcontainer":
            unknown = {a.split("=")[0] for a in args if a.startswith("--")} - devcontainer_options(
                args[0])
            assert not unknown, f"{command}: devcontainer {args[0]} has no {unknown}"
        elif tool in ("pip", "pipx"):
            assert args[0] == "install", command
            url, _, ref = args[1].rpartition("@")  # git+SCHEME://...@REF, read by every pip
            assert url.startswith("git+") and "://" in url and ref, command
        elif tool == "docker":
            assert args[0] in ("login", "pull"), command
        else:
            assert tool in ("echo", "npm"), f"unexpected command: {command}"


# -- every answer that changes files, without an engine ---------------------------------------


FILE_MATRIX = list(itertools.product(
    ["cpu", "gpu", "both"], ["pip", "conda", "both"], ["none", "postgres"],
    ["local", "prebuilt"], ["volume", "/srv/my data"],
))
# Quotes, a backslash and an apostrophe: the generated JSON, TOML and YAML must still parse.
TRICKY_NAME = 'Say "hi" \\ O\'Brien'
DEFAULTS_IN_THE_LABEL = ("remoteUser", "updateRemoteUserUID", "customizations",
                         "hostRequirements", "forwardPorts")
AWS_VARIABLES = ["AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]


@pytest.mark.parametrize(("variants", "manager", "services", "source", "data"), FILE_MATRIX,
                         ids=["-".join(c).replace("/srv/my data", "path") for c in FILE_MATRIX])
def test_every_answer_combination_generates_working_files(
        template, tmp_path, variants, manager, services, source, data):
    extras = data == "volume"  # home volume and AWS passthrough on with one, off with the other
    project = copy_project(
        template, tmp_path / "p", project_name=TRICKY_NAME, project_slug="tricky",
        variants=variants, dependency_manager=manager, services=services, image_source=source,
        registry="registry.local:5000/team", data_mount=data,
        persistent_home=str(extras).lower(), aws_credentials=str(extras).lower(),
        dotfiles_repository="https://example.com/me/dotfiles.git")
    found = configs(project)
    assert set(found) == ({"cpu", "gpu"} if variants == "both" else {variants})
    for variant, config in found.items():
        document = validate(config)
        assert document["name"] == f"{TRICKY_NAME} ({variant.upper()})"
        # The image's devcontainer.metadata label carries these; the project restates none.
        assert not set(DEFAULTS_IN_THE_LABEL) & set(document), set(document)
        mounts = {m["target"]: m for m in document["mounts"]}
        assert (HOME in mounts) == extras
        assert mounts["/data"]["type"] == ("volume" if data == "volume" else "bind")
        if data != "volume":
            assert mounts["/data"]["source"] == data
        assert "remoteEnv" not in document  # nothing set to an empty string
        if services == "postgres":
            compose_file = (config.parent / document["dockerComposeFile"]).resolve()
            answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
            assert re.fullmatch(r"tricky-[0-9a-f]{6}", answers["compose_project"])
            assert compose_file == (project / ".devcontainer" / answers["compose_project"]
                                    / "docker-compose.yml").resolve()
            compose = yaml.safe_load(compose_file.read_text())
            service = compose["services"][document["service"]]
            assert document["service"] == f"workspace-{variant}"
            assert service["image"] == f"registry.local:5000/team/devbox-projects/tricky:{variant}"
            assert service.get("environment", []) == (AWS_VARIABLES if extras else [])
            assert document["runServices"] == [f"workspace-{variant}", "db"]
        else:
            assert document["image"] == f"registry.local:5000/team/devbox-projects/tricky:{variant}"
            expected = [arg for name in AWS_VARIABLES for arg in ("-e", name)] if extras else None
            assert document.get("runArgs") == expected
        assert ("devbox-build build" in document.get("initializeCommand", "")) == (
            source == "local")
    spec = load_spec(project)  # the spec accepts what copier accepted
    assert spec.description == TRICKY_NAME
    assert spec.python is None and spec.python_version is None  # the team's, once locked
    assert spec.extends == "registry.local:5000/team/devbox/datascience"
    assert ("[pip]" in (project / "image.toml").read_text()) == (manager != "conda")
    workflow = (project / ".github/workflows/devbox.yml").read_text()
    assert ("--push" in workflow) == (source == "prebuilt")
    assert "docker login registry.local:5000" in workflow
    commands = printed_commands(project)
    assert "devbox-build lock . --check" in commands
    if source == "local":
        assert commands.index("devbox-build lock .") < next(
            i for i, c in enumerate(commands) if c.startswith("devcontainer up"))
    if variants == "both":
        assert all("--config" in c for c in commands if c.startswith("devcontainer "))
    assert any("--remove-existing-container" in c for c in commands)
    for command in commands:
        assert_parses(command)
    header = (project / "locks").exists()  # no locks until `devbox-build lock .`
    assert not header


@pytest.mark.parametrize(("answer", "message"), [
    ("project_name=   ", "The project name must not be empty"),
    ("project_slug=Bad Slug", "'Bad Slug' is not a valid slug"),
    ("data_mount=relative/path", "Use 'volume' or an absolute"),
    ("registry=Bad Registry", "'Bad Registry' is not a registry"),
    ("team_image=team/image:cpu", "is not an image repository name"),
    ("image_source=prebuilt", "A prebuilt image comes from a registry"),
    ("idle_timeout=soon", "'soon' is not a duration"),
])
def test_bad_answers_are_refused_with_a_clear_message(template, tmp_path, answer, message):
    result = copier("copy", "--defaults", "--vcs-ref", "1.0.0", "--data", answer,
                    str(template), str(tmp_path / "p"))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "p" / ".devcontainer").exists()


def test_copier_and_the_spec_share_one_image_name_rule():
    text = (ROOT / "copier.yml").read_text()
    assert f"regex_search('^{refs.REPOSITORY}$')" in text
    assert f"regex_search('^{refs.REGISTRY}$')" in text


def test_copier_update_applies_a_template_change_and_keeps_a_local_edit(tmp_path):
    def add_variable(folder: Path) -> None:  # the "next template version"
        include = folder / "templates/includes/devcontainer.json.jinja"
        include.write_text(include.read_text().replace(
            '"containerEnv": {', '"containerEnv": {\n    "DEVBOX_TEMPLATE": "1.1.0",'))

    template = make_template_repo(tmp_path / "template", {"1.0.0": None, "1.1.0": add_variable})
    project = tmp_path / "project"
    copy_project(template, project, project_name="Update Me")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "from the template")
    config = project / ".devcontainer/devcontainer.json"
    config.write_text(config.read_text().replace('"mounts": [', '"forwardPorts": [6006],\n  "mounts": ['))
    (project / "requirements.in").write_text("tqdm\npolars\n")
    git(project, "commit", "-q", "-am", "local edits")

    result = copier("update", "--defaults", "--vcs-ref", "1.1.0", cwd=project)
    assert result.returncode == 0, result.stderr
    document = validate(config)
    assert document["containerEnv"]["DEVBOX_TEMPLATE"] == "1.1.0"
    assert document["forwardPorts"] == [6006]  # the local edit survived the merge
    assert (project / "requirements.in").read_text() == "tqdm\npolars\n"
    answers = (project / ".copier-answers.yml").read_text()
    assert "_commit: 1.1.0" in answers and "_src_path:" in answers


# -- real engine: the README's own commands, copier copy → lock → devcontainer up → exec --------


MATRIX = {
    # name: answers (beyond project_name)
    "cpu-pip": dict(variants="cpu", dependency_manager="pip", pip_packages="attrs",
                    aws_credentials="true"),
    "gpu-conda-prebuilt": dict(variants="gpu", dependency_manager="conda",
                               image_source="prebuilt", conda_packages="greeter"),
    "both-both-hostdata": dict(variants="both", dependency_manager="both", pip_packages="attrs",
                               conda_packages="greeter", data_mount="HOSTDATA"),
    "both-postgres": dict(variants="both", dependency_manager="pip",
                          pip_packages="attrs pg8000", services="postgres"),
}

PROBES = {
    "pip": "python -c 'import attrs; print(\"attrs\", attrs.__version__)'",
    "conda": "greet",
    "write": "touch /data/written-by-me ./written-by-me && echo data-and-workspace-writable",
    "postgres": (
        "python - <<'EOF'\n"
        "import os, sys, time, urllib.parse, pg8000.native\n"
        "url = urllib.parse.urlparse(os.environ['DATABASE_URL'])\n"
        "for attempt in range(120):\n"
        "    try:\n"
        "        db = pg8000.native.Connection(url.username, host=url.hostname,\n"
        "            password=url.password, database=url.path[1:])\n"
        "        break\n"
        "    except Exception:\n"
        "        time.sleep(0.5)\n"
        "db.run('CREATE TABLE IF NOT EXISTS seen (who text)')\n"
        "db.run('INSERT INTO seen VALUES (:who)', who=os.environ['WHO'])\n"
        "print('postgres says', db.run('SELECT 40 + 2')[0][0])\n"
        "print('seen:', ','.join(sorted(r[0] for r in db.run('SELECT who FROM seen'))))\n"
        "EOF"
    ),
}


def readme_command(project: Path, starts: str, variant: str | None = None) -> str:
    """The README's command that starts with ``starts``, for a variant's configuration."""
    command = next(c for c in printed_commands(project) if c.startswith(starts))
    return command.replace(".devcontainer/cpu/", f".devcontainer/{variant}/") if variant else command


@pytest.mark.engine
@pytest.mark.parametrize("case", list(MATRIX))
def test_generated_project_opens_with_its_readme_commands(
        engine, template, team, channel, devcontainers, tmp_path, case):
    answers = {**MATRIX[case], "team_image": team, "conda_channels": channel.url}
    if answers.get("image_source") == "prebuilt":
        answers["registry"] = "127.0.0.1:5999"  # names the image; this case never pulls
    if answers.get("data_mount") == "HOSTDATA":
        data = tmp_path / "data"
        data.mkdir()
        (data / "input.csv").write_text("a,b\n1,2\n")
        os.chown(data, 1000, 100)  # the host user's own data folder
        answers["data_mount"] = str(data)
    if answers.get("services") == "postgres":
        answers["postgres_image"] = ensure_postgres_image(engine)
    if answers.get("aws_credentials"):
        # A host without ~/.aws, with only AWS_REGION set: the container must open, and get
        # exactly the variables that are set.
        (tmp_path / "host-home").mkdir()
        devcontainers.env["HOME"] = str(tmp_path / "host-home")
        devcontainers.env["AWS_REGION"] = "eu-west-1"
        for name in AWS_VARIABLES[:1] + AWS_VARIABLES[2:]:
            devcontainers.env.pop(name, None)
    project = copy_project(template, tmp_path / slug(case), project_name=slug(case), **answers)
    os.chown(project, 1000, 100)  # the workspace belongs to the host user (uid 1000 here)
    if answers.get("image_source") == "prebuilt":
        # What the project's CI does before a developer opens it: lock, build.
        for step in ("devbox-build lock .", "devbox-build build . --network host"):
            result = devcontainers.shell(step, project)
            assert result.returncode == 0, result.stderr[-3000:]
    else:
        result = devcontainers.shell(readme_command(project, "devbox-build lock ."), project)
        assert result.returncode == 0, result.stderr[-3000:]
    if answers["dependency_manager"] in ("pip", "both"):
        # The lock's header names the command that rewrites it; pasted in the project, it works.
        header = (project / "locks/linux-amd64/pip.txt").read_text().splitlines()[1]
        regenerate = header.removeprefix("# Regenerate with: ").split(" (")[0]
        assert regenerate == "devbox-build lock .", header
        result = devcontainers.shell(regenerate, project)
        assert result.returncode == 0 and "up to date" in result.stderr, result.stderr

    for variant, config in configs(project).items():
        validate(config)
        up = readme_command(project, "devcontainer up", variant if len(configs(project)) > 1 else None)
        container = devcontainers.up_printed(up, project)
        run = readme_command(project, "devcontainer exec", variant if len(configs(project)) > 1 else None)
        out = devcontainers.exec_printed(run, project, "id -un; pwd; echo $DEVBOX_PROJECT")
        assert out.split()[:3] == ["sagemaker-user", f"/workspaces/{slug(case)}", slug(case)]
        assert "data-and-workspace-writable" in devcontainers.exec_printed(run, project, PROBES["write"])
        manager = answers["dependency_manager"]
        if manager in ("pip", "both"):
            assert "attrs " in devcontainers.exec_printed(run, project, PROBES["pip"])
        if manager in ("conda", "both"):
            assert "hello from conda" in devcontainers.exec_printed(run, project, PROBES["conda"])
        if answers.get("services") == "postgres":
            out = devcontainers.exec_printed(run, project, f"WHO={variant} " + PROBES["postgres"])
            assert "postgres says 42" in out
            if variant == "gpu":  # the variants share the project's one database
                assert "seen: cpu,gpu" in out, out
        if variant == "gpu" and not engine.has_gpu():
            # The GPU configuration came up on a machine without a GPU ("optional"), and the
            # image's environment still tells the runtime to expose one where there is one.
            env = engine.api.inspect_container(container)["Config"]["Env"]
            assert "NVIDIA_VISIBLE_DEVICES=all" in env
        if answers.get("aws_credentials"):
            out = devcontainers.exec_printed(run, project, "test -d ~/.aws && echo aws-mounted; env | grep ^AWS_ | sort")
            assert "aws-mounted" in out and "AWS_REGION=eu-west-1" in out, out
            assert "AWS_PROFILE" not in out and "AWS_SECRET_ACCESS_KEY" not in out, out
        if case == "both-both-hostdata":
            assert "1,2" in devcontainers.exec_printed(run, project, "cat /data/input.csv")
        # The image carries the dev container defaults in its label; the project does not.
        image = engine.api.inspect_container(container)["Image"]
        metadata = json.loads(engine.image(image)["Config"]["Labels"]["devcontainer.metadata"])
        assert any(entry.get("remoteUser") == "sagemaker-user" for entry in metadata)
    for container in list(devcontainers.started):
        devcontainers.remove(container)


@pytest.mark.engine
def test_two_projects_with_the_same_answers_open_side_by_side(
        engine, template, team, devcontainers, tmp_path):
    answers = dict(variants="cpu", services="postgres", pip_packages="attrs pg8000",
                   team_image=team, postgres_image=ensure_postgres_image(engine))
    projects = []
    for folder in ("alice", "bob"):
        (tmp_path / folder).mkdir()
        project = copy_project(template, tmp_path / folder / slug("twin"), project_name=slug("twin"),
                               **answers)
        os.chown(project, 1000, 100)
        assert devcontainers.shell("devbox-build lock .", project).returncode == 0
        projects.append(project)
    first = devcontainers.up_printed(readme_command(projects[0], "devcontainer up"), projects[0])
    run = readme_command(projects[0], "devcontainer exec")
    assert "seen: cpu" in devcontainers.exec_printed(run, projects[0], "WHO=cpu " + PROBES["postgres"])
    second = devcontainers.up_printed(readme_command(projects[1], "devcontainer up"), projects[1])
    assert second != first
    labels = [engine.api.inspect_container(c)["Config"]["Labels"] for c in (first, second)]
    assert labels[0]["com.docker.compose.project"] != labels[1]["com.docker.compose.project"]
    # The second project has its own database: the first one's row is not there.
    out = devcontainers.exec_printed(run, projects[1], "WHO=bob " + PROBES["postgres"])
    assert "seen: bob" in out, out
    assert engine.state(first)["Running"]  # and the first project is untouched


@pytest.mark.engine
def test_the_idle_answer_stops_the_dev_container_by_itself(
        engine, template, team, devcontainers, tmp_path):
    """idle_timeout: the image's label starts the watcher (postStartCommand), since a dev
    container's entrypoint is the CLI's; the container, idle, stops itself. The README's
    inline idle and restore commands work in it first."""
    project = copy_project(template, tmp_path / slug("idle"), project_name=slug("idle"),
                           team_image=team, pip_packages="attrs", idle_timeout="8s")
    os.chown(project, 1000, 100)
    config = configs(project)["cpu"]
    assert validate(config)["containerEnv"]["DEVBOX_IDLE_TIMEOUT"] == "8s"
    assert devcontainers.shell("devbox-build lock .", project).returncode == 0
    readme = (project / "README.md").read_text()
    inline = [c for c in re.findall(r"`(devbox-(?:idle|restore) [^`]+)`", readme)]
    assert inline == ["devbox-restore --check", "devbox-idle status",
                      "devbox-idle keep-alive --for 2h"], inline
    # The README's commands, in the container, while the keep-alive holds it up.
    container = devcontainers.up(project, config)
    out = devcontainers.exec(project, config, " && ".join(
        [inline[2], inline[1], f"{inline[0]}; echo check-exit=$?"]))
    assert "kept alive until" in out and "action: stop after 8 s idle" in out, out
    # A brand-new dev container loses nothing: the CLI's own files are not the user's work.
    assert "check-exit=0" in out and "Traceback" not in out, out
    devcontainers.exec(project, config, "rm /tmp/devbox-keep-alive")
    assert engine.wait(container, timeout=300) in (0, 143), engine.logs(container)[-3000:]
    assert ": stop; last activity" in engine.logs(container), engine.logs(container)[-3000:]


@pytest.mark.engine
def test_the_project_has_the_team_images_python_and_no_other(
        engine, template, team, devcontainers, tmp_path):
    """The template asks no Python: the project inherits the team image's, recorded by the
    README's first step. A Python written into image.toml that the team image lacks is refused
    by the lock and by the build, on key 'python'."""
    project = copy_project(template, tmp_path / slug("py"), project_name=slug("py"),
                           team_image=team, pip_packages="attrs")
    assert "python =" not in (project / "image.toml").read_text()
    assert devcontainers.shell("devbox-build lock .", project).returncode == 0
    assert load_spec(project).python_version == "3.11"
    assert "# python: 3.11" in (project / "locks/team-constraints.txt").read_text()

    spec = project / "image.toml"
    spec.write_text(spec.read_text().replace("extends =", 'python = "3.12"\nextends ='))
    result = devcontainers.shell("devbox-build lock .", project)
    assert result.returncode == 2 and "key 'python'" in result.stderr, result.stderr
    assert "provides Python 3.11, not 3.12" in result.stderr and "Traceback" not in result.stderr
    # And the build, past the lock (--allow-stale): refused in the build, on key 'python'.
    result = devcontainers.shell("devbox-build build . --allow-stale", project)
    assert result.returncode == 2 and "key 'python'" in result.stderr, result.stderr[-2000:]
    assert "provides Python 3.11" in result.stderr


@pytest.mark.engine
def test_generated_ci_workflow_pushes_what_the_dev_container_pulls(
        engine, template, team, devcontainers, registry, tmp_path):
    """The workflow's steps, run here as the runner would: install devbox-build from the
    template's source, log in, pull the team image, check the locks, build, check, push. Then
    the dev container, with no image on this engine, pulls what CI pushed."""
    team_in_registry = f"{registry.host}/devbox-test/tiny"
    engine.tag(engine.image_id(f"{team}:cpu"), f"{team_in_registry}:cpu")
    for _ in engine.push(f"{team_in_registry}:cpu"):  # the team's own CI published it
        pass
    engine.untag(f"{team_in_registry}:cpu")
    name = slug("ci")
    project = copy_project(template, tmp_path / name, project_name=name, registry=registry.host,
                           team_image=team_in_registry, image_source="prebuilt",
                           pip_packages="attrs")
    os.chown(project, 1000, 100)
    # The developer locked and committed (README: "Change dependencies"); this pulls the team
    # image from the registry to read its pins.
    assert devcontainers.shell("devbox-build lock .", project).returncode == 0

    runner = tmp_path / "runner"
    subprocess.run([sys.executable, "-m", "venv", str(runner)], check=True)
    env = {**devcontainers.env, "PATH": f"{runner / 'bin'}:{devcontainers.env['PATH']}",
           "DOCKER_CONFIG": str(tmp_path / "docker-config")}
    workflow = yaml.safe_load((project / ".github/workflows/devbox.yml").read_text())
    steps = [step for step in workflow["jobs"]["image"]["steps"] if "run" in step]
    ran = []
    for step in steps:
        if step.get("if") and step["if"] != "github.ref == 'refs/heads/main'":
            continue  # only the main-branch condition is used; this run is on main
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", github_expressions(step["run"])],
                                cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{step['name']}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        ran.append(step["name"])
    assert len(ran) == len(steps) and any("push" in n for n in ran), ran
    installed = subprocess.run([str(runner / "bin/devbox-build"), "--version"], capture_output=True,
                               text=True)
    assert installed.returncode == 0, installed.stderr
    repository = f"{registry.host}/devbox-projects/{name}"
    assert "cpu" in registry.tags(f"devbox-projects/{name}")

    # A developer's machine: none of the project's images, only Docker.
    for tag in [t for i in engine.api.images(name=repository) for t in i["RepoTags"] or []]:
        engine.untag(tag)
    assert engine.image_id(f"{repository}:cpu") is None
    container = devcontainers.up_printed(readme_command(project, "devcontainer up"), project)
    assert engine.image_id(f"{repository}:cpu") is not None  # pulled from the registry
    run = readme_command(project, "devcontainer exec")
    assert "attrs " in devcontainers.exec_printed(run, project, PROBES["pip"])
    devcontainers.remove(container)


@pytest.mark.engine
@pytest.mark.parametrize("host_gid", [1234, 100])
def test_remapped_user_writes_the_workspace_installs_and_keeps_home(
        engine, template, team, devcontainers, host_user_1234, request, host_gid):
    """Host uid 1234 (not the image's 1000): the CLI remaps the container user. With host gid
    1234 the image's group 100 is renumbered and the image's onCreateCommand hands the
    environment and /data to the new gid; with host gid 100 (the SageMaker/`users` case) the
    group already matches."""
    name = slug(f"uid-{host_gid}")
    # pytest's tmp_path is private to root; the remapped host user needs to reach its project.
    tmp_path = Path(tempfile.mkdtemp(prefix="devbox-remap-"))
    os.chmod(tmp_path, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    project = copy_project(template, tmp_path / name, project_name=name, team_image=team,
                           image_source="prebuilt", registry="127.0.0.1:5999",
                           pip_packages="attrs")
    assert devcontainers.shell("devbox-build lock .", project).returncode == 0
    result = devcontainers.shell("devbox-build build .", project)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(["chown", "-R", f"1234:{host_gid}", str(project)], check=True)
    (tmp_path / "home").mkdir()
    os.chown(tmp_path / "home", 1234, host_gid)
    devcontainers.env["HOME"] = str(tmp_path / "home")
    user = (1234, host_gid)
    config = configs(project)["cpu"]

    container = devcontainers.up(project, config, user=user)
    # The image's group is joined, not handed over file by file: the container's own layer
    # stays small (a chgrp of the environment copied all of it up: ~900 MB).
    [listed] = engine.api.containers(all=True, filters={"id": container}, size=True)
    written = listed.get("SizeRw", 0)
    assert written < 10_000_000, f"the container's layer holds {written / 1e6:.0f} MB"
    out = devcontainers.exec(project, config, (
        "id -u; id -g; touch notes.txt && echo workspace-writable;"
        "touch /data/mine && echo data-writable;"
        "pip install --no-deps --no-cache-dir -q toolz==1.0.0 && python -c 'import toolz';"
        "echo installed; echo kept > ~/persisted.txt"), user=user)
    assert out.split()[:5] == ["1234", str(host_gid), "workspace-writable", "data-writable",
                               "installed"], out
    assert (project / "notes.txt").stat().st_uid == 1234

    # Persistence: the home volume outlives the container.
    devcontainers.remove(container)
    devcontainers.up(project, config, user=user)
    assert devcontainers.exec(project, config, "cat ~/persisted.txt", user=user).strip() == "kept"


@pytest.mark.engine
@pytest.mark.parametrize("host", ["uid-gid-1234", "root"])
def test_a_plain_image_opens_well_in_a_dev_container(
        engine, tiny_images, devcontainers, host_user_1234, request, host):
    """{"image": ...} and nothing else: the image's devcontainer.metadata label does the rest.
    Host uid:gid 1234:1234 (a typical Linux desktop: the CLI renumbers group 100): installs into
    the venv and writes to /data. A root host user: the workspace is read-only for the container
    user, and the container says so and what to do."""
    _, results = tiny_images
    tmp_path = Path(tempfile.mkdtemp(prefix="devbox-plain-"))
    os.chmod(tmp_path, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    workspace = tmp_path / slug(f"plain-{host}")
    (workspace / ".devcontainer").mkdir(parents=True)
    config = workspace / ".devcontainer" / "devcontainer.json"
    config.write_text(json.dumps({"image": results["cpu"].content_tag}))
    if host == "root":
        devcontainers.up(workspace, config)
        assert "not writable for uid 1000" in devcontainers.log, devcontainers.log[-3000:]
        assert "sudo chown -R 1000:100" in devcontainers.log
        return
    subprocess.run(["chown", "-R", "1234:1234", str(workspace)], check=True)
    (tmp_path / "home").mkdir()
    os.chown(tmp_path / "home", 1234, 1234)
    devcontainers.env["HOME"] = str(tmp_path / "home")
    devcontainers.up(workspace, config, user=(1234, 1234))
    out = devcontainers.exec(workspace, config, (
        "id -u; id -g; touch notes.txt && echo workspace-writable;"
        "touch /data/mine && echo data-writable;"
        "pip install --no-deps --no-cache-dir -q toolz==1.0.0 && python -c 'import toolz'"
        " && echo installed"), user=(1234, 1234))
    assert out.split()[:5] == ["1234", "1234", "workspace-writable", "data-writable",
                               "installed"], out


@pytest.mark.engine
def test_this_repository_opens_in_its_own_dev_container(engine, devcontainers, tmp_path,
                                                        request):
    """.devcontainer/: the image is built by devbox-build (initializeCommand), devbox-build runs
    inside from the workspace, and the host's engine answers there."""
    config = ROOT / ".devcontainer" / "devcontainer.json"
    validate(config)
    # Its home volume is named by the config, not by this test: remove the one this run makes.
    volumes = {v["Name"] for v in engine.api.volumes().get("Volumes") or []}

    def remove_new_volumes() -> None:
        for volume in engine.api.volumes().get("Volumes") or []:
            if volume["Name"] not in volumes:
                for container in engine.api.containers(
                        all=True, filters={"volume": volume["Name"]}):
                    engine.remove(container["Id"])
                engine.remove_volume(volume["Name"])

    request.addfinalizer(remove_new_volumes)
    checkout = tmp_path / "devbox-build"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    for name in (".devcontainer", "scripts", "images/devbox-dev"):  # uncommitted work too
        shutil.copytree(ROOT / name, checkout / name, dirs_exist_ok=True)
    # The image's user (uid 1000) owns this checkout, as on a laptop whose user is uid 1000.
    subprocess.run(["chown", "-R", "1000:100", str(checkout)], check=True)
    devcontainers.up(checkout, checkout / ".devcontainer/devcontainer.json")
    out = devcontainers.exec(checkout, checkout / ".devcontainer/devcontainer.json",
                             "devbox-build --version; docker version --format '{{.Server.APIVersion}}';"
                             " python -c 'import devbox_build; print(devbox_build.__file__)'")
    assert "devbox-build, version" in out, out
    assert "/workspaces/devbox-build/devbox_build/__init__.py" in out, out
    assert any(line.strip().startswith("1.") for line in out.splitlines()), out
