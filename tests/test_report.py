"""The one printable protocol (`kerasbn.printable`) and its rendering (`kerasbn.report`): every record says
what it shows once, and its text, rich and Markdown forms are drawn from that one view."""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import pytest
from rich.console import Console

from kerasbn import report
from kerasbn.deploy.criteria import LayerCheck, VerifyResult
from kerasbn.deploy.reports import Agreement, Int8Report, QuantizationAudit, WeightRange
from kerasbn.folding.reports import AuditReport, BNFinding, FoldReport, RedundantBias, StripReport
from kerasbn.printable import Printable, Table
from kerasbn.statistics.reports import BNStaleness, CalibrationReport, StalenessReport, SwapReport

RECORD_MODULES = (
    "kerasbn.folding.reports",
    "kerasbn.statistics.reports",
    "kerasbn.deploy.reports",
    "kerasbn.deploy.criteria",
    "kerasbn.deploy.export",
)
PRINTED = {
    "AuditReport",
    "FoldReport",
    "StripReport",
    "SwapReport",
    "StalenessReport",
    "CalibrationReport",
    "Int8Report",
    "QuantizationAudit",
    "VerifyResult",
    "ExportResult",
    "LayerCheck",
}

FOLDS = BNFinding(
    layer="bn",
    path="outer/bn",
    partner="conv",
    direction="backward",
    foldable=True,
    reason=None,
    code=None,
    parameters=8,
)
STAYS = BNFinding(
    layer="bn2",
    path="bn2",
    partner=None,
    direction=None,
    foldable=False,
    reason="a | in the reason",
    code="no_partner",
    parameters=8,
)
BIAS = RedundantBias(layer="dense", path="dense", bn="bn3", parameters=1200)
STALE = BNStaleness(
    layer="bn",
    path="outer/bn",
    values=64,
    mean_shift=0.5,
    mean_shift_max=1.0,
    variance_ratio=2.0,
    variance_ratio_min=1.5,
    variance_ratio_max=3.0,
    stale=True,
)
LAYER = LayerCheck(
    layer="outer/conv",
    bns=("bn",),
    passed=True,
    error=1e-7,
    own_error=2e-7,
    float64_error=1e-12,
    allowed=3e-6,
    margin=0.03,
    dtype="float32",
)
VERDICT = VerifyResult(
    passed=True,
    max_abs_error=1e-6,
    max_rel_error=1e-7,
    max_abs_reference=10.0,
    atol=None,
    rtol=None,
    tolerance="max|Δ|/max|y| within a few times the original's own float32 error against float64, " * 3,
    outputs=1,
    batch_size=8,
    layers=(LAYER,),
)


def _records() -> dict[str, Printable]:
    agreement = Agreement(
        dataset="calibration", samples=10, top1=1.0, max_abs_error=0.1, mean_abs_error=0.01, max_abs_reference=2.0
    )
    weights = WeightRange(
        layer="conv", bn="bn", weight="kernel", channels=4, ratio_before=1.5, ratio_after=20.0, flagged=True
    )
    return {
        "audit": AuditReport(
            model="m", batch_norms=[FOLDS, STAYS], redundant_biases=[BIAS], parameters=100, parameters_saved=16
        ),
        "fold": FoldReport(
            model="m", folded=[FOLDS], not_folded=[STAYS], parameters_before=100, parameters_after=84, method="removed"
        ),
        "strip": StripReport(model="m", removed=[BIAS], parameters_before=100, parameters_after=88),
        "swap": SwapReport(model="m", to="kerasbn", swapped=["outer/bn"], notes=["bn: a note under the table"]),
        "staleness": StalenessReport(
            model="m", data="d.npz", samples=64, batch_size=8, max_shift=0.25, max_ratio=1.5, batch_norms=[STALE]
        ),
        "calibration": CalibrationReport(
            model="m", mode="paper", data="d.npz", samples=64, batch_size=8, passes=1, batch_norms=[STALE]
        ),
        "int8": Int8Report(
            path=Path("m.onnx"),
            format="onnx",
            agreements=(agreement,),
            min_agreement=0.99,
            size_float=4096,
            size_int8=1024,
            latency_float_ms=1.0,
            latency_int8_ms=0.5,
            op_counts_float={"Conv": 1},
            op_counts_int8={"QLinearConv": 1},
        ),
        "quantization": QuantizationAudit(model="m", layers=[weights]),
        "verify": VERDICT,
        "layer": LAYER,
    }


