"""The README table of keras-hub backbones: BN found, folded (removed / in place), what stays and why.

Builds each backbone of `tests/keras_hub_models.py` from its small config
(random weights, no preset download), sets trained-like BN statistics
(seeded), then measures: the BN layers in the model (``_flatten_layers``),
those `kerasbn.audit` reports, those `kerasbn.fold` folds (how many in place),
fold time, and the largest error of the folded model saved and reloaded,
relative to each output's max |y|; then `kerasbn.export` (fold, tf2onnx,
graph passes, ONNX Runtime check) and ONNX Runtime's largest error relative
to max |y|, with the BatchNormalization ops left in the graph. Prints a
Markdown table.

Run: ``.venv/bin/python examples/keras_hub_table.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kerasbn_cli.quiet import import_frameworks  # noqa: E402

import_frameworks()  # TensorFlow's start-up noise held back, real errors kept
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402
import kerasbn.errors  # noqa: E402
from kerasbn.deploy.outputs import keras_outputs  # noqa: E402
from tests.helpers import count_bn  # noqa: E402
from tests.keras_hub_models import BACKBONES, image_batch, trained_like  # noqa: E402

HEADERS = (
    "backbone (keras-hub)",
    "layers",
    "BN in model",
    "BN audit reports",
    "folded (in place)",
    "exported",
    "fold time",
    "reloaded max \\|Δ\\| / max \\|y\\|",
    "stays, and why",
)


def row(name: str) -> list[str]:
    model = trained_like(BACKBONES[name]())
    report = kerasbn.audit(model)
    start = time.perf_counter()
    result = kerasbn.fold(model)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "folded.keras"
        kerasbn.save_model(result.model, path)
        reloaded = kerasbn.load_model(path)
        x = image_batch(model, batch=2, seed=1)
        err = max(
            float(np.max(np.abs(z - y)) / np.max(np.abs(y)))
            for y, z in zip(keras_outputs(model, x), keras_outputs(reloaded, x))
        )
        try:
            exported = kerasbn.export(model, Path(tmp) / "model.onnx", checks=kerasbn.Checks(inputs=x))
        except kerasbn.errors.KerasbnError as exc:
            export = f"no: {exc}"
        else:
            worst = max(c.max_rel_error for c in exported.checks)
            left = exported.op_counts.get("BatchNormalization", 0)
            export = f"yes, {worst:.1e}, {left} BN op{'s' if left != 1 else ''} left"
    folded = result.report.folded
    in_place = sum(f.how == "in_place" for f in folded)
    stays = Counter(str(f.code) for f in result.report.not_folded)
    why = ", ".join(f"{n} `{code}`" for code, n in stays.most_common()) or "—"
    return [
        name,
        str(len(model._flatten_layers(include_self=False))),
        str(count_bn(model)),
        str(report.bn_layers),
        f"{len(folded)} ({in_place})",
        export,
        f"{seconds:.1f} s",
        f"{err:.1e}",
        why,
    ]


def main() -> int:
    rows = [row(name) for name in BACKBONES]
    print("| " + " | ".join(HEADERS) + " |")
    print("| " + " | ".join("---" for _ in HEADERS) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
