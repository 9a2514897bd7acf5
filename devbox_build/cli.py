"""The ``devbox-build`` command line: a thin layer over the package's modules.

Data goes to stdout (a Dockerfile, a table, JSON); progress and errors go to stderr. A
DevboxError is printed as one message and exits with its class's code (errors.py); Ctrl-C exits
130 and SIGTERM 143, with nothing tagged that was not tagged before.
"""

from __future__ import annotations

import inspect
import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, locking, noop, refs, settings
from .build import (
    MECHANISMS,
    PROXY_ARGS,
    BuildOptions,
    base_image_id,
    build_contexts,
    prepare,
    resolve_variants,
)
from .engine import Engine
from .errors import (
    BuildFailed,
    ChecksFailed,
    CloudError,
    DevboxError,
    InputError,
    Interrupted,
    LockError,
    exit_codes_help,
)
from .hostca import host_ca_certificates
from .manifest import read_manifest
from .render import render
from .report import SILENT, Reporter
from .runtime import contract
from .spec import load_spec

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# What every command says while it works (report.py); an interruption names what it finished.
reporter = Reporter(console=err)

images_dir_option = click.option(
    "--images-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: Path(settings.value("DEVBOX_IMAGES_DIR") or "images"),
    show_default="images, or DEVBOX_IMAGES_DIR",
    help="Where image specs live (images/<name>/image.toml).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def ca_options(command):
    """--ca-cert and --no-host-ca: which CA certificates a build (or render) trusts."""
    command = click.option(
        "--no-host-ca", is_flag=True, default=settings.default("DEVBOX_NO_HOST_CA"),
        help="Do not trust this host's extra CA certificates by default (env "
             "DEVBOX_NO_HOST_CA=1).")(command)
    return click.option(
        "--ca-cert", "ca_certs", multiple=True, default=settings.default("DEVBOX_CA_CERTS"),
        metavar="PATH",
        help="Extra CA certificate (PEM) or glob to trust in the image and during the build "
             "(repeatable; env DEVBOX_CA_CERTS, space-separated). Default: this host's extra "
             "CAs (/usr/local/share/ca-certificates/*.crt, /etc/pki/ca-trust/source/anchors/*), "
             "which a TLS-intercepting network needs.")(command)


def chosen_ca_certificates(ca_certs: tuple[str, ...], no_host_ca: bool) -> tuple[list[str], str]:
    """The CA files to trust and where they came from (printed in the build's header)."""
    given = [pattern for value in ca_certs for pattern in value.split()]
    if given:
        return given, "--ca-cert / DEVBOX_CA_CERTS"
    if no_host_ca:
        return [], "none (--no-host-ca)"
    found = host_ca_certificates()
    return found, "this host's extra CAs" if found else "none (this host has no extra CAs)"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="devbox-build")
def cli() -> None:
    """Build reproducible, layered CPU and GPU images from locked dependency files.

    \b
    The flow is one way: spec → lock → render → build → check.
      devbox-build lock datascience          resolve pip inputs into hashed locks
      devbox-build lock datascience --check  exit 3 if any lock is stale (for CI)
      devbox-build render datascience        print the Dockerfile a build will use
      devbox-build build datascience         build the cpu and gpu variants
      devbox-build inspect devbox/datascience:cpu   what is inside a built image
      devbox-build diff devbox/datascience:cpu devbox/datascience:gpu   what changed
      devbox-build sbom devbox/datascience:cpu -o sbom.json   CycloneDX SBOM
      devbox-build release datascience       next version, CHANGELOG.md, tags
      devbox-build check devbox/datascience:cpu     prove it meets the platform contracts
      devbox-build sagemaker config devbox/datascience:cpu   SageMaker registration inputs
      devbox-build ec2 up --role cpu                 your EC2 box (boxes.toml)
      devbox-build hub docker devbox/datascience:cpu a team's JupyterHub configuration

    IMAGE is a spec name under --images-dir, a folder with an image.toml, or the file itself.
    """
    for warning in settings.check():
        err.print(f"[yellow]warning:[/] {escape(warning)}")


cli.help = (f"{inspect.cleandoc(cli.help)}\n\n\b\n{textwrap.fill(exit_codes_help(), 92)}"
            "\n\n\b\nSettings from the environment:\n"
            + "\n".join(f"  {s.name:<24} {s.help}" for s in settings.HOST.values()))


# -- lock ---------------------------------------------------------------------------------------


@cli.command("lock")
@click.argument("image")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 3 naming each missing, stale or hand-edited lock.")
@click.option(
    "--platform", "platforms", multiple=True, type=click.Choice(["linux/amd64", "linux/arm64"]),
    help="Lock for this platform (repeatable). Default: the spec's platforms.",
)
@click.option(
    "--resolver", type=click.Choice(locking.RESOLVERS), default="uv", show_default=True,
    help="uv locks for any platform; pip-compile only for the one it runs on.",
)
@click.option("--upgrade", is_flag=True, help="Re-resolve every lock to the newest allowed versions.")
@click.option("--apt", "apt", is_flag=True,
              help="Also lock the Debian packages of the os and system layers (locks/<platform>/"
                   "apt.txt, resolved in a throwaway container of the base; needs the engine). "
                   "Once it exists, `lock` keeps it current.")
@images_dir_option
@json_option
def lock_command(image, check, platforms, resolver, upgrade, apt, images_dir, as_json):
    """Lock IMAGE's inputs: pip into hashed requirements files per variant and platform, conda
    (an environment.yml) into conda-lock.yml for every conda platform.

    pip locks live in images/<name>/locks/<platform>/, conda locks in images/<name>/locks/
    (solved with py-rattler: no conda binary needed). Only missing or stale locks are
    re-resolved, and existing pins are kept unless an input moves them (or --upgrade).

    Every platform gets the first platform's versions: its locks are resolved preferring them,
    and go stale when they move. A version that cannot be followed (no wheel of it for the other
    platform) fails `--check` unless [pip] platform_specific lists the package.
    """
    spec = load_spec(image, images_dir)
    selected = list(platforms) or None
    if check:
        problems = locking.check(spec, selected)
        if as_json:
            out.print_json(data={"ok": not problems,
                                 "problems": [{"lock": str(p), "problem": m} for p, m in problems]})
        if problems:
            raise LockError(
                f"{len(problems)} lock(s) of {spec.name} must be rewritten:\n"
                + "\n".join(f"  {path}: {problem}" for path, problem in problems),
                hint=f"run: {spec.lock_command}")
        if not as_json:
            err.print(f"[green]✓[/] all locks of {spec.name} are up to date")
        return

    base_manifests = None
    if spec.extends:
        # The image it layers on decides the pins it must keep: read them from its manifests.
        engine = Engine.connect()
        absent = [vs.base for vs in spec.variants.values() if engine.image_id(vs.base) is None]
        recorded = locking.team_constraints_path(spec)
        if absent and recorded.is_file() and not upgrade:
            # A CPU dev container of a cpu+gpu project must not need the GPU team image.
            err.print(f"{', '.join(absent)} not in this engine: keeping the team's pins as "
                      f"{recorded.name} records them (pull it and lock again to refresh)")
        else:
            base_manifests = {}
            for variant, variant_spec in spec.variants.items():
                base_image_id(engine, spec, variant)  # pulled if missing, else one clear error
                base_manifests[variant_spec.base] = read_manifest(engine, variant_spec.base)
            err.print(f"constraints from {', '.join(base_manifests)}")
    shown = SILENT if as_json else reporter
    with shown.group(f"locking {spec.name} with {resolver}"):
        results = locking.lock(spec, platforms=selected, resolver=resolver, upgrade=upgrade,
                               reporter=shown, base_manifests=base_manifests)
    if spec.like:
        from .like import off_release, off_release_conda

        for unit in locking.units(spec, selected):
            release = (unit.like(spec) if isinstance(unit, locking.PipLock)
                       else unit.release(spec))
            if release is None or not unit.path(spec).is_file():
                continue
            if isinstance(unit, locking.PipLock):
                locked = {n: p.version for n, p in locking.read_pins(unit.path(spec)).items()}
                shared = [name for name in locked if name in release.pins]
                off = off_release(release, locked)
            else:  # a conda lock, by conda names, for its first subdir
                from . import conda

                locked = {p.name: p.version for p in conda.locked_packages(
                    spec, unit, spec.conda.platforms[0])}
                shared = [name for name in locked if name in release.conda_pins]
                off = off_release_conda(release, locked)
            shown.item("note", f"{unit.path(spec)}: {len(shared) - len(off)} of {len(shared)} "
                       f"packages it shares with {spec.like} at its version",
                       detail="\n".join(f"off: {line}" for line in off))
    from . import aptlock

    for platform in selected or spec.platforms:
        existing = aptlock.path(spec, platform)
        if apt or (existing.is_file() and (upgrade or aptlock.verdict(spec, platform))):
            started = time.monotonic()
            proxies = {name: os.environ[name] for name in PROXY_ARGS if name in os.environ}
            sections = aptlock.resolve(Engine.connect(), spec, platform, proxies)
            written = aptlock.write(spec, platform, sections)
            shown.item("ok", f"{written}: written ({sum(map(len, sections.values()))} Debian "
                       "packages)", seconds=time.monotonic() - started, finished=[str(written)])
    # A version no other pin could follow (no wheel of it for this platform): the locks are
    # written, and `lock --check` fails until the spec says the package may differ.
    for path, problem in locking.divergences(spec, selected):
        shown.item("fail", f"{path}: {problem}")
    if as_json:
        out.print_json(data=[{**r.__dict__, "path": str(r.path)} for r in results])


