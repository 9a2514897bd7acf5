"""The targets (EC2, SageMaker, a hub on one host or on Kubernetes) behind one Protocol: each
admits or refuses the same images by what they say about themselves, every problem of every image
is one error, and nothing is written unless all of a target's files are."""

from __future__ import annotations

import json

import pytest
import yaml

from devbox_build.checks.image import ImageUnderTest
from devbox_build.errors import InputError
from devbox_build.targets import Target, prepare, write
from devbox_build.targets.ec2 import Ec2, load_box
from devbox_build.targets.hub import DockerHub, KubernetesHub
from devbox_build.targets.sagemaker import SageMaker

from .conftest import ROOT

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbOaQj5DuSdW1pHcUSnlRa4Zy6ZtuazpUq2QQLu3Sv tester"
ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com/devbox/datascience"


def image(variant: str, *, arch: str = "amd64", cuda: str | None = None, hub: bool = True,
          built: bool = True) -> ImageUnderTest:
    """An image as the engine and its manifest describe it (no engine needed to judge it)."""
    labels = {"devbox.spec": "datascience", "devbox.variant": variant}
    if cuda:
        labels |= {"devbox.cuda.version": "12.8", "devbox.cuda.min-driver": cuda}
    packages = [{"name": "jupyterlab", "version": "4.5.0"}, {"name": "ipykernel", "version": "7"}]
    if hub:
        packages.append({"name": "jupyterhub", "version": "5.5.4"})
    tags = [f"devbox/datascience:{variant}"] + ([f"devbox/datascience:{variant}-0123456789ab"]
                                                if built else [])
    attrs = {"Architecture": arch, "RepoTags": tags,
             "Config": {"Labels": labels, "Entrypoint": ["devbox-entrypoint"]}}
    manifest = {"packages": {"pip": packages}} if built else None
    return ImageUnderTest(tags[0], None, attrs, manifest)


@pytest.fixture
def targets(tmp_path):
    box = load_box(ROOT / "boxes.toml")
    return [Ec2(box, "gpu", KEY),
            SageMaker("datascience-cpu", "arn:aws:iam::123456789012:role/SageMakerImages",
                      f"{ECR}:cpu"),
            DockerHub(), KubernetesHub()]


def test_every_target_is_one_protocol(targets):
    for target in targets:
        assert isinstance(target, Target), target
        assert target.name


def test_each_target_admits_a_fitting_image_and_renders_its_files(targets):
    gpu = image("gpu", cuda="570.26")
    files = {target.name: prepare(target, [gpu] if not isinstance(target, SageMaker)
                                  else [image("cpu")]) for target in targets}
    ec2, sagemaker, docker, k8s = files.values()
    assert list(ec2) == ["user-data-gpu.yml"] and ec2["user-data-gpu.yml"].startswith(
        "#cloud-config")
    assert json.loads(sagemaker["create-image-version.json"])["BaseImage"] == f"{ECR}:cpu"
    assert json.loads(docker["devbox-hub.json"])["profiles"][0]["gpus"] is True
    values = yaml.safe_load(k8s["values.yaml"])
    assert values["singleuser"]["image"] == {"name": "devbox/datascience",
                                             "tag": "gpu-0123456789ab",
                                             "pullPolicy": "IfNotPresent"}


@pytest.mark.parametrize("index, bad, needles", [
    (0, image("gpu", arch="arm64", cuda="999.1"),
     ["g6.xlarge is amd64, but devbox/datascience:gpu is linux/arm64", "needs 999.1 or newer"]),
    (1, image("cpu", arch="arm64", built=False), ["not built by devbox-build"]),
    (1, image("cpu", arch="arm64"), ["SageMaker runs linux/amd64 only"]),
    (2, image("cpu", hub=False, built=False), ["no content tag", "has no jupyterhub"]),
    (3, image("cpu", hub=False), ["has no jupyterhub"]),
])
def test_a_target_names_every_problem_of_an_image(targets, index, bad, needles):
    target = targets[index]
    with pytest.raises(InputError) as raised:
        prepare(target, [bad])
    message = str(raised.value)
    assert message.startswith(f"not for {target.name}:")
    for needle in needles:
        assert needle in message


def test_files_are_written_all_or_none(tmp_path):
    folder = tmp_path / "out"
    written = write(folder, {"a.json": "{}\n", "b.py": "print()\n"})
    assert [p.name for p in written] == ["a.json", "b.py"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.py"]

    # The second file cannot be written (its name is too long): the first does not land either.
    too_long = "x" * 300
    with pytest.raises(InputError, match="cannot write"):
        write(folder, {"a.json": "changed\n", too_long: "x"})
    assert (folder / "a.json").read_text() == "{}\n"
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.py"]

    with pytest.raises(InputError):
        write(tmp_path / "new", {"ok": "1", too_long: "x"})
    assert not (tmp_path / "new").exists()
