"""`like = "smd:X.Y.Z"`: a stack locked the way a SageMaker Distribution release is: its ranges
as constraints, its pins as the resolver's preferences, names mapped from conda-forge to PyPI,
what is not a PyPI package or version skipped, every shared package off its version named."""

from __future__ import annotations

import pytest

from devbox_build import locking
from devbox_build.errors import SpecError
from devbox_build.like import load, off_release

from .conftest import ROOT, assert_clean_error, cli, load as load_spec
from .test_locking import local_index, small_stack  # noqa: F401 (a fixture)


def test_the_stored_release_reads_as_pypi_ranges_and_pins():
    spec = load_spec(ROOT / "images" / "datascience")
    cpu = load(spec, "smd:4.4.1", "cpu")
    assert cpu.pins["torch"] == "2.8.0" and cpu.pins["numpy"] == "1.26.4"
    assert cpu.pins["sagemaker"] == "3.12.0" and cpu.pins["pandas"] == "2.3.3"
    assert cpu.pins["matplotlib"].startswith("3.10.") and cpu.pins["urllib3"] == "1.26.20"
    assert cpu.ranges["numpy"] == ">=1.26.4,<1.27.0" and cpu.ranges["torch"] == ">=2.8.0,<2.9.0"
    assert cpu.skipped["python"] == "not a PyPI package"
    assert "libgcc" in cpu.skipped and "tzdata" in cpu.skipped
    assert len(cpu.pins) > 300
    gpu = load(spec, "smd:4.4.1", "gpu")
    assert gpu.pins["torch"] == "2.8.0" and "xgboost" in gpu.ranges
    with pytest.raises(SpecError, match="smd:9.9.9 needs"):
        load(spec, "smd:9.9.9", "cpu")
    with pytest.raises(SpecError, match="is not a release to be like"):
        load(spec, "conda:1.0.0", "cpu")


def release_files(folder, version="9.9.9"):
    like = folder / "like" / f"smd-{version}"
    like.mkdir(parents=True)
    (like / "cpu.env.in").write_text(
        "# This file is auto-generated.\n"
        "conda-forge::alpha[version='>=1.0,<2.0']\nconda-forge::python[version='>=3.11']\n")
    base = "https://conda.anaconda.org/conda-forge"
    (like / "cpu.env.out").write_text("@EXPLICIT\n" + "".join(
        f"{base}/{sub}/{name}#0123\n" for sub, name in [
            ("noarch", "alpha-1.1-pyhd8ed1ab_0.conda"), ("noarch", "beta-1.0-pyhd8ed1ab_0.conda"),
            ("noarch", "gamma-2026c-h0_0.conda"), ("linux-64", "libfoo-1.0-h0_0.conda"),
            ("linux-64", "python-3.11.9-h0_0_cpython.conda")]))


