"""Progress only on a terminal; plain text, no escape codes, when piped."""

from __future__ import annotations

import sys

from kerasbn_cli import render
from tests.cli.conftest import invoke


def test_progress_only_on_a_terminal(monkeypatch, capsys):
    with render.progress(False) as step:
        step("Loading tiny.keras")
    assert capsys.readouterr() == ("", "")

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with render.progress(True) as step:  # --quiet
        step("Loading tiny.keras")
    assert capsys.readouterr() == ("", "")

    with render.progress(False) as step:  # rich draws the last status when it stops: no wait needed
        step("Loading tiny.keras")
    captured = capsys.readouterr()
    assert "Loading tiny.keras…" in captured.err
    assert captured.out == ""


def test_piped_output_has_no_escape_codes(model_files):
    for args in (["audit", model_files["keras"]], ["audit", model_files["keras"], "--format", "markdown"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        assert "\x1b[" not in result.output