# -- render -------------------------------------------------------------------------------------


@cli.command("render")
@click.argument("image")
@click.option("--variant", default=None, help="Variant to render (default: the first in the spec).")
@ca_options
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write the whole build context to this folder instead of printing the Dockerfile.")
@images_dir_option
def render_command(image, variant, ca_certs, no_host_ca, output, images_dir):
    """Print IMAGE's Dockerfile, one RUN per pip group (what `build --mechanism chain` builds;
    `build` installs the same groups on their own and assembles them), or write the whole
    context: that Dockerfile, the assembled build's two (assembled/) and every file they copy."""
    spec = load_spec(image, images_dir)
    ca_files, _ = chosen_ca_certificates(ca_certs, no_host_ca)
    context = render(spec, variant or next(iter(spec.variants)), ca_certificates=ca_files)
    if output is None:
        sys.stdout.write(context.dockerfile)
        return
    err.print(f"wrote {context.write(output)} files to {output}")


# -- build --------------------------------------------------------------------------------------


@cli.command("build")
@click.argument("image")
@click.option("--variant", default="all", show_default=True, help="cpu, gpu, ... or all.")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Also tag as REPOSITORY:TAG-VARIANT (repeatable).")
@click.option("--registry", help="Registry HOST[:PORT][/namespace] to prefix the repository with.")
@click.option("--push", is_flag=True, help="Push every tag after the build (to --registry, or to "
              "the registry the spec's repository names).")
@click.option("--allow-stale", is_flag=True,
              help="Build even if a lock's inputs changed (never from a lock edited by hand).")
@ca_options
@click.option("--network", "network_mode", default=settings.default("DEVBOX_NETWORK"),
              help="Network for build steps (e.g. host, to reach a channel or index on the "
                   "host's loopback; env DEVBOX_NETWORK).")
@click.option("--no-cache", is_flag=True, help="Rebuild every layer, ignoring the engine's cache.")
@click.option("--platform", help="linux/amd64 or linux/arm64 (default: the engine's own; the "
              "spec must lock it). Another platform needs emulation registered in the engine, "
              "builds FROM the base's twin (bootstrap-base --platform) and is tagged "
              "REPOSITORY:VARIANT-ARCH; `index` joins the platforms.")
@click.option("--mechanism", type=click.Choice(MECHANISMS),
              default=settings.default("DEVBOX_MECHANISM"),
              show_default="assembled, or DEVBOX_MECHANISM",
              help="How the pip groups become layers: assembled (each installed on its own in a "
              "builder container, cached on this host, put together with docker load; a "
              "one-pin change installs one group) or chain (one Dockerfile RUN per group, "
              "the classic builder alone).")
@click.option("-v", "--verbose", is_flag=True, help="Stream every line of build output.")
@images_dir_option
@json_option
def build_command(image, variant, tags, registry, push, allow_stale, ca_certs, no_host_ca,
                  network_mode, no_cache, platform, mechanism, verbose, images_dir, as_json):
    """Build IMAGE's variants; a build whose content is unchanged is a no-op.

    Every build is tagged REPOSITORY:VARIANT-<content hash> (the hash of spec, locks, template
    and base image) and REPOSITORY:VARIANT. Proxy variables in the environment (HTTP_PROXY,
    HTTPS_PROXY, NO_PROXY, ...) are passed as build args and never stored in the image.
    This host's extra CA certificates are trusted unless --ca-cert or --no-host-ca says
    otherwise; the header says which.

    \b
      devbox-build build datascience --variant cpu
      devbox-build build datascience --tag 2026.11 --registry 127.0.0.1:5000/team --push
    """
    spec = load_spec(image, images_dir)
    variants = resolve_variants(spec, variant)
    ca_files, ca_origin = chosen_ca_certificates(ca_certs, no_host_ca)
    options = BuildOptions(
        tags=tags, registry=registry, push=push, allow_stale=allow_stale,
        ca_certificates=ca_files, network_mode=network_mode, no_cache=no_cache,
        platform=platform, mechanism=mechanism,
    )
    contexts = prepare(spec, variants, options)
    ca_line = f"[dim]CA certificates: {len(ca_files)} from {escape(ca_origin)}[/]"
    err.print(ca_line)
    reporter.verbose = verbose
    results = build_contexts(contexts, Engine.connect(), options, reporter)
    if as_json:
        out.print_json(data=[r.as_dict() for r in results])
    elif not settings.check():  # the next identical command: its stamp (noop.py)
        noop.record(ca_line, [{"tags": r.tags, "image_id": r.image_id, "base": r.base,
                               "base_id": r.base_id} for r in results])


def _diff_side(text: str, variant: str, images_dir: Path):
    """One side of `diff`: SPEC@REV, a lock file, or an image reference."""
    from .diff import Side

    # SPEC@REV, not an image by digest (REPOSITORY@sha256:...).
    if ("@" in text and not text.startswith(("/", ".")) and ":" not in text.split("@")[0]
            and not text.partition("@")[2].startswith("sha256:")):
        name, _, revision = text.partition("@")
        spec = load_spec(name, images_dir)
        lock = locking.stack(spec, resolve_variants(spec, variant)[0],
                             spec.platforms[0])[-1].path(spec)
        if revision:
            relative = os.path.relpath(lock, _git_root(lock.parent))
            shown = subprocess.run(["git", "show", f"{revision}:{relative}"],
                                   cwd=lock.parent, capture_output=True, text=True, check=False)
            if shown.returncode != 0:
                raise InputError(f"{text}: git has no {relative} at {revision}: "
                                 f"{shown.stderr.strip()}")
            pins = locking.parse_pins(shown.stdout)
        else:
            pins = locking.read_pins(lock)
        return Side(text, _lock_manifest(pins), [], {})
    path = Path(text)
    if path.suffix == ".txt" and path.is_file():
        return Side(text, _lock_manifest(locking.read_pins(path)), [], {})
    refs.check_reference(text, "A and B (an image, a lock file or SPEC@REV)")
    engine = Engine.connect()
    return Side(text, read_manifest(engine, text), engine.layers(text),
                engine.image(text).get("Config") or {})


def _lock_manifest(pins: dict) -> dict:
    """A lock's pins as the packages of a manifest (sizes: the wheels')."""
    return {"packages": {"pip": [{"name": name, "version": pin.version, "size": pin.size or 0}
                                 for name, pin in pins.items()]}}


def _git_root(folder: Path) -> Path:
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder,
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise InputError(f"{folder} is not in a git repository: SPEC@REV needs one")
    return Path(found.stdout.strip())


# -- sbom ---------------------------------------------------------------------------------------


