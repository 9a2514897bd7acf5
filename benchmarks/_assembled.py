"""The other build mechanism of issue 15: install layers built independently and assembled.

The same render as `devbox-build build` (same base steps, same groups, same tail), but each pip
group is installed on its own into an empty tree (``pip install --root``) in a builder container,
normalised the way the chain's steps are (fixed mtimes, bytecode compiled against them, the
venv's group and setgid folders), written as a layer tar, and the image is put together from the
base steps' image plus those tars with `docker load`, then the tail steps run on top.

Only groups whose requirements changed are installed again. `docker load` skips a layer whose
chain is already in the engine, so the archive holds only the changed group and the groups above
it (their bytes are the same, but their chain ids are new): nothing above the change is
reinstalled, only streamed in again.

A benchmark contender, not a product path: see benchmarks/layers.py --assembled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devbox_build.build import PROXY_ARGS
from devbox_build.engine import Built, Engine
from devbox_build.render import LAYER_MTIME, BuildContext

_PIP_STEP = "RUN set -eu; umask 0002; : > /tmp/.devbox-layer;"
_REQUIREMENT = re.compile(r"^\s+('[^']*')\s+\\$")
_TARGET = re.compile(r"> /opt/devbox/requirements/([\w.-]+)\.txt;")


@dataclass
class Assembler:
    """One stack's state between builds: the layer tars already built, by requirements text."""

    scratch: Path
    layers: dict[str, tuple[Path, str]] = field(default_factory=dict)  # key → (tar, diff id)
    loaded_chains: set[str] = field(default_factory=set)
    images: list[str] = field(default_factory=list)  # every image id made, removed at the end

    def build(self, engine: Engine, context: BuildContext, buildargs: dict[str, str],
              no_cache: bool) -> str:
        if no_cache:
            self.layers.clear()
            self.loaded_chains.clear()
        head, groups, tail = split(context.dockerfile)
        head_id = self._engine_build(engine, context, head, buildargs, no_cache)
        keys = [hashlib.sha256(("\n".join(lines) + name).encode()).hexdigest()
                for name, lines in groups]
        missing = [(name, lines, key) for (name, lines), key in zip(groups, keys)
                   if key not in self.layers]
        if missing:
            self._install(engine, head_id, missing, context)
        base = engine.image(head_id)
        diff_ids = list(base["RootFS"]["Layers"])
        chain = _chain_ids(diff_ids)
        self.loaded_chains.update(chain)  # the base steps' layers are in the engine
        archive = self.scratch / "assembled.tar"
        with tarfile.open(archive, "w") as out:
            layer_paths = [f"base-{i}/layer.tar" for i in range(len(diff_ids))]
            for number, key in enumerate(keys):
                path, diff_id = self.layers[key]
                diff_ids.append(diff_id)
                chain.append(_chain_ids([chain[-1], diff_id])[-1])
                member = f"{number:02d}/layer.tar"
                layer_paths.append(member)
                if chain[-1] not in self.loaded_chains:
                    out.add(path, arcname=member)
            config = {"architecture": base["Architecture"], "os": base["Os"],
                      "config": base["Config"],
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}
            _add_bytes(out, "config.json", json.dumps(config).encode())
            _add_bytes(out, "manifest.json", json.dumps(
                [{"Config": "config.json", "RepoTags": None, "Layers": layer_paths}]).encode())
        with archive.open("rb") as stream:
            loaded = engine.api.load_image(stream)
        image_id = next(line["stream"].split("Loaded image ID: ")[1].strip()
                        for line in loaded if "Loaded image ID: " in line.get("stream", ""))
        archive.unlink()
        self.loaded_chains.update(chain)
        self.images += [head_id, image_id]
        final = self._engine_build(engine, context, [f"FROM {image_id}", *tail], buildargs,
                                   no_cache)
        self.images.append(final)
        return final

    def _install(self, engine: Engine, head_id: str, groups: list, context: BuildContext) -> None:
        """Install each group into its own tree in one builder container; tar each tree."""
        work = Path(tempfile.mkdtemp(prefix="assemble-", dir=self.scratch))
        python = context.spec.python_version
        script = ["set -eu; umask 0002"]
        for name, lines, _ in groups:
            (work / f"{name}.txt").write_text("".join(
                shlex.split(line)[0] + "\n" for line in lines))
            tree = f"/out/{name}"
            script.append(
                f"PIP_USER=0 pip install --no-deps --require-hashes --no-cache-dir --no-compile "
                f"--no-input --disable-pip-version-check --root-user-action=ignore "
                f"--root {tree} -r /out/{name}.txt >/dev/null; "
                f"mkdir -p {tree}/opt/devbox/requirements; "
                f"cp /out/{name}.txt {tree}/opt/devbox/requirements/{name}.txt; "
                # What the chain's steps get from the venv's setgid, group-writable folders.
                f"chgrp -R {context.spec.user.gid} {tree}/opt/venv; "
                f"find {tree}/opt/venv -type d -exec chmod g+s {{}} +; "
                f"for d in opt opt/venv opt/venv/bin opt/venv/lib opt/venv/lib/python{python} "
                f"opt/venv/lib/python{python}/site-packages opt/devbox; do "
                f"[ -d {tree}/$d ] && [ -d /$d ] && chown --reference=/$d {tree}/$d && "
                f"chmod --reference=/$d {tree}/$d || :; done; "
                f"find {tree} -exec touch -h -d @{LAYER_MTIME} {{}} +; "
                f"python -m compileall -q -j 0 -s {tree} -p / {tree}/opt/venv >/dev/null || :; "
                f"find {tree} -exec touch -h -d @{LAYER_MTIME} {{}} +; "
                f"tar --sort=name --numeric-owner -C {tree} -cf /out/{name}.tar opt")
        proxies = {name: os.environ[name] for name in PROXY_ARGS if name in os.environ}
        code, out = engine.run(head_id, ["bash", "-c", "; ".join(script)], user="root",
                               volumes={str(work): "/out"}, entrypoint=[], environment=proxies)
        if code != 0:
            raise RuntimeError(f"assembling failed:\n{out[-3000:]}")
        for name, lines, key in groups:
            tar = work / f"{name}.tar"
            digest = hashlib.sha256()
            with tar.open("rb") as layer:
                for chunk in iter(lambda: layer.read(1 << 20), b""):
                    digest.update(chunk)
            self.layers[key] = (tar, f"sha256:{digest.hexdigest()}")

    def _engine_build(self, engine: Engine, context: BuildContext, lines: list[str],
                      buildargs: dict[str, str], no_cache: bool) -> str:
        files = dict(context.files)
        files["Dockerfile"] = ("\n".join(lines) + "\n").encode()
        part = BuildContext(context.spec, context.variant, context.platform, context.base, files)
        image_id = ""
        for event in engine.build(part.tar(), platform=context.platform, buildargs=buildargs,
                                  nocache=no_cache):
            if isinstance(event, Built):
                image_id = event.image_id
        return image_id

    def remove(self, engine: Engine) -> None:
        for image_id in reversed(self.images):
            try:
                engine.remove_image(image_id)
            except Exception:  # an image shared by two builds goes with the first removal
                pass


def split(dockerfile: str) -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    """The rendered Dockerfile as (the instructions before the first pip group, each group's
    (name, requirement lines), the instructions after the last group)."""
    lines = dockerfile.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_PIP_STEP)]
    head, groups, index = lines[:starts[0]], [], starts[0]
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(("#", _PIP_STEP))):
        if lines[index].startswith(_PIP_STEP):
            requirements, index = [], index + 1
            while not _TARGET.search(lines[index]):
                if match := _REQUIREMENT.match(lines[index]):
                    requirements.append(match[1])
                index += 1
            groups.append((_TARGET.search(lines[index])[1], requirements))
            while lines[index].endswith("\\"):
                index += 1
        index += 1
    return head, groups, lines[index:]


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _chain_ids(diff_ids: list[str]) -> list[str]:
    """Docker's chain ids: the first layer's is its diff id, each next one hashes the one below
    with its own (so the first entry may also be a chain id already)."""
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain
