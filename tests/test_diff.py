"""`devbox-build diff`: packages per kind with the kind of each version move, the layers one
image shares with another and what a machine holding the first fetches for the second, the facts
that changed; as text, --json and markdown for a pull request."""

from __future__ import annotations

import json

import pytest

from devbox_build.diff import Side, bump, changed, compare, growth, markdown

from .conftest import assert_clean_error, cli
from .support.registry import LoopbackRegistry


SIZES = {("numpy", "1.26.4"): 30_000_000, ("numpy", "2.4.0"): 32_000_000, ("gone", "1"): 1_000,
         ("new", "0.1"): 100_000}


def side(ref: str, pip: dict, apt: dict, layers: list, labels: dict | None = None) -> Side:
    manifest = {"python_version": "3.11.2", "platform": "linux/amd64",
                "user": {"name": "sagemaker-user", "uid": 1000, "gid": 100},
                "packages": {"pip": [{"name": n, "version": v, "size": SIZES.get((n, v), 0)}
                                     for n, v in pip.items()],
                             "apt": [{"name": n, "version": v} for n, v in apt.items()]},
                "image": {"labels": {"org.opencontainers.image.created": ref, **(labels or {})}}}
    return Side(ref, manifest, layers, {"Entrypoint": ["devbox-entrypoint"]})


@pytest.mark.parametrize("old, new, package_kind, kind", [
    ("1.26.4", "2.4.0", "pip", "major"), ("2.3.1", "2.4.0", "pip", "minor"),
    ("3.10", "3.11", "pip", "minor"), ("3.11", "3.11.1", "pip", "patch"),
    ("2026.1", "2026.1.post1", "pip", "patch"), ("1.0", "not-a-version", "pip", "other"),
    ("1:2.38-4", "1:2.38-5", "apt", "patch"), ("2.6.1", "2.7.0", "apt", "minor"),
    ("3.0.17-1~deb12u2", "3.0.18-1~deb12u1", "apt", "patch"),
    ("2025a-0+deb12u1", "2025b-0+deb12u1", "apt", "other"), ("1:1.0-1", "2:1.0-1", "apt", "major"),
])
def test_a_version_move_is_named_by_its_kind(old, new, package_kind, kind):
    assert bump(old, new, package_kind) == kind


def test_packages_layers_and_facts_compared():
    base = [("sha256:os", 100, "os"), ("sha256:pip1", 50, "RUN pip-01")]
    a = side("a", {"numpy": "1.26.4", "six": "1.16.0", "gone": "1"}, {"tzdata": "2025a-0"},
             [*base, ("sha256:final-a", 5, "final")])
    b = side("b", {"numpy": "2.4.0", "six": "1.17.0", "new": "0.1"}, {"tzdata": "2025b-0"},
             [*base, ("sha256:pip2", 70, "RUN pip-02"), ("sha256:final-b", 6, "final")],
             labels={"devbox.cuda.version": "12.9", "devbox.cuda.min-driver": "525.60.13"})
    diff = compare(a, b)
    pip = diff["packages"]["pip"]
    assert pip["added"] == [{"name": "new", "version": "0.1", "size": 100_000}]
    assert pip["removed"] == [{"name": "gone", "version": "1", "size": 1_000}]
    assert [(p["name"], p["bump"]) for p in pip["changed"]] == [("numpy", "major"),
                                                                ("six", "minor")]
    assert diff["packages"]["apt"]["changed"][0]["bump"] == "other"
    assert diff["layers"] | {"fetched": None} == {
        "a": 3, "b": 4, "shared": 2, "to_fetch": 2, "bytes_to_fetch": 76, "fetched": None}
    # The build time differs on every build: not a change. CUDA is a fact, shown once.
    assert diff["facts"] == [{"fact": "cuda", "a": "", "b": "12.9"},
                             {"fact": "min driver", "a": "", "b": "525.60.13"}]
    text = markdown(diff)
    assert "| numpy | 1.26.4 | 2.4.0 | major | +2.0 MB |" in text
    assert "| gone | 1 | – | removed | -1 kB |" in text
    assert "**pip** (+2.1 MB)" in text
    assert growth(a.manifest, b.manifest)[:2] == [("pip", "numpy", 2_000_000),
                                                  ("pip", "new", 100_000)]
    assert "2 of 4 layers shared, 2 to fetch" in text
    assert compare(a, a)["facts"] == [] and not any(
        changed(entry) for entry in compare(a, a)["packages"].values())


