"""The team's default image (images/datascience): its locks are fresh and its CPU variant builds."""

from __future__ import annotations

import pytest

from devbox_build import locking
from devbox_build.build import BuildOptions, build
from devbox_build.spec import load_spec

from .conftest import HOST_CA_CERTS, ROOT
from .test_build import SEEDS, installed

SPEC = ROOT / "images" / "datascience"


def test_committed_locks_are_fresh():
    assert locking.check(load_spec(SPEC)) == []


@pytest.mark.engine
def test_default_cpu_image_builds_and_matches_its_lock(engine):
    spec = load_spec(SPEC)
    [result] = build(spec, ["cpu"], engine, BuildOptions(ca_certificates=HOST_CA_CERTS))
    top = locking.stack(spec, "cpu", "linux/amd64")[-1]
    locked = {name: pin.version for name, pin in locking.read_pins(top.path(spec)).items()}
    found = installed(engine, result.content_tag)
    assert {k: v for k, v in found.items() if k not in SEEDS} == locked
    code, out = engine.run(result.content_tag, ["python", "-c", (
        "import numpy, pandas, sklearn, matplotlib, jupyterlab, ipykernel, ruff, debugpy, pytest;"
        "print(pandas.DataFrame({'x': numpy.arange(3)}).x.sum())")])
    assert code == 0 and out.strip().endswith("3"), out
    code, out = engine.run(result.content_tag, ["jupyter", "lab", "--version"])
    assert code == 0, out
