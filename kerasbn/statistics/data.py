"""Calibration data, streamed in mini-batches whose memory does not grow with the data.

A source is a ``.npy`` file, a ``.npz`` file (arrays named after the model's
inputs, or ``arr_0``, ``arr_1``… in input order), a folder of images, or
arrays already in memory (one array, a list in input order, or a dict by
input name). Files are read a mini-batch at a time: an array member is
parsed from its ``.npy`` header and its rows read sequentially (a compressed
``.npz`` member inflates as it is read), an image is decoded when its batch
comes. Every problem is one `KerasbnError` line, raised before the first batch.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from kerasbn.errors import KerasbnError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple  # without the batch axis; None where any size goes
    dtype: np.dtype


class Batches:
    """Mini-batches of ``batch_size`` samples (the last one may be smaller), in the model's input structure.

    Iterate it as often as needed: each iteration reads the source again.

    Attributes:
        samples: Number of samples.
        batch_size: Samples per mini-batch.
        description: The source in words (for reports).
    """

    def __init__(self, readers: list[Any], structure: Any, samples: int, batch_size: int, description: str):
        self._readers = readers
        self._structure = structure
        self.samples = samples
        self.batch_size = batch_size
        self.description = description

    @property
    def batches(self) -> int:
        """Number of mini-batches per pass."""
        return math.ceil(self.samples / self.batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        import keras

        streams = [reader.rows() for reader in self._readers]
        try:
            for start in range(0, self.samples, self.batch_size):
                n = min(self.batch_size, self.samples - start)
                arrays = [stream.send(n) if start else _first(stream, n) for stream in streams]
                yield keras.tree.pack_sequence_as(self._structure, arrays)
        finally:
            for stream in streams:
                stream.close()

    def first(self, n: int) -> Any:
        """The first ``min(n, samples)`` samples, in the model's input structure."""
        import keras

        n = min(n, self.samples)
        arrays = []
        for reader in self._readers:
            stream = reader.rows()
            arrays.append(_first(stream, n))
            stream.close()
        return keras.tree.pack_sequence_as(self._structure, arrays)


def _first(stream: Any, n: int) -> np.ndarray:
    next(stream)  # a generator must reach its first `yield` before it can receive
    return stream.send(n)


def open_batches(source: Any, model: Any, *, batch_size: int = 32, image_size: Sequence[int] | None = None) -> Batches:
    """The calibration data for ``model`` from ``source``, checked against its inputs.

    Args:
        source: A path (``.npy``, ``.npz`` or a folder of images), or arrays:
            one array, a list/tuple in input order, or a dict by input name.
        model: The Keras model the data is for.
        batch_size: Samples per mini-batch.
        image_size: ``(height, width)`` images are resized to; by default the
            model's input size.

    Raises:
        KerasbnError: the source is missing, empty, not numeric, or does not
            match the model's inputs.
    """
    if batch_size < 1:
        raise KerasbnError(f"batch size must be at least 1, got {batch_size}")
    inputs = _model_inputs(model)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            readers = [_images(path, inputs, image_size)]
            if len(inputs) != 1:
                raise KerasbnError(f"{path}: a folder of images feeds one input, the model has {len(inputs)}")
        elif path.suffix == ".npy":
            readers = [_npy(path)]
        elif path.suffix == ".npz":
            readers = _npz(path, inputs)
        elif not path.exists():
            raise KerasbnError(f"{path}: no such file or folder")
        else:
            raise KerasbnError(
                f"{path}: unsupported data '{path.suffix}'; give a .npy or .npz file or a folder of images"
            )
        description = str(path)
    else:
        readers = _in_memory(source, inputs)
        description = "arrays in memory"
    label = description
    if len(readers) != len(inputs):
        names = [i.name for i in inputs]
        raise KerasbnError(f"{label}: holds {len(readers)} array(s), the model has {len(inputs)} input(s) {names}")
    for reader, spec in zip(readers, inputs):
        reader.check(spec, label)
    counts = {reader.samples for reader in readers}
    if len(counts) != 1:
        raise KerasbnError(f"{label}: the inputs have different numbers of samples {sorted(counts)}")
    samples = counts.pop()
    if samples == 0:
        raise KerasbnError(f"{label}: holds no samples")
    from kerasbn.folding.graph import check_model

    return Batches(readers, check_model(model)._inputs_struct, samples, batch_size, description)


def _model_inputs(model: Any) -> list[_Input]:
    import keras

    from kerasbn.folding.graph import check_model

    fn = check_model(model)
    return [_Input(t.name, tuple(t.shape[1:]), np.dtype(keras.backend.standardize_dtype(t.dtype))) for t in fn.inputs]


class _Reader:
    """One input's samples: ``rows()`` is a generator that is sent a count and yields that many rows."""

    source: str
    shape: tuple  # per sample
    dtype: np.dtype
    samples: int
    target: np.dtype

    def check(self, spec: _Input, label: str) -> None:
        where = f"{label}: input '{spec.name}'"
        if self.dtype.kind not in "biuf":
            raise KerasbnError(f"{where} has dtype {self.dtype}; calibration data must be numbers (float or int)")
        if self.dtype.kind == "f" and spec.dtype.kind in "iub":
            raise KerasbnError(f"{where} has dtype {self.dtype}; the model expects integers ({spec.dtype})")
        shape = self.shape
        if len(shape) != len(spec.shape) or any(e is not None and e != g for e, g in zip(spec.shape, shape)):
            raise KerasbnError(
                f"{where} has samples of shape {shape}, the model expects {tuple(spec.shape)} (batch axis first)"
            )
        self.target = spec.dtype

    def rows(self) -> Iterator[np.ndarray]:
        raise NotImplementedError


