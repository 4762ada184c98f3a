"""`kerasbn.signature`: every model kind's inputs (names, shapes, dtypes, structure) and outputs, in memory
and reloaded from a `.keras` file — the one place every exporter, check and `.npz` reader gets them from."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.errors import UnsupportedModelError

L = keras.layers


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class TwoTowers(keras.Model):
    """A subclassed model: known by the shape it was first called with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(3)
        self.bn = L.BatchNormalization()

    def call(self, x, training=False):
        return self.bn(self.dense(x), training=training)


def _sequential_input():
    return keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3), L.BatchNormalization(), L.Flatten(), L.Dense(2)])


def _sequential_built():
    model = keras.Sequential([L.Conv2D(3, 3), L.BatchNormalization(), L.Flatten(), L.Dense(2)])
    model.build((None, 6, 6, 2))
    return model


def _sequential_fit():
    model = keras.Sequential([L.Conv2D(3, 3), L.BatchNormalization(), L.Flatten(), L.Dense(2)])
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 6, 6, 2)).astype("float32"), rng.normal(size=(4, 2)).astype("float32"), verbose=0)
    return model


def _functional():
    x = keras.Input((5,), name="features")
    return keras.Model(x, L.BatchNormalization()(L.Dense(4)(x)))


def _nested():
    inner = _sequential_input()
    x = keras.Input((6, 6, 2), name="image")
    return keras.Model(x, L.Dense(3)(inner(x)))


def _dict_io():
    image = keras.Input((4, 4, 1), name="image")
    meta = keras.Input((3,), name="meta.data")
    ids = keras.Input((2,), dtype="int32", name="ids")
    flat = L.Flatten()(L.BatchNormalization()(L.Conv2D(2, 3)(image)))
    merged = L.Concatenate()([flat, L.Dense(2)(meta), L.Embedding(2, 2)(ids)[:, 0]])
    return keras.Model({"meta.data": meta, "image": image, "ids": ids}, {"score": L.Dense(1)(merged), "aux": flat})


def _list_io():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], [L.Dense(2)(a), L.Dense(1)(b)])


def _subclassed():
    model = TwoTowers()
    model(np.zeros((2, 5), "float32"))
    return model


# kind → (builder, [(key, name, shape, dtype)] in flat order)
KINDS = {
    "sequential_with_input": (_sequential_input, [(None, None, (None, 6, 6, 2), "float32")]),
    "sequential_built": (_sequential_built, [(None, None, (None, 6, 6, 2), "float32")]),
    "sequential_fit": (_sequential_fit, [(None, None, (None, 6, 6, 2), "float32")]),
    "functional": (_functional, [("features", "features", (None, 5), "float32")]),
    "nested": (_nested, [("image", "image", (None, 6, 6, 2), "float32")]),
    "dict_inputs_and_outputs": (
        _dict_io,
        [
            ("ids", "ids", (None, 2), "int32"),
            ("image", "image", (None, 4, 4, 1), "float32"),
            ("meta.data", "meta_data", (None, 3), "float32"),
        ],
    ),
    "list_inputs_and_outputs": (_list_io, [("a", "a", (None, 3), "float32"), ("b", "b", (None, 2), "float32")]),
    "subclassed": (_subclassed, [(None, None, (None, 5), "float32")]),
}


@pytest.fixture(params=["in_memory", "reloaded"])
def where(request):
    return request.param


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_signature_of_every_model_kind(kind, where, tmp_path):
    build, expected = KINDS[kind]
    model = build()
    if where == "reloaded":
        model.save(tmp_path / "m.keras")
        model = kerasbn.load_model(tmp_path / "m.keras")
    sig = kerasbn.signature(model)
    got = [(s.key, s.name, s.shape, s.dtype) for s in sig.inputs]
    assert [(g[2], g[3]) for g in got] == [(e[2], e[3]) for e in expected]
    for (key, name, *_), (want_key, want_name, *_) in zip(got, expected):
        assert want_key is None or key == want_key
        assert want_name is None or name == want_name
        assert name[0].isalpha() and set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
    assert len(set(sig.names)) == len(sig.names)

    # Random inputs in the model's own structure run through it, at two batch sizes.
    for batch in (1, 3):
        arrays = sig.random(batch, seed=batch)
        assert [a.shape[0] for a in arrays] == [batch] * len(arrays)
        outputs = keras.tree.flatten(model.predict_on_batch(sig.pack(arrays)))
        assert all(np.shape(y)[0] == batch for y in outputs)
        if sig.output_names is not None:
            assert len(sig.output_names) == len(outputs)
        np.testing.assert_array_equal(sig.flatten(sig.pack(arrays))[0], arrays[0])
    # The same seed gives the same arrays (every check draws them here).
    np.testing.assert_array_equal(sig.random(2, 7)[0], sig.random(2, 7)[0])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_names_survive_save_and_load(kind, tmp_path):
    """A file exported from the model in memory takes the inputs the reloaded model's signature names."""
    model = KINDS[kind][0]()
    model.save(tmp_path / "m.keras")
    assert kerasbn.signature(kerasbn.load_model(tmp_path / "m.keras")).names == kerasbn.signature(model).names


def test_names_keras_made_up_do_not_depend_on_the_process(tmp_path):
    """An unnamed input is ``input`` however many layers the process created before (keras-hub backbones
    create their keras.Input when loaded)."""
    model = _sequential_input()
    model.save(tmp_path / "m.keras")
    names = {tuple(kerasbn.signature(kerasbn.load_model(tmp_path / "m.keras")).names) for _ in range(2)}
    assert names == {("input",)}
    assert kerasbn.signature(_list_io()).names == ["a", "b"]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_sequential_built_by_fit_is_fed_float32(policy, tmp_path):
    """Keras gives it a float16 input layer and casts float32 data; its files take float32."""
    keras.config.set_dtype_policy(policy)
    try:
        model = _sequential_fit()
    finally:
        keras.config.set_dtype_policy("float32")
    model.save(tmp_path / "m.keras")
    for m in (model, kerasbn.load_model(tmp_path / "m.keras")):
        assert [s.dtype for s in kerasbn.signature(m).inputs] == ["float32"]


def test_an_uncalled_subclassed_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no known input shape"):
        kerasbn.signature(TwoTowers())


def test_integer_inputs_are_valid_indices():
    sig = kerasbn.signature(_dict_io())
    ids = sig.random(16, 0)[0]
    assert ids.dtype == np.int32 and set(np.unique(ids)) <= {0, 1}


def test_conform_names_the_input_that_does_not_fit():
    sig = kerasbn.signature(_dict_io())
    good = {k: a for k, a in zip(sig.keys, sig.random(2, 0))}
    assert [a.dtype for a in sig.conform(good, "x")] == [np.dtype(s.dtype) for s in sig.inputs]
    bad = dict(good, image=np.zeros((2, 5, 4, 1), "float32"))
    with pytest.raises(kerasbn.errors.KerasbnError, match="input 'image' has shape"):
        sig.conform(bad, "x")
