"""The team's default image (images/datascience): its locks are fresh and both variants build."""

from __future__ import annotations

import pytest

from devbox_build import locking
from devbox_build.spec import load_spec

from .conftest import DEFAULT_SPEC
from .test_build import SEEDS, installed


def test_committed_locks_are_fresh():
    assert locking.check(load_spec(DEFAULT_SPEC)) == []


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
        "print(pandas.DataFrame({'x': numpy.arange(3)}).x.sum())")])
    assert code == 0 and out.strip().endswith("3"), out
    code, out = engine.run(ref, ["jupyter", "lab", "--version"])
    assert code == 0, out
