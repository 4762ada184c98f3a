"""Session caches of the user-path matrix: each model kind × policy × backend built and saved once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import models

REPO = Path(__file__).resolve().parents[2]
# The suite's own interpreter builds the JAX-saved files (JAX is a dev dependency).
PYTHON = sys.executable


class ModelFiles:
    """``.keras`` files and in-memory TensorFlow models, built on first use, kept for the session."""

    def __init__(self, folder: Path, jax_cells: list[tuple[str, str]]) -> None:
        self.folder = folder
        # Built in one JAX process each: the sampled cells' files, then (for `make test-large`) all the others.
        rest = [(k, p) for k in models.KINDS for p in models.POLICIES if (k, p) not in jax_cells]
        self.jax_batches = [list(jax_cells), rest]
        self.memory: dict[tuple[str, str], object] = {}

    def model(self, kind: str, policy: str):
        """The in-memory model (TensorFlow): the one the library front works on."""
        if (kind, policy) not in self.memory:
            self.memory[kind, policy] = models.build(kind, policy)
        return self.memory[kind, policy]

    def path(self, kind: str, policy: str, backend: str) -> Path:
        path = self.folder / f"{kind}-{policy}-{backend}.keras"
        if path.exists():
            return path
        if backend == "tensorflow":
            self.model(kind, policy).save(path)
            return path
        while not path.exists() and self.jax_batches:  # a batch of JAX files per process: one JAX start-up
            cells = [f"{k}:{p}" for k, p in self.jax_batches.pop(0)]
            env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
            done = subprocess.run(
                [PYTHON, "-m", "tests.paths.models", str(self.folder), *cells],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr[-3000:]
        assert path.exists(), f"{path.name} was not saved by the JAX process"
        return path


@pytest.fixture(scope="session")
def path_models(tmp_path_factory) -> ModelFiles:
    from tests.paths.test_matrix import JAX_MODELS

    return ModelFiles(tmp_path_factory.mktemp("paths"), list(JAX_MODELS))
