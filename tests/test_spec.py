"""The image spec: valid specs load; every kind of bad spec is one error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from devbox_build.errors import SpecError
from devbox_build.spec import load_spec

from .conftest import ROOT, assert_clean_error, cli

MINIMAL = """
name = "demo"
repository = "team/demo"
python = "3.11"
[pip]
requirements = ["requirements.in"]
[variants.cpu]
base = "debian:bookworm-slim"
"""


def write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "requirements.in").write_text("six\n")
    (folder / "image.toml").write_text(text)
    return folder


def test_minimal_spec_gets_the_studio_user_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path / "demo", MINIMAL))
    assert (spec.user.name, spec.user.uid, spec.user.gid) == ("sagemaker-user", 1000, 100)
    assert spec.user.home == "/home/sagemaker-user"
    assert spec.platforms == ["linux/amd64"]
    assert list(spec.variants) == ["cpu"]


def test_committed_specs_load():
    for path in [*ROOT.glob("images/*/image.toml"), ROOT / "tests/stacks/tiny/image.toml"]:
        assert load_spec(path).name == path.parent.name


@pytest.mark.parametrize(
    "text, needles",
    [
        ("colour = 'blue'\n" + MINIMAL, ["unknown key 'colour'"]),
        (MINIMAL.replace('python = "3.11"', "python = 3.11"), ["key 'python'"]),
        (MINIMAL.replace('python = "3.11"', 'python = "three"'), ["key 'python'"]),
        (MINIMAL + "[user]\nuid = 70000\n", ["key 'user.uid'"]),
        (MINIMAL + "[variants.gpu]\nbase = 'x'\ncuda = { version = '12' }\n",
         ["key 'variants.gpu.cuda.version'", "expected a CUDA version"]),
        (MINIMAL.replace('repository = "team/demo"\n', ""), ["missing key 'repository'"]),
        (MINIMAL + "[env]\nHTTPS_PROXY = 'http://proxy:3128'\n", ["never baked into the image"]),
        (MINIMAL + "[system]\npackages = ['curl; rm -rf /']\n", ["key 'system.packages'"]),
        (MINIMAL.replace("requirements.in", "missing.in"),
         ["key 'pip.requirements[0]'", "file not found", "missing.in"]),
        (MINIMAL + "[variants.gpu]\nbase = 'x'\npip = ['gpu.in']\n",
         ["key 'variants.gpu.pip[0]'", "file not found"]),
    ],
    ids=["unknown-key", "wrong-type", "bad-python", "uid-too-large", "cuda-missing-key",
         "missing-repository", "proxy-in-env", "bad-apt-name", "missing-pip-input",
         "missing-variant-input"],
)
def test_bad_spec_is_one_error_naming_file_and_key(tmp_path, text, needles):
    folder = write_spec(tmp_path / "demo", text)
    with pytest.raises(SpecError) as raised:
        load_spec(folder)
    message = str(raised.value)
    assert message.startswith(str(folder / "image.toml")), message
    for needle in needles:
        assert needle in message


def test_malformed_toml_names_the_file_and_line(tmp_path):
    folder = write_spec(tmp_path / "demo", MINIMAL + "[env\n")
    with pytest.raises(SpecError, match=r"image.toml: malformed TOML: .*line 9"):
        load_spec(folder)


def test_unknown_image_lists_the_known_ones(tmp_path):
    write_spec(tmp_path / "images" / "demo", MINIMAL)
    with pytest.raises(SpecError, match="known images: demo"):
        load_spec("nope", tmp_path / "images")


@pytest.mark.parametrize(
    "text, needle",
    [
        (MINIMAL + "[pip\n", "malformed TOML"),
        ("colour = 'blue'\n" + MINIMAL, "unknown key 'colour'"),
        (MINIMAL.replace("requirements.in", "missing.in"), "file not found"),
    ],
    ids=["malformed-toml", "unknown-key", "missing-file"],
)
def test_cli_reports_bad_spec_without_traceback(tmp_path, text, needle):
    folder = write_spec(tmp_path / "demo", text)
    for command in (["lock", str(folder)], ["render", str(folder)], ["build", str(folder)]):
        assert_clean_error(cli(*command), "image.toml", needle)
