"""The hand-written Dockerfiles the benchmarks compare devbox-build with, on equal footing.

Same base, same apt packages and cleanup, same CA certificates, the same lock (the variant's top
lock: its whole closure); bytecode compiled in all three, as an image users import from should.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

from devbox_build.engine import Built, Engine

ROOT = Path(__file__).resolve().parent.parent
_PREAMBLE = """\
FROM {base}
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv {apt} \\
 && update-ca-certificates && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
"""
DOCKERFILES = {
    # The README of every Python project: one `pip install -r` layer.
    "pip install -r": _PREAMBLE + """\
RUN python3 -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt
""",
    # uv's Docker guide: uv from PyPI, bytecode compiled, no cache left behind.
    "uv pip install": _PREAMBLE + """\
RUN python3 -m venv /opt/venv && pip install --no-cache-dir uv=={uv_version}
COPY requirements.txt /tmp/requirements.txt
RUN uv pip install --no-cache --compile-bytecode --python /opt/venv/bin/python -r /tmp/requirements.txt
""",
}


def timed(action):
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


def copy_spec(scratch: Path, name: str, source: Path = ROOT / "images" / "datascience") -> Path:
    """A copy of a spec folder under a throwaway repository name (never the team's tags)."""
    folder = scratch / name
    shutil.copytree(source, folder)
    spec = folder / "image.toml"
    text = spec.read_text()
    repository = next(line for line in text.splitlines() if line.startswith("repository"))
    spec.write_text(text.replace(repository, f'repository = "devbox-bench/{name}"'))
    return folder


def own_base(engine: Engine, base: str, name: str) -> str:
    """``base`` under a label of its own: another image id (no new layer), tagged
    devbox-bench/base:NAME. The classic builder continues a cached step from the newest matching
    child of an image, so contenders built FROM one shared image could continue each other's
    steps (and another run's)."""
    tag = f"devbox-bench/base:{name}"
    engine.tag(build_files(engine, {
        "Dockerfile": f"FROM {base}\nLABEL devbox.benchmark-base={name}\n".encode()}), tag)
    return tag


def uv_version() -> str:
    import subprocess

    from uv import find_uv_bin

    return subprocess.run([find_uv_bin(), "--version"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def build_handwritten(engine: Engine, kind: str, requirements: bytes, *, base: str,
                      apt: list[str], ca_certs: list[str], tag: str | None = None,
                      no_cache: bool = False) -> str:
    """Build one hand-written Dockerfile; its image id."""
    files = {
        "Dockerfile": DOCKERFILES[kind].format(base=base, apt=" ".join(apt),
                                               uv_version=uv_version()).encode(),
        "requirements.txt": requirements,
        **{f"certs/{Path(c).name}": Path(c).read_bytes() for c in ca_certs},
    }
    image_id = build_files(engine, files, no_cache=no_cache)
    if tag:
        engine.tag(image_id, tag)
    return image_id


def build_files(engine: Engine, files: dict[str, bytes], no_cache: bool = False) -> str:
    """Build a context of ``files`` (its Dockerfile among them); the image id."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    # engine.build raises with the failing step's output; only the final image id matters here.
    built = [event for event in engine.build(buffer, nocache=no_cache) if isinstance(event, Built)]
    return built[-1].image_id
