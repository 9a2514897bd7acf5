"""Contract checks: prove an image keeps the laptop, EC2 and SageMaker promises.

The checks are ordinary pytest-testinfra tests grouped in profiles (``profiles/<name>.py``) and
served by a pytest plugin (:mod:`.plugin`) whose fixtures users can use in their own tests.
:func:`run_checks` is what ``devbox-build check`` calls: it picks the profiles, runs pytest in
this process, and returns one :class:`CheckOutcome` per check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..engine import Engine
from ..errors import DevboxError
from ..report import SILENT, Reporter
from .image import ImageUnderTest

PROFILES_DIR = Path(__file__).parent / "profiles"
PROFILES: dict[str, str] = {
    "base": "user 1000:100 and its home, non-root default, ids <= 65535, exec-form entrypoint, "
            "no secrets or proxies (shown masked), no private key in the CA store",
    "drift": "installed Python and Debian packages are exactly the lock's full closure; every "
             "dependency installed (pip check); the SBOM lists exactly what is installed",
    "jupyter": "laptop mode: JupyterLab at / on 8888 behind a token; healthcheck; quick stop",
    "sagemaker-studio": "Studio mode: /jupyterlab/default without a token, empty home volume, "
                        "sudo, idle-shutdown extension",
    "sagemaker-training": "`train` with /opt/ml: model written, failures reported, SIGTERM "
                          "forwarded; as root and as the user",
    "hub": "under a JupyterHub spawner's variables: jupyterhub-singleuser at /user/NAME/, the "
           "hub's OAuth login, nothing at the laptop URL",
    "gpu": "no driver baked in, CUDA labels, starts without a GPU; sees the GPU when there is one",
}


@dataclass(frozen=True)
class CheckOutcome:
    profile: str  # a built-in profile's name, or the test file of a user's own check
    name: str
    description: str
    outcome: str  # passed, failed, skipped
    seconds: float
    message: str = ""


def profile_path(name: str) -> Path:
    if name not in PROFILES:
        raise DevboxError(f"unknown check profile {name!r} (profiles: {', '.join(PROFILES)})")
    return PROFILES_DIR / f"{name.replace('-', '_')}.py"


def applicable_profiles(image: ImageUnderTest) -> list[str]:
    """The profiles that apply to what the image is: the default of ``devbox-build check``."""
    profiles = ["base"]
    if image.manifest is not None:  # built by devbox-build: it has a lock and the entrypoint
        profiles += ["drift", "sagemaker-training"]
    if image.has_jupyterlab:
        profiles += ["jupyter", "sagemaker-studio"]
    if "jupyterhub" in image.pip_packages:
        profiles.append("hub")
    if image.cuda_version:
        profiles.append("gpu")
    return [name for name in PROFILES if name in profiles]


# A check's outcome as the reporter marks it.
MARKS = {"passed": "ok", "failed": "fail", "skipped": "skip"}


class _Collector:
    """pytest plugin object: turns test reports into CheckOutcomes as they arrive."""

    def __init__(self, reporter: Reporter) -> None:
        self.outcomes: list[CheckOutcome] = []
        self.reporter = reporter
        self.descriptions: dict[str, str] = {}
        self.collection_errors: list[str] = []

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            doc = " ".join((getattr(item, "function", None).__doc__ or item.name).split())
            callspec = getattr(item, "callspec", None)
            self.descriptions[item.nodeid] = f"{doc} [{callspec.id}]" if callspec else doc

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.collection_errors.append(f"{report.nodeid}: {report.longreprtext}")

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            if report.when == "teardown" and report.outcome == "passed":
                return
            self._record(report)

    def _record(self, report) -> None:
        path, _, name = report.nodeid.partition("::")
        stem = Path(path).stem
        profile = stem.replace("_", "-") if Path(path).parent.name == "profiles" else path
        if report.skipped:
            message = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        elif report.failed:
            message = _failure_message(report)
        else:
            message = ""
        outcome = CheckOutcome(
            profile=profile, name=name,
            description=self.descriptions.get(report.nodeid, name),
            outcome=report.outcome, seconds=report.duration,
            message=message.removeprefix("Skipped: "),
        )
        self.outcomes.append(outcome)
        self.reporter.item(MARKS[outcome.outcome], f"{profile:<18} {outcome.description}",
                           seconds=outcome.seconds,
                           detail="" if outcome.outcome == "passed" else outcome.message)


def _failure_message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        # An assertion's own message, without pytest's rewritten "assert ..." explanation.
        message = crash.message.removeprefix("AssertionError: ").removeprefix("Failed: ")
        return message.split("\nassert ")[0].strip()
    return str(report.longrepr).strip().splitlines()[-1]


def run_checks(
    ref: str,
    profiles: list[str] | None = None,
    *,
    extra_tests: list[Path] = (),
    junit_xml: Path | None = None,
    reporter: Reporter = SILENT,
    engine: Engine | None = None,
) -> tuple[list[str], list[CheckOutcome], float]:
    """Check image ``ref``; returns (profiles run, outcomes, seconds).

    ``profiles`` None means those that apply to the image. ``extra_tests`` are the user's own
    test files or folders, run with the same fixtures.
    """
    engine = engine or Engine.connect()
    image = ImageUnderTest.load(engine, ref)
    chosen = profiles if profiles is not None else applicable_profiles(image)
    paths = [str(profile_path(name)) for name in chosen]
    for extra in extra_tests:
        if not Path(extra).exists():
            raise DevboxError(f"--tests {extra}: no such file or folder")
        paths.append(str(extra))
    args = [
        *paths, "--devbox-image", ref,
        "-p", "no:cacheprovider", "-p", "no:terminal",
        # The profiles carry no config of their own; do not pick up the caller's ini addopts.
        "-c", str(PROFILES_DIR / "pytest.ini"), "--rootdir", str(PROFILES_DIR.parent),
    ]
    if junit_xml is not None:
        args.append(f"--junitxml={junit_xml}")
    collector = _Collector(reporter)
    started = time.monotonic()
    code = pytest.main(args, plugins=[collector])
    if collector.collection_errors:
        raise DevboxError("cannot load the checks: " + "; ".join(collector.collection_errors))
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and not collector.outcomes:
        raise DevboxError(f"the check run did not start (pytest exit code {int(code)})")
    return chosen, collector.outcomes, time.monotonic() - started
