"""Where images run: one module per target, each behind :class:`Target`.

    ec2.Ec2              a person's EC2 box (one role of boxes.toml): its cloud-init user data
    sagemaker.SageMaker  a SageMaker image registration: the inputs of its API calls
    hub.DockerHub        a team's JupyterHub on one host: DockerSpawner's configuration
    hub.KubernetesHub    a team's JupyterHub on Kubernetes: Zero to JupyterHub's values

Every target answers the same two questions, and every command that writes a target's files goes
through :func:`prepare` then :func:`write`: all images are admitted before anything is rendered,
every problem of every image is one error, and the files are written all or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import InputError

if TYPE_CHECKING:
    from ..checks.image import ImageUnderTest


@runtime_checkable
class Target(Protocol):
    """One place images run."""

    name: str  # how messages name it: "SageMaker", "EC2 box gpu", "JupyterHub (DockerSpawner)"

    def admit(self, image: ImageUnderTest) -> list[str]:
        """Every reason ``image`` would not run there, each naming what to change; [] when none."""
        ...

    def render(self, images: Sequence[ImageUnderTest]) -> dict[str, str]:
        """The files the target reads, by name, for images it admitted."""
        ...


def prepare(target: Target, images: Sequence[ImageUnderTest]) -> dict[str, str]:
    """``target``'s files for ``images``, or one InputError listing every image's problems."""
    problems = [f"{image.ref}: {problem}" for image in images for problem in target.admit(image)]
    if problems:
        raise InputError(f"not for {target.name}:\n  " + "\n  ".join(problems))
    return target.render(images)


def write(folder: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` into ``folder``: each atomically, and none when one cannot be written."""
    from ..locking import write_atomic

    staged, created = folder / ".devbox-staging", not folder.exists()
    paths = []
    try:
        for name, text in files.items():
            write_atomic(staged / name, text, error=InputError)
        for name in files:
            (staged / name).replace(folder / name)
            paths.append(folder / name)
    finally:
        for leftover in staged.glob("*") if staged.is_dir() else ():
            leftover.unlink()
        if staged.is_dir():
            staged.rmdir()
        if created and not paths and folder.is_dir():
            folder.rmdir()
    return paths
