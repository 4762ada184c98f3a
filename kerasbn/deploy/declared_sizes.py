"""A model file may declare no more than it holds.

A config can ask for a Dense with 10⁹ units, and a weights file can declare a
dataset of 900 million values that stores nothing (chunked, compressed, all
fill value). Keras allocates the first while it builds the model and the
second while it reads the weights, gigabytes before it notices that they do
not match; its own guard on HDF5 datasets starts at 4 GiB. Both declarations
are bounded by what the file holds, before anything is built or read:

- the weights file: the bytes its datasets declare, at most 100 times the
  bytes they store once past 64 MiB in all (Keras writes them uncompressed,
  so a file it wrote declares exactly what it stores), the rule
  `files.py` applies to the members of a `.keras` archive;
- the config: the weights Keras creates while building the model from it, at
  most the values the weights file holds plus 2²⁴ (weights a layer does not
  save); the build stops at the first `add_weight` past that.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kerasbn.errors import ModelLoadError

WEIGHTS_MEMBER = "model.weights.h5"
# As for the members of a .keras archive (files.py): over 100x past 64 MiB is not a model.
_FLOOR_BYTES = 64 * 2**20
_RATIO = 100
# Values a built model may hold beyond its saved weights (seed states, layers that save less than they hold).
_UNSAVED_VALUES = 2**24


def weights_held(path: Path, kind: str) -> int:
    """The number of weight values in the model file (or unzipped .keras folder) at ``path`` (``kind`` "keras" or "h5").

    Raises `ModelLoadError` when its datasets declare more than they store. A
    weights file that cannot be read at all is left to Keras to report, and
    the file's size in bytes bounds what it may hold.
    """
    import h5py

    try:
        if kind == "h5":
            with h5py.File(path, "r") as f:
                return _count(path, f)
        if path.is_dir():  # an unzipped .keras folder (files.py): its weights file is the archive's member
            if not (path / WEIGHTS_MEMBER).is_file():
                return _size(path)
            with h5py.File(path / WEIGHTS_MEMBER, "r") as f:
                return _count(path, f)
        with zipfile.ZipFile(path) as archive:
            if WEIGHTS_MEMBER not in archive.namelist():
                return _size(path)  # .npz weights: Keras's own guard reads them
            with _member(path, archive, archive.getinfo(WEIGHTS_MEMBER)) as member, h5py.File(member, "r") as f:
                return _count(path, f)
    except ModelLoadError:
        raise
    except Exception:  # h5py raises many kinds on damaged files; Keras names the damage
        return _size(path)


def _size(path: Path) -> int:
    """Bytes in the file at ``path``, or in the files of the folder (an unzipped .keras model)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _count(path: Path, weights: Any) -> int:
    """Values declared by the datasets of an open HDF5 file; refuses a file that declares more than it stores."""
    import h5py

    totals = {"values": 0, "declared": 0, "stored": 0}
    largest = ("", 0)

    def visit(name: str, item: Any) -> None:
        nonlocal largest
        if not isinstance(item, h5py.Dataset):
            return
        values = math.prod(item.shape) if item.shape is not None else 0
        declared = values * item.dtype.itemsize
        totals["values"] += values
        totals["declared"] += declared
        totals["stored"] += item.id.get_storage_size()
        if declared > largest[1]:
            largest = (name, declared)

    weights.visititems(visit)
    if totals["declared"] > max(_FLOOR_BYTES, _RATIO * totals["stored"]):
        raise ModelLoadError(
            f"{path}: the weights declare {totals['declared']:,} bytes but store {totals['stored']:,} "
            f"(dataset '{largest[0]}' alone declares {largest[1]:,}); a file that declares more than it holds "
            "is not a model"
        )
    return totals["values"]


@contextlib.contextmanager
def _member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[Any]:
    """A seekable view of one archive member: a window on the file where it is stored uncompressed, as Keras does.

    h5py seeks back and forth; a `ZipExtFile` rereads the member from its
    start on every backward seek.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        # Compressed: zipfile inflates it; files.py has refused a member that inflates past its bound.
        yield io.BytesIO(archive.read(info))
        return
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        yield _Window(f, info.header_offset + 30 + name_length + extra_length, info.file_size)


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + size`` of an open binary file, as a file."""

    def __init__(self, f: Any, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _Budget:
    """Weight values a model being built may still create."""

    def __init__(self, path: Path, held: int) -> None:
        self.path, self.held, self.spent = path, held, 0
        self.refusal: ModelLoadError | None = None

    def spend(self, layer: Any, shape: Any) -> None:
        try:
            values = math.prod(max(int(d), 0) for d in shape or ())
        except (TypeError, ValueError):
            return  # Keras refuses a shape it cannot read
        self.spent += values
        if self.spent > self.held + _UNSAVED_VALUES:
            self.refusal = ModelLoadError(
                f"{self.path}: the model config declares more weights than the file holds (layer "
                f"'{layer.name}' ({type(layer).__name__}) asks for a {tuple(shape)} weight, {self.spent:,} values "
                f"so far; the weights hold {self.held:,}); nothing built"
            )
            raise self.refusal


_state = threading.local()
_lock = threading.Lock()
_installed: list[Any] = []  # Keras's own add_weight while a budget is installed, and the number of users


@contextlib.contextmanager
def weight_budget(path: Path, held: int) -> Iterator[_Budget]:
    """While loading ``path`` in this thread, refuse the first weight past ``held`` values (and the slack).

    Keras builds a model from its config through `Layer.add_weight`; it is
    wrapped while any thread loads, and counts only in the loading thread.
    After the block, a budget whose ``refusal`` is set was exceeded, even where
    Keras wrapped the refusal in an error of its own.
    """
    import keras

    with _lock:
        if not _installed:
            original = keras.layers.Layer.add_weight

            def add_weight(layer: Any, *args: Any, **kwargs: Any) -> Any:
                budget = getattr(_state, "budget", None)
                if budget is not None:
                    budget.spend(layer, kwargs.get("shape", args[0] if args else None))
                return original(layer, *args, **kwargs)

            keras.layers.Layer.add_weight = add_weight
            _installed[:] = [original, 0]
        _installed[1] += 1
    previous = getattr(_state, "budget", None)
    _state.budget = budget = _Budget(path, held)
    try:
        yield budget
    finally:
        _state.budget = previous
        with _lock:
            _installed[1] -= 1
            if not _installed[1]:
                keras.layers.Layer.add_weight = _installed[0]
                _installed.clear()
