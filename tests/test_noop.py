"""The no-op rebuild's fast path (noop.py): the command line answers an unchanged build from the
stamp its last success left, without importing the spec, lock or template code, and takes the
full path the moment anything it read, its environment or the engine's images differ. Real
engine, the tiny stack, the command line as a user runs it (``python -m devbox_build``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import load
from .test_build import remove_repository

pytestmark = pytest.mark.engine

FULL_PATH_MODULE = "devbox_build.spec"  # imported by the full path only


def devbox(stack: Path, cache: Path, *args: str, env: dict | None = None
           ) -> tuple[subprocess.CompletedProcess, bool]:
    """`devbox-build build STACK --variant cpu ARGS`; the result and whether it took the full
    path (Python's import log names the spec module)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "devbox_build", "build", str(stack),
         "--variant", "cpu", *args],
        env={**os.environ, "XDG_CACHE_HOME": str(cache), **(env or {})},
        capture_output=True, text=True, check=False, timeout=900)
    full = bool(re.search(rf"\|\s+{re.escape(FULL_PATH_MODULE)}$", result.stderr, re.MULTILINE))
    result.stderr = "\n".join(line for line in result.stderr.splitlines()
                              if not line.startswith("import time:"))
    return result, full


def test_an_unchanged_build_is_answered_from_its_stamp_until_anything_it_read_changes(
        engine, stack, tmp_path):
    cache = tmp_path / "cache"
    remove_repository(engine, stack)
    built, full = devbox(stack, cache)
    assert built.returncode == 0 and full, built.stderr[-3000:]
    spec = load(stack)

    # Nothing changed: the stamp answers, and says what the full path says.
    again, full = devbox(stack, cache)
    assert again.returncode == 0 and not full, again.stderr
    assert "up to date: " in again.stderr and "(nothing to build)" in again.stderr
    assert f"also tagged: {spec.repository}:cpu" in again.stderr
    assert "CA certificates: " in again.stderr
    stamps = list((cache / "devbox-build" / "noop").glob("*.json"))
    assert len(stamps) == 1

    # An input edited: the full path, which refuses the stale lock as it always did.
    inputs = stack / "requirements.in"
    kept = inputs.read_text()
    inputs.write_text(kept + "tomli\n")
    stale, full = devbox(stack, cache)
    assert full and stale.returncode == 3, stale.stderr
    assert "refusing to build from a stale or edited lock" in stale.stderr
    # The same bytes again, but the file was written: the full path once (a no-op), then the
    # stamp it left.
    inputs.write_text(kept)
    for expected_full in (True, False):
        result, full = devbox(stack, cache)
        assert result.returncode == 0 and full is expected_full, result.stderr
        assert "(nothing to build)" in result.stderr

    # A file added next to one it read (a lock for another platform, say): the full path.
    (stack / "NOTES.md").write_text("a new file in the spec's folder\n")
    result, full = devbox(stack, cache)
    assert result.returncode == 0 and full, result.stderr
    assert not devbox(stack, cache)[1]

    # The human tag moved to another image: the full path, which points it back.
    image_id = engine.image_id(f"{spec.repository}:cpu")
    engine.tag(engine.image_id(spec.variants["cpu"].base), f"{spec.repository}:cpu")
    result, full = devbox(stack, cache)
    assert result.returncode == 0 and full, result.stderr
    assert engine.image_id(f"{spec.repository}:cpu") == image_id

    # Another environment is another command; a command that must push, rebuild or print
    # JSON always takes the full path.
    assert devbox(stack, cache, env={"DOCKER_HOST": "unix:///var/run/docker.sock"})[1]
    assert devbox(stack, cache, "--json")[1]
    assert not devbox(stack, cache)[1]

    # The image removed: the full path builds it again.
    remove_repository(engine, stack)
    rebuilt, full = devbox(stack, cache)
    assert rebuilt.returncode == 0 and full, rebuilt.stderr[-3000:]
    assert "(nothing to build)" not in rebuilt.stderr
    remove_repository(engine, stack)
