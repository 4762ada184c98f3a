"""Mutated model files through the commands: a clean exit or a one-line refusal, never a traceback,
an unclassified error, a stray file, a changed input, a hang or a memory blow-up.

Two mutators: byte- and zip-level damage (truncation, flipped bytes, dropped or
garbled members) through `fold`, and mutations that keep the file well formed
but make what it says wrong (declared sizes, dtypes, graph references in
config.json; shapes, dtypes and non-finite values in model.weights.h5) through
`audit`, `fold` and `export`. Every case runs under an address-space limit a
few GB above what the process already holds, so a file that makes kerasbn
allocate what it declares instead of what it holds fails the case.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import resource
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.cli.conftest import invoke, listing

CASES = 200
SEMANTIC_CASES = 16
SEMANTIC_CASES_LARGE = 400
SECONDS_PER_CASE = 60
HEADROOM = 3 * 2**30  # address space a case may add to what the test process holds

# What a mutated config may declare: sizes, dtypes and dtype policies a file could name.
SIZES = (0, -1, 10**9, 2**31 - 1, 10**12, 7)
DTYPES = (
    "int32",
    "bool",
    "string",
    "uint8",
    "float16",
    "bfloat16",
    "float64",
    "mixed_float16",
    "int8_from_float32",
    "int4_from_float32",
    "float8_from_float32",
    "no_such_dtype",
)


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
    """One random byte- or zip-level mutation of a valid .keras file, named for the failure message."""
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


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _size_fields(config: dict) -> list[tuple[dict | list, str | int]]:
    """(container, key) of every integer a layer's config or build config declares."""
    found: list[tuple[dict | list, str | int]] = []

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if key in ("inbound_nodes", "keras_history", "input_layers", "output_layers"):
                continue  # graph references: their own mutation
            if isinstance(value, int) and not isinstance(value, bool):
                found.append((node, key))
            else:
                walk(value)

    for layer in config["config"]["layers"]:
        walk(layer["config"])
        walk(layer.get("build_config", {}))
    return found


def _mutate_config(config: dict, rng: np.random.Generator) -> str:
    """Change one thing a config declares, in place; returns what."""
    layers = config["config"]["layers"]
    kind = _pick(rng, ("size", "dtype", "reference"))
    if kind == "size":
        node, key = _pick(rng, _size_fields(config))
        node[key] = int(_pick(rng, SIZES))
        return f"size {key}={node[key]}"
    if kind == "dtype":
        layer = _pick(rng, layers)
        layer["config"]["dtype"] = _pick(rng, DTYPES)
        return f"dtype {layer['name']}={layer['config']['dtype']}"
    histories = [
        arg["config"]["keras_history"]
        for layer in layers
        for node in layer["inbound_nodes"]
        for arg in node["args"]
        if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__"
    ]
    how = _pick(rng, ("source", "node_index", "duplicate_input", "output", "drop_layer"))
    if how == "source":
        history = _pick(rng, histories)
        history[0] = _pick(rng, [layer["name"] for layer in layers] + ["no_such_layer"])
    elif how == "node_index":
        _pick(rng, histories)[1] = int(_pick(rng, (1, 5, -1)))
    elif how == "duplicate_input":
        config["config"]["input_layers"] = [config["config"]["input_layers"]] * 2
    elif how == "output":
        config["config"]["output_layers"][0] = _pick(rng, [layer["name"] for layer in layers] + ["no_such_layer"])
    else:
        layers.pop(int(rng.integers(len(layers))))
    return f"reference {how}"


def _mutate_weights(weights: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Change one dataset of model.weights.h5: its values, its declared shape or its dtype."""
    buffer = io.BytesIO(weights)
    with h5py.File(buffer, "r+") as f:
        names: list[str] = []
        f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        name = _pick(rng, sorted(names))
        values = np.array(f[name])
        kind = _pick(rng, ("nonfinite", "negative", "shape", "declared", "dtype"))
        del f[name]
        if kind == "nonfinite":
            flat = values.reshape(-1)
            flat[rng.integers(0, flat.size, size=int(rng.integers(1, 3)))] = _pick(rng, (np.nan, np.inf, -np.inf))
            f[name] = values
        elif kind == "negative":
            f[name] = -np.abs(values) - 1.0
        elif kind == "shape":
            f[name] = np.zeros(values.shape + (2,), values.dtype)
        elif kind == "declared":
            # Declared far larger than stored: chunked, compressed, only the fill value.
            f.create_dataset(name, shape=(900_000_000,), dtype="float32", chunks=(1_000_000,), compression="gzip")
        else:
            f[name] = values.astype(_pick(rng, ("int8", "float16", "float64", "bool", "S4")))
    return f"weights {kind} {name}", buffer.getvalue()


def _mutate_semantic(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutation that keeps the file well formed but makes what it declares wrong."""
    members = _members(data)
    if rng.integers(2):
        config = json.loads(members["config.json"])
        kind = _mutate_config(config, rng)
        return kind, _rezip({**members, "config.json": json.dumps(config).encode()})
    kind, weights = _mutate_weights(members["model.weights.h5"], rng)
    return kind, _rezip({**members, "model.weights.h5": weights})


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmSize:\s+(\d+) kB", status.read()).group(1)) * 1024


@contextlib.contextmanager
def _memory_limit(headroom: int) -> Iterator[None]:
    """Limit this process's address space to what it holds now plus ``headroom``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _timeout(signum, frame):
    raise TimeoutError(f"a fuzz case ran longer than {SECONDS_PER_CASE} s")


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """Each case under a time limit (SIGALRM) and a memory limit."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        with _memory_limit(HEADROOM):
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_case(folder: Path, mutant: Path, data: bytes, command: str, where: str) -> int:
    """Run one command on one mutant and check everything a bad file may not do; returns the exit code."""
    args = {"audit": (), "fold": ("-o", folder / "out.keras"), "export": ("-o", folder / "out.onnx")}[command]
    signal.alarm(SECONDS_PER_CASE)
    result = invoke(command, mutant, *args)
    signal.alarm(0)
    where = f"{where} {command}: exit {result.exit_code}, stderr {result.stderr!r}"
    assert result.exit_code in (0, 1, 2), where
    assert "Traceback" not in result.output, where
    assert "unexpected" not in result.stderr, where
    assert mutant.read_bytes() == data, where
    if result.exit_code == 0:
        if command == "fold":
            assert "reloaded vs original" in result.stdout and "FAILED" not in result.stdout, where
        for written in args[1:]:
            written.unlink()
    else:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kerasbn: error: "), where
    assert listing(folder) == {mutant.name}, where  # no output, no temporary file left
    return result.exit_code


def _fuzz(
    original: bytes, folder: Path, mutate: Callable, commands: Callable[[int], tuple[str, ...]], cases: int, seed: int
) -> dict[int, int]:
    rng = np.random.default_rng(seed)
    outcomes = {0: 0, 1: 0, 2: 0}
    mutant = folder / "mutant.keras"
    with _guarded():
        for case in range(cases):
            kind, data = mutate(original, rng)
            mutant.write_bytes(data)
            for command in commands(case):
                outcomes[_run_case(folder, mutant, data, command, f"case {case} ({kind})")] += 1
    return outcomes


@pytest.mark.slow
def test_fold_on_mutated_keras_files(model_files, tmp_path):
    outcomes = _fuzz(model_files["keras"].read_bytes(), tmp_path, _mutate, lambda case: ("fold",), CASES, 20251126)
    assert outcomes[2] > CASES // 2  # the mutations do break files; the test is not vacuous


def _commands(case: int) -> tuple[str, ...]:
    # An export costs a conversion: one case in four.
    return ("audit", "fold", "export") if case % 4 == 0 else ("audit", "fold")


@pytest.mark.slow
def test_commands_on_files_that_declare_wrong_things(model_files, tmp_path):
    outcomes = _fuzz(model_files["keras"].read_bytes(), tmp_path, _mutate_semantic, _commands, SEMANTIC_CASES, 20260125)
    assert outcomes[2] > 0 and outcomes[0] > 0  # refusals and successes: the mutations are neither all fatal nor none


@pytest.mark.large
def test_commands_on_many_files_that_declare_wrong_things(model_files, tmp_path):
    outcomes = _fuzz(
        model_files["keras"].read_bytes(), tmp_path, _mutate_semantic, _commands, SEMANTIC_CASES_LARGE, 20260126
    )
    assert outcomes[2] > SEMANTIC_CASES_LARGE // 10 and outcomes[0] > 0