@pytest.mark.engine
def test_diff_of_the_cpu_and_gpu_images_matches_what_a_registry_serves(engine, tiny_images,
                                                                      tmp_path):
    _, results = tiny_images
    cpu, gpu = results["cpu"].content_tag, results["gpu"].content_tag
    result = cli("diff", cpu, gpu, "--json")
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)
    assert [p["name"] for p in diff["packages"]["pip"]["added"]] == ["nvidia-cuda-runtime-cu12"]
    assert {f["fact"]: f["b"] for f in diff["facts"]}["cuda"] == "12.9"
    layers = diff["layers"]
    assert layers["shared"] >= 4 and layers["to_fetch"] == layers["b"] - layers["shared"]
    assert layers["bytes_to_fetch"] == sum(layer["bytes"] for layer in layers["fetched"]) > 0

    # What a pull of the GPU image fetches when the CPU one is there: the registry's manifest of
    # each, pushed to a registry of their own; the layers only the GPU image has are blobs the
    # CPU image's manifest does not list.
    (tmp_path / "registry").mkdir()
    with LoopbackRegistry(tmp_path / "registry") as registry:
        pushed = {}
        for name, ref in (("cpu", cpu), ("gpu", gpu)):
            remote = f"{registry.host}/diff/tiny:{name}"
            engine.tag(engine.image_id(ref), remote)
            try:
                for _ in engine.push(remote):
                    pass
            finally:
                engine.untag(remote)
            pushed[name] = [layer["digest"] for layer in registry.manifest("diff/tiny", name)[
                "layers"]]
        fetched = [digest for digest in pushed["gpu"] if digest not in pushed["cpu"]]
        assert len(fetched) == layers["to_fetch"], (fetched, layers)

    text = cli("diff", cpu, gpu, "--markdown").stdout
    assert text.startswith(f"### `{cpu}` → `{gpu}`")
    assert "| nvidia-cuda-runtime-cu12 | – | 12.9.79 | added |" in text
    same = cli("diff", cpu, cpu)
    assert "0 added, 0 removed, 0 changed" in same.stdout and "0 to fetch" in same.stdout
    assert_clean_error(cli("diff", cpu, "debian:bookworm-slim"), "debian:bookworm-slim",
                       "not built by devbox-build")


def test_diff_of_locks_and_of_a_spec_at_two_git_revisions(tmp_path):
    """Before anything is built: two lock files, or a spec's top lock at two commits (this
    repository's own history: the commit that put jupyterhub in the default image)."""
    from .conftest import ROOT

    lock = ROOT / "images" / "datascience" / "locks" / "linux-amd64" / "pip.txt"
    old = tmp_path / "old.txt"
    text = lock.read_text()
    assert "\nsix==" in text
    old.write_text(text.replace("\nsix==", "\nsix==0.9.0\n# six==", 1))
    result = cli("diff", str(old), str(lock), "--json")
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout)["packages"]["pip"]["changed"]
    assert [(c["name"], c["from"], c["bump"]) for c in changed] == [("six", "0.9.0", "major")]

    result = cli("diff", "datascience@3d13a8d~1", "datascience@3d13a8d", "--markdown")
    assert result.returncode == 0, result.stderr
    assert "| jupyterhub | – | 5.5.4 | added |" in result.stdout
    assert "layers shared" not in result.stdout  # locks have none
    assert_clean_error(cli("diff", "datascience@no-such-revision", "datascience@"),
                       "datascience@no-such-revision: git has no")
    # An image by digest is an image, not a spec at a revision.
    digest = "devbox-test/no-such@sha256:" + "0" * 64
    assert_clean_error(cli("diff", digest, digest), "devbox-test/no-such@sha256:")
    assert "git" not in cli("diff", digest, digest).stderr
