"""keras-hub CNN backbones built from config: every BN found, folds exact, reloads, verifies."""

from __future__ import annotations

import numpy as np
import pytest

import kerasbn
from kerasbn.folding import plan
from tests.helpers import count_bn, outputs
from tests.keras_hub_models import BACKBONES, image_batch, trained_like

pytest.importorskip("keras_hub")

# Blocks written as custom layers: their BN can only be folded in place.
CUSTOM_BLOCKS = {"HGNetV2", "MobileNet (v3)", "EfficientNet (fused-MBConv)"}
FAST = "HGNetV2"


def _params():
    return [pytest.param(name, marks=() if name == FAST else pytest.mark.slow) for name in BACKBONES]


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
