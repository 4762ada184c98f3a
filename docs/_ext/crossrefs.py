"""Griffe extension: backticked `kerasbn.…` names in docstrings become links in the API reference.

The docstrings name other objects as `kerasbn.deploy.verify.compare` (Keras's style). Each such name that
resolves in the package becomes an optional cross-reference: a link when the object is rendered in the API
reference, plain code otherwise. A name that does not resolve (a renamed or removed function) is a warning,
which `mkdocs build --strict` turns into a failure.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# `kerasbn.x.y` or `~kerasbn.x.y` (the tilde: show only the last part), not inside a ``literal``.
NAME = re.compile(r"(?<![`\w])`(~?)(kerasbn(?:\.\w+)+)`(?![`\w])")

logger = griffe.get_logger("kerasbn.crossrefs")


class BacktickCrossrefs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path == "kerasbn":
            self._walk(pkg, pkg, set())

    def _walk(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = NAME.sub(lambda m: self._link(m, obj, pkg), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg, seen)

    def _link(self, match: re.Match, obj: griffe.Object, pkg: griffe.Module) -> str:
        short, name = match[1], match[2]
        if not _resolves(pkg, name):
            logger.warning(f"{obj.relative_filepath}:{obj.docstring.lineno}: `{name}` names nothing in kerasbn")
            return match[0]
        title = name.rsplit(".", 1)[-1] if short else name
        return f'<autoref identifier="{name}" optional>`{title}`</autoref>'


def _resolves(pkg: griffe.Module, name: str) -> bool:
    try:
        pkg[name.removeprefix("kerasbn.")]
    except (KeyError, griffe.AliasResolutionError):
        return False
    return True
