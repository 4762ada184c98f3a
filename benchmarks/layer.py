"""Layer benchmark: kerasbn.BatchNormalization against keras.layers.BatchNormalization.

For each backend in its own process (Keras fixes the backend at import), on
the same tensors: the training step (forward and backward to x, γ and β for a
given upstream gradient, moving statistics updated) and inference, in a TF
graph (`tf.function`), under TF XLA (`jit_compile=True`) and under `jax.jit`;
on TensorFlow also `tf.compat.v1.nn.fused_batch_norm`. Each timing is the
median over interleaved repeats after warm-up (ratios: the median of the
per-repeat ratios), next to a copy of the same
tensor measured in the same run: BN is memory-bound, so its floor is a number
of passes over the tensor (8 for a training step — read x for the sums,
read x and write y, read dy and x for the gradient sums, read dy and x and
write dx — and 2 for inference), each costing half a copy. The small-CNN
`model.fit(jit_compile=True)` epoch time compares the layers inside a model.

    python benchmarks/layer.py                 # both backends, writes JSON and docs/benchmarks.md
    python benchmarks/layer.py --quick         # one shape, few repeats
    python benchmarks/layer.py --quick --shape 256x1024 --no-fit   # another shape, training and inference
    KERAS_BACKEND=jax python benchmarks/layer.py --backend jax --json out.json --no-markdown
    python benchmarks/layer.py --render        # rebuild the Markdown from the JSON files
    python benchmarks/layer.py --quick --baseline ../base --baseline-label "before #12"   # before/after ratios

The Markdown goes under the `## Layer` heading of docs/benchmarks.md; other
sections of that file are left as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
CPU_JSON = ROOT / "docs" / "layer-benchmarks.json"
GPU_JSON = ROOT / "docs" / "layer-benchmarks-gpu.json"
BEFORE_AFTER_JSON = ROOT / "docs" / "layer-benchmarks-before-after.json"
# The processes of a full CPU run: (backend, mode, with the model.fit comparison).
PROCESSES = (
    ("tensorflow", "graph", False),
    ("tensorflow", "xla", True),
    ("jax", "jit", True),
    ("torch", "eager", False),
    ("torch", "compile", False),
)
SHAPES = [(32, 56, 56, 64), (256, 1024), (8, 28, 28, 256)]
DTYPES = ["float32", "bfloat16"]
TRAIN_PASSES = 8
INFER_PASSES = 2
# The headline rows run in the environment users have. glibc returns large
# freed buffers to the OS and maps them afresh, so a step's time swings with
# page faults depending on the allocation history of the process (XLA's
# worker threads allocate in arenas of their own, which shrink on free
# whatever the trim threshold). With `--malloc-tuned`, the JAX process runs
# once more with freed memory kept in one arena, its rows labelled
# `MALLOC_LABEL`: what the page faults cost, never the headline (glibc reads
# these when a process starts; it ignores an mmap threshold above 32 MiB,
# the largest tensor here is 25.7 MB).
MALLOC_LABEL = "tuned malloc"
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
# A timed sample runs the step back to back until it lasts about this long,
# so that dispatch overhead (JAX on a GPU) is amortized.
SAMPLE_S = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["all", "tensorflow", "jax", "torch"], default="all")
    parser.add_argument("--quick", action="store_true", help="one shape in float32, few repeats")
    parser.add_argument(
        "--shape", action="append", default=None, help="only this shape, e.g. 256x1024 (repeatable; default: all)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--no-fit", action="store_true", help="skip the model.fit epoch-time comparison")
    parser.add_argument("--render", action="store_true", help="only rebuild the Markdown from the JSON files")
    parser.add_argument(
        "--mode",
        choices=["graph", "xla", "jit", "eager", "compile"],
        default=None,
        help="only this execution mode (default: all of the backend's)",
    )
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=None,
        help=f"JAX: steps per timed call (default 1 on CPU, {JaxBench.LOOP} on accelerators)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="source tree of an earlier kerasbn: time it and this one in alternating processes, "
        f"training-step ratios to {BEFORE_AFTER_JSON.relative_to(ROOT)}",
    )
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help=f"also run JAX with glibc's {', '.join(MALLOC_ENV)} set, as rows of their own (mode 'jit, "
        f"{MALLOC_LABEL}'); in a single-backend run: label this process's rows so (the caller sets the variables)",
    )
    parser.add_argument("--baseline-label", default=None, help="what the baseline is, for the table")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline: alternations of the two trees")
    parser.add_argument("--append", action="store_true", help="with --baseline: add rounds to the existing table")
    args = parser.parse_args()
    if args.render:
        write_markdown()
        return
    if args.baseline:
        compare(args)
        if not args.no_markdown:
            write_markdown()
        return
    if args.backend == "all":
        # One process per backend and mode: code run in one mode changes
        # later timings of another in the same process (TF-XLA training on
        # (32, 56, 56, 64) took 10.5 or 16 ms after a TF graph run, 10.5 ms
        # always without one). The model.fit comparison compiles with XLA.
        results = []
        processes = [(*p, False) for p in PROCESSES if args.mode is None or p[1] == args.mode]
        if args.malloc_tuned:
            processes += [(name, mode, False, True) for name, mode, _, _ in processes if name == "jax"]
        for name, mode, fit, tuned in processes:
            out = ROOT / "build" / f"layer-{name}-{mode}{'-malloc' * tuned}.json"
            out.parent.mkdir(exist_ok=True)
            cmd = [sys.executable, __file__, "--backend", name, "--mode", mode, "--json", str(out), "--no-markdown"]
            cmd += ["--quick"] * args.quick + ["--no-fit"] * (args.no_fit or not fit) + ["--malloc-tuned"] * tuned
            cmd += [f"--shape={shape}" for shape in args.shape or []]
            cmd += ["--repeats", str(args.repeats)] if args.repeats else []
            env = {**os.environ, **(MALLOC_ENV if tuned else {}), "KERAS_BACKEND": name}
            subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(out.read_text()))
        merged = {
            # Every process's versions (each backend's), the first process's machine fields.
            "machine": {k: v for res in reversed(results) for k, v in res["machine"].items()},
            "runs": [r for res in results for r in res["runs"]],
            "fit": [f for res in results for f in res["fit"]],
            "quick": args.quick,
            "load": [res["load"] for res in results],
        }
        path = args.json or CPU_JSON
        path.write_text(json.dumps(merged, indent=1) + "\n")
    else:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shape] if args.shape else None
        if args.malloc_tuned and "MALLOC_ARENA_MAX" not in os.environ:
            raise SystemExit(
                "--malloc-tuned with one backend labels rows: set the MALLOC_* variables in its environment."
            )
        result = run_backend(
            args.backend, args.quick, args.repeats, not args.no_fit, args.steps_per_call, args.mode, shapes
        )
        if args.malloc_tuned:
            for r in result["runs"]:
                r["mode"] = f"{r['mode']}, {MALLOC_LABEL}"
            result["load"]["process"] += f", {MALLOC_LABEL}"
        path = args.json or (CPU_JSON if result["machine"]["device"] == "cpu" else GPU_JSON)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    if not args.no_markdown:
        write_markdown()


def compare(args) -> None:
    """Training-step ratios (kerasbn ÷ Keras) of a baseline source tree and of this one.

    Each backend and mode runs in its own process, the two trees in turn for
    `--rounds` rounds, with the same options; a row's ratio is the median
    over the rounds of each process's median of per-repeat ratios.
    """
    files: dict = {"before": [], "after": []}
    previous = json.loads(BEFORE_AFTER_JSON.read_text()) if args.append and BEFORE_AFTER_JSON.exists() else None
    first = max(len(r["after"]) for r in previous["rows"]) if previous else 0
    for round_ in range(first, first + args.rounds):
        for side, source in (("before", args.baseline.resolve()), ("after", ROOT)):
            for name, mode, _ in PROCESSES:
                out = ROOT / "build" / f"compare-{side}-{name}-{mode}-{round_}.json"
                out.parent.mkdir(exist_ok=True)
                cmd = [sys.executable, __file__, "--backend", name, "--mode", mode, "--json", str(out)]
                cmd += ["--no-markdown", "--no-fit"] + ["--quick"] * args.quick
                cmd += [f"--shape={shape}" for shape in args.shape or []]
                cmd += ["--repeats", str(args.repeats)] if args.repeats else []
                env = {**os.environ, "KERAS_BACKEND": name, "KERASBN_SOURCE": str(source)}
                subprocess.run(cmd, check=True, env=env)
                files[side].append(out)
    result = before_after(files, args.baseline_label or str(args.baseline), args.quick)
    if previous:
        earlier = {(r["backend"], r["mode"], tuple(r["shape"]), r["dtype"]): r for r in previous["rows"]}
        for row in result["rows"]:
            old = earlier.get((row["backend"], row["mode"], tuple(row["shape"]), row["dtype"]))
            if old:
                row["before"], row["after"] = old["before"] + row["before"], old["after"] + row["after"]
    BEFORE_AFTER_JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {BEFORE_AFTER_JSON}")


def before_after(files: dict, label: str, quick: bool) -> dict:
    """The training-step rows of the per-process JSON files of both trees (see `compare`)."""
    rows: dict = {}
    machine: dict = {}
    for side, paths in files.items():
        for path in paths:
            result = json.loads(Path(path).read_text())
            machine.update(result["machine"])
            for r in result["runs"]:
                if r["op"] == "train" and r["impl"] == "kerasbn":
                    key = (r["backend"], r["mode"], tuple(r["shape"]), r["dtype"])
                    rows.setdefault(key, {"before": [], "after": []})[side].append(r["ratio_to_keras"])
    return {
        "baseline": label,
        "machine": machine,
        "quick": quick,
        "rows": [
            {"backend": k[0], "mode": k[1], "shape": list(k[2]), "dtype": k[3], **v} for k, v in sorted(rows.items())
        ],
    }


# --------------------------------------------------------------------------- timing


def time_all(fns: dict, repeats: int) -> dict:
    """Seconds per call of each zero-argument callable, one sample per repeat, interleaved.

    The callables take turns within each repeat so that load from other
    processes on a shared machine hits them alike; ratios are then taken
    per repeat (`paired`).
    """
    inner = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        inner[name] = max(1, min(1000, math.ceil(SAMPLE_S / max(once, 1e-7))))
    samples: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name] - 1):
                fn(block=False)
            fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def paired(num: list, den: list) -> float:
    """Median of the per-repeat ratios ``num[i] / den[i]``.

    Load from other processes on a shared machine comes and goes; samples
    taken in the same repeat see the same load, so their ratio is steadier
    than a ratio of medians.
    """
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def run_backend(
    name: str,
    quick: bool,
    repeats: int | None,
    fit: bool,
    steps_per_call: int | None = None,
    only: str | None = None,
    only_shapes: list[tuple[int, ...]] | None = None,
) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = name
    # `compare` points this at a baseline source tree.
    sys.path.insert(0, os.environ.get("KERASBN_SOURCE", str(ROOT)))
    import keras
    import numpy as np

    import kerasbn  # noqa: F401  (quiet TensorFlow start-up)

    if keras.backend.backend() != name:
        raise SystemExit(f"Keras was imported with the {keras.backend.backend()} backend, not {name}.")
    load_start = os.getloadavg()[0]
    bench = {"tensorflow": TFBench, "torch": TorchBench}.get(name, lambda: JaxBench(steps_per_call))()
    repeats = repeats or (5 if quick else 21)
    shapes = only_shapes or (SHAPES[:1] if quick else SHAPES)
    dtypes = DTYPES[:1] if quick else DTYPES
    rng = np.random.default_rng(0)
    runs = []
    for shape in shapes:
        x32 = (rng.standard_normal(shape) * 2.0 + 3.0).astype("float32")
        dy32 = rng.standard_normal(shape).astype("float32")
        for dtype in dtypes:
            for mode in [m for m in bench.modes if only is None or m == only]:
                fns = bench.steps(x32, dy32, dtype, mode)
                loop = getattr(bench, "loop", 1)
                samples = {k: [t / loop for t in ts] for k, ts in time_all(fns, repeats).items()}
                copy = samples["copy"]
                for op, passes in (("train", TRAIN_PASSES), ("infer", INFER_PASSES)):
                    for impl in ("kerasbn", "keras", "tf_fused"):
                        ts = samples.get(f"{impl}/{op}")
                        if ts is None:
                            continue
                        t = statistics.median(ts)
                        to_keras = paired(ts, samples[f"keras/{op}"])
                        to_copy = paired(ts, copy)
                        runs.append(
                            {
                                "backend": name,
                                "mode": mode,
                                "shape": list(shape),
                                "dtype": dtype,
                                "op": op,
                                "impl": impl,
                                "ms": t * 1e3,
                                "copy_ms": statistics.median(copy) * 1e3,
                                "ratio_to_keras": to_keras,
                                "bound_fraction": passes / 2 / to_copy,
                                "ratio_to_copy": to_copy,
                                **(
                                    {"temp_bytes": bench.memory[(dtype, impl)]}
                                    if op == "train" and (dtype, impl) in getattr(bench, "memory", {})
                                    else {}
                                ),
                            }
                        )
                        temp = runs[-1].get("temp_bytes")
                        print(
                            f"{name:10s} {mode:5s} {str(shape):18s} {dtype:8s} {op:5s} {impl:8s} "
                            f"{t * 1e3:8.3f} ms  ×Keras {to_keras:5.2f}  ×copy {to_copy:5.2f}  "
                            f"bound {passes / 2 / to_copy:5.1%}"
                            + ("" if temp is None else f"  temp {temp / 2**20:.1f} MiB"),
                            flush=True,
                        )
    fits = bench.fit_ratio(quick) if fit else []
    # The machine's 1-minute load average (as `uptime` prints it) when the
    # process started and ended: what else ran beside the benchmark.
    load = {"process": f"{name} {only or ', '.join(bench.modes)}", "start": load_start, "end": os.getloadavg()[0]}
    return {"machine": bench.machine(), "runs": runs, "fit": fits, "quick": quick, "load": load}


def _layers(keras, dtype, shape):
    import kerasbn

    policy = "float32" if dtype == "float32" else "mixed_bfloat16"
    layers = {
        "kerasbn": kerasbn.BatchNormalization(dtype=policy),
        "keras": keras.layers.BatchNormalization(dtype=policy),
    }
    for layer in layers.values():
        layer.build(shape)
    return layers


class TFBench:
    modes = ("graph", "xla")

    def __init__(self):
        import tensorflow as tf

        self.tf = tf

    def machine(self) -> dict:
        return {
            "device": "cpu",
            "name": _cpu_name(),
            "cores": os.cpu_count(),
            "tensorflow": self.tf.__version__,
            "keras": _keras_version(),
            "python": platform.python_version(),
        }

    def steps(self, x32, dy32, dtype, mode) -> dict:
        import keras

        tf = self.tf
        x = tf.cast(tf.constant(x32), dtype)
        dy = tf.cast(tf.constant(dy32), dtype)
        zero = tf.zeros([], dtype)
        jit = mode == "xla"
        fns = {}

        def wrap(fn, *a):
            def call(block=True):
                out = fn(*a)
                if block:
                    out.numpy()

            return call

        copy = tf.function(lambda t, c: t + c, jit_compile=jit)
        fns["copy"] = wrap(_last_scalar(tf, copy), x, zero)
        for impl, layer in _layers(keras, dtype, x.shape).items():
            weights = [layer.gamma.value, layer.beta.value]

            def train(t, g, layer=layer, weights=weights):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    y = layer(t, training=True)
                return [y] + tape.gradient(y, [t] + weights, output_gradients=g)

            fn = tf.function(train, jit_compile=jit)
            fns[f"{impl}/train"] = wrap(_last_scalar(tf, fn), x, dy)
            infer = tf.function(lambda t, layer=layer: layer(t, training=False), jit_compile=jit)
            fns[f"{impl}/infer"] = wrap(_last_scalar(tf, infer), x)
        if dtype == "float32":
            channels = x.shape[-1]
            scale = tf.Variable(tf.ones([channels]))
            offset = tf.Variable(tf.zeros([channels]))
            mean = tf.Variable(tf.zeros([channels]))
            var = tf.Variable(tf.ones([channels]))
            x4 = tf.reshape(x, [x.shape[0], -1, 1, channels])
            dy4 = tf.reshape(dy, x4.shape)

            def fused_train(t, g):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    y, _, _ = tf.compat.v1.nn.fused_batch_norm(t, scale, offset, epsilon=1e-3, is_training=True)
                return [y] + tape.gradient(y, [t, scale, offset], output_gradients=g)

            def fused_infer(t):
                return tf.compat.v1.nn.fused_batch_norm(t, scale, offset, mean, var, epsilon=1e-3, is_training=False)[0]

            fns["tf_fused/train"] = wrap(_last_scalar(tf, tf.function(fused_train, jit_compile=jit)), x4, dy4)
            fns["tf_fused/infer"] = wrap(_last_scalar(tf, tf.function(fused_infer, jit_compile=jit)), x4)
        return fns

    def fit_ratio(self, quick: bool) -> list:
        return [_fit_ratio("tensorflow", quick)]


def _last_scalar(tf, fn):
    """``fn`` then a one-element slice of its last output, for the caller to wait on."""

    def call(*a):
        out = fn(*a)
        flat = tf.nest.flatten(out)
        return flat[-1][..., :1] if flat[-1].shape.rank else flat[-1]

    return call


class JaxBench:
    """JAX under `jax.jit`.

    On an accelerator one step of these sizes takes tens of microseconds,
    about what dispatching a jitted call costs, so each timed call runs
    `LOOP` steps inside one `lax.fori_loop`: the output (∂/∂x for a training
    step, y for inference) feeds the next step, y and the parameter
    gradients are carried too so that none of them is optimized away.
    """

    modes = ("jit",)
    LOOP = 32

    def __init__(self, steps_per_call: int | None = None):
        import jax

        self.jax = jax
        self.loop = steps_per_call or (1 if jax.devices()[0].platform == "cpu" else self.LOOP)
        self.memory: dict = {}

    def machine(self) -> dict:
        dev = self.jax.devices()[0]
        info = {
            "jax": self.jax.__version__,
            "keras": _keras_version(),
            "python": platform.python_version(),
            "steps_per_call": self.loop,
        }
        if dev.platform == "cpu":
            return {"device": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), **info}
        return {"device": dev.platform, "name": dev.device_kind, **info}

    def steps(self, x32, dy32, dtype, mode) -> dict:
        import keras

        jax = self.jax
        jnp = jax.numpy
        lax = jax.lax
        loop = self.loop
        x = jnp.asarray(x32).astype(dtype)
        dy = jnp.asarray(dy32).astype(dtype)
        zero = jnp.zeros((), dtype)

        def wrap(fn, *a):
            def call(block=True):
                out = fn(*a)
                if block:
                    jax.block_until_ready(out)

            return call

        def repeat(step, carry):
            """``step`` applied ``loop`` times to ``carry`` in one program."""
            return step(*carry) if loop == 1 else lax.fori_loop(0, loop, lambda i, c: step(*c), carry)

        fns = {"copy": wrap(jax.jit(lambda t, c: repeat(lambda u, k: (u + k, k), (t, c))), x, zero)}
        for impl, layer in _layers(keras, dtype, x.shape).items():
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]

            def train_step(tv, ntv, t, g, layer=layer):
                def f(t, tv):
                    return layer.stateless_call(tv, ntv, t, training=True)

                y, vjp, new_ntv = jax.vjp(f, t, tv, has_aux=True)
                dx, dtv = vjp(g)
                return y, dx, dtv, new_ntv

            @jax.jit
            def train(tv, ntv, t, g, train_step=train_step):
                def body(t, y, ntv, acc):
                    y, dx, dtv, new_ntv = train_step(tv, ntv, t, g)
                    return dx, y, new_ntv, [a + d for a, d in zip(acc, dtv, strict=True)]

                return repeat(body, (t, jnp.zeros_like(t), ntv, [jnp.zeros_like(v) for v in tv]))

            @jax.jit
            def infer(tv, ntv, t, layer=layer):
                return repeat(lambda u: (layer.stateless_call(tv, ntv, u, training=False)[0],), (t,))

            fns[f"{impl}/train"] = wrap(train, trainable, non_trainable, x, dy)
            fns[f"{impl}/infer"] = wrap(infer, trainable, non_trainable, x)
            # XLA's buffer assignment of the compiled step: its temporaries are
            # what the step holds beyond its arguments and outputs (the
            # residuals kept from the forward pass for the backward among them).
            memory = train.lower(trainable, non_trainable, x, dy).compile().memory_analysis()
            if memory is not None:
                self.memory[(dtype, impl)] = memory.temp_size_in_bytes
        return fns

    def fit_ratio(self, quick: bool) -> list:
        return [_fit_ratio("jax", quick)]


class TorchBench:
    """torch as Keras runs it: eagerly, and under `torch.compile` (Keras's ``jit_compile=True`` on torch).

    The step is the layer's forward and `torch.autograd.grad` to x, γ and β
    for a given upstream gradient; under `torch.compile` the forward is
    compiled (with its backward), as in Keras's compiled torch train step.
    """

    modes = ("eager", "compile")

    def __init__(self):
        import torch

        self.torch = torch

    def machine(self) -> dict:
        return {
            "device": "cpu",
            "name": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": self.torch.__version__,
            "keras": _keras_version(),
            "python": platform.python_version(),
        }

    def steps(self, x32, dy32, dtype, mode) -> dict:
        import keras

        torch = self.torch
        dt = getattr(torch, dtype)
        x = torch.tensor(x32).to(dt)
        dy = torch.tensor(dy32).to(dt)
        zero = torch.zeros((), dtype=dt)

        def compiled(fn):
            return torch.compile(fn, dynamic=False) if mode == "compile" else fn

        def wrap(fn, *a):
            def call(block=True):
                # torch on CPU runs synchronously: nothing to wait on.
                fn(*a)

            return call

        def copy(t, c):
            return t + c

        fns = {"copy": wrap(compiled(copy), x, zero)}
        for impl, layer in _layers(keras, dtype, x.shape).items():
            weights = [layer.gamma.value, layer.beta.value]

            forward = compiled(lambda t, layer=layer: layer(t, training=True))

            def train(t, g, weights=weights, forward=forward):
                # Compiled, the forward and its backward are one AOTAutograd
                # graph; `autograd.grad` runs the compiled backward, as the
                # `loss.backward()` of Keras's compiled torch train step does.
                t = t.detach().requires_grad_(True)
                y = forward(t)
                return [y, *torch.autograd.grad(y, [t] + weights, g.to(y.dtype))]

            def infer(t, layer=layer):
                # Keras's torch predict step runs without autograd.
                with torch.no_grad():
                    return layer(t, training=False)

            fns[f"{impl}/train"] = wrap(train, x, dy)
            fns[f"{impl}/infer"] = wrap(compiled(infer), x)
        return fns

    def fit_ratio(self, quick: bool) -> list:
        return []


def _fit_ratio(backend: str, quick: bool) -> dict:
    """Epoch time of a small CNN with `model.fit(jit_compile=True)`, kerasbn vs Keras BN.

    The two models train one epoch each in turn, so that load from other
    processes and warm-up effects hit them alike; the first epoch compiles.
    The ratio is the median of the per-epoch ratios.
    """
    import keras
    import numpy as np

    import kerasbn

    rng = np.random.default_rng(0)
    n = 1024 if quick else 4096
    x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    epochs = 3 if quick else 5
    models = {}
    for name, bn in (("kerasbn", kerasbn.BatchNormalization), ("keras", keras.layers.BatchNormalization)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
                bn(),
                keras.layers.ReLU(),
                keras.layers.Conv2D(64, 3, padding="same", use_bias=False, strides=2),
                bn(),
                keras.layers.ReLU(),
                keras.layers.Conv2D(64, 3, padding="same", use_bias=False),
                bn(),
                keras.layers.ReLU(),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True
        )
        models[name] = model
    epoch_times: dict = {name: [] for name in models}
    for _ in range(epochs + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=64, epochs=1, verbose=0)
            epoch_times[name].append(time.perf_counter() - start)
    times = {name: statistics.median(t[1:]) for name, t in epoch_times.items()}
    for name, t in times.items():
        print(f"{backend:10s} fit epoch {name:8s} {t * 1e3:8.1f} ms", flush=True)
    ratio = paired(epoch_times["kerasbn"][1:], epoch_times["keras"][1:])
    return {
        "backend": backend,
        "samples": n,
        "batch_size": 64,
        "kerasbn_ms": times["kerasbn"] * 1e3,
        "keras_ms": times["keras"] * 1e3,
        "ratio": ratio,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _keras_version() -> str:
    import keras

    return keras.__version__


# --------------------------------------------------------------------------- Markdown

TARGETS = {
    ("tensorflow", "graph"): 0.5,
    ("tensorflow", "xla"): 0.5,
    ("jax", "jit"): 0.8,
    ("jax", f"jit, {MALLOC_LABEL}"): 0.8,
    ("torch", "eager"): 0.6,
    ("torch", "compile"): 0.8,
}


def _table(result: dict, gpu: bool) -> list[str]:
    runs = result["runs"]
    by = {(r["backend"], r["mode"], tuple(r["shape"]), r["dtype"], r["op"], r["impl"]): r for r in runs}
    lines = [
        "| backend | mode | shape | dtype | op | kerasbn ms | Keras ms | TF fused ms | kerasbn ÷ Keras | target | "
        "copy ms | kerasbn ÷ copy | of bandwidth bound |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    order = [p[:2] for p in PROCESSES]
    keys = sorted(
        {k[:5] for k in by},
        key=lambda k: (
            order.index(k[:2]) if k[:2] in order else order.index((k[0], k[1].split(",")[0])) + 0.5,
            SHAPES.index(k[2]) if k[2] in SHAPES else 9,
            k[3],
            k[4] != "train",
        ),
    )
    for key in keys:
        ours, theirs, fused = by.get(key + ("kerasbn",)), by.get(key + ("keras",)), by.get(key + ("tf_fused",))
        if ours is None or theirs is None:
            continue
        backend, mode, shape, dtype, op = key
        if op == "train":
            limit = 1.0 if gpu else TARGETS[(backend, mode)]
            target = f"÷ Keras ≤ {limit}" + (", bound ≥ 60 %" if gpu else "")
            met = ours["ratio_to_keras"] <= limit and (not gpu or ours["bound_fraction"] >= 0.6)
        else:
            target = "≤ 1.2 × copy"
            met = ours["ratio_to_copy"] <= 1.2
        fused_ms = f"{fused['ms']:.3f}" if fused else "–"
        lines.append(
            f"| {backend} | {mode} | {'×'.join(map(str, shape))} | {dtype} | {op} | {ours['ms']:.3f} | "
            f"{theirs['ms']:.3f} | {fused_ms} | {ours['ratio_to_keras']:.2f} | "
            f"{target}: {'met' if met else 'missed'} | "
            f"{ours['copy_ms']:.3f} | {ours['ratio_to_copy']:.2f} | {ours['bound_fraction']:.0%} |"
        )
    return lines


def _machine_line(machine: dict) -> str:
    if machine["device"] == "cpu":
        what = f"CPU: {machine['name']}, {machine['cores']} cores visible"
    else:
        what = f"GPU: {machine['name']}"
    versions = ", ".join(f"{k} {machine[k]}" for k in ("tensorflow", "jax", "torch", "keras", "python") if k in machine)
    loop = machine.get("steps_per_call", 1)
    timing = (
        f" JAX times are per step of {loop} run back to back in one jitted `fori_loop` (one dispatch), "
        "each step's ∂/∂x feeding the next."
        if loop > 1
        else ""
    )
    return f"{what} ({versions}).{timing}"


def _memory_lines(result: dict) -> list[str]:
    rows = [r for r in result["runs"] if "temp_bytes" in r]
    if not rows:
        return []
    by = {(tuple(r["shape"]), r["dtype"], r["impl"]): r["temp_bytes"] for r in rows}
    lines = [
        "",
        "Memory of the jitted JAX training step (`compiled.memory_analysis()`): XLA's temporaries beyond the "
        "step's arguments and outputs (both the same for the two layers), which hold any residual kept for "
        "the backward pass:",
        "",
        "| shape | dtype | one activation MiB | kerasbn temp MiB | Keras temp MiB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for (shape, dtype, impl), temp in sorted(by.items()):
        if impl != "kerasbn" or (shape, dtype, "keras") not in by:
            continue
        size = math.prod(shape) * (4 if dtype == "float32" else 2) / 2**20
        lines.append(
            f"| {'×'.join(map(str, shape))} | {dtype} | {size:.1f} | {temp / 2**20:.1f} | "
            f"{by[(shape, dtype, 'keras')] / 2**20:.1f} |"
        )
    return lines


def _load_lines(result: dict) -> list[str]:
    """The machine's load beside each process (1-minute averages, as `uptime` prints them)."""
    loads = result.get("load")
    if not loads:
        return []
    loads = loads if isinstance(loads, list) else [loads]
    each = "; ".join(f"{p['process']} {p['start']:.1f} → {p['end']:.1f}" for p in loads)
    return [f"Load average (1 minute) when each process started → ended: {each}.", ""]


def _fit_lines(result: dict) -> list[str]:
    if not result.get("fit"):
        return []
    lines = [
        "",
        "Small CNN (3 × Conv–BN–ReLU, 32×32×3 inputs, batch 64), `model.fit(jit_compile=True)`, "
        "median epoch time after a compiling epoch (ratio: median of the per-epoch ratios)"
        + (f" ({result['fit_note']})" if result.get("fit_note") else "")
        + ":",
        "",
        "| backend | samples | kerasbn ms/epoch | Keras ms/epoch | kerasbn ÷ Keras |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for f in result["fit"]:
        lines.append(
            f"| {f['backend']} | {f['samples']} | {f['kerasbn_ms']:.0f} | {f['keras_ms']:.0f} | {f['ratio']:.2f} |"
        )
    return lines


# Measurements behind the arrangements in kerasbn/ops, taken when each was
# chosen (kerasbn 0.1.0; CPU: the machine of the tables above, 2 cores; GPU:
# the H200). Kept here rather than in docstrings, where they would go stale.
DESIGN_MEASUREMENTS = [
    "TF-XLA, Σd and Σd² on (32, 56, 56, 64) float32: 12.0 ms as two blocked reductions, 5.6 ms as one variadic "
    "reduction; in a TF graph 3.7 ms blocked against 6.1 ms plain; casting the data to float64 took 22–27 ms "
    "(`ops/tensorflow.py`, `ops/reduce.py`).",
    "JAX on CPU, Σd and Σd² on (32, 56, 56, 64): 0.7 ms as one variadic reduction over leading blocks against "
    "2.3 ms as plain sums (a copy: 0.28 ms); on the H200 31 µs plain against 51 µs variadic (`ops/jax.py`).",
    "The gradient's Σdy and Σdy·d over runs of 8 positions first, (32, 56, 56, 64): 1.6 against 2.1 ms in float32 "
    "and 1.1 against 10.6 ms in bfloat16 under TF-XLA; 1.2 against 2.2 ms and 0.7 against 5.6 ms under JAX; the "
    "JAX training step on (256, 1024) 0.16 against 0.21 ms; runs of 4 and 16 were slower on every shape tried "
    "(`ops/reduce.py: inner_block_sums`).",
    "Σdy·x̂ as (Σdy·d − δ·Σdy)·inv rather than Σdy·(d − δ)·inv: TF-XLA training step 7.2 against 10.4 ms on "
    "(32, 56, 56, 64) (`ops/normalize.py`).",
    "The shift behind `lax.optimization_barrier` on JAX: without it ∂/∂x took a copy per step of a loop, 5.9 of "
    "the 51 µs of a bfloat16 (32, 56, 56, 64) training step on the H200 (`ops/jax.py: materialize`).",
    "TF fused kernels: their own float32 statistics were 8e-5 off in y at 10⁵ values per feature (hence the "
    "layer's statistics as their reserve space); half-precision data fed as they are: bfloat16 training step "
    "7.4 against 11.1 ms; the data viewed as m images of one pixel: inference 1.2 against 1.9 ms as one image of "
    "m pixels, on (32, 56, 56, 64) (`ops/tensorflow.py`).",
    "Half-precision inference as x·a + (β − E[x]·a): XLA:CPU's loop at 1.1 × a copy against 1.2 × "
    "(`layers/batch_normalization.py`).",
    "torch (2.13 CPU), a training step on (32, 56, 56, 64) float32 as raw torch, the candidates alternating in "
    "one process, 21 repeats, ratio to Keras's autodiff arithmetic (E[x²] − E[x]², then x̂·γ + β): eagerly "
    "torch's batch-norm kernels fed the shifted data 0.67 and 0.65 (two runs), a closed-form "
    "`torch.autograd.Function` of torch ops 0.75 and 0.77, autodiff through the exact shifted form 1.07; under "
    "`torch.compile` the kernels 1.87 and 1.82 (inductor lowers the gradient kernel to unfused code), the closed "
    "form saving d 1.26 and 1.89, saving x and recomputing d 0.93, autodiff through the shifted form 1.64 "
    "(`ops/torch.py`).",
    "torch eager inference on (32, 56, 56, 64) float32: the subtraction then torch's inference kernel 4.3 ms, "
    "the subtraction then β + d·a by an in-place `addcmul` 1.8 ms, a copy 1.2 ms: each new tensor of this size "
    "costs its page faults (`ops/torch.py: fused_inference`).",
    "torch eager (2.13 CPU), the statistics' Σd and Σd² on (32, 56, 56, 64) float32: as `d·d` written and two "
    "blocked sums, three passes; from one pass of `native_batch_norm_backward` with dy = x = d, mean 0 and "
    "inverse deviation 1 over 32-row blocks, its partial Σd² 2.7e-7 relative to float64. The training step, one "
    "thread, CPU time (the machine's load average near 9, wall times meaningless): 0.30 against 0.43 × Keras's "
    "(`ops/torch.py: moment_sums`).",
    "torch eager, the kernel's partial sums added (quiet machine, right after a Keras step, so from memory as in a "
    "model): in float64 0.7 ms of the 2.4 ms of the statistics on (32, 56, 56, 64), in float32 cascades 0.03 ms, "
    "both within 3.2–3.6 units of 2⁻²⁴ of float64 (six shapes, three offsets, three seeds); blocks of the leading "
    "reduced positions rather than of the batch: 8×28×28×256 read as 32 rows of 50,176 partials, not 8 of "
    "200,704 (the kernel 0.38 against 1.1 ms); up to 1,024 rows torch's own sums of d and d·d (256×1024: 0.06 "
    "against 0.15 ms in the step) (`ops/torch.py: moment_sums`).",
    "torch eager, Python per step: a `keras.ops` call costs 1.3 (cast) to 15 µs (maximum, mean) against about 1 µs "
    "for the torch call; the statistics and the layer's per-step calls through `dispatch.array_ops` took the "
    "training step on a (2, 4) tensor from 0.71 to 0.57 ms (Keras's BN 0.48 ms, a Keras layer computing "
    "x·γ + β with autograd 0.32 ms at 256×1024: the floor of any layer call there) (`ops/torch.py: array_ops`).",
    "torch eager, (32, 56, 56, 64), 60 steps interleaved with Keras's: in a quarter of the steps freeing the "
    "step's tensors took 4–13 ms (glibc handing the heap's top back), for both layers; writing dx over d in the "
    "backward (one 25.7 MB buffer fewer a step) left that and the step's median unchanged (11.9–23.8 against "
    "12.3–12.6 ms), and would break a second backward through a kept graph: not kept.",
    "JAX on CPU, 256×1024: kerasbn's jitted step runs 15 XLA fusions to Keras's 14; the sample mean's slice stays "
    "a copy of 64 rows because a one-operand sum, however written, becomes YNNPACK's reduction, which cannot "
    "read a slice. One variadic second level for the gradient's two partial sums made it 14 (0.327 → 0.316 ms, "
    "within the noise) at the price of a sequential reduction over m/8 partials: not kept (`ops/jax.py`).",
    "keras-hub ResNet (96×96, batch 32), jitted JAX, kerasbn ÷ Keras per `train_on_batch` step, quiet machine: "
    "as shipped 1.04, 0.99 and 0.99; without the shift's optimization barrier 0.99; the gradient's sums plain 1.02; the "
    'statistics\' sums plain 1.01 (`benchmarks/swap.py --only JAX --model "keras-hub ResNet"`).',
    "JAX on CPU, the statistics of a small batch (256, 1024): YNNPACK's plain sums read a materialized d, one pass "
    "each, 11 passes over the data in the training step; one variadic reduction over leading blocks reads x "
    "once, 8 passes (XLA's dump). The step's CPU time 0.87 against 1.14 × Keras's, wall 0.90 against 1.21 × "
    "(one process each, load average near 8) (`ops/jax.py`).",
    "JAX on CPU, the 1.55 MiB of temporaries of the layer benchmark's jitted step (XLA's buffer assignment): the "
    "statistics' first-level partial sums (Σd, Σd², one per 32 rows). With dy an argument of the step, the "
    "gradient's Σdy and Σdy·d do not depend on the statistics, and XLA schedules them (their partials in the "
    "buffers of the outputs y and dx, written last) while the statistics' partials are still held, so those get "
    "a buffer of their own. Centring the gradient on the rounded mean (shift + δ, exact with the remainder in δ's "
    "place) made the gradient's sums wait for the statistics: their partials moved into the output buffers, and "
    "the gradient's 3.1 MiB out of them (XLA then wrote y before the gradient's second level); reverted. "
    "`lax.optimization_barrier` does not order them: XLA:CPU removes it before scheduling. Where dy comes from "
    "y (a loss after the layer: every model), kerasbn's step keeps fewer temporaries than Keras's: 6.1 against "
    "24.5 MiB on (32, 56, 56, 64), 1.5 against 6.1 on (8, 28, 28, 256), 0.27 against 1.02 on (256, 1024), float32.",
    "torch's CPU reductions for the statistics, Σd² over (100352, 64) at an offset of 10⁴: a plain cascade sum "
    "2.6e-7 relative, `linalg.vector_norm` 1.7e-5, torch's own `batch_norm_update_stats` 1.3e-5 in the "
    "variance; its gradient kernel's dγ and dβ 5e-6 relative (1e5 values per feature), 1.8e-5 (1e6) "
    "(`ops/torch.py`).",
]


def _design_lines() -> list[str]:
    return ["", "### Measurements behind the arrangements in kerasbn/ops", ""] + [f"- {m}" for m in DESIGN_MEASUREMENTS]


def _before_after_lines() -> list[str]:
    if not BEFORE_AFTER_JSON.exists():
        return []
    result = json.loads(BEFORE_AFTER_JSON.read_text())
    rounds = max(len(r["after"]) for r in result["rows"])
    lines = [
        "",
        f"### Before/after: {result['baseline']}",
        "",
        f"{_machine_line(result['machine'])} A run of its own, apart from the full tables above (which may "
        "predate the after tree). Training step, kerasbn ÷ Keras in the same process; the two source "
        f"trees ran in alternating processes, {rounds} rounds"
        + (", `--quick` (11 repeats)" if result.get("quick") else "")
        + "; a ratio is the median over the rounds; change = after ÷ before − 1 (≤ +5 % allowed). Command: "
        "`python benchmarks/layer.py --quick --shape … --baseline DIR --baseline-label …`.",
        "",
        "| backend | mode | shape | dtype | before | after | change | rounds (before; after) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        before, after = statistics.median(r["before"]), statistics.median(r["after"])
        each = f"{', '.join(f'{v:.2f}' for v in r['before'])}; {', '.join(f'{v:.2f}' for v in r['after'])}"
        lines.append(
            f"| {r['backend']} | {r['mode']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} | {before:.2f} | "
            f"{after:.2f} | {after / before - 1:+.1%} | {each} |"
        )
    return lines


def write_markdown() -> None:
    body = [
        "## Layer",
        "",
        "Written by `benchmarks/layer.py` (`make bench`); raw figures in `docs/layer-benchmarks.json`"
        + (" and `docs/layer-benchmarks-gpu.json`" if GPU_JSON.exists() else "")
        + ".",
        "Training step = forward and backward to x, γ, β for a given upstream gradient, moving statistics "
        "updated; times are medians of interleaved repeats after warm-up, ratios the medians of the "
        "per-repeat ratios (a shared machine's load slows both layers of a repeat alike). "
        "The bandwidth bound is measured in the same "
        "run as a copy of the same tensor (2 passes): 8 passes for a training step, 2 for inference; "
        "“of bandwidth bound” = bound ÷ time (above 100 % where the copy of a small tensor is latency-bound, "
        "or where the compiler fuses passes the bound counts). bfloat16 runs use the `mixed_bfloat16` policy "
        "for both layers; TF's fused kernel is shown for float32 only. Every process runs in the default "
        "environment, as users run it; the rows whose mode says “tuned malloc” come from one more JAX process "
        "with glibc's `MALLOC_ARENA_MAX=1` and its mmap, trim and top-pad thresholds raised (freed buffers "
        "reused rather than mapped afresh): what page faults cost the step, not what a user gets. "
        "Commands: `python benchmarks/layer.py --malloc-tuned` (CPU; each backend and mode in its own process, "
        "since running one mode first shifted the timings of another); on a GPU machine `bash benchmarks/gpu.sh` "
        "writes `layer-gpu.json`, copied here as `docs/layer-benchmarks-gpu.json`, then "
        "`python benchmarks/layer.py --render`.",
    ]
    for path, gpu in ((CPU_JSON, False), (GPU_JSON, True)):
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        body += [
            "",
            f"### {'GPU' if gpu else 'CPU'}",
            "",
            _machine_line(result["machine"])
            + (" Quick run (`--quick`)." if result.get("quick") else "")
            + (
                f" The torch rows come from a run of their own: {result['torch_run']}." if "torch_run" in result else ""
            ),
            "",
        ]
        body += _load_lines(result) + _table(result, gpu) + _fit_lines(result) + _memory_lines(result)
    body += _before_after_lines() + _design_lines()
    section = "\n".join(body) + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find("\n## Layer\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
