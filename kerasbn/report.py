"""How records look: rich tables, plain text, Markdown, and sizes for people.

Every record of the package follows one protocol (`kerasbn.printable`): it
says what it shows as a list of `~kerasbn.printable.Table` sections and lines
of text, and the functions here draw that list: `rich` for the console,
`text` for ``str(record)`` (what ``print`` shows), `markdown` for a pull
request or a CI step summary. So ``print(report)``, the CLI's tables and its
``--format markdown`` cannot drift apart; ``--format json`` is the record's
own ``to_dict()``. rich is imported inside the functions: building a record
never needs it, and this module imports nothing of the package.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def rich(view: Sequence[Any]) -> Any:
    """A record's view (`~kerasbn.printable.Table` sections and lines) as one rich renderable."""
    from rich.console import Group

    parts = [section if isinstance(section, str) else _table(section) for section in view]
    return parts[0] if len(parts) == 1 else Group(*parts)


def text(view: Sequence[Any]) -> str:
    """A record's view as plain text: what ``print(record)`` shows.

    Tables are drawn 140 columns wide; a line of text stays one line (a
    `kerasbn.VerifyResult` is one, and it is quoted inside error messages).
    """
    return "".join(section + "\n" if isinstance(section, str) else _plain(_table(section)) for section in view).rstrip()


def markdown(view: Sequence[Any]) -> str:
    """A record's view as Markdown: each table under its heading, its summary below it."""
    blocks = []
    for section in view:
        if isinstance(section, str):
            blocks.append(section)
            continue
        heading = section.heading if section.heading is not None else f"#### {section.title or ''}".rstrip()
        summary = section.summary if section.summary is not None else f"{section.caption}." if section.caption else ""
        rows = section.markdown_rows if section.markdown_rows is not None else section.rows
        lines = [heading, "", markdown_table(section.headers, rows)]
        blocks.append("\n".join([*lines, "", summary] if summary else lines))
    return "\n\n".join(blocks)


def _table(section: Any) -> Any:
    """A `~kerasbn.printable.Table` as a rich `Table`; its ``numeric`` columns are right-aligned."""
    from rich.table import Table

    out = Table(title=section.title, caption=section.caption, title_justify=section.title_justify, show_lines=False)
    for i, header in enumerate(section.headers):
        out.add_column(header, justify="right" if i in section.numeric else "left", overflow="fold")
    for row in section.rows:
        out.add_row(*("" if cell is None else str(cell) for cell in row))
    return out


def _plain(renderable: Any) -> str:
    """Plain text of a rich renderable, 140 columns wide, no colour."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=140, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` escaped, newlines flattened)."""

    def cell(value: Any) -> str:
        return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def file_size(n: int) -> str:
    """``n`` bytes for people: ``812 B``, ``3.1 KiB``, ``97.4 MiB``."""
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"
