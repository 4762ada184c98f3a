"""`--slice K/N` (tests/conftest.py): CI's rotating share of the `large` tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import slice_of

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = """
import pytest

@pytest.mark.parametrize("i", range(40))
def test_case(i):
    pass
"""


@pytest.mark.parametrize("n", [1, 3, 12])
def test_every_test_id_falls_in_one_slice_the_same_every_time(n):
    ids = [f"tests/paths/test_matrix.py::test_cell[{i}-functional-float32]" for i in range(600)]
    slices = [slice_of(i, n) for i in ids]
    assert slices == [slice_of(i, n) for i in ids] and set(slices) <= set(range(n))
    # Hash-spread: no slice holds twice its share of 600 ids.
    assert max(slices.count(k) for k in range(n)) <= 2 * len(ids) / n


def _collected(pytester, *args: str) -> list[str]:
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:randomly", *args)
    assert result.ret == 0, result.outlines
    return [line for line in result.outlines if "::" in line]


def test_the_slices_split_the_selected_tests(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_cases=TESTS)
    everything = _collected(pytester)
    assert len(everything) == 40
    slices = [_collected(pytester, "--slice", f"{k}/3") for k in range(3)]
    assert sorted(sum(slices, [])) == sorted(everything)
    for k, chosen in enumerate(slices):
        assert chosen == [i for i in everything if slice_of(i, 3) == k]


def test_the_commit_picks_the_slice(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_cases=TESTS)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=pytester.path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=pytester.path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pytester.path, capture_output=True, text=True).stdout
    k = int(head, 16) % 3
    assert _collected(pytester, "--slice", "commit/3") == _collected(pytester, "--slice", f"{k}/3")
    header = pytester.runpytest_inprocess("--co", "--slice", "commit/3")
    assert f"slice {k} of 3 (K from commit {head[:12]}" in header.stdout.str()


@pytest.mark.parametrize("spec", ["3/3", "x/3", "1", "0/0", "-1/3"])
def test_a_bad_slice_is_a_usage_error(pytester, spec):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_cases=TESTS)
    assert pytester.runpytest_inprocess("--collect-only", "--slice", spec).ret == pytest.ExitCode.USAGE_ERROR
