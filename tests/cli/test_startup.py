"""`kerasbn --help` and `--version` answer at once: no TensorFlow, no kerasbn library import.

What the import graph buys in seconds is measured by benchmarks/startup.py, never asserted here:
a duration depends on the machine's load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli.conftest import COMMANDS, KERASBN

HEAVY = (
    "tensorflow",
    "keras",
    "numpy",
    "tf2onnx",
    "onnxruntime",
    "rich",
    "kerasbn",
)


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]])
def test_help_imports_nothing_heavy(args):
    code = (
        "import sys\n"
        "from kerasbn_cli.main import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_help_has_an_example():
    for command in COMMANDS:
        done = subprocess.run([str(KERASBN), command, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0
        assert "Example:" in done.stdout and f"kerasbn {command}" in done.stdout
        for option in ("--import", "--unsafe", "--quiet", "--verbose", "--force"):
            assert option in done.stdout, (command, option)


def test_version():
    done = subprocess.run([str(KERASBN), "--version"], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("kerasbn, version ")