@cli.command("sbom")
@click.argument("ref")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write it to this file (default: print it).")
def sbom_command(ref, output):
    """Print image REF's software bill of materials: every apt, conda and pip package
    installed, as CycloneDX 1.6 JSON with package URLs (pkg:deb, pkg:conda, pkg:pypi), the
    sha256 the locks pinned, the base image, and the image's id and layers. The build wrote it
    from the package databases (/opt/devbox/sbom.cdx.json; this adds the layers, which the copy
    inside the image cannot know); `check` (drift) holds it to what is installed.

    \b
      devbox-build sbom devbox/datascience:cpu -o datascience-cpu.cdx.json
    """
    from .runtime.sbom import with_layers

    refs.check_reference(ref, "REF")
    engine = Engine.connect()
    image = engine.image(ref)  # a missing image is its own error
    try:
        text = engine.read_file(ref, contract.SBOM).decode()
    except DevboxError:
        raise InputError(f"{ref} has no {contract.SBOM}: it was built by devbox-build before "
                         "0.2.0, or not by devbox-build",
                         hint="rebuild it: devbox-build build SPEC") from None
    sbom = with_layers(json.loads(text), image["Id"], engine.layers(ref))
    text = json.dumps(sbom, indent=1, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    locking.write_atomic(output, text, error=InputError)
    err.print(f"[green]✓[/] {len(json.loads(text)['components'])} components in {output}")


def _inspect_like(manifest: dict, like: str, images_dir: Path, as_json: bool,
                  as_markdown: bool = False) -> None:
    from .like import compare_image, load, markdown

    spec = load_spec(manifest["spec"], images_dir)
    flavour = "gpu" if manifest.get("cuda") else "cpu"
    report = compare_image(load(spec, like, flavour), manifest)
    if as_json:
        out.print_json(data=report)
        return
    if as_markdown:
        click.echo(markdown(report, flavour), nl=False)
        return
    versions = report["versions"]
    out.print(f"[bold]{manifest['image']['ref']}[/] against {like} ({flavour}): "
              f"{report['shared']} shared pip packages; {len(versions['same'])} the same, "
              f"{len(versions['patch'])} patch, {len(versions['minor'])} minor, "
              f"{len(versions['major'])} major apart")
    out.print(f"  Python {report['python']['image']} (the release: "
              f"{report['python']['release'] or '?'})")
    for level in ("major", "minor"):
        if versions[level]:
            out.print(f"  {level}: " + ", ".join(escape(v) for v in versions[level]))
    if report["release_only"]:
        out.print("  the release has, the image lacks: " + ", ".join(report["release_only"]))
    out.print(f"  the image has {len(report['image_only'])} packages the release lacks")


# -- release ------------------------------------------------------------------------------------


@cli.command("release")
@click.argument("image")
@click.option("--variant", default="all", show_default=True, help="cpu, gpu, ... or all.")
@click.option("--registry", help="Registry HOST[:PORT][/namespace] to prefix the repository with.")
@click.option("--push", is_flag=True, help="Push the release's tags.")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign each pushed tag with this private key and attach its provenance "
                   "(see sign; needs --push).")
@click.option("--dry-run", is_flag=True, help="Say what the release would be; change nothing.")
@ca_options
@click.option("--network", "network_mode", default=settings.default("DEVBOX_NETWORK"),
              help="Network for build steps (env DEVBOX_NETWORK).")
@images_dir_option
@json_option
def release_command(image, variant, registry, push, sign_key, dry_run, ca_certs, no_host_ca,
                    network_mode, images_dir, as_json):
    """Release IMAGE: build it (a no-op when built), compare each variant with the last
    release (the newest version in CHANGELOG.md beside the spec, its images
    REPOSITORY:VERSION-VARIANT), propose the next version by the spec's [release] policy,
    hold [budget] growth_percent against the last release, then label and tag
    REPOSITORY:VERSION-VARIANT and write the CHANGELOG.md entry. Nothing changed: no release.

    \b
      devbox-build release datascience --dry-run
      devbox-build release datascience --registry 127.0.0.1:5000/team --push
      devbox-build release datascience --registry 127.0.0.1:5000/team --push --sign-key team.key
    """
    import datetime

    from . import budget as budgets
    from . import release as releases
    from .build import apply_tags, repository
    from .diff import Side, compare, markdown

    spec = load_spec(image, images_dir)
    variants = resolve_variants(spec, variant)
    ca_files, _ = chosen_ca_certificates(ca_certs, no_host_ca)
    options = BuildOptions(registry=registry, push=False, ca_certificates=ca_files,
                           network_mode=network_mode)
    contexts = prepare(spec, variants, options)
    if push and not registry and not refs.names_registry(spec.repository):
        raise InputError("--push needs a registry: pass --registry HOST[/NAMESPACE], or name "
                         "one in the spec's repository (HOST[:PORT]/name)")
    if sign_key and not push:
        raise InputError("--sign-key signs what is pushed: add --push")
    key = _signing_key(sign_key) if sign_key and not dry_run else None  # before any work
    engine = Engine.connect()
    shown = SILENT if as_json else reporter
    results = build_contexts(contexts, engine, options, shown)
    changelog = spec.folder / releases.CHANGELOG
    previous = releases.previous_version(changelog)
    repo = repository(spec, registry)
    sides, diffs, changed = {}, [], previous is None
    for result in results:
        ref = result.content_tag
        sides[result.variant] = Side(ref, read_manifest(engine, ref), engine.layers(ref),
                                     engine.image(ref).get("Config") or {})
        if previous is None:
            continue
        before = f"{repo}:{previous}-{result.variant}"
        if engine.image_id(before) is None and refs.names_registry(before):
            try:
                engine.pull(before)  # the last release, as the registry holds it
            except DevboxError:
                pass
        if engine.image_id(before) is None:
            raise InputError(f"the last release's image {before} is not in this engine "
                             f"({changelog} says {previous} is the last release)",
                             hint=f"docker pull {before}")
        old = Side(before, read_manifest(engine, before), engine.layers(before),
                   engine.image(before).get("Config") or {})
        changed = changed or (old.manifest.get("content_hash")
                              != sides[result.variant].manifest.get("content_hash"))
        diffs.append(compare(old, sides[result.variant]))
        if spec.budget is not None and spec.budget.growth_percent is not None:
            problems = budgets.problems(
                spec.budget.model_copy(update={"total_mb": None, "layers": {}}),
                sides[result.variant].manifest, engine.image(ref)["Size"],
                (old.manifest, engine.image(before)["Size"]), where=f"{spec.path}: [budget]")
            if problems:
                raise BuildFailed(f"{spec.name} {result.variant} grew too much since {previous} "
                                  "(nothing was released):\n  " + "\n  ".join(problems),
                                  hint="remove or replace what grew, or raise growth_percent")
    # What the spec's inputs name (the top lock's direct pins, the system packages).
    inputs = {name.split("=")[0] for name in spec.system.packages} | {
        name for result in results
        for lock in locking.stack(spec, result.variant,
                                  sides[result.variant].manifest["platform"])[-1:]
        for name, pin in locking.read_pins(lock.path(spec)).items() if pin.direct}
    proposal = releases.propose(previous, spec.release.first, diffs, changed,
                                spec.release.major, spec.release.minor, inputs)
    summary = {"version": proposal.version, "previous": proposal.previous,
               "level": proposal.level, "why": proposal.why,
               "tags": [f"{repo}:{proposal.version}-{r.variant}" for r in results]
               if proposal.version else [], "dry_run": dry_run}
    if proposal.version is None or dry_run:
        if as_json:
            out.print_json(data=summary)
        else:
            shown.item("note" if proposal.version is None else "ok",
                       f"{spec.name}: " + (proposal.why[0] if proposal.version is None else
                                           f"would release {proposal.version} "
                                           f"({proposal.level}): " + "; ".join(proposal.why)))
        return
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    sections = [markdown({**diff, "b": tag}) for diff, tag in zip(diffs, summary["tags"])]
    text = releases.with_entry(changelog, releases.entry(proposal, date, sections))
    for result, tag in zip(results, summary["tags"]):
        labelled = _labelled(engine, result.content_tag, proposal.version)
        apply_tags(engine, labelled, [tag])
        if push:
            for line in engine.push(tag):
                shown.output(line)
        if key is not None:
            shown.item("ok", f"signed {tag} ({_sign_pushed(engine, tag, key)})")
    locking.write_atomic(changelog, text, error=InputError)
    if as_json:
        out.print_json(data=summary)
        return
    shown.item("ok", f"released {spec.name} {proposal.version} ({proposal.level}): "
               + ", ".join(summary["tags"]), detail="\n".join(proposal.why),
               finished=summary["tags"])
    err.print(f"  wrote {changelog}")


