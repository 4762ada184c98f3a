"""Reproduce Figure 1 of Ioffe & Szegedy (2015), §4.1, with kerasbn.

The paper trains a network of three fully-connected hidden layers of 100
sigmoid units and a 10-way softmax on MNIST with mini-batches of 60, with and
without Batch Normalization before each sigmoid, and shows that the BN network
reaches a higher test accuracy sooner (Figure 1a) while the distribution of a
sigmoid's input stays stable (Figures 1b and 1c). §3.3 adds that BN makes
higher learning rates usable.

MNIST cannot be downloaded here, so scikit-learn's bundled 8×8 digits (1,797
images, 10 classes) stand in for it; the training set is smaller and the
images coarser, so the step counts are scaled down from the paper's 50,000.

Outputs (under ``--out``, default ``build/paper_figure1``):

* ``figure1.png``: test accuracy vs training steps, and the 15th, 50th and
  85th percentiles of one last-hidden-layer sigmoid input, without and with BN;
* ``figure1.csv``: the curves, one row per evaluation;
* ``learning_rates.csv``: the learning-rate table printed at the end.

Run it with ``python examples/paper_figure1.py`` (about 30 s on two CPU
cores); ``--steps 300`` gives a quick version for tests.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from kerasbn_cli.quiet import import_frameworks  # noqa: E402

import_frameworks()  # TensorFlow's start-up noise held back, real errors kept
import kerasbn  # noqa: E402

BATCH = 60  # the paper's mini-batch size
HIDDEN = 100
DEPTH = 3
CURVE_COLUMNS = ("step", "network", "test_accuracy", "p15", "p50", "p85")


def digits(seed: int):
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def build_mlp(bn: bool, seed: int) -> keras.Model:
    """The paper's network; with ``bn`` a kerasbn layer sits before each sigmoid.

    BN's β takes the place of the Dense bias (the paper's §3.2: the bias "can
    be ignored"), so the BN network has no Dense biases in its hidden layers.
    The paper initializes weights to small random Gaussian values.
    """
    inputs = keras.Input((64,), name="pixels")
    x = inputs
    for i in range(DEPTH):
        init = keras.initializers.RandomNormal(stddev=0.1, seed=seed + i)
        x = keras.layers.Dense(HIDDEN, use_bias=not bn, kernel_initializer=init, name=f"fc{i}")(x)
        if bn:
            x = kerasbn.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation("sigmoid", name=f"sigmoid{i}")(x)
    init = keras.initializers.RandomNormal(stddev=0.1, seed=seed + DEPTH)
    outputs = keras.layers.Dense(10, activation="softmax", kernel_initializer=init, name="classes")(x)
    return keras.Model(inputs, outputs, name="mlp_bn" if bn else "mlp")


class Recorder(keras.callbacks.Callback):
    """Test accuracy and the percentiles of one sigmoid input every ``every`` steps."""

    def __init__(self, x_test, y_test, every: int):
        super().__init__()
        self.x_test, self.y_test, self.every = x_test, y_test, every
        self.rows: list[tuple[int, float, float, float, float]] = []

    def set_model(self, model):
        super().set_model(model)
        # The input of the last hidden sigmoid, as in the paper's Figure 1(b, c).
        probe = model.get_layer(f"sigmoid{DEPTH - 1}").input
        self.probe = keras.Model(model.inputs[0], [model.outputs[0], probe])

    def record(self, step: int) -> None:
        probs, pre = (keras.ops.convert_to_numpy(t) for t in self.probe(self.x_test, training=False))
        accuracy = float(np.mean(np.argmax(probs, axis=1) == self.y_test))
        if not np.all(np.isfinite(probs)):
            accuracy = float("nan")  # a diverged network scores nothing
        p15, p50, p85 = np.percentile(pre[:, 0], (15, 50, 85)) if np.all(np.isfinite(pre)) else (np.nan,) * 3
        self.rows.append((step, accuracy, float(p15), float(p50), float(p85)))

    def on_train_begin(self, logs=None):
        self.record(0)

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1
        if step % self.every == 0:
            self.record(step)


def train(bn: bool, lr: float, steps: int, every: int, data, seed: int) -> Recorder:
    """Plain SGD (the paper's optimizer) for exactly ``steps`` mini-batches of 60."""
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_mlp(bn, seed)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy", jit_compile=True)
    # One pass over a stream of reshuffled epochs, cut to a whole number of
    # full batches, so every step sees exactly 60 examples.
    rng = np.random.default_rng(seed)
    epochs = -(-steps * BATCH // len(x_train))
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(epochs)])[: steps * BATCH]
    recorder = Recorder(x_test, y_test, every)
    model.fit(
        x_train[order], y_train[order], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[recorder]
    )
    return recorder


