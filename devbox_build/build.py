"""Orchestrates a build: lock gate → render → content tag → engine build → tags → push.

A build is addressed by its content: the hash of everything that goes into it (spec, locks,
Dockerfile template, CA files, base image id). When an image with that content tag exists, there is
nothing to build. Tags are only applied after the engine reports success, so a failed or
interrupted build never leaves a tag behind.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import assemble, locking, refs
from .engine import Built, Committed, Engine, Output, Step, StepFailed
from .errors import BuildFailed, DevboxError, EngineError, InputError, LockError, SpecError
from .render import HEAD_DOCKERFILE, PYTHON_MISMATCH_MARKER, TAIL_DOCKERFILE, BuildContext, render
from .report import SILENT, Reporter
from .spec import PLATFORMS, ImageSpec

# Docker's predefined proxy build args: passed through from the caller's environment, never
# declared in the Dockerfile, so their values stay out of the image and its history.
PROXY_ARGS = tuple(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)
FAILED_OUTPUT_LINES = 40
MECHANISMS = ("assembled", "chain")
# What a failed download says when a TLS-intercepting network's CA is not trusted.
CERTIFICATE_ERRORS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed",
                      "SSL certificate problem", "self-signed certificate in certificate chain",
                      "unable to get local issuer certificate", "Certificate verification failed",
                      "invalid peer certificate")  # the last: uv's (the assembled builder's)


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
    base: str = ""  # the base image it was built FROM (the spec's, or its twin), and its id
    base_id: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BuildOptions:
    tags: tuple[str, ...] = ()
    registry: str | None = None
    push: bool = False
    allow_stale: bool = False
    ca_certificates: tuple[str, ...] = ()
    network_mode: str | None = None
    no_cache: bool = False
    # The platform to build; default: the engine's own, which the spec must lock.
    platform: str | None = None
    # How the pip groups become layers: "assembled" (each installed on its own, put together
    # with docker load: measured fastest) or "chain" (one Dockerfile RUN per group).
    mechanism: str = "assembled"

    def __post_init__(self) -> None:
        # Every name an engine call will use is checked before any engine work.
        if self.mechanism not in MECHANISMS:
            raise InputError(f"--mechanism: {self.mechanism!r} is not one of "
                             f"{', '.join(MECHANISMS)}")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise InputError(f"--platform: {self.platform!r} is not one of "
                             f"{', '.join(PLATFORMS)}")
        for tag in self.tags:
            refs.check_tag(tag, "--tag")
        if self.registry is not None:
            object.__setattr__(self, "registry", refs.check_registry(self.registry))
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "ca_certificates", tuple(self.ca_certificates))


def repository(spec: ImageSpec, registry: str | None) -> str:
    return f"{registry.rstrip('/')}/{spec.repository}" if registry else spec.repository


def resolve_variants(spec: ImageSpec, variant: str) -> list[str]:
    if variant == "all":
        return list(spec.variants)
    if variant not in spec.variants:
        raise InputError(
            f"{spec.path}: no variant {variant!r} (variants: {', '.join(spec.variants)}, all)"
        )
    return [variant]


def tags_for(spec: ImageSpec, variant: str, options: BuildOptions, digest: str,
             foreign: str = "") -> list[str]:
    """The content tag first, then REPOSITORY:VARIANT and REPOSITORY:TAG-VARIANT; for a
    ``foreign`` platform (not the engine's own: "arm64"), those end in -ARCH, so the native
    image keeps its names (`index` joins both platforms under one)."""
    repo = repository(spec, options.registry)
    suffix = f"-{foreign}" if foreign else ""
    tags = [f"{repo}:{variant}-{digest[:12]}", f"{repo}:{variant}{suffix}"]
    tags += [f"{repo}:{tag}-{variant}{suffix}" for tag in options.tags]
    for ref in tags:
        refs.check_reference(ref, "image tag")
    return tags


def check_locks(spec: ImageSpec, platform: str, variants: list[str], allow_stale: bool) -> None:
    problems = locking.check(spec, [platform], variants)
    missing = [path for path, problem in problems if problem.startswith(locking.MISSING)]
    if missing:
        raise LockError(
            "missing lock: " + ", ".join(str(p) for p in missing),
            hint=f"run: {spec.lock_command}",
        )
    # --allow-stale accepts changed inputs, never a lock whose own content was changed.
    refused = [(path, problem) for path, problem in problems
               if not allow_stale or problem.startswith(locking.EDITED)]
    if refused:
        raise LockError(
            "refusing to build from a stale or edited lock:\n"
            + "\n".join(f"  {path}: {problem}" for path, problem in refused),
            hint=f"run: {spec.lock_command}"
            + ("" if any(p.startswith(locking.EDITED) for _, p in refused)
               else " (or build with --allow-stale)"),
        )


def base_image_id(engine: Engine, spec: ImageSpec, variant: str,
                  platform: str | None = None) -> str:
    """The base's image id (see base_for)."""
    return base_for(engine, spec, variant, platform)[1]


def base_for(engine: Engine, spec: ImageSpec, variant: str,
             platform: str | None = None) -> tuple[str, str]:
    """The image a build for ``platform`` starts FROM, and its id: the spec's base, pulled (for
    the platform) when missing; when the engine's is of another platform, its twin there
    (refs.platform_twin: bootstrap-base --platform makes one). A base of the wrong platform is
    refused: wheels locked for one architecture would land in another's base. Without a
    platform (reading a base's manifest), any will do."""
    base = spec.variants[variant].base
    image_id = engine.image_id(base)
    if image_id is None:
        try:
            image_id = engine.pull(base, platform)
        except DevboxError as exc:
            raise _missing_base(spec, variant, base, exc) from None
    found = engine.image_platform(base)
    if not platform or found == platform:
        return base, image_id
    twin = refs.platform_twin(base, platform)
    twin_id = engine.image_id(twin)
    if twin_id and engine.image_platform(twin) == platform:
        return twin, twin_id
    raise SpecError(f"{spec.path}: key 'variants.{variant}.base': {base} in this engine is "
                    f"{found}, but this build is for {platform}, and there is no {twin}",
                    hint=f"without a registry: devbox-build bootstrap-base --tag {base} "
                         f"--platform {platform}; with one: docker pull --platform {platform} "
                         f"{base} && docker tag {base} {twin} (then pull {base} back)")


def _missing_base(spec: ImageSpec, variant: str, base: str, exc: DevboxError) -> SpecError:
    # Under `extends` a variant's base is implied (<extends>:<variant>): name the key written.
    key = "extends" if spec.extends and base == f"{spec.extends}:{variant}" \
        else f"variants.{variant}.base"
    return SpecError(
        f"{spec.path}: key '{key}': base image {base!r} (variant {variant}) is not in the "
        f"engine and could not be pulled ({exc.message.removeprefix(f'cannot pull {base}: ')})",
        hint="build the image it extends first (devbox-build build <its spec>) or pull it"
        if spec.extends else f"without a registry, build it from a Debian mirror: "
        f"devbox-build bootstrap-base --tag {base}",
    )


def prepare(spec: ImageSpec, variants: list[str], options: BuildOptions) -> list[BuildContext]:
    """Everything a build needs that the engine does not: the lock gate and each variant's
    context, for every platform the build may choose (--platform, else each one the spec
    locks; build_contexts picks the engine's). Every input problem (lock, CA file, variant,
    platform) is raised here, before any engine call."""
    if options.push and not options.registry and not refs.names_registry(spec.repository):
        raise InputError("--push needs a registry: pass --registry HOST[/NAMESPACE], or name "
                         "one in the spec's repository (HOST[:PORT]/name)")
    if options.platform and options.platform not in spec.platforms:
        raise InputError(f"{spec.path}: key 'platforms': --platform {options.platform}, but the "
                         f"spec locks only {', '.join(spec.platforms)}",
                         hint=f"add \"{options.platform}\" to platforms, then: {spec.lock_command}")
    if options.mechanism == "assembled":
        assemble.cache_budget()
    platforms = [options.platform] if options.platform else list(spec.platforms)
    contexts = []
    for platform in platforms:
        check_locks(spec, platform, variants, options.allow_stale)
        contexts += [render(spec, variant, platform=platform,
                            ca_certificates=list(options.ca_certificates)) for variant in variants]
    return contexts


def choose_platform(contexts: list[BuildContext], engine: Engine, options: BuildOptions) -> str:
    """The platform to build: --platform, else the engine's own, which the spec must lock.
    A platform the engine cannot run (no emulation registered) is refused before the build."""
    spec = contexts[0].spec
    native = engine.platform()
    platform = options.platform or native
    if platform not in {c.platform for c in contexts}:
        raise InputError(
            f"{spec.path}: key 'platforms': this engine runs {native}, and the spec locks only "
            f"{', '.join(spec.platforms)}",
            hint=f"add \"{native}\" to platforms and run: {spec.lock_command}; or build "
                 f"another platform under emulation with --platform {spec.platforms[0]}")
    if platform != native and not engine.can_emulate(platform):
        raise EngineError(
            f"this engine runs {native} and cannot run {platform} build steps: no emulation "
            "for it is registered (binfmt_misc)",
            hint="build on a machine of that platform, or register QEMU's binfmt handlers "
                 "(Debian: apt-get install qemu-user-static binfmt-support)")
    return platform


def build(
    spec: ImageSpec,
    variants: list[str],
    engine: Engine,
    options: BuildOptions | None = None,
    reporter: Reporter = SILENT,
) -> list[BuildResult]:
    options = options or BuildOptions()
    return build_contexts(prepare(spec, variants, options), engine, options, reporter)


def build_contexts(
    contexts: list[BuildContext],
    engine: Engine,
    options: BuildOptions,
    reporter: Reporter = SILENT,
) -> list[BuildResult]:
    """Build prepared contexts for the chosen platform: content tag → engine build (or
    nothing) → all tags → push."""
    platform = choose_platform(contexts, engine, options)
    results = []
    foreign = "" if platform == engine.platform() else platform.split("/")[-1]
    for context in (c for c in contexts if c.platform == platform):
        spec, variant = context.spec, context.variant
        base, base_id = base_for(engine, spec, variant, platform)
        digest = content_digest(context, base_id, options)
        content_tag, *human_tags = tags_for(spec, variant, options, digest, foreign)
        started = time.monotonic()
        image_id = None if options.no_cache else engine.image_id(content_tag)
        if image_id:
            result = BuildResult(spec.name, variant, image_id, content_tag, built=False)
        else:
            check_layer_count(context, len(engine.image(base)["RootFS"]["Layers"]))
            with reporter.group(f"building {content_tag} (base {base})"):
                result = _run_build(engine, context, digest, content_tag, options, reporter,
                                    base)
        result.tags = [content_tag, *human_tags]
        result.base, result.base_id = base, base_id
        if spec.budget is not None:
            check_budget(engine, spec, result.image_id, human_tags[0])
        apply_tags(engine, result.image_id, result.tags)
        if options.push:
            for ref in result.tags:
                for line in engine.push(ref):
                    reporter.output(line)
            result.pushed = True
        result.seconds = time.monotonic() - started
        reporter.item("ok", f"built {content_tag} in {result.seconds:.1f} s ({result.steps} "
                      f"steps, {result.cached_steps} from cache)" if result.built
                      else f"up to date: {content_tag} (nothing to build)",
                      detail=f"also tagged: {', '.join(result.tags[1:])}",
                      finished=result.tags)
        results.append(result)
    return results


def check_budget(engine: Engine, spec: ImageSpec, image_id: str, replaces: str) -> None:
    """The spec's [budget] against the built image, before any tag moves; ``replaces``: the tag
    whose current image is the one growth is measured against."""
    from . import budget
    from .manifest import read_manifest

    manifest = read_manifest(engine, image_id)
    previous = None
    previous_id = engine.image_id(replaces)
    if previous_id and previous_id != image_id:
        try:
            previous = (read_manifest(engine, replaces), engine.image(replaces)["Size"])
        except DevboxError:
            previous = None  # not built by devbox-build: nothing to compare packages with
    problems = budget.problems(spec.budget, manifest, engine.image(image_id)["Size"], previous,
                               where=f"{spec.path}: [budget]")
    if problems:
        raise BuildFailed(f"{manifest['spec']} {manifest['variant']} is over its size budget "
                          "(nothing was tagged):\n  " + "\n  ".join(problems),
                          hint="remove or replace what grew, or raise the limit in [budget]")


# overlay2 stacks at most 127 layers; the margin is for an image that extends this one.
MAX_LAYERS = 100


def check_layer_count(context: BuildContext, base_layers: int) -> None:
    """Refuse, before building, an image with more filesystem layers than the engine can stack."""
    total = base_layers + context.filesystem_layers()
    if total > MAX_LAYERS:
        spec = context.spec
        raise SpecError(
            f"{spec.path}: key 'layers.max_per_lock': variant '{context.variant}' would have "
            f"{total} filesystem layers ({base_layers} from {context.base}), more than "
            f"{MAX_LAYERS} (overlay2 stacks at most 127, and images extend this one)",
            hint=f"lower layers.max_per_lock (now {spec.layers.max_per_lock})")


def apply_tags(engine: Engine, image_id: str, tags: list[str]) -> None:
    """Point every tag at ``image_id``, or none: if anything stops it half-way (an engine error,
    Ctrl-C, SIGTERM), the tags already moved go back to the images they named before."""
    before = {ref: engine.image_id(ref) for ref in tags}
    moved: list[str] = []
    try:
        for ref in tags:
            if before[ref] != image_id:
                engine.tag(image_id, ref)
                moved.append(ref)
    except BaseException:
        with _signals_deferred():
            for ref in reversed(moved):
                engine.untag(ref, restore=before[ref])
        raise


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends: a rollback must not stop half-way too."""
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def content_digest(context: BuildContext, base_image_id: str, options: BuildOptions) -> str:
    """The content hash a build of ``context`` is tagged with."""
    return context.digest(base_image_id, mechanism=_mechanism(context, options))


def _mechanism(context: BuildContext, options: BuildOptions) -> str:
    """How this context is built: assembled when asked and it has pip groups to assemble."""
    if options.mechanism == "assembled" and context.assembled_steps:
        return f"assembled {assemble.recipe()}"
    return "chain"


def _run_build(
    engine: Engine,
    context: BuildContext,
    digest: str,
    content_tag: str,
    options: BuildOptions,
    reporter: Reporter,
    base: str,
) -> BuildResult:
    proxies = {name: os.environ[name] for name in PROXY_ARGS if name in os.environ}
    head_args = {**proxies, "DEVBOX_BASE": base}  # the spec's base, or its twin (base_for)
    buildargs = {**head_args,
                 "DEVBOX_BUILD_TIME": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "DEVBOX_CONTENT_HASH": digest}
    result = BuildResult(context.spec.name, context.variant, "", content_tag)
    if context.private:
        reporter.note(f"fetching {len(context.private)} conda packages of a "
                      "private channel on this host (its credentials stay here)")
        context.fetch_private()
    if _mechanism(context, options) == "chain":
        result.image_id = _engine_build(engine, context, "Dockerfile", buildargs, options,
                                        reporter, result)
    else:
        steps = context.assembled_steps
        assembly = assemble.Assembly(engine, context, environment=proxies,
                                     network_mode=options.network_mode, fresh=options.no_cache,
                                     reporter=reporter)
        early = assemble.builder_step(context)

        def committed(event: Committed) -> None:
            # The os layer is done: its venv is all the groups install against, so they
            # install while the system layer's apt packages do.
            if event.step.number == early and not assembly.started:
                reporter.note(f"the pip groups install on the os layer ({event.image_id[:12]}) "
                              "while the system layer builds")
                assembly.start(event.image_id)

        try:
            head_id = _engine_build(engine, context, HEAD_DOCKERFILE, head_args, options,
                                    reporter, result, committed=committed)
            if not assembly.started:
                assembly.start(head_id)
            reporter.step(steps[0].layer, 1, 1, f"assemble {len(steps)} pip groups: "
                          f"{steps[0].name} .. {steps[-1].name}")
            result.steps += 1
            try:
                assembled = assembly.onto(head_id)
            except StepFailed as failure:
                raise _explain(context, [steps[0].layer], failure) from None
        finally:
            assembly.close()
        tail_args = {k: v for k, v in buildargs.items() if k != "DEVBOX_BASE"}
        result.image_id = _engine_build(engine, context, TAIL_DOCKERFILE,
                                        {**tail_args, "DEVBOX_ASSEMBLED": assembled}, options,
                                        reporter, result)
    return result


def _engine_build(engine: Engine, context: BuildContext, dockerfile: str,
                  buildargs: dict[str, str], options: BuildOptions, reporter: Reporter,
                  result: BuildResult, committed=None) -> str:
    """One classic-builder build of the context's ``dockerfile``; the image id. ``committed``
    is handed each step's image as it is committed."""
    layers = context.step_layers(dockerfile)
    image_id = ""
    try:
        for event in engine.build(
            context.tar(),
            dockerfile=dockerfile,
            platform=context.platform,
            buildargs=buildargs,
            network_mode=options.network_mode,
            nocache=options.no_cache,
        ):
            if isinstance(event, Step):
                result.steps += 1
                reporter.step(_layer_of(layers, event), event.number, event.total,
                              event.instruction)
            elif isinstance(event, Output):
                if event.text.strip() == "---> Using cache":
                    result.cached_steps += 1
                reporter.output(event.text)
            elif isinstance(event, Committed):
                if committed:
                    committed(event)
            elif isinstance(event, Built):
                image_id = event.image_id
    except StepFailed as failure:
        raise _explain(context, layers, failure) from None
    if not image_id:
        raise BuildFailed(f"the engine finished building {result.content_tag} ({dockerfile}) "
                          "without an image id")
    return image_id


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
    certificate = any(needle in line for line in failure.output + [failure.message]
                      for needle in CERTIFICATE_ERRORS)
    return BuildFailed(
        f"build of image '{spec.name}', variant '{context.variant}' failed {where}:\n"
        f"{failure.message}\noutput of the failing step:\n{shown}\nno image was tagged.",
        hint="a download failed TLS verification: this network probably intercepts TLS. Trust "
             "its CA with --ca-cert PATH or DEVBOX_CA_CERTS (build finds this host's extra CAs "
             "in /usr/local/share/ca-certificates by itself unless --no-host-ca)"
        if certificate else failure.hint,
    )