def _labelled(engine: Engine, ref: str, version: str) -> str:
    """``ref`` with the label org.opencontainers.image.version (no new layer); its id."""
    import io
    import tarfile

    from .engine import Built

    dockerfile = (f"FROM {ref}\nLABEL org.opencontainers.image.version="
                  f"{json.dumps(version)}\n").encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo("Dockerfile")
        member.size, member.mtime = len(dockerfile), 0
        archive.addfile(member, io.BytesIO(dockerfile))
    buffer.seek(0)
    built = [event for event in engine.build(buffer) if isinstance(event, Built)]
    return built[-1].image_id


# -- index ---------------------------------------------------------------------------------------


@cli.command("index")
@click.argument("target")
@click.argument("images", nargs=-1, required=True)
@json_option
def index_command(target, images, as_json):
    """Write TARGET as a multi-platform index of IMAGES (pushed images of one repository, one
    per platform), by digest: `docker pull TARGET` on an Apple-silicon Mac or a Graviton box
    then gets its arm64 image, on an x86 box its amd64 one. A build for another platform than
    the engine's tags REPOSITORY:VARIANT-ARCH, so the two sit side by side until joined.

    \b
      devbox-build build datascience --variant cpu --registry 127.0.0.1:5000/team --push
      devbox-build build datascience --variant cpu --platform linux/arm64 --registry 127.0.0.1:5000/team --push
      devbox-build index 127.0.0.1:5000/team/devbox/datascience:cpu 127.0.0.1:5000/team/devbox/datascience:cpu 127.0.0.1:5000/team/devbox/datascience:cpu-arm64
    """
    from .registry import join

    digest, entries = join(target, list(images))
    if as_json:
        out.print_json(data={"ref": target, "digest": digest, "manifests": entries})
        return
    err.print(f"[green]✓[/] {target} ({digest}): " + ", ".join(
        f"{e['platform']['os']}/{e['platform']['architecture']} {e['digest'][:19]}"
        for e in entries))


# -- signing ------------------------------------------------------------------------------------


def _passphrase(confirm: bool = False) -> bytes:
    """DEVBOX_SIGNING_PASSPHRASE, or asked for on a terminal (never echoed, never printed)."""
    text = settings.value("DEVBOX_SIGNING_PASSPHRASE")
    if text is None:
        if not sys.stdin.isatty():
            raise InputError("the signing key's passphrase is not set",
                             hint="set DEVBOX_SIGNING_PASSPHRASE (a CI secret), or run this on "
                                  "a terminal to be asked")
        text = click.prompt("Passphrase for the signing key", hide_input=True,
                            confirmation_prompt=confirm, err=True)
    return text.encode()


def _signing_key(path: Path):
    from .signing import load_private_key

    return load_private_key(path, _passphrase())


def _sign_pushed(engine: Engine, ref: str, key) -> str:
    """Signs ``ref`` as its registry holds it, with its provenance: read from the engine's copy,
    which must be what the registry holds (its RepoDigests name the registry's digest)."""
    from .registry import resolve
    from .signing import provenance, sign

    _, reference, digest = resolve(ref)
    if engine.image_id(ref) is None:
        engine.pull(reference.at(digest))
        ref = reference.at(digest)
    if reference.at(digest) not in (engine.image(ref).get("RepoDigests") or []):
        raise InputError(f"{ref}: the registry holds {digest}, not this engine's image; the "
                         "provenance would describe another image",
                         hint=f"docker pull {reference.at(digest)} (or push this one), then "
                              "sign again")
    manifest = read_manifest(engine, ref)
    base = manifest.get("base")
    return sign(ref, key, provenance(manifest, engine.image_id(base) if base else None))


@cli.command("generate-key-pair")
@click.option("--output-prefix", default="cosign", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Write PREFIX.key (the private key, encrypted, mode 0600) and PREFIX.pub.")
def generate_key_pair_command(output_prefix):
    """Make the team's signing key pair, in cosign's format (cosign and skopeo read it).
    Keep PREFIX.key and its passphrase secret (a CI secret: DEVBOX_SIGNING_PASSPHRASE); commit
    PREFIX.pub, which verify, ec2 and the hub configs check images against.

    \b
      devbox-build generate-key-pair --output-prefix team-signing
    """
    from .signing import generate_key_pair

    private, public = generate_key_pair(output_prefix, _passphrase(confirm=True))
    err.print(f"[green]✓[/] wrote {private} (secret) and {public} (share it)")


def _key_option(half: str):
    return click.option("--key", "key_path", required=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help=f"The {half} key (generate-key-pair's PREFIX."
                             + {"private": "key", "public": "pub"}[half] + ").")


@cli.command("sign")
@click.argument("ref")
@_key_option("private")
@json_option
def sign_command(ref, key_path, as_json):
    """Sign image REF as its registry holds it, and attach its provenance (the spec, every
    lock's digest, the base image, the builder's version as an in-toto SLSA provenance
    statement), both in cosign's layout beside the image (tags sha256-<digest>.sig and .att).
    The passphrase comes from DEVBOX_SIGNING_PASSPHRASE, or is asked for.

    \b
      devbox-build sign 127.0.0.1:5000/team/datascience:cpu --key team-signing.key
    """
    key = _signing_key(key_path)
    engine = Engine.connect()
    digest = _sign_pushed(engine, ref, key)
    if as_json:
        out.print_json(data={"ref": ref, "digest": digest})
        return
    err.print(f"[green]✓[/] signed {ref} ({digest}), with its provenance")


@cli.command("verify")
@click.argument("ref")
@_key_option("public")
@json_option
def verify_command(ref, key_path, as_json):
    """Verify image REF in its registry: a signature by the key over its digest, and a
    provenance statement signed by it. Prints the digest to run (REPOSITORY@sha256:...), which
    is exactly what was signed. Exit code 7 when it is unsigned, signed by another key, or
    its signature does not match.

    \b
      devbox-build verify 127.0.0.1:5000/team/datascience:cpu --key team-signing.pub
    """
    from .signing import load_public_key, verify

    verified = verify(ref, load_public_key(key_path))
    build = verified.provenance["buildDefinition"]
    facts = {"ref": ref, "digest": verified.digest, "pinned": verified.pinned,
             "spec": build["externalParameters"].get("spec"),
             "variant": build["externalParameters"].get("variant"),
             "builder": verified.provenance["runDetails"]["builder"],
             "materials": build["resolvedDependencies"]}
    if as_json:
        out.print_json(data=facts)
        return
    out.print(f"[green]✓[/] {ref}: signed by {key_path}; run {verified.pinned}")
    out.print(f"  built by devbox-build "
              f"{facts['builder']['version'].get('devbox-build')} from spec {facts['spec']} "
              f"({facts['variant']}): " + ", ".join(
                  f"{m['uri']}" + (f" {next(iter(m['digest'].values()))[:12]}"
                                   if m.get("digest") else "") for m in facts["materials"]))


# -- inspect ------------------------------------------------------------------------------------


@cli.command("inspect")
@click.argument("ref")
@click.option("--packages/--no-packages", default=True, help="List installed packages.")
@click.option("--like", "like", metavar="smd:X.Y.Z",
              help="Compare with a release whose files are stored beside the image's spec "
                   "(like/smd-X.Y.Z/): shared packages same / patch / minor / major, top-level "
                   "packages one has and the other lacks, the Pythons.")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="With --like: the comparison as a markdown table.")
@images_dir_option
@json_option
def inspect_command(ref, packages, like, as_markdown, images_dir, as_json):
    """Show what image REF was built from and what it contains (its manifest).

    \b
      devbox-build inspect devbox/datascience:cpu
      devbox-build inspect devbox/datascience:cpu --like smd:4.4.1
      devbox-build inspect devbox/datascience:cpu --like smd:4.4.1 --markdown
    """
    refs.check_reference(ref, "REF")
    if as_markdown and not like:
        raise InputError("--markdown is for --like's comparison: add --like smd:X.Y.Z")
    manifest = read_manifest(Engine.connect(), ref)
    if like:
        _inspect_like(manifest, like, images_dir, as_json, as_markdown)
        return
    if as_json:
        out.print_json(data=manifest)
        return
    labels = manifest["image"]["labels"]
    summary = Table.grid(padding=(0, 2))
    for key, value in [
        ("image", f"{ref} ({manifest['image']['id'][:19]})"),
        ("spec", f"{manifest['spec']} variant {manifest['variant']} ({manifest['platform']})"),
        ("python", manifest["python_version"]),
        ("size", f"{manifest['image']['size'] / 1e6:.0f} MB"),
        ("built", f"{labels.get('org.opencontainers.image.created', '?')} by devbox-build "
                  f"{manifest['tool_version']}"),
        ("content", manifest["content_hash"][:12]),
        ("cuda", labels.get("devbox.cuda.version", "-")
         + (f" (driver ≥ {labels['devbox.cuda.min-driver']})" if "devbox.cuda.min-driver" in labels else "")),
        ("locks", ", ".join(f"{name} {digest[:12]}" for name, digest in manifest["locks"].items()) or "-"),
        ("packages", f"{len(manifest['packages']['pip'])} pip, "
         f"{len(manifest['packages'].get('conda', []))} conda, "
         f"{len(manifest['packages']['apt'])} apt"),
    ]:
        summary.add_row(f"[bold]{key}[/]", value)
    out.print(summary)
    if packages:
        table = Table("pip package", "version", "layer", box=None, pad_edge=False)
        for package in manifest["packages"]["pip"]:
            table.add_row(package["name"], package["version"], package["layer"])
        out.print()
        out.print(table)
        if manifest["packages"].get("conda"):
            table = Table("conda package", "version", "build", "channel", box=None,
                          pad_edge=False)
            for package in manifest["packages"]["conda"]:
                table.add_row(package["name"], package["version"], package["build"],
                              package["channel"])
            out.print()
            out.print(table)


