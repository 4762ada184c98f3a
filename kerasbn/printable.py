"""The one protocol every record of the package follows: it says what it shows, `kerasbn.report` draws it.

A record (a report, a check result) is a dataclass beside the code that
produces it. It subclasses `Printable` and defines two methods: ``to_dict()``
(JSON-ready) and ``view()`` (its `Table` sections and lines of text, in
order). From the view, `kerasbn.report` draws the same content three ways:
``str(record)`` (plain text, what ``print`` shows), ``__rich__`` (the CLI's
tables) and ``to_markdown()``. A record never imports rich or the rendering
module at module level, so the fold engine does not depend on presentation.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Table:
    """One table of a record's view.

    Attributes:
        title: Shown above the table (``None``: no title).
        headers: Column names.
        rows: The cells, already formatted as text.
        caption: Shown below the table.
        numeric: Columns aligned right.
        title_justify: ``"center"`` or ``"left"``.
        heading: The Markdown line above the table [default: ``#### title``].
        summary: The Markdown line below it [default: ``caption.``].
        markdown_rows: The Markdown cells where they differ from ``rows``.
    """

    title: str | None
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str | None = None
    numeric: Sequence[int] = ()
    title_justify: str = "center"
    heading: str | None = None
    summary: str | None = None
    markdown_rows: Sequence[Sequence[Any]] | None = None


class Printable(abc.ABC):
    """A record: ``to_dict()`` for JSON and ``view()`` for people; printing is `kerasbn.report`'s."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """A JSON-ready dict of the record."""

    @abc.abstractmethod
    def view(self) -> list[Table | str]:
        """What the record shows: tables and lines of text, in order."""

    def __str__(self) -> str:
        from kerasbn.report import text

        return text(self.view())

    def __rich__(self) -> Any:
        from kerasbn.report import rich

        return rich(self.view())

    def to_markdown(self) -> str:
        """The view as GitHub-flavoured Markdown (for a pull request or a CI step summary)."""
        from kerasbn.report import markdown

        return markdown(self.view())
