#!/usr/bin/env bash
# The kerasbn command line on the models the examples save: the commands a
# user types. Run `make demo` and `python examples/fold_resnet50.py` first
# (they write build/demo/ and build/fold_resnet50/), then
#
#     bash examples/cli.sh
#
# Every command is printed before it runs. Exit status of kerasbn: 0 success,
# 1 verification failed or --strict findings, 2 bad usage or unreadable input.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"   # the console script `make install` put there

DEMO=build/demo/digits_cnn.keras
RESNET=build/fold_resnet50/resnet50.keras
OUT=build/cli
for model in "$DEMO" "$RESNET"; do
    [[ -f $model ]] || { echo "$model is missing: run make demo and python examples/fold_resnet50.py" >&2; exit 2; }
done
mkdir -p "$OUT"

run() { printf '\n$ %s\n' "$*"; "$@"; }

# What would a fold do? A table per BN layer, then the redundant biases.
run kerasbn audit "$DEMO"

# The same as JSON, for scripts: here, the totals of ResNet50.
printf '\n$ kerasbn audit %s --format json | python -c ...totals...\n' "$RESNET"
kerasbn audit "$RESNET" --format json | python -c 'import json, sys; print(json.load(sys.stdin)["totals"])'

# A CI gate: exit status 1 while the model still has foldable BN layers.
printf '\n$ kerasbn audit %s --strict -q || echo ...\n' "$RESNET"
kerasbn audit "$RESNET" --strict -q || echo "exit status $?: $RESNET still has foldable BN layers"

# Fold, verified on the inputs fold_resnet50.py saved (random ones without
# --inputs); the 53-row table is cut to its summary lines here.
printf '\n$ kerasbn fold %s -o %s --inputs build/fold_resnet50/inputs.npz --force | tail -4\n' "$RESNET" "$OUT/resnet50.folded.keras"
kerasbn fold "$RESNET" -o "$OUT/resnet50.folded.keras" --inputs build/fold_resnet50/inputs.npz --force | tail -4
run kerasbn audit "$OUT/resnet50.folded.keras" --strict -q
echo "exit status 0: nothing left to fold"

# Keep BN for further training, drop the biases it makes redundant.
run kerasbn strip-biases "$DEMO" -o "$OUT/digits_cnn.nobias.keras" --force

# ONNX with BN folded away, checked in ONNX Runtime at batch sizes 1 and 8.
run kerasbn export "$DEMO" -o "$OUT/digits_cnn.onnx" --opset 17 --force
