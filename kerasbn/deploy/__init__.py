"""Files in and out: safe loading, atomic saving, the one verification, export.

- `files`: `load_model` (safe mode), `save_model` and `atomic_output`, `load_inputs`.
- `verify`: `verify`, `check_runtime`, `judge` (by the float64 answer) and `compare` (by noise,
  or element-wise): the one comparison with one set of defaults.
- `exact`: a model's twin in another float type (float64: the exact answer) and its evaluation.
- `onnx`: `export_onnx` (fold, tf2onnx, graph passes, ONNX Runtime check).
- `onnx_passes`: the passes that fuse what an ONNX Conv, ConvTranspose or Gemm can carry.
- `litert`: `export_litert` (fold, TensorFlow's LiteRT converter, LiteRT interpreter check).
- `quantize`: `export_int8` (static int8 after the fold, judged against the float model) and
  `audit_quantization` (per-tensor vs per-channel weight ranges after each fold).
- `runtime`: an exported file run by ONNX Runtime or the LiteRT interpreter, and its latency.
"""