# -- check --------------------------------------------------------------------------------------

@cli.command("check")
@click.argument("ref", required=False)
@click.option("--profile", "profiles", multiple=True, metavar="NAME",
              help="A check profile (repeatable; default: every profile that applies to REF). "
                   "See `devbox-build check --list`.")
@click.option("--tests", "extra_tests", multiple=True, type=click.Path(path_type=Path),
              help="Your own testinfra checks (a file or folder), run with the same fixtures.")
@click.option("--junit", "junit_xml", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a JUnit XML report here (for CI).")
@click.option("--list", "list_profiles", is_flag=True, help="List the profiles and exit.")
@json_option
def check_command(ref, profiles, extra_tests, junit_xml, list_profiles, as_json):
    """Prove that image REF keeps the laptop, EC2 and SageMaker contracts.

    Runs pytest-testinfra checks against containers of REF (each removed afterwards) and prints
    one line per check; exits 1 when any fails. Profiles that apply to REF are chosen from what it
    is (a devbox-built image, JupyterLab installed, a CUDA variant) unless --profile is given.

    \b
      devbox-build check devbox/datascience:cpu
      devbox-build check devbox/datascience:gpu --profile base --profile gpu
      devbox-build check my/image:1.2 --tests tests/image --junit checks.xml

    Your own checks are ordinary testinfra tests using the fixtures `image`, `image_host`,
    `image_root_host` and `start_container`; plain `pytest --devbox-image REF` runs them too.
    """
    from .checks import PROFILES, profile_path, run_checks

    if list_profiles:
        for name, text in PROFILES.items():
            out.print(f"[bold]{name:<20}[/] {text}")
        return
    if ref is None:
        raise click.UsageError("Missing argument 'REF' (an image to check; --list needs none).")
    refs.check_reference(ref, "REF")
    for name in profiles:
        profile_path(name)  # an unknown name is an error before any container starts

    chosen, outcomes, seconds = run_checks(
        ref, list(profiles) or None, extra_tests=list(extra_tests), junit_xml=junit_xml,
        reporter=SILENT if as_json else reporter,
    )
    counts = {kind: sum(o.outcome == kind for o in outcomes) for kind in ("passed", "failed",
                                                                          "skipped")}
    if as_json:
        out.print_json(data={
            "image": ref, "profiles": chosen, "seconds": round(seconds, 2), **counts,
            "checks": [o.__dict__ for o in outcomes],
        })
    else:
        colour = "red" if counts["failed"] else "green"
        err.print(f"[bold {colour}]{counts['passed']} passed, {counts['failed']} failed, "
                  f"{counts['skipped']} skipped[/] in {seconds:.1f} s "
                  f"({ref}; profiles: {', '.join(chosen)})")
        if junit_xml:
            err.print(f"  JUnit report: {junit_xml}")
    if counts["failed"] or not outcomes:
        sys.exit(ChecksFailed.exit_code)


# -- diff ---------------------------------------------------------------------------------------


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--variant", default="cpu", show_default=True,
              help="For a spec at a git revision: the variant whose top lock to compare.")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="Print markdown for a pull request comment.")
@images_dir_option
@json_option
def diff_command(a, b, variant, as_markdown, images_dir, as_json):
    """What changed from A to B. Each is a built image, a pip lock file, or a spec at a git
    revision (SPEC@REV: its variant's top lock as that commit has it; SPEC@ alone: as the
    working tree has it), so a pull request is reviewed before anything is built.

    For images: apt, conda and pip packages added, removed and changed (with major / minor /
    patch) and the bytes each change installs, the layers B shares with A and the bytes a
    machine holding A fetches to run B, and the facts that changed (Python, user, CUDA, minimum
    driver, entrypoint, labels). For locks: the pip packages, with their wheels' sizes.

    \b
      devbox-build diff devbox/datascience:cpu devbox/datascience:gpu
      devbox-build diff datascience@origin/main datascience@ --markdown
      devbox-build diff old/pip.txt images/datascience/locks/linux-amd64/pip.txt
    """
    from .diff import KINDS, compare, counts, elided, markdown, signed

    sides = [_diff_side(text, variant, images_dir) for text in (a, b)]
    result = compare(*sides)
    if as_json:
        out.print_json(data=result)
        return
    if as_markdown:
        click.echo(markdown(result))
        return
    total, layers = counts(result), result["layers"]
    out.print(f"[bold]{escape(a)}[/] → [bold]{escape(b)}[/]: {total['added']} added, "
              f"{total['removed']} removed, {total['changed']} changed")
    for kind in KINDS:
        entry = result["packages"][kind]
        for package in entry["added"]:
            out.print(f"  [green]+[/] {kind:<5} {escape(package['name'])} {package['version']} "
                      f"[dim]{signed(package['size'])}[/]")
        for package in entry["removed"]:
            out.print(f"  [red]-[/] {kind:<5} {escape(package['name'])} {package['version']} "
                      f"[dim]{signed(-package['size'])}[/]")
        for package in entry["changed"]:
            out.print(f"  [yellow]~[/] {kind:<5} {escape(package['name'])} {package['from']} → "
                      f"{package['to']} ({package['bump']}) "
                      f"[dim]{signed(package['size_change'])}[/]")
    if layers["b"]:
        out.print(f"layers: {layers['shared']} of {layers['b']} shared; {layers['to_fetch']} to "
                  f"fetch, {layers['bytes_to_fetch'] / 1e6:.1f} MB uncompressed")
    for fact in result["facts"]:
        before, after = elided(fact["a"], fact["b"])
        out.print(f"  {escape(fact['fact'])}: {escape(before) or '–'} → {escape(after) or '–'}")


# -- sagemaker ----------------------------------------------------------------------------------


@cli.group("sagemaker")
def sagemaker_group() -> None:
    """Register images with Amazon SageMaker."""


def _key_value(ctx, param, values):
    pairs = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", ctx, param)
        pairs[key] = text
    return pairs


@sagemaker_group.command("config")
@click.argument("ref")
@click.option("--role-arn", required=True,
              help="IAM role SageMaker uses to read the image from ECR.")
@click.option("--image-uri", help="Where the image is pushed in ECR (default: REF, when it "
                                  "names a registry).")
@click.option("--image-name", help="SageMaker image name (default: from the image's spec and "
                                   "variant, e.g. datascience-cpu).")
@click.option("--entrypoint", help="ContainerEntrypoint (default: the image's ENTRYPOINT).")
@click.option("--arg", "arguments", multiple=True, help="A ContainerArguments item (repeatable).")
@click.option("--env", "environment", multiple=True, callback=_key_value, metavar="KEY=VALUE",
              help="A ContainerEnvironmentVariables entry (repeatable).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the JSON files to (default: sagemaker/IMAGE-NAME).")
