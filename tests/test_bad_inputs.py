"""Bad inputs and faults: each is one clear error naming the file, key or step, an exit code
that says which kind of failure (errors.py), no traceback, and nothing half-done.

The cases are data: ``CASES`` below is also the table in docs/reference.md's reliability section
(test_readme_table_lists_every_case keeps the two equal). Cases that need no engine run with
DOCKER_HOST pointing nowhere, which also proves they are refused before any engine work: an
engine call would exit 4, not 2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT, TINY, assert_clean_error, cli

NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as the reference's table says it
    args: tuple[str, ...]  # {stack} is the test's copy of the tiny stack
    code: int
    needles: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    engine: bool = False  # needs the real engine (else DOCKER_HOST points nowhere)
    absent: tuple[str, ...] = ()  # must not be printed (a secret's value, a neighbour's name)
    unchanged: tuple[str, ...] = ()  # files (relative to the stack) that must stay as they were
    env: dict = field(default_factory=dict)


def edit(old: str, new: str, file: str = "image.toml") -> Callable[[Path], None]:
    def apply(stack: Path) -> None:
        path = stack / file
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))
    return apply


def env_line(line: str) -> Callable[[Path], None]:
    return edit("[env]\n", f"[env]\n{line}\n")


def append(text: str) -> Callable[[Path], None]:
    def apply(stack: Path) -> None:
        (stack / "image.toml").write_text((stack / "image.toml").read_text() + text)
    return apply


def write(relative: str, data: str | bytes) -> Callable[[Path], None]:
    def apply(stack: Path) -> None:
        path = stack / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return apply


def cut_lock(relative: str, keep_lines: int) -> Callable[[Path], None]:
    """A lock cut at a line boundary, as a bad merge leaves it."""
    def apply(stack: Path) -> None:
        path = stack / relative
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep_lines]))
    return apply


PIP = "locks/linux-amd64/pip.txt"
BUILD = ("build", "{stack}", "--variant", "cpu")
LOCK_CHECK = ("lock", "{stack}", "--check")

CASES = [
    # -- the spec: every free-text field has a precise rule (exit 2) ---------------------------
    Case("env-key-injects-a-step", "`[env]` key holding `\\nRUN touch /pwned`", BUILD, 2,
         ("key 'env.", "not an environment variable name"),
         env_line('"A\\nRUN touch /pwned" = "x"')),
    Case("label-key-injects-a-step", "`[labels]` key holding `\\nRUN touch /pwned`", BUILD, 2,
         ("key 'labels.", "not a label key"), append('[labels]\n"a\\nRUN touch /pwned" = "x"\n')),
    Case("env-key-with-space", "`[env]` key `\"A B\"` (would become `A=B=x`)", BUILD, 2,
         ("key 'env.\"A B\"'", "not an environment variable name"), env_line('"A B" = "x"')),
    Case("env-value-newline", "`[env]` value with a newline", BUILD, 2,
         ("key 'env.A'", "newline or control character"), env_line('A = "x\\ny"')),
    Case("label-value-newline", "label value with a newline", BUILD, 2,
         ("key 'labels.team'", "newline or control character"),
         append('[labels]\nteam = "a\\nRUN touch /pwned"\n')),
    Case("description-newline", "`description` with a newline", BUILD, 2,
         ("key 'description'", "newline"), edit('description = "devbox-build test stack"',
                                                 'description = "a\\nRUN touch /pwned"')),
    Case("user-name-shell", "`user.name` = `x; touch /pwned`", BUILD, 2,
         ("key 'user.name'", "not a user name"), append('[user]\nname = "x; touch /pwned"\n')),
    Case("user-home-space", "`user.home` with a space", BUILD, 2,
         ("key 'user.home'", "not an absolute path"), append('[user]\nhome = "/home/a b"\n')),
    Case("user-shell-relative", "`user.shell` = `bash` (relative)", BUILD, 2,
         ("key 'user.shell'", "not an absolute path"), append('[user]\nshell = "bash"\n')),
    Case("conda-prefix-shell", "`conda.prefix` = `/opt/conda; rm -rf /`", BUILD, 2,
         ("key 'conda.prefix'", "not an absolute path"),
         append('[conda]\nenvironment = "environment.yml"\nprefix = "/opt/conda; rm -rf /"\n')),
    Case("conda-glibc", "`conda.glibc` = `2.36; id`", BUILD, 2, ("key 'conda.glibc'",),
         append('[conda]\nenvironment = "environment.yml"\nglibc = "2.36; id"\n')),
    Case("idle-timeout-word", "`[idle]` timeout = `soon`", BUILD, 2,
         ("key 'idle.timeout'", "not a duration"), append('[idle]\ntimeout = "soon"\n')),
    Case("idle-action-unknown", "`[idle]` action = `halt`", BUILD, 2,
         ("key 'idle.action'",), append('[idle]\naction = "halt"\n')),
    Case("idle-interval-zero", "`[idle]` interval = `0`", BUILD, 2,
         ("key 'idle.interval'", "must be more than 0"), append('[idle]\ninterval = "0"\n')),
    Case("idle-ignore-shell", "`[idle]` ignore = [`x; rm -rf ~`]", BUILD, 2,
         ("key 'idle.ignore.0'", "not a process name"), append('[idle]\nignore = ["x; rm -rf ~"]\n')),
    Case("layers-own-unlocked", "`[layers]` own = [`nmupy`] (in no lock)", BUILD, 2,
         ("key 'layers.own'", "'nmupy' is in none of the spec's pip locks"),
         append('[layers]\nown = ["nmupy"]\n')),
    Case("layers-budget-too-high", "`[layers]` max_per_lock = 200", BUILD, 2,
         ("key 'layers.max_per_lock'", "less than or equal to 24"),
         append('[layers]\nmax_per_lock = 200\n')),
    Case("cuda-min-driver-shell", "`cuda.min_driver` = `580; id`", BUILD, 2,
         ("key 'variants.gpu.cuda.min_driver'", "not a driver version"),
         edit('min_driver = "525.60.13"', 'min_driver = "580; id"')),
    Case("base-not-a-reference", "variant base `Not A Ref!!`", BUILD, 2,
         ("key 'variants.cpu.base'", "not an image reference"),
         edit('base = "debian:bookworm-slim"', 'base = "Not A Ref!!"')),
    Case("repository-not-a-repository", "`repository` = `Bad Repo`", BUILD, 2,
         ("key 'repository'", "not an image repository"),
         edit('repository = "devbox-test/', 'repository = "Bad Repo/')),
    Case("extends-with-tag", "`extends` = `team/image:cpu` (a tag)", LOCK_CHECK, 2,
         ("key 'extends'",), edit('python = "3.11"', 'python = "3.11"\nextends = "team/image:cpu"')),
    Case("reserved-label", "label `devbox.variant` (set by the tool)", BUILD, 2,
         ("key 'labels'", "set by devbox-build"), append('[labels]\n"devbox.variant" = "x"\n')),
    Case("env-proxy", "`[env]` `HTTPS_PROXY`", BUILD, 2,
         ("key 'env.HTTPS_PROXY'", "never baked"), env_line('HTTPS_PROXY = "http://proxy:3128"')),
    Case("env-url-password", "`[env]` URL with `user:password@`", BUILD, 2,
         ("key 'env.PIP_INDEX_URL'", "a password in a URL", "<masked"),
         env_line('PIP_INDEX_URL = "https://alice:s3cr3tpass@example.com/simple"'),
         absent=("s3cr3tpass",)),
    Case("env-github-token", "`[env]` value that is a GitHub token", BUILD, 2,
         ("key 'env.GH'", "a GitHub token", "<masked"),
         env_line('GH = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"'),
         absent=("ghp_abcdefghijklmnopqrstuvwxyz0123456789",)),
    Case("env-aws-key", "`[env]` AWS access key id", BUILD, 2, ("an AWS access key id", "<masked"),
         env_line('KEY_ID = "AKIAIOSFODNN7EXAMPLE"'), absent=("AKIAIOSFODNN7EXAMPLE",)),
    Case("env-secret-name", "`[env]` `API_TOKEN = \"...\"` (secret by its name)", BUILD, 2,
         ("key 'env.API_TOKEN'", "a secret by its name"), env_line('API_TOKEN = "abc123xyz"'),
         absent=("abc123xyz",)),
    Case("label-credential", "label value with `user:password@`", BUILD, 2,
         ("key 'labels'", "a password in a URL"),
         append('[labels]\nsource = "https://bob:hunter2hunter2@git.example.com/x"\n'),
         absent=("hunter2hunter2",)),
    Case("spec-not-utf8", "image.toml that is not UTF-8", BUILD, 2, ("not UTF-8",),
         write("image.toml", b'name = "d\xe9mo"\n')),
    Case("spec-malformed-toml", "image.toml that is not TOML", BUILD, 2, ("malformed TOML",),
         write("image.toml", "name = \n")),
    Case("spec-unknown-key", "unknown key in image.toml", BUILD, 2, ("unknown key 'colour'",),
         edit('name = "tiny"', 'name = "tiny"\ncolour = "blue"')),
    Case("python-3.99", "`python = \"3.99\"` (no base provides it)", ("lock", "{stack}"), 2,
         ("key 'python'", "not provided by any base"),
         edit('python = "3.11"', 'python = "3.99"')),
    Case("python-not-the-base", "`python = \"3.12\"` on `debian:bookworm-slim` (3.11)",
         ("lock", "{stack}"), 2, ("key 'python'", "provides Python 3.11"),
         edit('python = "3.11"', 'python = "3.12"')),
    Case("spec-not-found", "a spec name that does not exist", ("build", "no-such-image"), 2,
         ("no image spec named 'no-such-image'",)),
    Case("variant-unknown", "`--variant tpu`", ("build", "{stack}", "--variant", "tpu"), 2,
         ("no variant 'tpu'",)),
    # -- flags and references, checked before any engine work (exit 2) -------------------------
    Case("tag-bad", "`--tag 'bad tag!'`", (*BUILD, "--tag", "bad tag!"), 2,
         ("--tag: 'bad tag!' is not a valid tag",)),
    Case("tag-with-colon", "`--tag a:b`", (*BUILD, "--tag", "a:b"), 2, ("a tag has no ':'",)),
    Case("registry-bad", "`--registry 'Bad Registry/NS'`",
         (*BUILD, "--registry", "Bad Registry/NS", "--push"), 2,
         ("--registry: 'Bad Registry/NS' is not a registry",)),
    Case("platform-unknown", "`--platform linux/s390x`", (*BUILD, "--platform", "linux/s390x"), 2,
         ("--platform: 'linux/s390x' is not one of linux/amd64, linux/arm64",)),
    Case("platform-not-locked", "`--platform linux/arm64`, the spec locks only linux/amd64",
         (*BUILD, "--platform", "linux/arm64"), 2,
         ("key 'platforms': --platform linux/arm64, but the spec locks only linux/amd64",)),
    Case("push-without-registry", "`--push` without `--registry`", (*BUILD, "--push"), 2,
         ("--push needs a registry",)),
    Case("inspect-bad-ref", "`inspect 'Bad Ref!!'`", ("inspect", "Bad Ref!!"), 2,
         ("REF: 'Bad Ref!!' is not an image reference",)),
    Case("check-bad-ref", "`check 'Bad Ref!!'`", ("check", "Bad Ref!!"), 2,
         ("not an image reference",)),
    Case("check-unknown-profile", "`check --profile nope`",
         ("check", "devbox/x:cpu", "--profile", "nope"), 2, ("unknown check profile 'nope'",)),
    Case("unknown-option", "an unknown option (`build --colour`)", (*BUILD, "--colour"), 2,
         ("No such option",)),
    # -- CA certificates (exit 2) --------------------------------------------------------------
    Case("ca-private-key", "`--ca-cert` PEM that also holds a private key",
         (*BUILD, "--ca-cert", "{stack}/corp.pem"), 2, ("holds a private key",),
         write("corp.pem", PEM_KEY), absent=("MIIB",)),
    Case("ca-glob-no-match", "`--ca-cert` glob that matches nothing",
         (*BUILD, "--ca-cert", "{stack}/certs/*.crt"), 2, ("--ca-cert: no file matches",)),
    Case("ca-missing-file", "`--ca-cert` file that does not exist",
         (*BUILD, "--ca-cert", "{stack}/none.crt"), 2, ("--ca-cert: file not found",)),
    Case("ca-not-pem", "`--ca-cert` file that is not a certificate",
         (*BUILD, "--ca-cert", "{stack}/corp.crt"), 2, ("not a PEM certificate",),
         write("corp.crt", "hello\n")),
    Case("ca-spec-private-key", "spec `ca_certificates` file with a private key", BUILD, 2,
         ("key 'ca_certificates'", "holds a private key"),
         lambda stack: (write("corp.pem", PEM_KEY)(stack),
                        edit('python = "3.11"', 'python = "3.11"\nca_certificates = ["corp.pem"]')(stack))),
    # -- locks (exit 3) ------------------------------------------------------------------------
    Case("lock-cut-check", "a lock cut at a line boundary: `lock --check`", LOCK_CHECK, 3,
         ("pip.txt: edited",), cut_lock(PIP, 8), absent=("dev.txt",)),
    Case("lock-cut-build", "a lock cut at a line boundary: `build --allow-stale`",
         (*BUILD, "--allow-stale"), 3, ("pip.txt: edited", "devbox-build lock"), cut_lock(PIP, 8)),
    Case("lock-pin-edited", "a pin edited by hand (reported as that file, not its neighbour)",
         LOCK_CHECK, 3, ("pip.txt: edited",), edit("six==1.17.0", "six==1.16.0", PIP),
         absent=("dev.txt",)),
    Case("lock-missing", "a lock file deleted", BUILD, 3, ("missing lock", "pip.txt"),
         lambda stack: (stack / PIP).unlink()),
    Case("lock-stale", "an input changed since locking", BUILD, 3,
         ("stale", "dev.txt", "devbox-build lock"), write("dev.in", "iniconfig\npluggy\n")),
    Case("lock-hint-names-the-path", "hint for a spec given as a path", BUILD, 3,
         ("hint: run: devbox-build lock /",), write("dev.in", "iniconfig\npluggy\n")),
    # -- the engine (exit 4) -------------------------------------------------------------------
    Case("no-engine", "no engine answers (`DOCKER_HOST` nowhere)", BUILD, 4,
         ("no Docker engine reachable", "DOCKER_HOST")),
    Case("inspect-missing-image", "`inspect` an image the engine does not have",
         ("inspect", "devbox-test/no-such-image:cpu"), 4, ("no image",), engine=True),
    Case("sagemaker-not-devbox", "`sagemaker config` on an image not built by devbox-build",
         ("sagemaker", "config", "debian:bookworm-slim", "--role-arn",
          "arn:aws:iam::123456789012:role/R", "--image-uri", "1.dkr.ecr.us-east-1.amazonaws.com/x:1",
          "-o", "{stack}/sm"), 2, ("not built by devbox-build",), engine=True,
         absent=("create-image.json",)),
]


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(TINY, target)
    (target / "environment.yml").write_text("channels: [conda-forge]\ndependencies: [python]\n")
    return target


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, stack: Path, request):
    if case.engine:
        request.getfixturevalue("engine")
    if case.setup:
        case.setup(stack)
    before = {name: (stack / name).read_bytes() for name in case.unchanged}
    args = [arg.replace("{stack}", str(stack)) for arg in case.args]
    result = cli(*args, env={**({} if case.engine else NO_ENGINE), **case.env})
    if case.id == "unknown-option":  # click's own usage error: not ours to word
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    else:
        assert_clean_error(result, *case.needles)
    assert result.returncode == case.code, result.stderr
    for text in case.absent:
        assert text not in result.stderr + result.stdout, f"{text!r} was printed"
    for name, data in before.items():
        assert (stack / name).read_bytes() == data, f"{name} changed"
    if case.id == "sagemaker-not-devbox":
        assert not (stack / "sm").exists(), "an incomplete registration was written"


def test_disk_full_while_writing_a_lock_keeps_the_old_lock(stack, tmp_path):
    """ENOSPC from a real (tiny) tmpfs: one error naming the lock, the old lock intact."""
    mount = tmp_path / "full"
    mount.mkdir()
    locks = stack / "locks"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    try:
        shutil.copytree(locks, mount / "locks")
        with (mount / "filler").open("wb", buffering=0) as handle:  # fill the disk
            try:
                while True:
                    handle.write(b"\0" * 512)
            except OSError:
                pass
        shutil.rmtree(locks)
        os.symlink(mount / "locks", locks)
        before = (locks / "linux-amd64" / "dev.txt").read_bytes()
        (stack / "dev.in").write_text("iniconfig\npluggy\n")  # dev.txt must be rewritten
        result = cli("lock", str(stack))
        assert_clean_error(result, "cannot write", "dev.txt", "No space left on device")
        assert result.returncode == 3
        assert (locks / "linux-amd64" / "dev.txt").read_bytes() == before
        assert not [p for p in (locks / "linux-amd64").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_readme_table_lists_every_case():
    """The reference's reliability table is this file's CASES (and the fault tests below it)."""
    readme = (ROOT / "docs" / "reference.md").read_text()
    section = readme.split("<!-- bad-inputs:start -->", 1)[1].split("<!-- bad-inputs:end -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [readme_row(case) for case in CASES]
    assert rows[:len(expected)] == expected, "docs/reference.md table out of date; expected:\n" + "\n".join(
        expected)
    # The rows after the cases name fault tests elsewhere; each must exist.
    for row in rows[len(expected):]:
        test = re.search(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert test, row
        assert f"def {test[2]}(" in (ROOT / test[1]).read_text(), row
    assert len(rows) >= 40


def readme_row(case: Case) -> str:
    words = " … ".join(case.needles).replace("|", "\\|")
    return f"| `{case.id}` | {case.what} | {case.code} | {words} |"


def test_check_list_needs_no_image():
    """`check --help` points to `check --list`, which must work without an image."""
    result = cli("check", "--list", env=NO_ENGINE)
    assert result.returncode == 0, result.stderr
    assert "sagemaker-training" in result.stdout and "drift" in result.stdout


def test_the_exit_codes_are_one_table_in_help_readme_and_errors():
    """errors.EXIT_CODES is the only table: `--help`, the reference and every error class
    agree."""
    from devbox_build import errors

    readme = (ROOT / "docs" / "reference.md").read_text()
    section = readme.split("<!-- exit-codes:start -->", 1)[1].split("<!-- exit-codes:end -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [f"| {code} | {meaning} |" for code, meaning in errors.EXIT_CODES.items()]
    help_text = " ".join(cli("--help").stdout.split())
    assert " ".join(errors.exit_codes_help().split()) in help_text
    for cls in (errors.ChecksFailed, errors.InputError, errors.LockError, errors.EngineError,
                errors.BuildFailed, errors.CloudError, errors.NotVerified):
        assert cls.exit_code in errors.EXIT_CODES
    assert "--check  exit 3" in help_text or "--check exit 3" in help_text
    assert cli("lock", str(ROOT / "tests/stacks/tiny"), "--check").returncode == 0