def test_every_printed_record_follows_the_protocol_the_same_way():
    for name in RECORD_MODULES:
        importlib.import_module(name)
    found, stack = {}, list(Printable.__subclasses__())
    while stack:
        cls = stack.pop()
        found[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    assert PRINTED <= set(found), PRINTED - set(found)
    for cls in found.values():
        # Drawing is the protocol's: a record only says what it shows.
        assert not {"__str__", "__rich__", "to_markdown"} & set(vars(cls)), cls


@pytest.mark.parametrize("name", sorted(_records()))
def test_text_rich_and_markdown_are_drawn_from_one_view(name):
    record = _records()[name]
    view = record.view()
    tables = [s for s in view if isinstance(s, Table)]
    lines = [s for s in view if isinstance(s, str)]
    text = str(record)
    buffer = io.StringIO()
    Console(file=buffer, width=140, color_system=None, force_terminal=False).print(record)
    if all(len(line) <= 140 for line in lines):
        assert buffer.getvalue().rstrip() == text
    else:  # the console wraps a long line, the text keeps it whole
        assert buffer.getvalue().split() == text.split()
    markdown = record.to_markdown()
    for table in tables:
        md_rows = table.markdown_rows if table.markdown_rows is not None else table.rows
        assert sum(line.startswith("| ") for line in markdown.splitlines()) >= len(md_rows) + 2
        for row in md_rows:
            for cell in row:
                assert str(cell).replace("|", "\\|") in markdown
        for row in table.rows:
            for cell in row:
                assert cell in text
        if table.title:
            assert table.title in text
    for line in lines:
        assert line in markdown and line in text
    assert isinstance(record.to_dict(), dict)


def test_a_line_stays_one_line_in_text():
    # A VerifyResult is quoted inside error messages: its text is one line however long.
    text = str(VERDICT)
    assert "\n" not in text and len(text) > 140
    assert text.startswith("verify passed: ") and VERDICT.tolerance.strip() in text


def test_markdown_heading_and_summary():
    plain = Table(title="Title", headers=("a",), rows=[["1"]], caption="the caption")
    assert report.markdown([plain]) == "#### Title\n\n| a |\n| --- |\n| 1 |\n\nthe caption."
    own = Table(title="Title", headers=("a",), rows=[["1"]], heading="### Own", summary="**sum**", markdown_rows=[[2]])
    assert report.markdown([own, "a line"]) == "### Own\n\n| a |\n| --- |\n| 2 |\n\n**sum**\n\na line"


def test_audit_markdown_keeps_its_heading_verdict_and_raw_bias_counts():
    markdown = _records()["audit"].to_markdown()
    assert markdown.startswith("### BatchNormalization audit of `m`\n")
    assert "**1/2** BN layers fold, saving 16 of 100 parameters." in markdown
    assert "| dense | bn3 | 1200 |" in markdown  # Markdown's own cells: the table keeps its 1,200
    assert "1,200" in str(_records()["audit"])


@pytest.mark.parametrize("size", [0, 1023, 1024, 2**20 - 1, 2**20, 5 * 2**30])
def test_file_size(size):
    text = report.file_size(size)
    number, unit = text.split()
    scale = {"B": 1, "KiB": 1024, "MiB": 2**20}[unit]
    assert size < 1024 or unit != "B"
    assert abs(float(number) * scale - size) <= 0.05 * scale
