"""Install layers from the lock: the grouping (layers.py), what the locks record for it, and how
render shows it. No engine: the engine tests are in test_build.py (one-pin rebuilds, layer
digests that do not depend on the machine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devbox_build import layers, locking
from devbox_build.errors import SpecError
from devbox_build.locking import Pin
from devbox_build.render import render
from devbox_build.spec import load_spec

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "images" / "datascience"


def pins(**sizes: int) -> list[Pin]:
    return [Pin(name, "1", f"{name}==1\n", size=size) for name, size in sizes.items()]


def names(groups: list[layers.Group]) -> list[list[str]]:
    return [[pin.name for pin in group.packages] for group in groups]


def cost(groups: list[layers.Group], below: int = 0) -> int:
    """The expected one-pin rebuild cost the grouping minimises (layers.py's docstring)."""
    total, at_or_below = 0, below
    for group in groups:
        at_or_below += len(group.packages)
        total += (layers.LAYER_OVERHEAD_BYTES + group.size
                  + layers.PACKAGE_OVERHEAD_BYTES * len(group.packages)) * at_or_below
    return total


def every_grouping(ordered: list[Pin]):
    """Every split of ``ordered`` into contiguous groups."""
    for mask in range(2 ** (len(ordered) - 1)):
        groups, current = [], [ordered[0]]
        for index, pin in enumerate(ordered[1:]):
            if mask >> index & 1:
                groups.append(layers.Group(tuple(current)))
                current = []
            current.append(pin)
        groups.append(layers.Group(tuple(current)))
        yield groups


@pytest.mark.parametrize("below", [0, 100])
def test_grouping_is_the_cheapest_split_with_big_packages_low(below):
    sizes = {"big": 55_000_000, "mid": 17_000_000, "numpy": 16_900_000, "small": 4_000_000,
             "a": 200_000, "b": 90_000, "c": 60_000, "d": 3_000}
    groups = layers.group(pins(**sizes), below=below)
    ordered = [pin.size for group in groups for pin in group.packages]
    assert ordered == sorted(ordered, reverse=True)  # bottom first: biggest first
    by_size = sorted(pins(**sizes), key=lambda pin: -pin.size)
    assert cost(groups, below) == min(cost(g, below) for g in every_grouping(by_size))
    # The same packages in another order: the same layers (the lock alone decides).
    assert names(layers.group(reversed(pins(**sizes)), below=below)) == names(groups)
    if below == 0:
        assert names(groups)[0] == ["big"] and len(groups) >= 3
    else:
        # Above a big lock, every layer is rebuilt by all the changes below: fewer layers.
        assert len(groups) < len(layers.group(pins(**sizes)))


def test_own_layer_and_the_layer_budget():
    sizes = {f"p{i:02d}": 3_000_000 * (i + 1) for i in range(30)}
    groups = layers.group(pins(**sizes), own=["p00"], max_per_lock=4)
    assert len(groups) == 4
    assert [g for g in groups if g.own] == [layers.Group((pins(**sizes)[0],), own=True)]
    assert sorted(p for g in names(groups) for p in g) == sorted(sizes)


def test_committed_locks_record_each_wheel_and_what_needs_it():
    lock = locking.read_pins(DEFAULT / "locks" / "linux-amd64" / "pip.txt")
    assert all(pin.size and pin.wheel for pin in lock.values())
    assert re.fullmatch(r"numpy-[\d.]+-cp311-cp311-.*manylinux.*x86_64\.whl", lock["numpy"].wheel)
    assert lock["six"].wheel.endswith("-none-any.whl")
    assert {"pandas", "scipy", "scikit-learn"} <= set(lock["numpy"].via)
    assert lock["ipywidgets"].via == ()  # nothing in the stack needs it: a leaf
    assert "mlflow" in lock["pyarrow"].via  # the SDK brings it in (0.3.0): no longer a leaf


def test_render_shows_every_package_in_one_layer_with_why():
    spec = load_spec(DEFAULT)
    context = render(spec, "cpu")
    listed = re.findall(r"^#   ([a-z0-9-]+)==(\S+)  ([\d.]+ [kM]B)  (.*)$", context.dockerfile, re.M)
    lock = locking.read_pins(locking.stack(spec, "cpu", "linux/amd64")[-1].path(spec))
    assert sorted(name for name, *_ in listed) == sorted(lock)
    numpy = next(row for row in listed if row[0] == "numpy")
    assert numpy[3].startswith("needed by ") and "pandas" in numpy[3]
    markers = re.findall(r"^# ---- layer: pip \(\d+ pip packages? from locks/linux-amd64/pip\.txt, "
                         r"group (\d+) of (\d+), ", context.dockerfile, re.M)
    assert len(markers) >= 4 and [int(m[0]) for m in markers] == list(range(1, len(markers) + 1))
    # Each group's requirements file holds exactly the packages its comment lists.
    from .test_render import written_requirements

    for section in context.dockerfile.split("# ---- layer: ")[1:]:
        for lines in written_requirements(section).values():
            assert sorted(line.split("==")[0] for line in lines) == sorted(
                re.findall(r"^#   ([a-z0-9-]+)==", section, re.M))
            assert all(line == locking.install_line(lock[line.split("==")[0]]) for line in lines)


def test_gpu_only_packages_sit_above_every_shared_layer():
    from .test_render import written_requirements

    spec = load_spec(DEFAULT)
    cpu, gpu = render(spec, "cpu"), render(spec, "gpu")
    cpu_files, gpu_files = written_requirements(cpu.dockerfile), written_requirements(gpu.dockerfile)
    shared = [name for name in cpu_files if re.fullmatch(r"pip-\d+", name)]
    assert len(shared) >= 4 and all(gpu_files[name] == cpu_files[name] for name in shared)
    assert any(name.startswith("pip-gpu-") for name in gpu_files)
    lines = gpu.dockerfile.splitlines()
    accelerator = next(i for i, line in enumerate(lines) if line.startswith("ENV NVIDIA_VISIBLE"))
    written_at = {name: next(i for i, line in enumerate(lines)
                             if f"> /opt/devbox/requirements/{name}.txt" in line)
                  for name in gpu_files}
    assert all(written_at[name] < accelerator for name in shared)
    assert all(at > accelerator for name, at in written_at.items() if name not in shared)


def test_a_package_named_for_its_own_layer_must_be_locked(tmp_path):
    import shutil

    stack = tmp_path / "tiny"
    shutil.copytree(TINY, stack)
    with (stack / "image.toml").open("a") as spec_file:
        spec_file.write('\n[layers]\nown = ["nmupy"]\n')
    with pytest.raises(SpecError, match=r"layers\.own.*'nmupy' is in none of the spec's pip locks"):
        render(load_spec(stack), "cpu")


def test_more_layers_than_the_engine_stacks_is_refused_before_the_build():
    from devbox_build.build import MAX_LAYERS, check_layer_count

    context = render(load_spec(DEFAULT), "gpu")
    ours = context.filesystem_layers()
    assert 10 < ours < MAX_LAYERS
    check_layer_count(context, 1)  # a debootstrapped base: one layer
    with pytest.raises(SpecError, match=r"key 'layers\.max_per_lock'.*would have \d+ filesystem"):
        check_layer_count(context, MAX_LAYERS - ours + 1)


def test_small_packages_the_inputs_name_go_on_top_of_the_bottom_lock_only():
    direct = [Pin("tqdm", "1", "tqdm==1\n", size=80_000, direct=True),
              Pin("numpy", "1", "numpy==1\n", size=17_000_000, direct=True)]
    transitive = pins(six=11_000, idna=70_000, scipy=35_000_000)
    groups = layers.group(direct + transitive)
    assert names(groups)[-1] == ["tqdm"] and groups[-1].top
    assert "input files name" in groups[-1].reason()
    assert all("numpy" not in g for g in names(groups)[-1:])  # big inputs stay by size
    # Above another lock (dev above pip), no layer of their own: every change below would
    # rebuild it too.
    assert not any(g.top for g in layers.group(direct + transitive, below=100))


def test_the_default_lock_marks_what_its_inputs_name():
    lock = locking.read_pins(DEFAULT / "locks" / "linux-amd64" / "pip.txt")
    named = {line.split(">")[0].split("=")[0].strip()
             for line in (DEFAULT / "requirements.in").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert {name for name, pin in lock.items() if pin.direct} == named


def test_one_layer_per_lock_is_allowed():
    direct = [Pin("tqdm", "1", "tqdm==1\n", size=80_000, direct=True)]
    groups = layers.group(direct + pins(six=11_000, scipy=35_000_000), max_per_lock=1)
    assert [sorted(g) for g in names(groups)] == [["scipy", "six", "tqdm"]]


def test_group_bytecode_is_what_compileall_writes_byte_for_byte(tmp_path, monkeypatch):
    """The builder compiles each group's tree with dockerfile/bytecode.py (one process per core,
    its share up front): the same files and bytes as `compileall -s TREE -p /`, each recording
    the path the image sees; a source that does not compile is skipped, not fatal."""
    import importlib.util
    import os
    import subprocess
    import sys

    path = ROOT / "devbox_build" / "dockerfile" / "bytecode.py"
    module_spec = importlib.util.spec_from_file_location("bytecode", path)
    bytecode = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bytecode)
    monkeypatch.setitem(sys.modules, "bytecode", bytecode)  # its workers find it by name

    def tree(name: str) -> Path:
        root = tmp_path / name
        site = root / "opt" / "venv" / "lib" / "site-packages"
        for index in range(7):
            package = site / f"pkg{index}" / "sub"
            package.mkdir(parents=True)
            (package.parent / "__init__.py").write_text(f"VALUE = {index}\n")
            (package / "mod.py").write_text(f"def f():\n    return {index} * 2\n")
        (site / "py2_fixture.py").write_text("print 'python 2'\n")
        (site / "pkg0" / "data.txt").write_text("not python\n")
        (site / "linked").symlink_to(site / "pkg1", target_is_directory=True)
        for file in root.rglob("*"):
            os.utime(file, (1_000_000, 1_000_000), follow_symlinks=False)
        return root

    def pycs(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.pyc"))}

    ours, theirs = tree("ours"), tree("theirs")
    assert bytecode.compile_tree(str(ours), str(ours / "opt" / "venv"), workers=3) == 1
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(theirs),
                    "-p", "/", str(theirs / "opt" / "venv")], capture_output=True, check=False)
    assert len(pycs(ours)) == 14 and pycs(ours) == pycs(theirs)
    # Each records the image's path, not the builder's tree.
    assert b"/opt/venv/lib/site-packages/pkg3/sub/mod.py" in pycs(ours)[
        f"opt/venv/lib/site-packages/pkg3/sub/__pycache__/mod.{sys.implementation.cache_tag}.pyc"]
    assert str(tmp_path).encode() not in b"".join(pycs(ours).values())
    # The command the script runs, one process per core.
    again = tree("again")
    subprocess.run([sys.executable, str(path), str(again), str(again / "opt" / "venv")],
                   check=True)
    assert pycs(again) == pycs(ours)
