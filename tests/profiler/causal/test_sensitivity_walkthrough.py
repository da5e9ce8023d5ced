"""examples/debug_walkthrough.py end to end (about 80 s): for each injected fault the culprit
is ranked in the top 3, and suggest_mixed_precision's configuration, prepared and calibrated,
reaches >= 99% of float accuracy with <= 3 layers changed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
dw = importlib.import_module("debug_walkthrough")


@pytest.mark.slow
def test_walkthrough(capsys):
    rows = dw.main()
    out = capsys.readouterr().out
    assert [r.fault for r in rows] == list(dw.FAULTS)
    for r in rows:
        assert r.rank < 3, r
        assert r.before < 0.95 * r.float_acc, r
        assert r.after >= 0.99 * r.float_acc and r.layers <= 3, r
        assert max(r.recovered[1:]) > 0.99, r
        assert f"{r.fault:<16} {r.culprit:<8}" in out
    assert "after prepare_qat_fx(**res.prepare_kwargs) + calibrate" in out
