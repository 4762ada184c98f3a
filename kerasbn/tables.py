"""Tables for the audit and fold reports (rich renderables and their plain text)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


def table(title: str, columns: list[str], rows: list[list[str]], caption: str) -> Table:
    """A rich `Table` with the given title, columns, rows and caption."""
    out = Table(title=title, caption=caption, show_lines=False)
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def render(*renderables) -> str:
    """Plain text of rich renderables, 140 columns wide, no colour."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=140, color_system=None, force_terminal=False)
    for r in renderables:
        console.print(r)
    return buffer.getvalue().rstrip()


def bn_rows(findings: list) -> list[list[str]]:
    """Table rows for `kerasbn.audit.BNFinding` records."""
    return [
        [f.path, f.partner or "", f.direction or "", "yes" if f.foldable else "no", f.reason or ""]
        for f in findings
    ]
