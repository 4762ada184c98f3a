"""The `kerasbn` command group.

Only click is imported at module level: `kerasbn --help` and `--version` must
not pay for importing TensorFlow.
"""

from __future__ import annotations

from importlib.metadata import version

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("kerasbn"), prog_name="kerasbn")
def main() -> None:
    """Audit, fold and export Batch Normalization in Keras 3 models."""
