"""The one reporter: CI log groups for GitHub Actions, Azure Pipelines and GitLab, a header
elsewhere, quiet under --json, and the record of what finished (an interruption names it)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from devbox_build.report import Reporter


def recorded(environ: dict, **kwargs) -> tuple[Reporter, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, no_color=True, highlight=False, soft_wrap=True)
    return Reporter(environ=environ, console=console, **kwargs), buffer


@pytest.mark.parametrize("environ, opening, closing", [
    ({"GITHUB_ACTIONS": "true"}, "::group::building x", "::endgroup::"),
    ({"TF_BUILD": "True"}, "##[group]building x", "##[endgroup]"),
    ({"GITLAB_CI": "true"}, "section_start:", "section_end:"),
    ({}, "building x", None),
])
def test_a_group_folds_in_ci_and_is_a_header_elsewhere(environ, opening, closing):
    reporter, buffer = recorded(environ)
    with reporter.group("building x"):
        with reporter.group("inner"):  # CI services fold one level: a header inside
            reporter.note("a note")
    lines = buffer.getvalue().splitlines()
    assert opening in lines[0]
    assert any("inner" in line for line in lines[1:-1])
    assert "a note" in lines[-2 if closing else -1]
    if closing:
        assert closing in lines[-1]
        assert sum(closing in line for line in lines) == 1


def test_output_only_when_verbose_and_nothing_when_quiet():
    reporter, buffer = recorded({})
    reporter.output("engine line")
    assert buffer.getvalue() == ""
    reporter.verbose = True
    reporter.output("engine line")
    assert "│ engine line" in buffer.getvalue()
    quiet, buffer = recorded({}, quiet=True, verbose=True)
    quiet.note("x")
    quiet.item("ok", "y", finished=["tag"])
    assert buffer.getvalue() == "" and quiet.finished == ["tag"]


def test_an_item_shows_its_mark_time_and_detail_and_keeps_what_finished():
    reporter, buffer = recorded({})
    reporter.item("fail", "user [1000]", seconds=1.25, detail="line 1\nline 2",
                  finished=["a:cpu", "a:cpu-0123"])
    assert buffer.getvalue().splitlines() == ["✗ user [1000] 1.2s", "      line 1",
                                              "      line 2"]
    assert reporter.finished == ["a:cpu", "a:cpu-0123"]
