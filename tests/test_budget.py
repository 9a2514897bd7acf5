"""[budget]: the image's size, each layer kind's packages and growth against the image a build
replaces; a build over it fails naming the limit and the packages that grew most (or the
largest), and moves no tag."""

from __future__ import annotations

import pytest

from devbox_build.budget import kind_sizes, problems
from devbox_build.spec import Budget

from .conftest import assert_clean_error, cli, load
from .test_build import CA, content_tag

MB = 1_000_000


def manifest(pip: dict, apt: dict) -> dict:
    return {"packages": {
        "pip": [{"name": n, "version": "1", "layer": layer, "size": size}
                for n, (layer, size) in pip.items()],
        "apt": [{"name": n, "version": "1", "size": size} for n, size in apt.items()]}}


BEFORE = manifest({"numpy": ("pip", 30 * MB), "pytest": ("dev", 5 * MB)}, {"libc6": 12 * MB})
AFTER = manifest({"numpy": ("pip", 31 * MB), "torch": ("pip", 900 * MB),
                  "pytest": ("dev", 5 * MB)}, {"libc6": 12 * MB})


def test_layer_kinds_sum_their_packages():
    assert kind_sizes(AFTER) == {"system": 12 * MB, "conda": 0, "pip": 931 * MB, "dev": 5 * MB}


def test_each_limit_names_its_figure_and_culprits():
    budget = Budget(total_mb=500, layers={"pip": 100, "dev": 10}, growth_percent=5)
    found = problems(budget, AFTER, 960 * MB, (BEFORE, 60 * MB))
    assert found == [
        "[budget] total_mb: the image is 960 MB, over 500 MB; grew most: torch (+900.0 MB), "
        "numpy (+1.0 MB)",
        "[budget] layers.pip: its packages install 931 MB, over 100 MB; grew most: torch "
        "(+900.0 MB), numpy (+1.0 MB)",
        "[budget] growth_percent: the image grew 1500.0% (60 → 960 MB), over 5%; grew most: "
        "torch (+900.0 MB), numpy (+1.0 MB)"]
    # Nothing to compare with: the largest are named; within budget: nothing.
    assert problems(Budget(total_mb=500), AFTER, 960 * MB) == [
        "[budget] total_mb: the image is 960 MB, over 500 MB; largest: torch (900.0 MB), "
        "numpy (31.0 MB), libc6 (12.0 MB), pytest (5.0 MB)"]
    assert problems(Budget(total_mb=1000, growth_percent=5), BEFORE, 60 * MB,
                    (BEFORE, 60 * MB)) == []


@pytest.mark.engine
def test_a_build_over_budget_fails_naming_what_grew_and_moves_no_tag(engine, stack):
    spec_file = stack / "image.toml"
    first = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert first.returncode == 0, first.stderr
    spec = load(stack)
    replaced = engine.image_id(f"{spec.repository}:cpu")

    # Over the total: the largest packages are named (nothing to compare an unchanged image to).
    spec_file.write_text(spec_file.read_text() + "\n[budget]\ntotal_mb = 1\n")
    result = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert_clean_error(result, "[budget] total_mb: the image is", "over 1 MB; largest:",
                       "nothing was tagged")
    assert result.returncode == 5

    # A system package more, against 0% growth: the new package is what grew.
    spec_file.write_text(spec_file.read_text().replace(
        "total_mb = 1\n", "growth_percent = 0\n") + '[system]\npackages = ["tree"]\n')
    grown = content_tag(engine, stack, "cpu")
    result = cli("build", str(stack), "--variant", "cpu", env=CA)
    assert_clean_error(result, "[budget] growth_percent: the image grew", "grew most: tree (+")
    assert engine.image_id(f"{spec.repository}:cpu") == replaced
    assert engine.image_id(grown) is None