@json_option
def sagemaker_config_command(ref, role_arn, image_uri, image_name, entrypoint, arguments,
                             environment, output, as_json):
    """Write the inputs of create-image, create-image-version and create-app-image-config for
    image REF (JupyterLab; KernelGateway and Code Editor when the image has them).

    Every request is validated offline against the SageMaker API model in botocore, limits
    included (one entrypoint item, at most 50 arguments of 64 characters, 25 variables), so a
    registration does not fail half-way. Prints the aws commands to run, in order.

    \b
      devbox-build sagemaker config devbox/datascience:cpu \\
          --image-uri "$ECR_REPOSITORY:cpu-3f2a9c1d4e5b" \\
          --role-arn arn:aws:iam::123456789012:role/SageMakerImages
    """
    from .checks.image import ImageUnderTest
    from .targets import prepare, write
    from .targets.sagemaker import SageMaker, image_name_for

    refs.check_reference(ref, "REF")
    image = ImageUnderTest.load(Engine.connect(), ref)
    if image_uri is None:
        if not refs.names_registry(ref):
            raise InputError(f"{ref} is a local image name, not a registry URI",
                             hint="push it to ECR and pass --image-uri with its URI")
        image_uri = ref
    target = SageMaker(image_name or image_name_for(image), role_arn, image_uri,
                       [entrypoint] if entrypoint else None, list(arguments), environment)
    files = prepare(target, [image])
    requests = target.requests(image)
    if as_json:
        out.print_json(data={r.filename: {"operation": r.operation, "input": r.params}
                             for r in requests})
        return
    folder = output or Path("sagemaker") / target.image_name
    write(folder, files)
    err.print(f"[green]✓[/] {len(files)} requests for {target.image_name} in {folder}/, valid "
              "for the SageMaker API. Register with:")
    out.print(f"cd {folder}")
    for request in requests:
        out.print(request.cli)


# -- ec2 ----------------------------------------------------------------------------------------


@cli.group("ec2")
def ec2_group() -> None:
    """EC2 boxes: a CPU box and a GPU box sharing one data volume (boxes.toml)."""