class _ArrayReader(_Reader):
    def __init__(self, array: np.ndarray):
        self.array = array
        self.dtype = array.dtype
        if array.ndim == 0:
            raise KerasbnError("calibration data must have a batch axis; got a scalar")
        self.shape = tuple(array.shape[1:])
        self.samples = int(array.shape[0])

    def rows(self) -> Iterator[np.ndarray]:
        start = 0
        n = yield
        while True:
            chunk = np.asarray(self.array[start : start + n], self.target)
            start += n
            n = yield chunk


class _StreamReader(_Reader):
    """An array in ``.npy`` format read sequentially from a file or a zip member."""

    def __init__(self, label: str, opener: Any):
        self.label = label
        self.opener = opener
        with opener() as fp:
            self.shape_all, self.dtype = _read_header(fp, label)
        if not self.shape_all:
            raise KerasbnError(f"{label}: holds a scalar; calibration data needs a batch axis")
        self.samples = int(self.shape_all[0])
        self.shape = tuple(self.shape_all[1:])
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape)

    def rows(self) -> Iterator[np.ndarray]:
        with self.opener() as fp:
            _read_header(fp, self.label)
            n = yield
            while True:
                raw = fp.read(n * self.row_bytes)
                if len(raw) != n * self.row_bytes:
                    raise KerasbnError(f"{self.label}: truncated array data")
                chunk = np.frombuffer(raw, self.dtype).reshape((n, *self.shape)).astype(self.target)
                n = yield chunk


def _read_header(fp: IO[bytes], label: str) -> tuple[tuple, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError) as exc:
        raise KerasbnError(f"{label}: not a readable NumPy array ({exc})") from exc
    if dtype.hasobject:
        raise KerasbnError(f"{label}: holds Python objects (dtype {dtype}); calibration data must be numbers")
    if fortran and len(shape) > 1:
        raise KerasbnError(f"{label}: is stored in Fortran order; save it with numpy.ascontiguousarray first")
    return tuple(int(d) for d in shape), dtype


def _npy(path: Path) -> _Reader:
    if not path.is_file():
        raise KerasbnError(f"{path}: no such file")
    return _StreamReader(str(path), lambda: path.open("rb"))


def _npz(path: Path, inputs: list[_Input]) -> list[_Reader]:
    if not path.is_file():
        raise KerasbnError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise KerasbnError(f"{path}: not a readable .npz file ({exc})") from exc
    arrays = {m[: -len(".npy")]: m for m in members}
    if not arrays:
        raise KerasbnError(f"{path}: holds no arrays")
    from kerasbn.deploy.files import match_inputs

    chosen = [arrays[k] for k in match_inputs(path, list(arrays), [i.name for i in inputs])]
    return [_StreamReader(f"{path} [{member[:-4]}]", _member_opener(path, member)) for member in chosen]


def _member_opener(path: Path, member: str) -> Any:
    import contextlib

    @contextlib.contextmanager
    def opener() -> Iterator[IO[bytes]]:
        with zipfile.ZipFile(path) as archive, archive.open(member) as fp:
            yield fp

    return opener


def _in_memory(source: Any, inputs: list[_Input]) -> list[_Reader]:
    if isinstance(source, dict):
        missing = [i.name for i in inputs if i.name not in source]
        if missing:
            raise KerasbnError(f"the data has no array for input(s) {missing}; it holds {sorted(source)}")
        arrays = [source[i.name] for i in inputs]
    elif isinstance(source, (list, tuple)):
        arrays = list(source)
    else:
        arrays = [source]
    return [_ArrayReader(np.asarray(a)) for a in arrays]


class _ImageReader(_Reader):
    def __init__(self, folder: Path, files: list[Path], size: tuple[int, int], channels: int, channels_first: bool):
        self.folder = folder
        self.files = files
        self.size = size
        self.mode = _MODES[channels]
        self.channels_first = channels_first
        self.samples = len(files)
        self.dtype = np.dtype("float32")
        h, w = size
        self.shape = (channels, h, w) if channels_first else (h, w, channels)

    def rows(self) -> Iterator[np.ndarray]:
        start = 0
        n = yield
        while True:
            batch = np.stack([self._load(f) for f in self.files[start : start + n]]).astype(self.target)
            start += n
            n = yield batch

    def _load(self, file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as image:
                pixels = image.convert(self.mode).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(pixels, np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise KerasbnError(f"{file}: not a readable image ({exc})") from exc
        if array.ndim == 2:
            array = array[..., None]
        return np.moveaxis(array, -1, 0) if self.channels_first else array


def _images(folder: Path, inputs: list[_Input], image_size: Sequence[int] | None) -> _Reader:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KerasbnError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shape = inputs[0].shape
    if len(shape) != 3:
        raise KerasbnError(f"{folder}: images need a model input of rank 3 (height, width, channels), got {shape}")
    channels_first = shape[0] in _MODES and shape[-1] not in _MODES
    channels = shape[0] if channels_first else shape[-1]
    if channels not in _MODES:
        raise KerasbnError(f"{folder}: the model input {shape} does not take 1, 3 or 4 channel images")
    spatial = shape[1:] if channels_first else shape[:2]
    if image_size is None:
        if None in spatial:
            raise KerasbnError(f"{folder}: the model takes images of any size; give --image-size HEIGHTxWIDTH")
        image_size = spatial
    size = (int(image_size[0]), int(image_size[-1]))
    return _ImageReader(folder, files, size, channels, channels_first)
