"""The package itself: lazy public API, no side effects on import, runnable docstring examples."""

from __future__ import annotations

import doctest
import importlib
import os
import subprocess
import sys

import pytest

import kerasbn
from tests.conftest import BACKEND

DOCTESTED = [
    "kerasbn.folding.audit",
    "kerasbn.folding.fold",
    "kerasbn.folding.biases",
    "kerasbn.deploy.verify",
    "kerasbn.deploy.quantize",
    "kerasbn.layers.batch_normalization",
    "kerasbn.statistics.calibrate",
    "kerasbn.statistics.swap",
    "kerasbn.ops.fake_quant",
    "kerasbn.qat.layers",
    "kerasbn.qat.preparation",
    "kerasbn.qat.freezing",
]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_every_public_name_resolves():
    for name in kerasbn.__all__:
        assert getattr(kerasbn, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kerasbn.nope  # noqa: B018


def test_layer_alone_loads_neither_tensorflow_nor_the_fold_engine_on_jax():
    code = (
        "import sys, kerasbn\n"
        "kerasbn.BatchNormalization()\n"
        "loaded = {'tensorflow', 'tf2onnx', 'onnxruntime', 'kerasbn.folding', 'kerasbn.deploy', 'kerasbn.report', 'kerasbn.printable'}\n"
        "print(sorted(loaded & set(sys.modules)))\n"
    )
    done = _python(code, KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_import_registers_the_layer_but_loads_nothing_of_the_fold_engine():
    code = (
        "import sys, kerasbn, keras\n"
        "assert keras.saving.get_registered_object('kerasbn>BatchNormalization') is kerasbn.BatchNormalization\n"
        "print(sorted({'tf2onnx', 'onnxruntime', 'kerasbn.folding', 'kerasbn.deploy', 'kerasbn.report', 'kerasbn.printable'} & set(sys.modules)))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the file-descriptor check imports TensorFlow")
def test_import_leaves_stderr_and_logging_alone():
    # Every way a library could redirect fd 2 goes through os.dup2; logging
    # handlers and levels must be those Python starts with.
    code = (
        "import logging, os\n"
        "calls = []\n"
        "real = os.dup2\n"
        "os.dup2 = lambda *a, **k: calls.append(a) or real(*a, **k)\n"
        "before = (logging.root.level, list(logging.root.handlers))\n"
        "import kerasbn\n"
        "kerasbn.BatchNormalization(); kerasbn.fold; kerasbn.load_model; kerasbn.export_onnx\n"
        "assert calls == [], calls\n"
        "assert (logging.root.level, list(logging.root.handlers)) == before\n"
        "print('ok')\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"