@ec2_group.command("preflight")
@click.option("--boxes", "boxes_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("boxes.toml"), show_default=True, help="The box definition.")
@json_option
def ec2_preflight_command(boxes_path, as_json):
    """Check the box definition before any AWS call: instance types exist and the gpu role has
    a GPU, each image's architecture matches its instance, the AMI family's driver is new enough
    for the image's CUDA, the data volume is in the boxes' availability zone, IMDSv2 with hop
    limit 2. Offline: only the local engine is asked about the images (when it has them).

    \b
      devbox-build ec2 preflight --boxes boxes.toml
    """
    from .targets.ec2 import ImageFacts, load_box, preflight

    box = load_box(boxes_path)
    local = _local_images(box)
    images = {role: ImageFacts.of(image) for role, image in local.items()}
    unchecked = [f"{box.image}:{role}" for role in box.roles if role not in local]
    problems = preflight(box, images)
    if as_json:
        out.print_json(data={"ok": not problems, "problems": problems, "unchecked": unchecked})
    if problems:
        raise InputError(f"{len(problems)} problem(s) before any AWS call:\n  "
                         + "\n  ".join(problems))
    if not as_json:
        err.print(f"[green]✓[/] {box.name}: preflight passed for {', '.join(box.roles)}"
                  + (f" (not in this engine, image checks skipped: {', '.join(unchecked)})"
                     if unchecked else ""))


def _local_images(box) -> dict:
    """The roles' images this machine's engine has (checks.image.ImageUnderTest), by role: a
    local build pushed to ECR may be known by the repository's name alone. {} without an
    engine: the checks that need the image are then skipped, and said to be."""
    from .checks.image import ImageUnderTest

    try:
        engine = Engine.connect()
    except DevboxError:
        return {}
    images = {}
    for role in box.roles:
        ref = f"{box.image}:{role}"
        local = ref.split("/", 1)[1] if "." in ref.split("/", 1)[0] else ref
        found = next((name for name in (ref, local) if engine.image_id(name)), None)
        if found:
            images[role] = ImageUnderTest(found, engine, engine.api.inspect_image(found), None)
    return images


def _checked_box(boxes_path: Path):
    """The box definition, after the offline preflight (every ec2 command runs it first)."""
    from .targets.ec2 import load_box, preflight

    box = load_box(boxes_path)
    problems = preflight(box, {})
    if problems:
        raise InputError(f"{len(problems)} problem(s) before any AWS call:\n  "
                         + "\n  ".join(problems), hint=f"devbox-build ec2 preflight --boxes {boxes_path}")
    return box


def _fleet(box):
    from .targets.fleet import Fleet

    return Fleet(box, reporter)


boxes_option = click.option(
    "--boxes", "boxes_path", type=click.Path(dir_okay=False, path_type=Path),
    default=Path("boxes.toml"), show_default=True, help="The box definition.")
role_option = click.option("--role", type=click.Choice(["cpu", "gpu"]), required=True,
                           help="Which box: the cheap CPU one or the GPU one.")
key_option = click.option(
    "--public-key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
    help="The ssh public key the box lets in (default: ~/.ssh/id_ed25519.pub, id_ecdsa.pub or "
         "id_rsa.pub, the first that exists).")


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        out.print_json(data=status)
        return
    people = status.get("team") or {status.get("owner", "?"): status}
    for owner, entry in people.items():
        volume = entry["volume"]
        out.print(f"{status['box']} ({status['region']}), {owner}: data volume "
                  + (f"{volume['volume_id']} {volume['size_gb']} GB in {volume['zone']}, "
                     f"{volume['state']} (about ${volume['monthly_usd']:.2f}/month, stopped or "
                     "not)" + (f", attached to {volume['attached_to']}"
                               if volume["attached_to"] else "")
                     if volume else "not created yet"))
        for role, instance in entry["roles"].items():
            cost = ""
            if instance and instance["state"] in ("pending", "running"):
                cost = (f", running {instance['running_hours']:.1f} h, about "
                        f"${instance['cost_this_run_usd']:.2f} so far at "
                        f"${instance['hourly_usd']:.2f}/h" if instance["hourly_usd"] else "")
            out.print(f"  {role}: " + ("no instance" if instance is None else (
                f"{instance['instance_id']} {instance['instance_type']}"
                f"{' spot' if instance['spot'] else ''}, {instance['state']}{cost}"
                f"{', has the data volume' if instance['has_data_volume'] else ''}")))


@ec2_group.command("user-data")
@boxes_option
@role_option
@key_option
@click.option("--volume-id", default="vol-00000000000000000", show_default=True,
              help="The data volume's id (`ec2 up` passes the real one).")
def ec2_user_data_command(boxes_path, role, key_path, volume_id):
    """Print the cloud-init user data a box boots with. Every boot: Docker (and the NVIDIA
    container toolkit where the AMI lacks it), ECR login through the credential helper, the
    data volume found by its id, formatted only if it has no filesystem, mounted and grown, then
    the image with --gpus all on GPU, home and /data on the volume, JupyterLab and sshd on
    127.0.0.1, the idle watcher powering the instance off, and the failsafe that powers it off
    when any of this fails.

    \b
      devbox-build ec2 user-data --role gpu > user-data.yml
    """
    from .targets import prepare
    from .targets.ec2 import Ec2, box_image, public_key

    box = _checked_box(boxes_path)
    key, _ = public_key(key_path)
    local = _local_images(box)
    files = prepare(Ec2(box, role, key, volume_id, box_image(box, role)),
                    [local[role]] if role in local else [])
    click.echo(next(iter(files.values())), nl=False)


def _connect_lines(box, role: str, boxes_path: Path) -> None:
    from .targets.ec2 import host_alias

    out.print(f"devbox-build ec2 ssh-config --role {role} --boxes {boxes_path} >> ~/.ssh/config")
    out.print(f"ssh {host_alias(box, role)}")
    out.print(f"devbox-build ec2 connect --role {role} --boxes {boxes_path}")


@ec2_group.command("up")
@boxes_option
@role_option
@key_option
@click.option("--wait-image/--no-wait-image", default=True, show_default=True,
              help="Wait until the boot script says the image answers (serial console).")
@json_option
def ec2_up_command(boxes_path, role, key_path, wait_image, as_json):
    """Start your box for the role (create it, and the data volume, the first time) with the
    data volume attached; a second `up` finds both by their tags, yours only (the tags name you,
    from your AWS identity). The role's image must be in ECR. A box whose boxes.toml changed
    (type, image, idle minutes, key) is updated while stopped; a running one is refused with the
    command that does it. Refuses while your other box runs with the volume: use `ec2 move`.

    \b
      devbox-build ec2 up --role cpu
    """
    from .targets.ec2 import box_image, public_key

    box = _checked_box(boxes_path)
    key, _ = public_key(key_path)
    image = box_image(box, role)  # verified before anything starts, when boxes.toml asks
    fleet = _fleet(box)
    started = time.monotonic()
    status = fleet.up(role, image, key)
    instance = status["roles"][role]
    if wait_image and not fleet.wait_for_image(role):
        raise CloudError(f"{instance['instance_id']} runs, but the image did not answer in 15 "
                         "minutes (the box's failsafe powers it off)",
                         hint="see its serial console: aws ec2 get-console-output "
                         f"--instance-id {instance['instance_id']}")
    _print_status(status, as_json)
    if not as_json:
        err.print(f"[green]✓[/] the {role} box is up in {time.monotonic() - started:.0f} s. "
                  "Connect (VS Code Remote-SSH, ssh, scp; then JupyterLab's URL):")
        _connect_lines(box, role, boxes_path)


@ec2_group.command("down")
@boxes_option
@click.option("--role", type=click.Choice(["cpu", "gpu"]), help="Only this box (default: both).")
@click.option("--snapshot", is_flag=True, help="Then snapshot the data volume.")
@json_option
def ec2_down_command(boxes_path, role, snapshot, as_json):
    """Stop your box(es). Nothing is deleted: the data volume and the instances stay, and the
    next `up` starts them again. Stopped, the volume (and any snapshot) still bills; the
    instances do not.

    \b
      devbox-build ec2 down
      devbox-build ec2 down --snapshot     # and keep a snapshot of the data volume
    """
    _print_status(_fleet(_checked_box(boxes_path)).down(role, snapshot=snapshot), as_json)


@ec2_group.command("move")
@boxes_option
@key_option
@click.option("--to", "to", type=click.Choice(["cpu", "gpu"]), required=True,
              help="The box that gets the data volume.")
@json_option
def ec2_move_command(boxes_path, key_path, to, as_json):
    """Move your work to the other box: start it first (created the first time; its type must
    be offered in the volume's zone), then stop the current one and move the data volume. When
    EC2 has no capacity for the target, nothing changes; when a step after the start fails, the
    volume goes back to the box you had.

    \b
      devbox-build ec2 move --to gpu      # train
      devbox-build ec2 move --to cpu      # back to the cheap box
    """
    from .targets.ec2 import box_image, public_key

    box = _checked_box(boxes_path)
    key, _ = public_key(key_path)
    _print_status(_fleet(box).move(to, box_image(box, to), key), as_json)
    if not as_json:
        _connect_lines(box, to, boxes_path)


@ec2_group.command("status")
@boxes_option
@click.option("--all", "everyone", is_flag=True, help="The whole team's boxes, by owner.")
@json_option
def ec2_status_command(boxes_path, everyone, as_json):
    """Your boxes: each instance and state, what this run has cost so far (on-demand price, an
    estimate), where the data volume is and what it costs a month. --all: everyone's."""
    _print_status(_fleet(_checked_box(boxes_path)).status(everyone), as_json)


@ec2_group.command("destroy")
@boxes_option
@click.option("--role", type=click.Choice(["cpu", "gpu"]), help="Only this box (default: both).")
@click.option("--delete-volume", is_flag=True,
              help="Also delete the data volume, after a final snapshot.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@json_option
def ec2_destroy_command(boxes_path, role, delete_volume, yes, as_json):
    """Terminate your boxes (and cancel their spot requests). The data volume stays unless
    --delete-volume, which snapshots it first; the snapshot bills until you delete it.

    \b
      devbox-build ec2 destroy --role gpu
      devbox-build ec2 destroy --delete-volume --yes
    """
    box = _checked_box(boxes_path)
    if delete_volume and not yes:
        click.confirm("Terminate the boxes and delete the data volume (after a snapshot)?",
                      abort=True, err=True)
    _print_status(_fleet(box).destroy(role, delete_volume), as_json)


@ec2_group.command("relocate")
@boxes_option
@click.option("--zone", required=True, help="The availability zone to move the volume to.")
@json_option
def ec2_relocate_command(boxes_path, zone, as_json):
    """When the volume's zone has no capacity for your type: snapshot the volume, create it in
    ZONE from the snapshot, end the old zone's instances (they hold nothing). Then set
    availability_zone = ZONE in boxes.toml and run `ec2 up`. The old volume stays, tagged
    devbox:purpose=relocated, until you delete it.

    \b
      devbox-build ec2 relocate --zone us-east-1b
    """
    result = _fleet(_checked_box(boxes_path)).relocate(zone)
    if as_json:
        out.print_json(data=result)
    else:
        out.print(f"the data volume is {result['volume_id']} in {zone} now (from "
                  f"{result['snapshot']}); set availability_zone = \"{zone}\" in {boxes_path}")


@ec2_group.command("ssh-config")
@boxes_option
@role_option
@key_option
def ec2_ssh_config_command(boxes_path, role, key_path):
    """Print an ~/.ssh/config entry that logs in to the environment itself: the container, as
    the image's user (its Python, kernels, home and /data), through SSM Session Manager (no
    inbound port, no public IP), with your agent and JupyterLab's port forwarded. VS Code
    Remote-SSH, scp and git over your agent then work as on any host. Needs the AWS CLI's
    session-manager-plugin.

    \b
      devbox-build ec2 ssh-config --role gpu >> ~/.ssh/config
    """
    import os

    from .targets.ec2 import public_key, ssh_config

    box = _checked_box(boxes_path)
    _, key_file = public_key(key_path)
    instance = _fleet(box).instance(role)
    if instance is None:
        raise InputError(f"{box.name} has no {role} box yet", hint=f"run: devbox-build ec2 up --role {role}")
    click.echo(ssh_config(box, role, instance["InstanceId"], key_file.with_suffix(""),
                          os.environ.get("AWS_PROFILE")), nl=False)


@ec2_group.command("connect")
@boxes_option
@role_option
@click.option("--ssh-config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The ssh configuration with the box's entry (default: ssh's own).")
def ec2_connect_command(boxes_path, role, config_file):
    """Print JupyterLab's URL, token included, for a browser on this machine: it asks the
    environment over ssh (the `ec2 ssh-config` entry), whose forwarded port it names.

    \b
      devbox-build ec2 connect --role gpu
    """
    import subprocess

    from .targets.ec2 import host_alias

    box = _checked_box(boxes_path)
    alias = host_alias(box, role)
    command = ["ssh", *(["-F", str(config_file)] if config_file else []), "-o", "BatchMode=yes",
               alias, "cat", contract.IDE_MARKER]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CloudError(f"ssh {alias}: {exc}") from None
    try:
        marker = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        marker = None
    if not marker:
        raise CloudError(f"ssh {alias}: no JupyterLab answer ({result.stderr.strip()[-300:]})",
                         hint=f"devbox-build ec2 ssh-config --role {role} >> ~/.ssh/config; is "
                              f"the box up? devbox-build ec2 status")
    token = marker.get("token")
    out.print(marker["url"] + ("lab" if marker["url"].endswith("/") else "/lab")
              + (f"?token={token}" if token else ""))


@ec2_group.command("iam-policy")
@click.option("--for", "who", type=click.Choice(["user", "box"]), required=True,
              help="user: what running the ec2 commands needs; box: the instance role's.")
@boxes_option
@click.option("--bucket", "buckets", multiple=True, help="An S3 bucket the box reads and writes "
              "(repeat for more).")
@click.option("--kms-key", "kms_keys", multiple=True, help="A KMS key ARN that encrypts the "
              "volumes (a customer-managed key; repeat for more).")
def ec2_iam_policy_command(who, boxes_path, buckets, kms_keys):
    """Print a least-privilege IAM policy (JSON): for a person running `devbox-build ec2` (their
    own boxes, by the owner tag), or for the boxes' instance role (SSM, ECR reads, the buckets).

    \b
      devbox-build ec2 iam-policy --for user > devbox-user.json
      devbox-build ec2 iam-policy --for box --bucket team-data > devbox-box.json
    """
    from .targets.iam import box_policy, user_policy

    box = _checked_box(boxes_path)
    policy = (user_policy(box, kms_keys) if who == "user"
              else box_policy(box, buckets, kms_keys))
    click.echo(json.dumps(policy, indent=2))


# -- hub ----------------------------------------------------------------------------------------


def _verified(images, public_key: Path | None) -> dict[str, str]:
    """With a key: each image pinned to its verified digest (signing.verify_images); without:
    none."""
    if public_key is None:
        return {}
    from .signing import verify_images

    return verify_images(images, public_key)


@cli.group("hub")
def hub_group() -> None:
    """JupyterHub for a team: the built images as a hub's profiles."""


@hub_group.command("docker")
@click.argument("images", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=Path("devbox"), show_default=True, help="Folder to write to.")
@click.option("--network", default="devbox-hub", show_default=True,
              help="The Docker network the hub and the servers share.")
@click.option("--home-volume", default="devbox-home-{username}", show_default=True,
              help="Each user's home volume ({username} is theirs).")
@click.option("--idle-timeout", help="Each server stops itself (through the hub) after this "
              "long idle, by the image's watcher: 30m, 2h.")
@click.option("--cull-minutes", type=click.IntRange(1), help="Also run jupyterhub-idle-culler "
              "with this timeout (the watcher keeps busy servers from it).")
@click.option("--verify-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve only images signed by this public key (generate-key-pair's .pub), "
                   "each pinned to its verified digest (IMAGES name their registry).")
@json_option
def hub_docker_command(images, output, network, home_volume, idle_timeout, cull_minutes,
                       verify_key, as_json):
    """Write a JupyterHub configuration for DockerSpawner on one host, serving IMAGES (built
    images; the first is the default, more make a picker; a CUDA image gets the host's GPUs):
    jupyterhub_config.py (the same every time) and devbox-hub.json (the images by content tag,
    the network, the home volumes, idle settings). Include it from your own configuration,
    which adds the authenticator.

    \b
      devbox-build hub docker devbox/datascience:cpu devbox/datascience:gpu --idle-timeout 2h
    """
    from .checks.image import ImageUnderTest
    from .runtime.rules import RuleError, duration
    from .targets import prepare, write
    from .targets.hub import DockerHub, profile_for

    if idle_timeout:
        try:
            duration(idle_timeout, "--idle-timeout")
        except RuleError as exc:
            raise InputError(str(exc)) from None
    if "{username}" not in home_volume:
        raise InputError(f"--home-volume {home_volume!r} has no {{username}}: every user would "
                         "share one home")
    engine = Engine.connect()
    for ref in images:
        refs.check_reference(ref, "IMAGES")
    loaded = [ImageUnderTest.load(engine, ref) for ref in images]
    pinned = _verified(loaded, verify_key)
    target = DockerHub(network, home_volume, idle_timeout, cull_minutes, pinned)
    written = write(output, prepare(target, loaded))
    if as_json:
        out.print_json(data={"files": [str(p) for p in written],
                             "profiles": [profile_for(image, pinned.get(image.ref)).image
                                          for image in loaded]})
        return
    for path in written:
        err.print(f"[green]✓[/] wrote {path}")
    err.print("Include it from your jupyterhub_config.py, then add your authenticator:")
    out.print(f'load_subconfig("{output / "jupyterhub_config.py"}")')


@hub_group.command("k8s")
@click.argument("images", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("values.yaml"), show_default=True, help="The values file to write.")
@click.option("--idle-timeout", help="Each server stops itself (through the hub) after this "
              "long idle: 30m, 2h.")
@click.option("--cull-minutes", type=click.IntRange(1), help="The chart's culler timeout "
              "(default: the culler off; the image's watcher spares busy servers from it).")
@click.option("--gpu-node-selector", "gpu_nodes", multiple=True, callback=_key_value,
              metavar="KEY=VALUE", help="A label GPU nodes carry (repeatable).")
@click.option("--cpu", "cpu", default="0.5:2", show_default=True,
              help="CPU guarantee:limit per user.")
@click.option("--memory", "memory", default="1G:4G", show_default=True,
              help="Memory guarantee:limit per user.")
@click.option("--verify-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve only images signed by this public key (generate-key-pair's .pub), "
                   "each pinned to its verified digest (IMAGES name their registry).")
def hub_k8s_command(images, output, idle_timeout, cull_minutes, gpu_nodes, cpu, memory,
                    verify_key):
    """Write Zero to JupyterHub values for IMAGES (built images, pushed where the cluster pulls
    them with the same tags: `build --registry ... --push`): the image as its user (uid 1000,
    fsGid 100), jupyterhub-singleuser, the home mount, each image a profile (a CUDA image asks
    for nvidia.com/gpu on the GPU nodes), requests and limits, idle culling.

    \b
      devbox-build hub k8s devbox/datascience:cpu devbox/datascience:gpu \\
          --gpu-node-selector node.kubernetes.io/instance-type=g6.xlarge
      helm upgrade --install jhub jupyterhub/jupyterhub --values values.yaml
    """
    from .checks.image import ImageUnderTest
    from .runtime.rules import RuleError, duration
    from .targets import prepare, write
    from .targets.hub import KubernetesHub

    if idle_timeout:
        try:
            duration(idle_timeout, "--idle-timeout")
        except RuleError as exc:
            raise InputError(str(exc)) from None
    resources = {}
    for name, value, pattern in (("cpu", cpu, r"\d+(\.\d+)?"),
                                 ("memory", memory, r"\d+(\.\d+)?[KMGT]?")):
        parts = value.split(":")
        if len(parts) != 2 or not all(re.fullmatch(pattern, part) for part in parts):
            raise InputError(f"--{name} {value!r}: expected GUARANTEE:LIMIT, like "
                             + ("0.5:2" if name == "cpu" else "1G:4G"))
        guarantee, limit = (float(p) if name == "cpu" else p for p in parts)
        resources[name] = {"guarantee": guarantee, "limit": limit}
    engine = Engine.connect()
    for ref in images:
        refs.check_reference(ref, "IMAGES")
    loaded = [ImageUnderTest.load(engine, ref) for ref in images]
    target = KubernetesHub(gpu_nodes, resources, idle_timeout, cull_minutes, output.name,
                           _verified(loaded, verify_key))
    write(output.parent, prepare(target, loaded))
    err.print(f"[green]✓[/] wrote {output}")


# -- bootstrap-base -----------------------------------------------------------------------------


@cli.command("bootstrap-base")
@click.option("--tag", default="debian:bookworm-slim", show_default=True,
              help="Name for the imported image (what specs name as their base).")
@click.option("--suite", default="bookworm", show_default=True, help="Debian suite.")
@click.option("--mirror", help="Debian mirror URL. Default: the first one in this machine's apt sources.")
@click.option("--if-missing", is_flag=True, help="Do nothing when TAG already exists.")
@click.option("--platform", type=click.Choice(["linux/amd64", "linux/arm64"]),
              help="Another platform than the engine's (under emulation): the image is named "
                   "TAG-ARCH (debian:bookworm-slim-arm64), which builds for that platform use.")
def bootstrap_base_command(tag, suite, mirror, if_missing, platform):
    """Build a Debian base image from a mirror (debootstrap + import), for machines that
    cannot pull from a registry. Needs root and debootstrap; takes about a minute (arm64
    under emulation: about as long).

    \b
      devbox-build bootstrap-base
      devbox-build bootstrap-base --platform linux/arm64
    """
    from .bootstrap import bootstrap_base

    engine = Engine.connect()
    name = tag if platform in (None, engine.platform()) else refs.platform_twin(tag, platform)
    if if_missing and (existing := engine.image_id(name)):
        err.print(f"[green]✓[/] {name} exists ({existing[:19]})")
        return
    started = time.monotonic()
    image_id = bootstrap_base(engine, tag, suite=suite, mirror=mirror, platform=platform,
                              reporter=reporter)
    err.print(f"[green]✓[/] {name} ({image_id[:19]}, {platform or engine.platform()}) in "
              f"{time.monotonic() - started:.0f} s")


# Tags the builds of this run applied, for a true message when the run is interrupted.


def _interrupt(signum, _frame) -> None:
    raise Interrupted(signum)


def main() -> None:
    # Set, not inherited: a shell that starts a background job without job control makes it
    # ignore SIGINT, and Python then never raises KeyboardInterrupt, so Ctrl-C (or a CI runner's
    # SIGINT) would let a build run on and tag. SIGTERM (docker stop, CI cancel) acts the same.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(standalone_mode=False)
    except DevboxError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[yellow]hint:[/] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except (Interrupted, KeyboardInterrupt, click.exceptions.Abort) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        message = "nothing was tagged" if not reporter.finished else (
            "the work in progress left nothing half-done; finished before it: "
            + ", ".join(reporter.finished))
        err.print(f"interrupted ({signal.Signals(signum).name}): {message}")
        sys.exit(128 + signum)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
