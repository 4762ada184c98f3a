"""Reading calibration data: every source gives the same mini-batches, bad data is one clear error."""

from __future__ import annotations

import tracemalloc

import keras
import numpy as np
import pytest

from kerasbn.errors import KerasbnError
from kerasbn.statistics.data import open_batches


def image_model(shape=(6, 6, 3)) -> keras.Model:
    inputs = keras.Input(shape, name="image")
    return keras.Model(inputs, keras.layers.BatchNormalization()(inputs))


def two_input_model() -> keras.Model:
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], keras.layers.Concatenate()([a, b]))


def values(seed: int = 0, shape=(11, 6, 6, 3)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def concat(batches) -> np.ndarray:
    return np.concatenate(list(batches))


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed", "npz_positional", "memory"])
def test_every_source_streams_the_same_batches(tmp_path, kind):
    x = values()
    path = {
        "npy": tmp_path / "x.npy",
        "npz": tmp_path / "x.npz",
        "npz_compressed": tmp_path / "xc.npz",
        "npz_positional": tmp_path / "xp.npz",
    }.get(kind)
    if kind == "npy":
        np.save(path, x)
    elif kind == "npz":
        np.savez(path, image=x)
    elif kind == "npz_compressed":
        np.savez_compressed(path, image=x)
    elif kind == "npz_positional":
        np.savez(path, x)
    batches = open_batches(path if path is not None else x, image_model(), batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(concat(batches), x)
    np.testing.assert_array_equal(concat(batches), x)  # a second pass reads it again


def test_multi_input_npz_by_name(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 2)).astype("float32")
    np.savez(tmp_path / "x.npz", b=b, a=a)
    batches = list(open_batches(tmp_path / "x.npz", two_input_model(), batch_size=2))
    np.testing.assert_array_equal(np.concatenate([x[0] for x in batches]), a)
    np.testing.assert_array_equal(np.concatenate([x[1] for x in batches]), b)


def test_integers_are_cast_to_the_input_dtype(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(2 * 108).reshape(2, 6, 6, 3).astype("uint8"))
    (batch,) = open_batches(tmp_path / "x.npy", image_model(), batch_size=2)
    assert batch.dtype == np.float32 and batch[1, 5, 5, 2] == 215


def test_folder_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batches = open_batches(tmp_path, image_model(), batch_size=2)
    assert batches.samples == 5
    got = concat(batches)
    # Sorted by path: 0, 2, 4 in the folder, then sub/1, sub/3; same size, so no resampling.
    np.testing.assert_array_equal(got, pixels[[0, 2, 4, 1, 3]].astype("float32"))


def test_images_are_resized_to_image_size(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "a.png")
    (batch,) = open_batches(tmp_path, image_model((None, None, 1)), image_size=(8, 12))
    assert batch.shape == (1, 8, 12, 1)


def test_npy_memory_does_not_grow_with_the_data(tmp_path):
    big = np.zeros((2000, 6, 6, 3), "float32")  # 864 KB; batches of 8 are 3.5 KB
    np.save(tmp_path / "big.npy", big)
    del big
    batches = open_batches(tmp_path / "big.npy", image_model(), batch_size=8)
    tracemalloc.start()
    for _ in batches:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200_000, peak


BAD = {
    "wrong_shape": ("x.npy", lambda: np.zeros((4, 5, 5, 3), "float32"), "the model expects"),
    "wrong_dtype": ("x.npy", lambda: np.array([["a"] * 108] * 2).reshape(2, 6, 6, 3), "must be numbers"),
    "complex": ("x.npy", lambda: np.zeros((2, 6, 6, 3), "complex64"), "must be numbers"),
    "no_batch_axis": ("x.npy", lambda: np.float32(3.0), "batch axis"),
    "empty": ("x.npy", lambda: np.zeros((0, 6, 6, 3), "float32"), "no samples"),
    "fortran": ("x.npy", lambda: np.asfortranarray(np.zeros((2, 6, 6, 3), "float32")), "Fortran"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arrays(tmp_path, case):
    name, make, message = BAD[case]
    np.save(tmp_path / name, make())
    with pytest.raises(KerasbnError, match=message):
        open_batches(tmp_path / name, image_model())


def test_bad_sources(tmp_path):
    model = image_model()
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("1 2 3")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases = {
        "empty": "holds no images",
        "missing.npy": "no such file",
        "x.txt": "unsupported data",
        "bad.npz": "not a readable .npz",
        "bad.npy": "not a readable NumPy array",
        "objects.npy": "Python objects",
    }
    for name, message in cases.items():
        with pytest.raises(KerasbnError, match=message):
            open_batches(tmp_path / name, model)


def test_npz_with_the_wrong_arrays(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 3)), c=np.zeros((2, 2)), d=np.zeros((2, 1)))
    with pytest.raises(KerasbnError, match="name the arrays after the inputs"):
        open_batches(tmp_path / "x.npz", two_input_model())
    np.savez(tmp_path / "y.npz", a=np.zeros((2, 3)), b=np.zeros((3, 2)))
    with pytest.raises(KerasbnError, match="different numbers of samples"):
        open_batches(tmp_path / "y.npz", two_input_model())


def test_a_folder_of_unreadable_images_fails_on_the_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    batches = open_batches(tmp_path, image_model())
    with pytest.raises(KerasbnError, match="broken.png: not a readable image"):
        list(batches)
