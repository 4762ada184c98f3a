"""Safe model loading, atomic saving, verification inputs from files.

`load_model` turns every way a model file can be wrong into one
`ModelLoadError` (or `UnsupportedModelError`) line that says what is wrong and
what to do, and never touches the input. Keras safe mode stays on unless the
caller turns it off: a `.keras` file from a stranger can hold marshalled Python
bytecode in a `Lambda` layer.

`save_model` and `atomic_output` write through a temporary file in the
destination folder and rename it into place, so a crash, a failed
verification or a full disk never leaves a half-written or unverified output.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kerasbn.errors import KerasbnError, ModelLoadError, UnsupportedModelError, first_line

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
_WEIGHT_MEMBERS = ("model.weights.h5", "model.weights.npz")
# Keras stores members uncompressed; a member that inflates over 100x past 64 MiB is not a model.
_BOMB_FLOOR = 64 * 2**20
_BOMB_RATIO = 100


def load_model(
    path: str | os.PathLike,
    *,
    safe_mode: bool = True,
    custom_modules: Iterable[str] = (),
) -> Any:
    """Load a `.keras` or legacy `.h5` model for inspection or rewriting.

    Args:
        path: the model file, or an unzipped `.keras` folder (``keras.saving.save_model(model, folder,
            zipped=False)``: ``config.json`` and ``model.weights.h5``), loaded with the same safety.
        safe_mode: keep Keras safe mode on (refuses Python lambdas). Turn it
            off only for files you trust: deserializing a lambda runs its code.
        custom_modules: modules to import first; they register the custom
            layers the model uses (``@keras.saving.register_keras_serializable``).

    Returns:
        The `keras.Model`, uncompiled. It is a functional or built Sequential
        model: a graph kerasbn can read.

    Raises:
        ModelLoadError: the file is missing, not a model, truncated, corrupted,
            uses an unknown layer, holds a lambda refused in safe mode, or
            declares more than it holds (`kerasbn.deploy.declared_sizes`).
        UnsupportedModelError: the model has no functional graph, or its layers
            cannot run on its inputs (`kerasbn.folding.model_checks.check_runnable`).
    """
    path = Path(path)
    kind = _check_input_file(path)
    _import_modules(custom_modules)

    import keras

    from kerasbn.deploy.declared_sizes import weight_budget, weights_held
    from kerasbn.folding.model_checks import check_runnable

    held = weights_held(path, kind)
    with warnings.catch_warnings(record=True) as caught, weight_budget(path, held) as budget:
        warnings.simplefilter("always")
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
        except Exception as exc:  # Keras reports file problems with many exception types
            raise budget.refusal or _classify_keras_error(path, kind, exc) from exc
        if budget.refusal is not None:  # refused inside a step whose errors Keras swallows
            raise budget.refusal
    for warning in caught:
        # Keras only warns when weights in the file do not match the config and
        # layers keep random initial values; rewriting such a model would be silently wrong.
        if _UNLOADED_WEIGHTS.search(str(warning.message)):
            raise ModelLoadError(
                f"{path}: corrupted .keras file (some weights do not match the model config and were not loaded)"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    _check_has_graph(path, model)
    try:
        check_runnable(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from exc
    return model


def save_model(
    model: Any,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    check: Callable[[Any], None] | None = None,
    safe_mode: bool = True,
    custom_modules: Iterable[str] = (),
) -> Path:
    """Save `model` to `path` atomically; returns the path written.

    Args:
        model: the Keras model.
        path: a `.keras` (or legacy `.h5`) file name.
        overwrite: replace an existing file; otherwise an existing `path` is
            an error and is left untouched.
        check: called with the model as reloaded from the temporary file
            before it is renamed into place; if it raises, nothing is written.
        safe_mode: Keras safe mode when reloading the file for `check`.
        custom_modules: modules to import (custom layers) before reloading it.

    Raises:
        KerasbnError: the destination is not writable, exists (without
            `overwrite`) or has an unsupported extension.
    """
    path = Path(path)
    if path.suffix not in KERAS_SUFFIXES + H5_SUFFIXES:
        raise KerasbnError(f"{path}: an output model must end in .keras or .h5")
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            with _quiet_keras_warnings():
                model.save(tmp, overwrite=True)
        except OSError as exc:
            raise KerasbnError(f"{path}: cannot write the model: {exc.strerror or exc}") from exc
        if check is not None:
            try:
                reloaded = load_model(tmp, safe_mode=safe_mode, custom_modules=custom_modules)
            except KerasbnError as exc:
                # The temporary name in the message would mean nothing to the user.
                reason = str(exc).replace(f"{tmp}: ", "", 1)
                raise KerasbnError(f"{path}: the saved model does not load back ({reason}); nothing written") from exc
            check(reloaded)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    The temporary file keeps `path`'s suffix (Keras picks the format from
    it). On any exception it is removed and `path` is left as it was. Without
    `overwrite`, the final step links rather than renames, so a file that
    appeared at `path` meanwhile is still not replaced.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as exc:
        raise KerasbnError(f"{path}: cannot write in {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def load_inputs(path: str | os.PathLike, model: Any) -> Any:
    """Read verification inputs for `model` from a `.npz` file.

    Arrays are matched to the model's inputs by name, else by order
    (``arr_0``, ``arr_1``, ... as `numpy.savez` writes them). Returns them in
    the structure the model takes (one array for a single-input model).
    Pickled objects are refused.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise KerasbnError(f"{path}: no such inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise KerasbnError(f"{path}: not a readable .npz file of arrays ({first_line(exc)})") from exc
    from kerasbn.model_signature import signature

    sig = signature(model)
    chosen = [arrays[k] for k in match_inputs(path, list(arrays), sig.keys)]
    return sig.pack(sig.conform(chosen, str(path)))


def match_inputs(path: str | os.PathLike, keys: list[str], names: list[str]) -> list[str]:
    """The keys of an `.npz` file for the model inputs ``names``, in their order.

    By name when every input is there, else by order (``arr_0``, ``arr_1``,
    ... as `numpy.savez` writes them) when the counts agree.
    """
    if set(names) <= set(keys):
        return list(names)
    if len(keys) == len(names):
        return sorted(keys, key=_savez_order)
    raise KerasbnError(
        f"{path}: holds {len(keys)} array(s) {sorted(keys)}, the model has "
        f"{len(names)} input(s) {names}; name the arrays after the inputs"
    )


def _savez_order(key: str) -> tuple[int, str]:
    match = re.fullmatch(r"arr_(\d+)", key)
    return (int(match.group(1)), key) if match else (1 << 30, key)


def _check_input_file(path: Path) -> str:
    """Fail early, with a specific message, on anything that is not a model file."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        _check_keras_folder(path)
        return "keras"
    suffix = path.suffix
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc
    is_zip = head[:4] in _ZIP_MAGIC
    is_hdf5 = head == _HDF5_MAGIC
    if suffix in KERAS_SUFFIXES:
        if is_hdf5:
            raise ModelLoadError(f"{path}: is an HDF5 file, not a .keras archive; rename it to .h5")
        if not is_zip:
            raise ModelLoadError(
                f"{path}: not a .keras file (a .keras model is a zip archive; this file "
                + ("is empty)" if not head else "starts with other bytes)")
            )
        _check_keras_archive(path)
        return "keras"
    if suffix in H5_SUFFIXES:
        if is_zip:
            raise ModelLoadError(f"{path}: is a zip archive, not HDF5; rename it to .keras")
        if not is_hdf5:
            raise ModelLoadError(f"{path}: not an HDF5 file" + (" (it is empty)" if not head else ""))
        return "h5"
    what = "a zip archive" if is_zip else "an HDF5 file" if is_hdf5 else "not a model file"
    raise ModelLoadError(f"{path}: unsupported file type '{path.suffix}' ({what}); give a .keras or .h5 model")


def _check_keras_archive(path: Path) -> None:
    """Validate the zip container and config before Keras sees it.

    `testzip` reads every member and checks its CRC, so truncation and flipped
    bytes are reported as such instead of as an obscure HDF5 or JSON error.
    A member that would expand far beyond its stored size is refused first,
    so a decompression bomb cannot keep that check busy.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > _BOMB_FLOOR and info.file_size > _BOMB_RATIO * max(info.compress_size, 1):
                    raise ModelLoadError(
                        f"{path}: refusing a .keras archive whose member '{info.filename}' expands "
                        f"from {info.compress_size:,} to {info.file_size:,} bytes (a decompression bomb?)"
                    )
            names = set(archive.namelist())
            bad = archive.testzip()
            if bad is not None:
                raise ModelLoadError(f"{path}: corrupted .keras archive (member '{bad}' fails its checksum)")
            if "config.json" not in names:
                raise ModelLoadError(f"{path}: .keras archive without config.json; it is not a saved Keras model")
            if not names & set(_WEIGHT_MEMBERS):
                raise ModelLoadError(f"{path}: .keras archive without model weights (model.weights.h5)")
            raw = archive.read("config.json")
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise ModelLoadError(f"{path}: truncated or corrupted .keras archive ({first_line(exc)})") from exc
    except Exception as exc:  # zlib and struct errors from damaged headers
        raise ModelLoadError(f"{path}: truncated or corrupted .keras archive ({type(exc).__name__})") from exc
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: corrupted .keras archive (config.json is not valid JSON)") from exc
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelLoadError(f"{path}: corrupted .keras archive (config.json does not describe a model)")


def _check_keras_folder(path: Path) -> None:
    """An unzipped ``.keras`` model (``keras.saving.save_model(..., zipped=False)``), or a true refusal.

    Keras reads such a folder as it reads the archive (`keras.saving.load_model`:
    ``config.json`` under the same safe mode, then the weights file), so it is
    loaded with the same safety; only the container checks differ. A
    TensorFlow SavedModel folder (``saved_model.pb``) and any other folder are
    refused, saying which.
    """
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        raise ModelLoadError(
            f"{path}: is a TensorFlow SavedModel folder, not a Keras model; "
            "give a .keras or .h5 file or an unzipped .keras folder"
        )
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(
            f"{path}: is a directory without config.json; give a .keras or .h5 file or an unzipped .keras folder"
        )
    if not any((path / name).is_file() for name in _WEIGHT_MEMBERS):
        raise ModelLoadError(f"{path}: unzipped .keras folder without model weights (model.weights.h5)")
    try:
        parsed = json.loads(config.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read config.json: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: corrupted .keras folder (config.json is not valid JSON)") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("class_name"), str):
        raise ModelLoadError(f"{path}: corrupted .keras folder (config.json does not describe a model)")


def _import_modules(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the user's module may fail in any way
            raise ModelLoadError(f"cannot import module '{name}' (from --import): {first_line(exc)}") from exc


_UNLOADED_WEIGHTS = re.compile(r"freshly-initialized|could not be loaded|Skipping (?:nested|loading)")
_UNKNOWN_CLASS = re.compile(r"Could not locate (?:class|function) '([^']+)'")


def _classify_keras_error(path: Path, kind: str, exc: BaseException) -> KerasbnError:
    """One actionable line for an exception Keras raised while loading."""
    messages = []
    seen = exc
    while seen is not None and len(messages) < 8:
        messages.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(messages)
    if "Lambda" in text and "safe_mode" in text:
        return ModelLoadError(
            f"{path}: contains a Lambda layer with Python code, refused in safe mode; "
            "load it with --unsafe (safe_mode=False) only if you trust where the file came from"
        )
    if "safe_mode" in text:
        return ModelLoadError(
            f"{path}: contains code that Keras refuses to load in safe mode; "
            "use --unsafe (safe_mode=False) only if you trust where the file came from"
        )
    unknown = _UNKNOWN_CLASS.search(text)
    if unknown:
        name = unknown.group(1)
        return ModelLoadError(
            f"{path}: uses the unknown layer or object '{name}'; import the module that defines "
            f"and registers it with --import MODULE (custom_modules=[...])"
        )
    if kind == "h5" and "No model config found" in text:
        return ModelLoadError(f"{path}: HDF5 file without a model config (weights only?); save the whole model")
    if isinstance(exc, OSError) or "Unable to" in text or "truncated" in text:
        what = "HDF5" if kind == "h5" else ".keras"
        return ModelLoadError(f"{path}: truncated or corrupted {what} file ({first_line(exc)})")
    return ModelLoadError(f"{path}: cannot rebuild the model: {first_line(exc)}")


def _check_has_graph(path: Path, model: Any) -> None:
    """A model kerasbn can read: functional, a built Sequential, or a subclassed model with a known input shape."""
    import keras

    from kerasbn.folding.graph import check_model, functional_of
    from kerasbn.model_signature import signature

    try:
        if isinstance(model, keras.Model) and not isinstance(model, keras.Sequential) and functional_of(model) is None:
            signature(model)  # subclassed: traced through its input shape
        else:
            check_model(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from exc


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise `KerasbnError` now if `path` cannot be written, before any long work."""
    path = Path(path)
    if path.is_dir():
        raise KerasbnError(f"{path}: is a directory; give an output file name")
    if not path.parent.is_dir():
        raise KerasbnError(f"{path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise KerasbnError(f"{path}: already exists; use --force (overwrite=True) to replace it")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished file the usual permissions and move it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise KerasbnError(f"{path}: already exists; use --force (overwrite=True) to replace it") from exc
    except OSError:
        # File systems without hard links: check and rename (a small race window).
        if path.exists():
            raise KerasbnError(f"{path}: already exists; use --force (overwrite=True) to replace it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_keras_warnings() -> Iterator[None]:
    """Hide absl's 'HDF5 is legacy' warning: the user chose the format."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
