"""The team's default image (images/datascience): its locks are fresh and both variants build."""

from __future__ import annotations

import pytest

from packaging.specifiers import SpecifierSet

from devbox_build import locking
from devbox_build.spec import load_spec

from .conftest import DEFAULT_SPEC
from .test_build import SEEDS, installed


def test_committed_locks_are_fresh():
    assert locking.check(load_spec(DEFAULT_SPEC)) == []


def test_the_default_stack_has_one_set_of_pins_on_amd64_and_arm64():
    """Both platforms locked, every pip and apt version the same on both (lock --check's
    divergence check names any that is not)."""
    spec = load_spec(DEFAULT_SPEC)
    assert spec.platforms == ["linux/amd64", "linux/arm64"]
    assert locking.divergences(spec) == []
    locks = DEFAULT_SPEC / "locks"
    for name in ("pip.txt", "dev.txt", "pip-gpu.txt", "dev-gpu.txt"):
        amd64, arm64 = ({n: p.version for n, p in locking.read_pins(
            locks / platform / name).items()} for platform in ("linux-amd64", "linux-arm64"))
        assert amd64 == arm64, name
    apt = [[line for line in (locks / platform / "apt.txt").read_text().splitlines()
            if not line.startswith("#")] for platform in ("linux-amd64", "linux-arm64")]
    assert apt[0] == apt[1] and len(apt[0]) > 50


def test_the_sagemaker_sdk_and_widgets_follow_the_sagemaker_distribution_release():
    """requirements.in asks for the SageMaker SDK and ipywidgets in the ranges of the SageMaker
    Distribution release the stack follows (its env.in, stored beside the spec), and the CPU
    lock has them without torch (an unpinned SDK backtracks to a release that pulls it in)."""
    import re

    from packaging.requirements import Requirement

    folder = DEFAULT_SPEC if DEFAULT_SPEC.is_dir() else DEFAULT_SPEC.parent
    asked = {}
    for line in (folder / "requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            asked[requirement.name] = requirement.specifier
    release = (folder / "like" / "smd-4.4.1" / "cpu.env.in").read_text()
    for pypi, conda in (("sagemaker", "sagemaker-python-sdk"), ("ipywidgets", "ipywidgets")):
        (ranged,) = re.findall(rf"::{conda}\[version='([^']+)'\]", release)
        assert asked[pypi] == SpecifierSet(ranged), pypi
    pins = locking.read_pins(folder / "locks" / "linux-amd64" / "dev.txt")
    assert pins["sagemaker"].version == "3.12.0" and "ipywidgets" in pins
    assert not set(pins) & {"torch", "nvidia-cuda-runtime", "triton"}


@pytest.mark.engine
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_default_image_matches_its_lock(engine, default_images, variant):
    spec = load_spec(DEFAULT_SPEC)
    top = locking.stack(spec, variant, "linux/amd64")[-1]
    locked = {name: pin.version for name, pin in locking.read_pins(top.path(spec)).items()}
    found = installed(engine, default_images[variant].content_tag)
    # The venv's own pip and setuptools are not locked, unless the stack needs them (torch does).
    assert {k: v for k, v in found.items() if k not in SEEDS or k in locked} == locked


@pytest.mark.engine
def test_default_cpu_image_runs_the_stack(engine, default_images):
    ref = default_images["cpu"].content_tag
    code, out = engine.run(ref, ["python", "-c", (
        "import numpy, pandas, sklearn, matplotlib, jupyterlab, ipykernel, ruff, debugpy, pytest;"
        "import sagemaker, ipywidgets;"
        # pandas reads s3:// through s3fs, and refuses one older than its minimum.
        "from pandas.compat._optional import import_optional_dependency as need; need('s3fs');"
        "print(pandas.DataFrame({'x': numpy.arange(3)}).x.sum())")])
    assert code == 0 and out.strip().endswith("3"), out
    code, out = engine.run(ref, ["jupyter", "lab", "--version"])
    assert code == 0, out


@pytest.mark.engine
def test_default_cpu_and_gpu_images_share_every_layer_below_the_accelerator(engine,
                                                                             default_images):
    """Every pip group both variants install is the same layer in both images; the GPU image
    adds its own only above them. Prints the bytes shared."""
    from .test_build import filesystem_layers

    cpu = filesystem_layers(engine, default_images["cpu"].content_tag)
    gpu = filesystem_layers(engine, default_images["gpu"].content_tag)
    gpu_only = next(i for i, (step, _) in enumerate(gpu) if "/requirements/pip-gpu-" in step)
    assert gpu[:gpu_only] == cpu[:gpu_only]
    assert sum("/opt/devbox/requirements/pip-" in step for step, _ in gpu[:gpu_only]) >= 4
    sizes = {entry["CreatedBy"]: entry["Size"] for entry in engine.history(
        default_images["gpu"].content_tag)}
    shared = sum(sizes.get(step, 0) for step, _ in gpu[:gpu_only])
    print(f"CPU and GPU share {gpu_only} layers, {shared / 1e6:.0f} MB "
          f"(GPU image {engine.size(default_images['gpu'].content_tag) / 1e9:.1f} GB)")
