"""docs/support.md shows the matrix the suite runs, and the README links it: they cannot drift."""

from __future__ import annotations

from pathlib import Path

from tests.paths import support

README = Path(__file__).resolve().parents[2] / "README.md"


def test_support_page_is_the_matrix():
    assert support.generated_block(support.PAGE.read_text()) == support.table(), (
        "docs/support.md differs from tests/paths/test_matrix.py; run python -m tests.paths.support"
    )


def test_readme_support_table_names_every_model_kind_and_links_the_matrix():
    text = README.read_text()
    section = text[text.index("## What is supported") :].split("\n## ")[0]
    assert "docs/support.md" in section
    row = next(line for line in section.splitlines() if line.startswith("| model kinds"))
    for word in ("Sequential", "functional", "nested", "multi-input", "subclassed", "keras.applications", "keras-hub"):
        assert word in row, word
