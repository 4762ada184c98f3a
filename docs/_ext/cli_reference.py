"""MkDocs hook: the command line reference is the `--help` of every click command, generated at build time.

`docs/cli.md` holds the marker below; the hook puts `kerasbn --help` and each command's `--help` there, in the
order the commands are defined, exactly as a terminal 100 columns wide prints them, so the page cannot drift from
the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

MARKER = "<!-- kerasbn --help -->"
WIDTH = 100  # the CLI's own max_content_width


def on_config(config: Any, **kwargs: Any) -> None:
    # Document this tree's CLI, as mkdocstrings' `paths: [.]` documents this tree's library.
    sys.path.insert(0, str(Path(config.config_file_path).parent))


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())


def reference() -> str:
    from kerasbn_cli.main import main

    root = click.Context(main, info_name="kerasbn", terminal_width=WIDTH, **main.context_settings)
    parts = [_block("kerasbn", main.get_help(root))]
    for name, command in main.commands.items():
        ctx = click.Context(command, info_name=name, parent=root)
        parts.append(_block(f"kerasbn {name}", command.get_help(ctx)))
    return "\n".join(parts)


def _block(title: str, text: str) -> str:
    return f"### `{title}`\n\n```text\n{text}\n```\n"
