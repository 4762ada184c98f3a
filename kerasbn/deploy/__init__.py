"""Files in and out: safe loading, atomic saving, the one verification, export.

- `files`: `load_model` (safe mode), `save_model` and `atomic_output`, `load_inputs`.
- `criteria`: the rule that passes or fails a candidate's outputs (`VerifyResult`; by the float64
  answer, by the model's noise, or element-wise; a discontinuous model's), explained there once.
- `verify`: `verify`, `check_runtime`, `Checks` and `Reference`: which inputs, the original's answers
  on them, the candidate's outputs, handed to the rule.
- `layerwise`: the folded layers of a discontinuous model judged one by one.
- `twins`: a model re-created in another float type (float64: the exact answer), and its evaluation there.
- `outputs`: a Keras model's inference outputs as the checks compare them, and random inputs.
- `tolerances`: the rule's numbers and the measurements behind them.
- `export`: `export`, the one pipeline (fold, convert, graph passes, int8, check in the runtime, atomic
  write), and the 0.1 names `export_onnx`, `export_litert`, `export_int8`.
- `target`: a format as a small object plugged into the pipeline, and the registry of formats.
- `onnx`: the ONNX target (tf2onnx, ONNX Runtime's quantizer).
- `onnx_passes`: the passes that fuse what an ONNX Conv, ConvTranspose or Gemm can carry.
- `litert`: the LiteRT target (TensorFlow's LiteRT converter).
- `quantize`: the int8 step's judgement by top-1 agreement, and `audit_quantization` (per-tensor vs
  per-channel weight ranges after each fold).
- `runtime`: an exported file run by ONNX Runtime or the LiteRT interpreter, and its latency.
"""
