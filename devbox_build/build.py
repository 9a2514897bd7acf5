"""Orchestrates a build: lock gate → render → content tag → engine build → tags → push.

A build is addressed by its content: the hash of everything that goes into it (spec, locks,
Dockerfile template, CA files, base image id). When an image with that content tag exists, there is
nothing to build. Tags are only applied after the engine reports success, so a failed or
interrupted build never leaves a tag behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from . import locking
from .engine import Built, Engine, Output, Step, StepFailed
from .errors import BuildFailed, DevboxError, LockError, SpecError
from .render import PYTHON_MISMATCH_MARKER, BuildContext, render
from .spec import ImageSpec

# Docker's predefined proxy build args: passed through from the caller's environment, never
# declared in the Dockerfile, so their values stay out of the image and its history.
PROXY_ARGS = tuple(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)
FAILED_OUTPUT_LINES = 40


class Progress(Protocol):
    """What a build reports while it runs (the CLI draws it with rich)."""

    def start(self, ref: str, context: BuildContext) -> None: ...
    def step(self, step: Step, layer: str) -> None: ...
    def output(self, line: str) -> None: ...
    def done(self, result: BuildResult) -> None: ...


class SilentProgress:
    def start(self, ref, context): pass
    def step(self, step, layer): pass
    def output(self, line): pass
    def done(self, result): pass


@dataclass
class BuildResult:
    spec: str
    variant: str
    image_id: str
    content_tag: str
    tags: list[str] = field(default_factory=list)
    built: bool = True  # False: the content tag already existed, nothing was built
    seconds: float = 0.0
    steps: int = 0
    cached_steps: int = 0
    pushed: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BuildOptions:
    tags: list[str] = field(default_factory=list)
    registry: str | None = None
    push: bool = False
    allow_stale: bool = False
    ca_certificates: list[str] = field(default_factory=list)
    network_mode: str | None = None
    no_cache: bool = False


def repository(spec: ImageSpec, registry: str | None) -> str:
    return f"{registry.rstrip('/')}/{spec.repository}" if registry else spec.repository


def resolve_variants(spec: ImageSpec, variant: str) -> list[str]:
    if variant == "all":
        return list(spec.variants)
    if variant not in spec.variants:
        raise DevboxError(
            f"{spec.path}: no variant {variant!r} (variants: {', '.join(spec.variants)}, all)"
        )
    return [variant]


def check_locks(spec: ImageSpec, platform: str, variants: list[str], allow_stale: bool) -> None:
    problems = locking.check(spec, [platform], variants)
    missing = [path for path, problem in problems if problem == "missing"]
    if missing:
        raise LockError(
            "missing lock: " + ", ".join(str(p) for p in missing),
            hint=f"run: devbox-build lock {spec.name}",
        )
    if problems and not allow_stale:
        raise LockError(
            "refusing to build from a stale lock:\n"
            + "\n".join(f"  {path}: {problem}" for path, problem in problems),
            hint=f"run: devbox-build lock {spec.name} (or build with --allow-stale)",
        )


def base_image_id(engine: Engine, spec: ImageSpec, variant: str) -> str:
    base = spec.variants[variant].base
    if image_id := engine.image_id(base):
        return image_id
    try:
        return engine.pull(base)
    except DevboxError as exc:
        raise SpecError(
            f"{spec.path}: key 'variants.{variant}.base': base image {base!r} is not in the "
            f"engine and could not be pulled ({exc.message.removeprefix(f'cannot pull {base}: ')})",
            hint=f"build the image it extends first (devbox-build build <its spec>) or pull it"
            if spec.extends else f"without a registry, build it from a Debian mirror: "
            f"devbox-build bootstrap-base --tag {base}",
        ) from None


def build(
    spec: ImageSpec,
    variants: list[str],
    engine: Engine,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
) -> list[BuildResult]:
    options = options or BuildOptions()
    progress = progress or SilentProgress()
    platform = spec.platforms[0]
    check_locks(spec, platform, variants, options.allow_stale)
    if options.push and not options.registry:
        raise DevboxError("--push needs a registry: pass --registry HOST[/NAMESPACE]")
    results = []
    for variant in variants:
        context = render(spec, variant, platform=platform, ca_certificates=options.ca_certificates)
        digest = context.digest(base_image_id(engine, spec, variant))
        repo = repository(spec, options.registry)
        content_tag = f"{repo}:{variant}-{digest[:12]}"
        human_tags = [f"{repo}:{variant}"] + [f"{repo}:{tag}-{variant}" for tag in options.tags]
        started = time.monotonic()
        image_id = None if options.no_cache else engine.image_id(content_tag)
        if image_id:
            result = BuildResult(spec.name, variant, image_id, content_tag, built=False)
        else:
            progress.start(content_tag, context)
            result = _run_build(engine, context, digest, content_tag, options, progress)
            engine.tag(result.image_id, content_tag)
        for ref in human_tags:
            engine.tag(result.image_id, ref)
        result.tags = [content_tag, *human_tags]
        if options.push:
            for ref in result.tags:
                for line in engine.push(ref):
                    progress.output(line)
            result.pushed = True
        result.seconds = time.monotonic() - started
        progress.done(result)
        results.append(result)
    return results


def _run_build(
    engine: Engine,
    context: BuildContext,
    digest: str,
    content_tag: str,
    options: BuildOptions,
    progress: Progress,
) -> BuildResult:
    layers = context.step_layers()
    buildargs = {name: os.environ[name] for name in PROXY_ARGS if name in os.environ}
    buildargs["DEVBOX_BUILD_TIME"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    buildargs["DEVBOX_CONTENT_HASH"] = digest
    result = BuildResult(context.spec.name, context.variant, "", content_tag)
    try:
        for event in engine.build(
            context.tar(),
            buildargs=buildargs,
            network_mode=options.network_mode,
            nocache=options.no_cache,
        ):
            if isinstance(event, Step):
                result.steps += 1
                progress.step(event, _layer_of(layers, event))
            elif isinstance(event, Output):
                if event.text.strip() == "---> Using cache":
                    result.cached_steps += 1
                progress.output(event.text)
            elif isinstance(event, Built):
                result.image_id = event.image_id
    except StepFailed as failure:
        raise _explain(context, layers, failure) from None
    if not result.image_id:
        raise BuildFailed(f"the engine finished building {content_tag} without an image id")
    return result


def _layer_of(layers: list[str], step: Step) -> str:
    return layers[step.number - 1] if step.number <= len(layers) else "?"


def _explain(context: BuildContext, layers: list[str], failure: StepFailed) -> DevboxError:
    spec = context.spec
    for line in failure.output:
        if PYTHON_MISMATCH_MARKER in line:
            provided = line.split(PYTHON_MISMATCH_MARKER, 1)[1].strip()
            return SpecError(
                f"{spec.path}: key 'python': base image {context.base!r} provides Python "
                f"{provided}"
            )
    where = "before the first step"
    if failure.step:
        layer = _layer_of(layers, failure.step)
        instruction = failure.step.instruction
        if len(instruction) > 120:
            instruction = instruction[:117] + "..."
        where = (
            f"in layer '{layer}' (step {failure.step.number}/{failure.step.total}: {instruction})"
        )
    tail = failure.output[-FAILED_OUTPUT_LINES:]
    shown = "\n".join(f"  | {line}" for line in tail) if tail else "  (no output)"
    return BuildFailed(
        f"build of image '{spec.name}', variant '{context.variant}' failed {where}:\n"
        f"{failure.message}\noutput of the failing step:\n{shown}\nno image was tagged."
    )
