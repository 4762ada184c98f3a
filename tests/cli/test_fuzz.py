"""Mutated `.keras` files through `kerasbn fold`: a clean exit 2 or a verified
success, never a traceback, an unclassified error, a stray file or a hang."""

from __future__ import annotations

import io
import json
import re
import signal
import zipfile

import numpy as np
import pytest

from tests.cli.conftest import invoke, listing

CASES = 200
SECONDS_PER_CASE = 60


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rezip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random mutation of a valid .keras file, named for the failure message."""
    kind = ("truncate", "flip", "insert", "drop_member", "garble_member", "cut_member", "tweak_config")[
        int(rng.integers(7))
    ]
    members = _members(data)
    name = sorted(members)[int(rng.integers(len(members)))]
    if kind == "truncate":
        return kind, data[: int(rng.integers(0, len(data)))]
    if kind == "flip":
        mutated = bytearray(data)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 5))):
            mutated[position] ^= int(rng.integers(1, 256))
        return kind, bytes(mutated)
    if kind == "insert":
        at = int(rng.integers(0, len(data)))
        return kind, data[:at] + rng.bytes(int(rng.integers(1, 64))) + data[at:]
    if kind == "drop_member":
        return f"{kind}:{name}", _rezip({k: v for k, v in members.items() if k != name})
    if kind == "garble_member":
        return f"{kind}:{name}", _rezip({**members, name: rng.bytes(len(members[name]))})
    if kind == "cut_member":
        content = members[name]
        return f"{kind}:{name}", _rezip({**members, name: content[: int(rng.integers(0, len(content)))]})
    # A syntactically valid config with one number changed: shapes, units, axes.
    text = members["config.json"].decode()
    numbers = list(re.finditer(r"\b\d+\b", text))
    match = numbers[int(rng.integers(len(numbers)))]
    text = text[: match.start()] + str(int(rng.integers(0, 9))) + text[match.end() :]
    json.loads(text)
    return kind, _rezip({**members, "config.json": text.encode()})


def _timeout(signum, frame):
    raise TimeoutError(f"a fuzz case ran longer than {SECONDS_PER_CASE} s")


@pytest.mark.slow
def test_fold_on_mutated_keras_files(model_files, tmp_path):
    rng = np.random.default_rng(20251126)
    original = model_files["keras"].read_bytes()
    outcomes = {0: 0, 2: 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for case in range(CASES):
            kind, data = _mutate(original, rng)
            path = tmp_path / "mutant.keras"
            path.write_bytes(data)
            signal.alarm(SECONDS_PER_CASE)
            result = invoke("fold", path, "-o", tmp_path / "out.keras")
            signal.alarm(0)
            where = f"case {case} ({kind}): exit {result.exit_code}, stderr {result.stderr!r}"
            assert result.exit_code in (0, 2), where
            assert "Traceback" not in result.output, where
            if result.exit_code == 2:
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("kerasbn: error: "), where
                assert "unexpected" not in lines[0], where
                assert listing(tmp_path) == {"mutant.keras"}, where
            else:
                assert "reloaded vs original" in result.stdout and "FAILED" not in result.stdout, where
                (tmp_path / "out.keras").unlink()
            assert path.read_bytes() == data, where
            outcomes[result.exit_code] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes[2] > CASES // 2  # the mutations do break files; the test is not vacuous
