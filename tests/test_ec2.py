"""EC2 boxes, before any AWS call: `devbox-build ec2 preflight` refuses each classic trap with
one error naming the file and key."""

from __future__ import annotations

import pytest

from devbox_build.targets.ec2 import ImageFacts, architecture, load_box, preflight

from .conftest import ROOT, assert_clean_error, cli

GOOD = (ROOT / "boxes.toml").read_text()
CPU = ImageFacts("devbox/datascience:cpu", "amd64", None)
GPU = ImageFacts("devbox/datascience:gpu", "amd64", "580.65.06")


def box_with(tmp_path, old: str = "", new: str = ""):
    assert old in GOOD
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace(old, new, 1))
    return load_box(path)


def test_the_committed_box_passes(tmp_path):
    assert preflight(box_with(tmp_path), {"cpu": CPU, "gpu": GPU}) == []


@pytest.mark.parametrize("old, new, images, needle", [
    ('instance_type = "g6.xlarge"', 'instance_type = "m7i.xlarge"', {"gpu": GPU},
     "key 'roles.gpu.instance_type': m7i.xlarge has no GPU"),
    ('[volume]\n', '[volume]\navailability_zone = "us-east-1b"\n', {},
     "key 'volume.availability_zone': us-east-1b, but the boxes run in us-east-1a"),
    ("hop_limit = 2", "hop_limit = 1", {},
     "key 'metadata.hop_limit': 1; a container behind Docker's bridge"),
    ('ami_family = "dlami-base-gpu-al2023"', 'ami_family = "al2023"', {"gpu": GPU},
     "key 'roles.gpu.ami_family': al2023 ships no NVIDIA driver"),
    ("", "", {"gpu": ImageFacts("devbox/datascience:gpu", "amd64", "590.10.01")},
     "ships driver 580.95.05; devbox/datascience:gpu needs 590.10.01 or newer"),
    ('instance_type = "m7i.large"', 'instance_type = "m7g.large"', {"cpu": CPU},
     "key 'roles.cpu.instance_type': m7g.large is arm64, but devbox/datascience:cpu is "
     "linux/amd64"),
    ('instance_type = "m7i.large"', 'instance_type = "m7i.huge"', {},
     "'m7i.huge' is not an EC2 instance type"),
])
def test_each_trap_is_one_error_naming_the_key(tmp_path, old, new, images, needle):
    problems = preflight(box_with(tmp_path, old, new), images)
    assert len(problems) == 1 and needle in problems[0], problems


def test_architecture_from_the_family():
    assert [architecture(t) for t in ("m7g.large", "g5g.xlarge", "t4g.small", "c7gn.large",
                                      "g4dn.xlarge", "g6e.xlarge", "m7i.large", "p5.48xlarge")
            ] == ["arm64"] * 4 + ["amd64"] * 4


def test_cli_refuses_before_any_aws_call(tmp_path):
    path = tmp_path / "boxes.toml"
    path.write_text(GOOD.replace("hop_limit = 2", "hop_limit = 1").replace(
        '"g6.xlarge"', '"m7i.xlarge"'))
    result = cli("ec2", "preflight", "--boxes", str(path),
                 env={"DOCKER_HOST": "unix:///nonexistent/docker.sock",
                      "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})  # nothing AWS may answer
    assert_clean_error(result, "2 problem(s) before any AWS call", "metadata.hop_limit",
                       "roles.gpu.instance_type")
    assert result.returncode == 2
    path.write_text(GOOD.replace('region = "us-east-1"', 'region = "mars"'))
    assert_clean_error(cli("ec2", "preflight", "--boxes", str(path)), "key 'region'")


@pytest.mark.engine
def test_cli_checks_the_local_images(engine, default_images):
    result = cli("ec2", "preflight", "--boxes", str(ROOT / "boxes.toml"))
    assert result.returncode == 0, result.stderr
    assert "preflight passed for cpu, gpu" in result.stderr and "skipped" not in result.stderr
