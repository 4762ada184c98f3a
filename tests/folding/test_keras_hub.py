"""keras-hub backbones built from config: every BN found, folds exact, reloads, verifies, exports."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.target import targets
from kerasbn.folding import plan
from tests.helpers import assert_matches_original, count_bn, file_outputs, outputs
from tests.keras_hub_models import BACKBONES, efficientnet_test_config, image_batch, trained_like

pytest.importorskip("keras_hub")

# Blocks written as custom layers: their BN can only be folded in place.
CUSTOM_BLOCKS = {"HGNetV2", "MobileNet (v3)", "EfficientNet (fused-MBConv)"}
FAST = "HGNetV2"


# CSPNet is the user-path matrix's keras-hub model (tests/paths), which audits, folds and reloads it: test-large.
REPEATED = "CSPNet"


def _params():
    marks = {FAST: (), REPEATED: (pytest.mark.slow, pytest.mark.large)}
    return [pytest.param(name, marks=marks.get(name, pytest.mark.slow)) for name in BACKBONES]


@pytest.mark.parametrize("name", _params())
def test_backbone_audit_fold_reload(name, tmp_path):
    model = trained_like(BACKBONES[name]())
    report = kerasbn.audit(model)
    assert report.bn_layers == count_bn(model)
    for finding in report.batch_norms:
        assert finding.foldable or (finding.code in set(plan.Reason) and finding.reason)

    result = kerasbn.fold(model)
    folded = result.report.folded
    assert len(folded) == report.foldable > 0
    if name in CUSTOM_BLOCKS:
        assert any(f.how == plan.IN_PLACE for f in folded)

    kerasbn.save_model(result.model, tmp_path / "folded.keras")
    reloaded = kerasbn.load_model(tmp_path / "folded.keras")
    x = image_batch(model, batch=2, seed=1)
    for y, z in zip(outputs(model, x), outputs(reloaded, x)):
        assert np.max(np.abs(z - y)) <= 1e-4 * np.max(np.abs(y))
    assert kerasbn.verify(model, reloaded, x).passed


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.parametrize("fmt", ["onnx", "litert"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_exports_within_its_float32_error(name, fmt, tmp_path):
    # Each small backbone, its BN statistics from its own activations on generated data (a training-mode
    # pass, as training leaves them), folded and exported; the file in its own runtime against the model
    # evaluated in float64, on inputs the export's check never saw.
    keras.utils.set_random_seed(0)
    model = BACKBONES[name]()
    model = kerasbn.calibrate(model, image_batch(model, batch=8, seed=0), mode="paper", batch_size=8).model
    target = targets()[fmt]
    result = kerasbn.export(model, tmp_path / f"m{target.suffix}", to=fmt)
    assert result.verified and len(result.fold_report.folded) == kerasbn.audit(model).foldable > 0
    x = image_batch(model, batch=2, seed=3)
    assert_matches_original(model, file_outputs(result.path, fmt, model, x), x, "float32")


@pytest.fixture(scope="module")
def efficientnet():
    """keras-hub's own 477-layer EfficientNet test config (112 BN), seeded, with the statistics of its own
    activations (as training leaves them)."""
    keras.utils.set_random_seed(0)
    model = efficientnet_test_config()
    data = np.random.default_rng(0).standard_normal((4, *model.inputs[0].shape[1:])).astype("float32")
    return kerasbn.calibrate(model, data, mode="paper", batch_size=4).model


@pytest.mark.slow
@pytest.mark.large
def test_efficientnet_test_config_folds_within_its_float32_error(efficientnet):
    # Judged against the model evaluated in float64, not against its float32 noise. Seeded weights: a
    # correct fold's margin was 0.71-0.89 over three random initializations (its bias cancels the BN mean
    # in float32), a 0.1 % wrong one 2.7-3.5.
    model = efficientnet
    result = kerasbn.fold(model)
    assert len(result.report.folded) == count_bn(model) == 112
    x = image_batch(model, batch=2, seed=1)
    check = kerasbn.verify(model, result.model, x)
    assert check.passed and check.reference == "float64" and check.dtype == "float32", check
    # The float64 evaluation of the fold is no farther from the exact answer than float32 arithmetic is.
    assert check.float64_error <= check.own_error
    # A 0.1 % wrong scale in one folded kernel (the last block's projection) fails.
    conv = [la for la in result.model._flatten_layers(recursive=True) if la.name.endswith("project_conv")][-1]
    conv.kernel.assign(np.asarray(conv.kernel) * 1.001)
    assert not kerasbn.verify(model, result.model, x).passed


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_efficientnet_test_config_exports_within_its_float32_error(efficientnet, fmt, tmp_path):
    # The folded file in its own runtime, against the model evaluated in float64: no farther from it than
    # 4× Keras's own float32 outputs are (plus 8 unit roundoffs), on inputs the export's check never saw.
    target = targets()[fmt]
    result = kerasbn.export(efficientnet, tmp_path / f"m{target.suffix}", to=fmt)
    assert result.verified and len(result.fold_report.folded) == 112
    assert all(c.reference == "float64" for c in result.checks), result.checks
    x = image_batch(efficientnet, batch=2, seed=3)
    assert_matches_original(efficientnet, file_outputs(result.path, fmt, efficientnet, x), x, "float32")


# D-FINE: its query selection (top-k) makes its outputs discontinuous, so folds are verified layer by layer.


@pytest.fixture(scope="module")
def d_fine_model():
    from tests.keras_hub_models import d_fine

    return trained_like(d_fine())


@pytest.mark.slow
@pytest.mark.large
def test_d_fine_folds_verified_layer_by_layer_library_and_cli(d_fine_model, tmp_path):
    import json

    import keras

    from tests.cli.conftest import assert_clean_error, invoke
    from tests.keras_hub_models import d_fine_batch

    model, x = d_fine_model, d_fine_batch(seed=1)
    result = kerasbn.fold(model)
    assert len(result.report.folded) == count_bn(model) == 49
    good = kerasbn.verify(model, result.model, x)
    assert good.passed and "TopKV2" in good.discontinuous and len(good.layers) == 49
    assert all(c.passed and c.margin <= 1 for c in good.layers)
    partner = next(
        layer
        for layer in result.model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Conv2D) and layer.name == "lateral_conv_1_convolution"
    )
    partner.kernel.assign(np.asarray(partner.kernel) * np.float32(1.001))  # a 0.1 % wrong scale
    bad = kerasbn.verify(model, result.model, x)
    assert not bad.passed and [c.layer.split("/")[-1] for c in bad.layers if not c.passed] == [partner.name]

    kerasbn.save_model(model, tmp_path / "d_fine.keras")
    np.savez(tmp_path / "x.npz", pixel_values=x)
    cli = invoke(
        "fold",
        tmp_path / "d_fine.keras",
        "-o",
        tmp_path / "f.keras",
        "--inputs",
        tmp_path / "x.npz",
        "--format",
        "json",
    )
    assert cli.exit_code == 0, cli.output
    checks = json.loads(cli.stdout)["verification"]
    for stage in ("rewritten", "reloaded"):
        assert (
            checks[stage]["passed"]
            and "TopKV2" in checks[stage]["discontinuous"]
            and len(checks[stage]["layers"]) == 49
        )
    # Random 8×8 images are too small for its top-k of 10 queries: one line, exit 2, nothing written.
    refused = invoke("fold", tmp_path / "d_fine.keras", "-o", tmp_path / "g.keras")
    assert_clean_error(refused.exit_code, refused.stdout, refused.stderr)
    assert "--inputs" in refused.stderr and not (tmp_path / "g.keras").exists()


@pytest.mark.slow
@pytest.mark.large
def test_d_fine_exports_to_onnx_judged_before_its_selection(d_fine_model, tmp_path):
    from kerasbn.deploy.verify import Checks
    from tests.keras_hub_models import d_fine_batch

    result = kerasbn.export(
        d_fine_model, tmp_path / "d_fine.onnx", checks=Checks(inputs=d_fine_batch(seed=2)), compare_unfolded=False
    )
    assert result.verified and "BatchNormalization" not in result.op_counts
    # keras.ops.map (its per-sample query gathers) is batched, not a Loop; the top-k is ONNX's own.
    assert "Loop" not in result.op_counts and result.op_counts["TopK"] == 4
    for check in result.checks:
        assert check.passed and "TopKV2" in check.discontinuous and check.margin <= 1
