"""A prepared / converted model saved with ``torch.save`` and loaded with ``torch.load`` keeps
its annotation: unpickling traces the code again (nodes may come back as ``conv1`` for the
saved ``conv1_1``) and drops ``GraphModule.meta``; qatkit undoes both on first contact."""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import qatkit
import torch
from qatkit.annotation import get_annotations

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from digits import DigitsNet  # noqa: E402


def _round_trip(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_saved_and_loaded_model_keeps_names_annotation_and_numbers():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(DigitsNet().eval(),
                                   {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    qatkit.calibrate(qm, x, progress=False)
    loaded = _round_trip(qm)
    names = [n.name for n in qm.graph.nodes]
    assert [n.name for n in loaded.graph.nodes] != names, "torch.load renames nodes here"

    anns = get_annotations(loaded)  # names restored, annotation found
    assert [n.name for n in loaded.graph.nodes] == names
    assert [a.name for a in anns.values()] == [a.name for a in get_annotations(qm).values()]
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
        # a copy of the loaded model keeps the annotation (unpickling dropped GraphModule.meta)
        assert torch.equal(qatkit.convert_fx(copy.deepcopy(loaded))(x), qatkit.convert_fx(qm)(x))
        int_loaded = _round_trip(qatkit.convert_fx(qm))
        assert torch.equal(qatkit.convert_fx(qm)(x), int_loaded(x))
    assert qatkit.get_provenance(loaded) == qatkit.get_provenance(qm)
