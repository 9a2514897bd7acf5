"""One reporter for what every command says while it works: on stderr, with CI log groups.

Library code takes a :class:`Reporter` (``SILENT`` by default, and under ``--json``) and says:

    with reporter.group(title):   a block of work: folded in CI logs, a bold header elsewhere
    reporter.note(text)           what the tool itself does (always shown, with the time)
    reporter.step(layer, n, total, text)   a build step the engine runs
    reporter.output(line)         a tool's or the engine's own output (shown with --verbose)
    reporter.item(mark, text)     one finished thing: a lock written, a check, an image built

Log groups: GitHub Actions (``::group::``), Azure Pipelines (``##[group]``) and GitLab CI
(collapsed sections), found from the environment; markup off in CI, where it would hide them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

MARKS = {"ok": "[green]✓[/]", "fail": "[red]✗[/]", "skip": "[yellow]-[/]",
         "error": "[red]![/]", "note": "[dim]·[/]"}


def ci_kind(environ: Mapping[str, str]) -> str | None:
    """The CI service whose log groups to write, or None."""
    if environ.get("GITHUB_ACTIONS") == "true":
        return "github"
    if environ.get("TF_BUILD") == "True":
        return "azure"
    if environ.get("GITLAB_CI") == "true":
        return "gitlab"
    return None


class Reporter:
    def __init__(self, *, verbose: bool = False, quiet: bool = False,
                 environ: Mapping[str, str] | None = None, console=None) -> None:
        self.verbose, self.quiet = verbose, quiet
        self.ci = ci_kind(os.environ if environ is None else environ)
        self._console = console
        self.started = time.monotonic()
        self.finished: list[str] = []  # what completed (an interruption names it)
        self._depth = 0

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True,
                                    no_color=self.ci is not None)
        return self._console

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def _raw(self, text: str) -> None:
        """A CI marker, printed as is: no markup, no wrapping."""
        if not self.quiet:
            self.console.out(text, highlight=False)

    @contextmanager
    def group(self, title: str) -> Iterator[None]:
        from rich.markup import escape

        self.started = time.monotonic()
        nested = self._depth > 0  # CI services fold one level
        self._depth += 1
        section = f"devbox_{int(time.time())}_{re.sub(r'[^a-z0-9]+', '_', title.lower())[:40]}"
        if self.ci == "github" and not nested:
            self._raw(f"::group::{title}")
        elif self.ci == "azure" and not nested:
            self._raw(f"##[group]{title}")
        elif self.ci == "gitlab" and not nested:
            self._raw(f"\x1b[0Ksection_start:{int(time.time())}:{section}[collapsed=true]"
                      f"\r\x1b[0K{title}")
        else:
            self._print(f"[bold]{escape(title)}[/]")
        try:
            yield
        finally:
            self._depth -= 1
            if self.ci == "github" and not nested:
                self._raw("::endgroup::")
            elif self.ci == "azure" and not nested:
                self._raw("##[endgroup]")
            elif self.ci == "gitlab" and not nested:
                self._raw(f"\x1b[0Ksection_end:{int(time.time())}:{section}\r\x1b[0K")

    def _elapsed(self) -> str:
        return f"[dim]{time.monotonic() - self.started:6.1f}s[/]"

    def note(self, text: str) -> None:
        from rich.markup import escape

        self._print(f"  {self._elapsed()} {'':>8}       {escape(text)}")

    def step(self, layer: str, number: int, total: int, text: str) -> None:
        from rich.markup import escape

        text = text if len(text) < 90 else text[:87] + "..."
        self._print(f"  {self._elapsed()} [cyan]{layer:>8}[/] {number:>2}/{total} "
                    f"{escape(text)}")

    def output(self, line: str) -> None:
        from rich.markup import escape

        if self.verbose:
            self._print(f"           [dim]│ {escape(line)}[/]")

    def item(self, mark: str, text: str, *, seconds: float | None = None,
             detail: str = "", finished: list[str] = ()) -> None:
        """One finished thing; ``detail`` lines are indented under it; ``finished`` names what
        it completed (tags, files) for an interruption's message."""
        from rich.markup import escape

        self.finished.extend(finished)
        took = f" [dim]{seconds:.1f}s[/]" if seconds is not None else ""
        self._print(f"{MARKS[mark]} {escape(text)}{took}")
        for line in detail.splitlines()[:12]:
            self._print(f"      {escape(line)}")


SILENT = Reporter(quiet=True)
