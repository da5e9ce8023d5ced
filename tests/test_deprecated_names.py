"""Old public names stay reachable for one release: reading one warns once
(``DeprecationWarning`` naming the new path) and gives the new object; the old names are in no
``__all__``.  This is the only place the old spellings are used."""

from __future__ import annotations

import importlib
import warnings

import pytest
import qatkit
import qatkit.profiler  # noqa: F401  (registers the profiler's old names)
from qatkit import _deprecation

#: (module, old name) -> the new path, as users are told
OLD_NAMES = {
    ("qatkit", "set_fake_quantize"): "qatkit.set_fake_quant_state",
    ("qatkit", "get_fake_quantize_state"): "qatkit.get_fake_quant_state",
    ("qatkit", "default_qat_out_8bit_fake_quant_qconfig"):
        "qatkit.default_qat_8bit_out_fake_quant_qconfig",
    ("qatkit", "default_calib_out_8bit_fake_quant_qconfig"):
        "qatkit.default_calib_8bit_out_fake_quant_qconfig",
    ("qatkit", "release_exact_caches"): "qatkit.fake_quantize.release_exact_caches",
    ("qatkit", "ptq_log"): "qatkit.algorithms.ptq_log",
    ("qatkit.fake_quantize", "set_fake_quantize"): "qatkit.fake_quantize.set_fake_quant_state",
    ("qatkit.fake_quantize", "get_fake_quantize_state"):
        "qatkit.fake_quantize.get_fake_quant_state",
    ("qatkit.qconfig", "default_qat_out_8bit_fake_quant_qconfig"):
        "qatkit.qconfig.default_qat_8bit_out_fake_quant_qconfig",
    ("qatkit.qconfig", "default_calib_out_8bit_fake_quant_qconfig"):
        "qatkit.qconfig.default_calib_8bit_out_fake_quant_qconfig",
    ("qatkit.eager", "annotated_graph"): "qatkit.model_graph.annotated_graph",
    ("qatkit.eager", "link_eager_model"): "qatkit.eager.graph.link_eager_model",
    ("qatkit.eager", "eager_info"): "qatkit.eager.info.eager_info",
    ("qatkit.eager", "EagerInfo"): "qatkit.eager.info.EagerInfo",
    # the profiler's internals left its top level; its metric functions are named by their keys
    **{("qatkit.profiler", n): f"qatkit.profiler.core.metrics.{n}"
       for n in ("METRICS", "BatchMetric", "FINAL_SIMILARITY_THRESHOLD")},
    **{("qatkit.profiler", n): f"qatkit.profiler.report.html.{n}"
       for n in ("render_html", "build_verdict", "Verdict", "REPORT_SECTIONS")},
    ("qatkit.profiler", "MODES"): "qatkit.profiler.report.model_report.MODES",
    ("qatkit.profiler", "model_kind"): "qatkit.profiler.report.model_report.model_kind",
    ("qatkit.profiler", "ADVICE_COLUMNS"): "qatkit.profiler.report.advisor.ADVICE_COLUMNS",
    ("qatkit.profiler", "IncrementalRunner"):
        "qatkit.profiler.causal.incremental.IncrementalRunner",
    ("qatkit.profiler", "cosine_similarity"): "qatkit.profiler.cosine",
    ("qatkit.profiler", "max_abs_error"): "qatkit.profiler.max_abs",
    ("qatkit.profiler", "kl_divergence"): "qatkit.profiler.kl",
    ("qatkit.profiler.core.metrics", "cosine_similarity"): "qatkit.profiler.core.metrics.cosine",
    ("qatkit.profiler.core.metrics", "max_abs_error"): "qatkit.profiler.core.metrics.max_abs",
    ("qatkit.profiler.core.metrics", "kl_divergence"): "qatkit.profiler.core.metrics.kl",
    # qatkit.profiler.report was model_profiler's module; it is the report's package now
    **{("qatkit.profiler.report", n): f"qatkit.profiler.report.model_report.{n}"
       for n in ("model_profiler", "ProfilerReport", "MODES", "model_kind", "TOOLS",
                 "SENSITIVITY_TOOLS", "SENSITIVITY_SWEEP")},
}


def _new_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_alias_is_listed_here():
    assert _deprecation.DEPRECATED_ALIASES == OLD_NAMES


@pytest.mark.parametrize(("module", "old"), sorted(OLD_NAMES))
def test_an_old_name_warns_once_naming_the_new_one(fresh_warnings, module, old):
    new = OLD_NAMES[(module, old)]
    mod = importlib.import_module(module)
    assert old not in mod.__all__ and old not in vars(mod)
    assert new.rpartition(".")[2] in importlib.import_module(new.rpartition(".")[0]).__dict__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = getattr(mod, old)
        second = getattr(mod, old)
    assert first is _new_object(new) and second is first
    assert [w.category for w in caught] == [DeprecationWarning], [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"{module}.{old} is deprecated" in message and f"use {new}" in message, message
    assert caught[0].filename == __file__  # points at the user's line


def test_from_import_of_an_old_name_works_with_the_warning(fresh_warnings):
    with pytest.warns(DeprecationWarning, match="qatkit.set_fake_quant_state"):
        from qatkit import set_fake_quantize  # noqa: F401
    assert set_fake_quantize is qatkit.set_fake_quant_state


def test_the_renamed_functions_behave_as_before(fresh_warnings):
    from torch import nn

    model = nn.Sequential(qatkit.FakeQuantize(), nn.ReLU(), qatkit.FakeQuantize())
    with pytest.warns(DeprecationWarning):
        assert qatkit.set_fake_quantize(model, "validation") == 2
    assert qatkit.get_fake_quant_state(model) == {qatkit.FakeQuantState.VALIDATION: 2}


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'qatkit' has no attribute 'nothing_here'"):
        qatkit.nothing_here  # noqa: B018
    with pytest.raises(AttributeError, match="'qatkit.eager' has no attribute 'prepare_qatt'"):
        qatkit.eager.prepare_qatt  # noqa: B018