def test_a_stack_locked_like_a_release(tmp_path, local_index):  # noqa: F811
    for version in ("1.0", "1.1", "1.2", "2.0"):
        local_index.add("alpha", version)
    local_index.add("beta", "1.0")
    local_index.add("beta", "1.5")
    local_index.add("delta", "3.0", "beta>=1.5")
    folder = small_stack(tmp_path / "like", "alpha\nbeta\ndelta\n")
    release_files(folder)
    spec_file = folder / "image.toml"
    spec_file.write_text(spec_file.read_text().replace(
        'python = "3.11"\n', 'python = "3.11"\nlike = "smd:9.9.9"\n'))
    result = cli("lock", str(folder))
    assert result.returncode == 0, result.stderr
    lock = folder / "locks" / "linux-amd64" / "pip.txt"
    pins = {name: pin.version for name, pin in locking.read_pins(lock).items()}
    # alpha: the release's 1.1, though 2.0 is out (and 1.2 within its range); beta: delta
    # needs 1.5, so it ends off the release, and lock says so.
    assert pins == {"alpha": "1.1", "beta": "1.5", "delta": "3.0"}
    assert "# Like: smd:9.9.9 (like/smd-9.9.9/)" in lock.read_text()
    assert "1 of 2 packages it shares with smd:9.9.9 at its version" in result.stderr
    assert "off: beta 1.5 (smd:9.9.9: 1.0)" in result.stderr
    release = load(load_spec(folder), "smd:9.9.9", "cpu")
    assert release.skipped == {"gamma": "version 2026c is not a PEP 440 one",
                               "libfoo": "not a PyPI package", "python": "not a PyPI package"}
    assert off_release(release, pins) == [
        "beta 1.5 (smd:9.9.9: 1.0): the spec's inputs (or what they need) rule the release's "
        "version out, or the index has no wheel of it for this Python and platform"]

    # The release's files are inputs: a new one makes the lock stale.
    (folder / "like" / "smd-9.9.9" / "cpu.env.out").write_text("@EXPLICIT\n")
    check = cli("lock", str(folder), "--check")
    assert check.returncode == 3 and "pip.txt: stale" in check.stderr
    # Its ranges are hard: an input outside one cannot be locked, and the error says so.
    (folder / "requirements.in").write_text("alpha>=2\n")
    assert_clean_error(cli("lock", str(folder)), "could not lock layer 'pip'", "alpha")


@pytest.mark.network
def test_the_default_stack_locked_like_smd_matches_it(tmp_path):
    """The default stack's inputs, locked like SageMaker Distribution 4.4.1 against the public
    index: at most three shared packages end off the release's version (cffi: PyPI's metadata
    of what needs it says >=2 where conda-forge's repodata patches allow 1.17)."""
    import shutil

    folder = tmp_path / "datascience"
    shutil.copytree(ROOT / "images" / "datascience", folder, ignore=shutil.ignore_patterns("locks"))
    spec_file = folder / "image.toml"
    spec_file.write_text(spec_file.read_text().replace(
        'python = "3.11"\n', 'python = "3.11"\nlike = "smd:4.4.1"\n'))
    result = cli("lock", str(folder))
    assert result.returncode == 0, result.stderr
    release = load(load_spec(folder), "smd:4.4.1", "cpu")
    pins = {n: p.version for n, p in locking.read_pins(
        folder / "locks" / "linux-amd64" / "dev.txt").items()}
    shared = [name for name in pins if name in release.pins]
    assert len(shared) > 100
    assert len(off_release(release, pins)) <= 3, off_release(release, pins)
    assert pins["numpy"] == "1.26.4" and pins["pandas"] == "2.3.3"
    for name in ("scikit-learn", "sagemaker", "ipywidgets"):  # the SDK: the default stack's own
        assert pins[name] == release.pins[name], name