def steps_to(rows, target: float) -> int | None:
    """The first evaluated step whose test accuracy reaches ``target``."""
    return next((step for step, accuracy, *_ in rows if accuracy >= target), None)


def plot(curves: dict[str, list], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"Without BN": "tab:blue", "With BN": "tab:red"}
    for name, rows in curves.items():
        step, accuracy, p15, p50, p85 = np.array(rows).T
        axes[0].plot(step, accuracy, color=colors[name], label=name)
    axes[0].axhline(target, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy", ylim=(0.0, 1.0))
    axes[0].legend(loc="lower right")
    for ax, (name, rows), label in zip(axes[1:], curves.items(), ("(b)", "(c)")):
        step, _, p15, p50, p85 = np.array(rows).T
        for p, ls in ((p15, "--"), (p50, "-"), (p85, "--")):
            ax.plot(step, p, color=colors[name], ls=ls)
        ax.set(
            xlabel="training steps",
            title=f"{label} sigmoid input, {name[0].lower() + name[1:]}\n15th / 50th / 85th percentile",
        )
    low = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0])
    high = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1])
    for ax in axes[1:]:
        ax.set_ylim(low, high)
    fig.suptitle("Ioffe & Szegedy (2015), Figure 1, on scikit-learn digits (MNIST is not available offline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_steps(step: int | None) -> str:
    return "never" if step is None else str(step)


def fmt_accuracy(value: float) -> str:
    return "diverged" if np.isnan(value) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps for the Figure-1 curves")
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--lr", type=float, default=0.5, help="base learning rate of plain SGD")
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy for the steps-to-target count")
    parser.add_argument("--out", type=Path, default=Path("build/paper_figure1"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-steps", type=int, help="training steps per learning-rate run (default: --steps)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = digits(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    curves, tags = {}, {"Without BN": "plain", "With BN": "bn"}
    for name, bn in (("Without BN", False), ("With BN", True)):
        curves[name] = train(bn, args.lr, args.steps, args.every, data, args.seed).rows
    with open(args.out / "figure1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_COLUMNS)
        for name, rows in curves.items():
            for step, accuracy, p15, p50, p85 in rows:
                writer.writerow((step, tags[name], accuracy, p15, p50, p85))
    plot(curves, args.out / "figure1.png", args.target)

    print(f"Figure 1 on digits: {args.steps} steps of SGD (lr {args.lr:g}), mini-batches of {BATCH}, seed {args.seed}")
    print(f"{'network':<12} {'steps to ' + format(args.target, '.0%'):>14} {'final test accuracy':>20}")
    for name, rows in curves.items():
        print(f"{name:<12} {fmt_steps(steps_to(rows, args.target)):>14} {fmt_accuracy(rows[-1][1]):>20}")

    # §3.3: BN makes higher learning rates usable. Each pair trains from the
    # same initial weights and batches; only the learning rate differs.
    lr_steps = args.lr_steps or args.steps
    table = []
    for factor in (1, 5, 30):
        if factor == 1 and lr_steps == args.steps:
            plain, with_bn = curves["Without BN"], curves["With BN"]
        else:
            plain, with_bn = (
                train(bn, args.lr * factor, lr_steps, args.every, data, args.seed).rows for bn in (False, True)
            )
        table.append(
            (
                factor,
                args.lr * factor,
                plain[-1][1],
                with_bn[-1][1],
                steps_to(plain, args.target),
                steps_to(with_bn, args.target),
            )
        )
    with open(args.out / "learning_rates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ("factor", "lr", "plain_accuracy", "bn_accuracy", "plain_steps_to_target", "bn_steps_to_target")
        )
        writer.writerows(table)

    print(f"\nlearning rate ({lr_steps} steps each): final test accuracy, steps to {args.target:.0%}")
    print(f"{'lr':>10} {'without BN':>12} {'with BN':>10} {'steps w/o BN':>13} {'steps w/ BN':>12}")
    for factor, lr, plain_acc, bn_acc, plain_steps, bn_steps in table:
        print(
            f"{f'{factor}× = {lr:g}':>10} {fmt_accuracy(plain_acc):>12} {fmt_accuracy(bn_acc):>10} "
            f"{fmt_steps(plain_steps):>13} {fmt_steps(bn_steps):>12}"
        )
    print(
        f"\nwrote {args.out / 'figure1.png'}, figure1.csv and learning_rates.csv in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
