"""Chart the layer benchmark: kerasbn vs Keras's BatchNormalization, per configuration.

Reads the JSON that `benchmarks/layer.py` writes (``docs/layer-benchmarks.json``
for the CPU and, when present, ``docs/layer-benchmarks-gpu.json``) and saves
``docs/benchmarks.png``: per device, a panel for the training step and one
for inference. Each bar is a time divided by Keras's
time for the same configuration (Keras = 1, shorter is faster); the black tick
is the memory-bandwidth bound measured in the same run (a copy of the tensor,
scaled to the passes the operation needs), the floor no implementation beats.

    python examples/plot_benchmarks.py
    python examples/plot_benchmarks.py --json build/layer.json --out build/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = [ROOT / "docs" / "layer-benchmarks.json", ROOT / "docs" / "layer-benchmarks-gpu.json"]
IMPLS = {"kerasbn": ("kerasbn", "tab:red"), "keras": ("Keras", "tab:blue"), "tf_fused": ("TF fused kernel", "tab:grey")}
PASSES = {"train": 8, "infer": 2}  # as in benchmarks/layer.py: passes over the tensor each op needs
DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
BACKEND = {"tensorflow": "TF", "jax": "JAX"}


def configurations(runs: list[dict], op: str) -> list[tuple]:
    """(backend, mode, shape, dtype) keys of ``op`` in the order they were run."""
    keys: list[tuple] = []
    for r in runs:
        key = (r["backend"], r["mode"], tuple(r["shape"]), r["dtype"])
        if r["op"] == op and key not in keys:
            keys.append(key)
    return keys


def device_title(machine: dict) -> str:
    if machine["device"] == "cpu":
        return f"CPU: {machine['name']} ({machine['cores']} cores visible)"
    return f"GPU: {machine['name']}"


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    widest = max(len(configurations(r["runs"], "train")) for r in results)
    fig, axes = plt.subplots(2 * len(results), 1, figsize=(max(9, 1.15 * widest + 2), 3.6 * 2 * len(results)))
    for i, result in enumerate(results):
        runs = {(r["backend"], r["mode"], tuple(r["shape"]), r["dtype"], r["op"], r["impl"]): r for r in result["runs"]}
        for ax, op in zip(axes[2 * i : 2 * i + 2], ("train", "infer")):
            keys = configurations(result["runs"], op)
            impls = [i for i in IMPLS if any(k + (op, i) in runs for k in keys)]
            width = 0.8 / len(impls)
            x = np.arange(len(keys))
            for j, impl in enumerate(impls):
                ratios = [runs[k + (op, impl)]["ratio_to_keras"] if k + (op, impl) in runs else np.nan for k in keys]
                label, color = IMPLS[impl]
                ax.bar(x + (j - (len(impls) - 1) / 2) * width, ratios, width, label=label, color=color)
            bounds = [runs[k + (op, "keras")]["copy_ms"] / 2 * PASSES[op] / runs[k + (op, "keras")]["ms"] for k in keys]
            ax.scatter(x, bounds, marker="_", s=900, color="black", zorder=3, label="bandwidth bound")
            # Small tensors on a GPU stay in cache, where the copy-based bound
            # can exceed the measured time: keep those marks in view too.
            tallest = max(max(bounds), *(p.get_height() for p in ax.patches if np.isfinite(p.get_height())))
            ax.set_ylim(0, 1.1 * tallest)
            ax.axhline(1.0, color="tab:blue", lw=0.8, ls=":")
            ax.set_xticks(
                x,
                [f"{BACKEND.get(b, b)} {m}\n{'×'.join(map(str, s))}\n{DTYPE.get(d, d)}" for b, m, s, d in keys],
                fontsize=7.5,
            )
            ax.set_ylabel("time ÷ Keras's time")
            name = "training step (forward + backward)" if op == "train" else "inference"
            ax.set_title(f"{name}, {device_title(result['machine'])}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("kerasbn.BatchNormalization vs keras.layers.BatchNormalization (lower is faster)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, nargs="+", help="benchmark JSON files (default: those under docs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = parser.parse_args(argv)
    paths = args.json or [p for p in DEFAULT_JSON if p.exists()]
    if not paths:
        parser.error("no benchmark JSON: run `make bench` (benchmarks/layer.py) first")
    plot([json.loads(p.read_text()) for p in paths], args.out)
    print(f"wrote {args.out} from {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
