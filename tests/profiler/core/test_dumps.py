"""dump_tensors / dump_layers / compare_dumps: the deployment-alignment files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import qatkit
import torch
from qatkit.profiler import compare_dumps, dump_layers, dump_tensors
from qatkit.profiler.core.dumps import read_dump
from torch import nn


def test_dump_writes_little_endian_bin_npy_and_a_manifest(tmp_path):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    q = torch.tensor([[-128, 5], [127, 0]], dtype=torch.int8)
    paths = dump_tensors(tmp_path, scales={"q": 0.5}, preprocessed=x, q=q)
    assert paths["preprocessed"].read_bytes() == x.numpy().astype("<f4").tobytes()
    assert np.array_equal(np.load(tmp_path / "q.npy"), q.numpy())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entries = {t["name"]: t for t in manifest["tensors"]}
    assert entries["q"] == {"name": "q", "order": 1, "shape": [2, 2], "dtype": "int8",
                            "scale": 0.5, "bin": "q.bin", "npy": "q.npy", "bytes": 4}
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left"
    np.testing.assert_array_equal(read_dump(tmp_path, "preprocessed"), x.numpy())


def test_compare_dumps_flags_values_beyond_the_tolerance(tmp_path):
    ref = torch.linspace(-1, 1, 100)
    dump_tensors(tmp_path / "ref", pre=ref, post=ref * 2)
    noisy = ref.clone()
    noisy[:3] += 5e-4  # beyond 1e-4 on 3% of the values
    dump_tensors(tmp_path / "cand", pre=noisy, post=ref * 2)
    table = compare_dumps(tmp_path / "ref", tmp_path / "cand", atol=1e-4)
    rows = table.set_index("Name")
    assert not rows.loc["pre", "Pass"] and rows.loc["pre", "Mismatched Fraction"] == 0.03
    assert rows.loc["pre", "Max Abs Error"] == pytest.approx(5e-4, rel=1e-3)
    assert rows.loc["post", "Pass"] and rows.loc["post", "Max Abs Error"] == 0.0
    # a board writes bare .bin files: read with the reference's shape and dtype
    board = tmp_path / "board"
    board.mkdir()
    (board / "pre.bin").write_bytes(ref.numpy().astype("<f4").tobytes())
    table = compare_dumps(tmp_path / "ref", board).set_index("Name")
    assert table.loc["pre", "Pass"] and table.loc["post", "Note"] == "missing in the candidate"
    # a truncated .bin is a clear error, never a silent comparison
    (board / "pre.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="12 bytes, but the manifest says float32 \\[100\\]"):
        compare_dumps(tmp_path / "ref", board)
    with pytest.raises(ValueError, match="no manifest.json"):
        compare_dumps(board, tmp_path / "ref")
    with pytest.raises(ValueError, match="file name"):
        dump_tensors(tmp_path, **{"a/b": ref})


def test_dump_layers_writes_the_integer_model_in_execution_order(tmp_path, calibrate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    x = torch.randn(1, 3, 8, 8)
    qm = calibrate(model.eval(), x)
    im = qatkit.convert_fx(qm)
    dump_layers(im, x, tmp_path / "int")
    entries = json.loads((tmp_path / "int" / "manifest.json").read_text())["tensors"]
    ops = [e["op"] for e in entries]
    assert ops[:2] == ["input_1_quant", "0"] and entries[0]["name"] == "0000_input_1_quant"
    conv = next(e for e in entries if e["op"] == "0")
    assert conv["dtype"] == "int8" and conv["scale"] > 0
    q = read_dump(tmp_path / "int", conv["name"])
    with torch.no_grad():
        y = qm.get_submodule("0")(qm.get_submodule("input_1_quant")(x))
    np.testing.assert_array_equal(q, torch.round(y / conv["scale"]).to(torch.int8).numpy())
    # the integer model against its own fake-quant model: every layer equal
    dump_layers(qm, x, tmp_path / "fq")
    table = compare_dumps(tmp_path / "int", tmp_path / "fq", atol=0)
    assert table["Pass"].all(), table
