"""The copier template: `copier copy` → a project that opens with the Dev Container CLI.

The reference CLI (`@devcontainers/cli`, installed by scripts/provision.sh) stands in for VS Code's
"Reopen in Container". The team image is the tiny test stack (devbox-test/tiny:cpu/gpu); a
project's conda channel is the conda tests' loopback channel, so conda builds use the host's
network (DEVBOX_NETWORK=host).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest

from .conftest import HOST_CA_CERTS, IN_CI, ROOT, cli
from .support.postgres import ensure_postgres_image

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
    """This repository's template (copier.yml + templates/) as a git repo, one tag per version.

    Each version's callable edits the template before its commit (None: as it is here).
    """
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "copier.yml", folder / "copier.yml")
    shutil.copytree(ROOT / "templates", folder / "templates")
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
        outcome = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout else {}
        assert outcome.get("outcome") == "success", result.stdout[-3000:] + result.stderr[-3000:]
        self.started.append(outcome["containerId"])
        return outcome["containerId"]

    def exec(self, project: Path, config: Path, script: str, user=None) -> str:
        result = self.run("exec", "--workspace-folder", str(project), "--config", str(config),
                          "bash", "-lc", script, user=user)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def remove(self, container_id: str) -> None:
        labels = self.engine.api.inspect_container(container_id)["Config"]["Labels"] or {}
        ids = [container_id]
        if project := labels.get("com.docker.compose.project"):
            ids += [c["Id"] for c in self.engine.api.containers(
                all=True, filters={"label": f"com.docker.compose.project={project}"})]
        for each in dict.fromkeys(ids):
            self.engine.remove(each)

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
    env = {**os.environ, "DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS), "DEVBOX_NETWORK": "host",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
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


# -- the answers, without an engine -----------------------------------------------------------


ANSWER_MATRIX = list(itertools.product(
    ["cpu", "gpu", "both"], ["pip", "conda", "both"], ["none", "postgres"],
    [(True, "volume", False), (False, "/srv/data", True)],
))


@pytest.mark.parametrize(("variants", "manager", "services", "extras"), ANSWER_MATRIX)
def test_every_generated_devcontainer_json_follows_the_spec(
        template, tmp_path, variants, manager, services, extras):
    home, data, aws = extras
    project = copy_project(template, tmp_path / "p", project_name="Schema Check",
                           variants=variants, dependency_manager=manager, services=services,
                           persistent_home=str(home).lower(), data_mount=data,
                           aws_credentials=str(aws).lower(),
                           dotfiles_repository="https://example.com/me/dotfiles.git")
    found = configs(project)
    assert set(found) == ({"cpu", "gpu"} if variants == "both" else {variants})
    for variant, config in found.items():
        document = validate(config)
        assert document["remoteUser"] == "sagemaker-user" and document["updateRemoteUserUID"]
        assert document["forwardPorts"] == [8888]
        assert "--gpus" not in json.dumps(document.get("runArgs", []))
        assert document.get("hostRequirements", {}).get("gpu") == (
            "optional" if variant == "gpu" else None)
        mounts = {m["target"]: m for m in document["mounts"]}
        assert (HOME in mounts) == home
        if home:
            assert "${devcontainerId}" in mounts[HOME]["source"]
        assert mounts["/data"]["type"] == ("volume" if data == "volume" else "bind")
        assert ("AWS_PROFILE" in document.get("remoteEnv", {})) == aws
        if aws:  # ~/.aws is created first, so a machine without one still opens
            assert document["initializeCommand"].startswith('mkdir -p "$HOME/.aws"')
        settings = document["customizations"]["vscode"]["settings"]
        assert settings["python.defaultInterpreterPath"] == "/opt/venv/bin/python"
        if services == "postgres":
            assert document["dockerComposeFile"] == "docker-compose.yml"
            assert (config.parent / "docker-compose.yml").is_file()
    spec = (project / "image.toml").read_text()
    assert ('[pip]' in spec) == (manager != "conda") and ('[conda]' in spec) == (manager != "pip")
    workflow = (project / ".github/workflows/devbox.yml").read_text()
    assert "devbox-build lock . --check" in workflow and "devbox-build check" in workflow
    assert "dotfiles" in (project / ".devcontainer/post-create.sh").read_text()


@pytest.mark.parametrize(("answer", "message"), [
    ("project_name=   ", "The project name must not be empty"),
    ("project_slug=Bad Slug", "'Bad Slug' is not a valid slug"),
    ("python_version=2.7", "Invalid choice for 'python_version'"),
    ("data_mount=relative/path", "Use 'volume' or an absolute"),
])
def test_bad_answers_are_refused_with_a_clear_message(template, tmp_path, answer, message):
    result = copier("copy", "--defaults", "--vcs-ref", "1.0.0", "--data", answer,
                    str(template), str(tmp_path / "p"))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "p" / ".devcontainer").exists()


def test_copier_update_applies_a_template_change_and_keeps_a_local_edit(tmp_path):
    def add_extension(folder: Path) -> None:  # the "next template version"
        include = folder / "templates/includes/devcontainer.json.jinja"
        include.write_text(include.read_text().replace(
            '"ms-toolsai.jupyter"]', '"ms-toolsai.jupyter", "charliermarsh.ruff"]'))

    template = make_template_repo(tmp_path / "template", {"1.0.0": None, "1.1.0": add_extension})
    project = tmp_path / "project"
    copy_project(template, project, project_name="Update Me")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "from the template")
    config = project / ".devcontainer/devcontainer.json"
    config.write_text(config.read_text().replace('"forwardPorts": [8888]',
                                                 '"forwardPorts": [8888, 6006]'))
    (project / "requirements.in").write_text("tqdm\npolars\n")
    git(project, "commit", "-q", "-am", "local edits")

    result = copier("update", "--defaults", "--vcs-ref", "1.1.0", cwd=project)
    assert result.returncode == 0, result.stderr
    document = validate(config)
    assert "charliermarsh.ruff" in document["customizations"]["vscode"]["extensions"]
    assert document["forwardPorts"] == [8888, 6006]  # the local edit survived the merge
    assert (project / "requirements.in").read_text() == "tqdm\npolars\n"
    assert "_commit: 1.1.0" in (project / ".copier-answers.yml").read_text()


# -- real engine: copier copy → devcontainer up → exec ----------------------------------------


MATRIX = {
    # name: answers (beyond project_name), what `exec` must show per config
    "cpu-pip": dict(variants="cpu", dependency_manager="pip", pip_packages="attrs",
                    aws_credentials="true"),
    "gpu-conda": dict(variants="gpu", dependency_manager="conda", image_source="prebuilt",
                      conda_packages="greeter"),
    "both-both": dict(variants="both", dependency_manager="both", pip_packages="attrs",
                      conda_packages="greeter", data_mount="HOSTDATA"),
    "postgres": dict(variants="cpu", dependency_manager="pip", pip_packages="attrs pg8000",
                     services="postgres"),
}

PROBES = {
    "pip": "python -c 'import attrs; print(\"attrs\", attrs.__version__)'",
    "conda": "greet",
    "postgres": (
        "python - <<'EOF'\n"
        "import os, time, urllib.parse, pg8000.native\n"
        "url = urllib.parse.urlparse(os.environ['DATABASE_URL'])\n"
        "for attempt in range(60):\n"
        "    try:\n"
        "        db = pg8000.native.Connection(url.username, host=url.hostname,\n"
        "            password=url.password, database=url.path[1:])\n"
        "        break\n"
        "    except Exception:\n"
        "        time.sleep(0.5)\n"
        "print('postgres says', db.run('SELECT 40 + 2')[0][0])\n"
        "EOF"
    ),
}


@pytest.mark.engine
@pytest.mark.parametrize("case", list(MATRIX))
def test_generated_project_opens_in_a_dev_container(
        engine, template, team, channel, devcontainers, tmp_path, case):
    answers = {**MATRIX[case], "team_image": team, "conda_channels": channel.url}
    if answers.get("data_mount") == "HOSTDATA":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "input.csv").write_text("a,b\n1,2\n")
        answers["data_mount"] = str(tmp_path / "data")
    if answers.get("services") == "postgres":
        answers["postgres_image"] = ensure_postgres_image(engine)
    if answers.get("aws_credentials"):
        # A host without ~/.aws: the container must open anyway.
        (tmp_path / "host-home").mkdir()
        devcontainers.env["HOME"] = str(tmp_path / "host-home")
    project = copy_project(template, tmp_path / slug(case), project_name=slug(case), **answers)
    if answers.get("image_source") == "prebuilt":
        # What the project's CI does: lock, build (then push; there is no registry here).
        for step in (["lock", str(project)], ["build", str(project), "--network", "host"]):
            result = cli(*step, env={"DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS)})
            assert result.returncode == 0, result.stderr[-3000:]

    for variant, config in configs(project).items():
        validate(config)
        container = devcontainers.up(project, config)
        out = devcontainers.exec(project, config, "id -un; pwd; echo $DEVBOX_PROJECT")
        assert out.split()[:3] == ["sagemaker-user", f"/workspaces/{slug(case)}", slug(case)]
        manager = answers["dependency_manager"]
        if manager in ("pip", "both"):
            assert "attrs " in devcontainers.exec(project, config, PROBES["pip"])
        if manager in ("conda", "both"):
            assert "hello from conda" in devcontainers.exec(project, config, PROBES["conda"])
        if answers.get("services") == "postgres":
            assert "postgres says 42" in devcontainers.exec(project, config, PROBES["postgres"])
        if variant == "gpu" and not engine.has_gpu():
            # The GPU configuration came up on a machine without a GPU ("optional"), and the
            # image's environment still tells the runtime to expose one where there is one.
            env = engine.api.inspect_container(container)["Config"]["Env"]
            assert "NVIDIA_VISIBLE_DEVICES=all" in env
        if answers.get("aws_credentials"):
            assert "aws-mounted" in devcontainers.exec(project, config,
                                                       "test -d ~/.aws && echo aws-mounted")
        if "HOSTDATA" in str(MATRIX[case].get("data_mount")):
            assert "1,2" in devcontainers.exec(project, config, "cat /data/input.csv")
        # The image carries the shared dev container defaults in its label.
        image = engine.api.inspect_container(container)["Image"]
        metadata = json.loads(engine.image(image)["Config"]["Labels"]["devcontainer.metadata"])
        assert any(entry.get("remoteUser") == "sagemaker-user" for entry in metadata)
        devcontainers.remove(container)


@pytest.mark.engine
@pytest.mark.parametrize("host_gid", [1234, 100])
def test_remapped_user_writes_the_workspace_installs_and_keeps_home(
        engine, template, team, devcontainers, host_user_1234, request, host_gid):
    """Host uid 1234 (not the image's 1000): the CLI remaps the container user. With host gid
    1234 the image's group 100 is renumbered and post-create hands the environment to the new
    gid; with host gid 100 (the SageMaker/`users` case) the group already matches."""
    name = slug(f"uid-{host_gid}")
    # pytest's tmp_path is private to root; the remapped host user needs to reach its project.
    tmp_path = Path(tempfile.mkdtemp(prefix="devbox-remap-"))
    os.chmod(tmp_path, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    project = copy_project(template, tmp_path / name, project_name=name, team_image=team,
                           image_source="prebuilt", pip_packages="attrs")
    result = cli("lock", str(project))
    assert result.returncode == 0, result.stderr
    result = cli("build", str(project), env={"DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS)})
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(["chown", "-R", f"1234:{host_gid}", str(project)], check=True)
    (tmp_path / "home").mkdir()
    os.chown(tmp_path / "home", 1234, host_gid)
    devcontainers.env["HOME"] = str(tmp_path / "home")
    user = (1234, host_gid)
    config = configs(project)["cpu"]

    container = devcontainers.up(project, config, user=user)
    out = devcontainers.exec(project, config, (
        "id -u; id -g; touch notes.txt && echo workspace-writable;"
        "pip install --no-deps --no-cache-dir -q toolz==1.0.0 && python -c 'import toolz';"
        "echo installed; echo kept > ~/persisted.txt"), user=user)
    assert out.split()[:4] == ["1234", str(host_gid), "workspace-writable", "installed"], out
    assert (project / "notes.txt").stat().st_uid == 1234

    # Persistence: the home volume outlives the container.
    devcontainers.remove(container)
    devcontainers.up(project, config, user=user)
    assert devcontainers.exec(project, config, "cat ~/persisted.txt", user=user).strip() == "kept"


@pytest.mark.engine
def test_this_repository_opens_in_its_own_dev_container(engine, devcontainers, tmp_path):
    """.devcontainer/: the image is built by devbox-build (initializeCommand), devbox-build runs
    inside from the workspace, and the host's engine answers there."""
    config = ROOT / ".devcontainer" / "devcontainer.json"
    validate(config)
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