@pytest.mark.engine
def test_inspect_like_compares_a_built_image_with_the_release(engine, tiny_images):
    import json

    spec, results = tiny_images
    like = spec.folder / "like" / "smd-9.8.7"
    like.mkdir(parents=True, exist_ok=True)
    (like / "cpu.env.in").write_text("conda-forge::six[version='>=1.16,<1.17']\n"
                                     "conda-forge::polars[version='>=1.0,<2.0']\n")
    base = "https://conda.anaconda.org/conda-forge/noarch"
    (like / "cpu.env.out").write_text("@EXPLICIT\n" + "".join(f"{base}/{name}#0\n" for name in (
        "python-3.12.13-h0_0_cpython.conda", "idna-3.20-pyhd8ed1ab_0.conda",
        "six-1.16.0-pyhd8ed1ab_0.conda", "markupsafe-2.1.5-py_0.conda",
        "polars-1.30.0-py_0.conda")))
    result = cli("inspect", results["cpu"].content_tag, "--like", "smd:9.8.7",
                 "--images-dir", str(spec.folder.parent), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["python"]["release"] == "3.12.13" and report["shared"] == 3
    assert report["versions"]["same"] == ["idna"]
    assert report["versions"]["minor"] == ["six 1.17.0 (1.16.0)"]
    assert report["versions"]["major"] == ["markupsafe 3.0.4 (2.1.5)"]
    assert report["release_only"] == ["polars"] and "iniconfig" in report["image_only"]


@pytest.mark.engine
def test_the_guides_table_is_the_default_images_comparison_with_smd(default_images):
    """docs/building.md's `inspect --like` table is what the command prints for the default CPU
    image as built now (a lock change that moves it fails here: paste the command's output)."""
    result = cli("inspect", default_images["cpu"].content_tag, "--like", "smd:4.4.1",
                 "--markdown")
    assert result.returncode == 0, result.stderr
    guide = (ROOT / "docs" / "building.md").read_text()
    table = guide.split("<!-- like-table:start -->\n", 1)[1].split("<!-- like-table:end -->")[0]
    assert table == result.stdout
    assert_clean_error(cli("inspect", default_images["cpu"].content_tag, "--markdown"),
                       "--markdown is for --like")


TRAIN = """
import base64, pickle
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
X, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=500).fit(X, y)
print("MODEL:" + base64.b64encode(pickle.dumps(model)).decode())
print("PREDICTED:" + ",".join(map(str, model.predict(X[::10]))))
"""
LOAD = """
import base64, pickle, sys, warnings
from sklearn.exceptions import InconsistentVersionWarning
warnings.simplefilter("error", InconsistentVersionWarning)  # as a careful serving job does
from sklearn.datasets import load_iris
X, _ = load_iris(return_X_y=True)
model = pickle.loads(base64.b64decode(sys.argv[1]))
print("PREDICTED:" + ",".join(map(str, model.predict(X[::10]))))
"""


def marked(output: str, marker: str) -> str:
    return next(line[len(marker):] for line in output.splitlines() if line.startswith(marker))


@pytest.mark.engine
def test_a_model_pickled_like_smd_loads_where_smds_versions_are(engine, default_images):
    """A stack locked like SageMaker Distribution 4.4.1 (tests/stacks/like-smd: scikit-learn and
    pandas, no versions asked) gets the release's versions; a model it pickles loads in a
    container of the release's exact versions (tests/stacks/smd-pins, locked from its pins by
    the same path) and predicts the same. One pickled in the default image (numpy 2, the
    newest scikit-learn) is refused there, scikit-learn's InconsistentVersionWarning made an
    error as a careful serving job makes it: what `like` is for."""
    from devbox_build.build import BuildOptions, build

    from .conftest import HOST_CA_CERTS

    built = {}
    for name in ("like-smd", "smd-pins"):
        spec = load_spec(ROOT / "tests" / "stacks" / name)
        assert locking.check(spec) == [], name  # the committed locks are its inputs'
        pins = {n: p.version for n, p in locking.read_pins(
            spec.folder / "locks" / "linux-amd64" / "pip.txt").items()}
        assert off_release(load(spec, "smd:4.4.1", "cpu"), pins) == [], name
        (result,) = build(spec, ["cpu"], engine, BuildOptions(ca_certificates=HOST_CA_CERTS))
        built[name] = result.content_tag

    code, trained = engine.run(built["like-smd"], ["python", "-c", TRAIN])
    assert code == 0, trained
    code, loaded = engine.run(built["smd-pins"], ["python", "-c", LOAD, marked(trained, "MODEL:")])
    assert code == 0, loaded
    assert marked(loaded, "PREDICTED:") == marked(trained, "PREDICTED:")

    code, newest = engine.run(default_images["cpu"].content_tag, ["python", "-c", TRAIN])
    assert code == 0, newest
    code, refused = engine.run(built["smd-pins"], ["python", "-c", LOAD, marked(newest, "MODEL:")])
    assert code != 0 and "InconsistentVersionWarning" in refused, refused
    assert "from version 1.9" in refused and "when using version 1.7.2" in refused
