"""The README stays a short front door and the docs site stays whole (`make docs` checks links and docstrings)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

import kerasbn
from kerasbn_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 15_000  # bytes: the front door, not the manual


def _nav_pages(entries: list) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify, which MkDocs uses for anchors.
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def _public_functions() -> list[str]:
    return sorted(name for name in kerasbn._PUBLIC if inspect.isfunction(getattr(kerasbn, name)))


def test_readme_is_short():
    assert len(README.read_bytes()) <= README_LIMIT


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_ext" not in p.parts)
    assert sorted(nav) == pages
    assert len(nav) == len(set(nav))


def test_api_reference_renders_every_public_name():
    page = (DOCS / "reference" / "api.md").read_text()
    rendered = re.findall(r"^::: kerasbn\.(\w+)$", page, flags=re.M)
    assert sorted(rendered) == sorted([*kerasbn._PUBLIC, "BatchNormalization"])


@pytest.mark.parametrize("command", sorted(main.commands))
def test_readme_shows_every_command(command):
    assert re.search(rf"^kerasbn {command} ", README.read_text(), flags=re.M), command


@pytest.mark.parametrize("function", _public_functions())
def test_readme_shows_every_public_function(function):
    assert f"kerasbn.{function}(" in README.read_text()


def test_readme_links_to_files_and_headings_that_exist():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#([^)]+))?\)", README.read_text())
    assert links
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            assert anchor in _anchors(path), f"{target}#{anchor}"
