"""Deployment alignment: dump tensors the way NPU toolchains compare them, and compare dumps.

NPU guides tell users to save, for single samples, the original input, the preprocessed data,
the model output and the post-processed data from the training code, then check the board's
preprocessing (tolerance 1e-4) and post-processing (1e-3) against them; and, when the model
itself disagrees, to compare the NPU's per-layer dump with the integer model's.

* :func:`dump_tensors` writes each tensor as raw little-endian ``<name>.bin`` (what boards
  read and write) and ``<name>.npy``, plus ``manifest.json`` (shape, dtype, scale, order);
* :func:`dump_layers` writes every quantized op's output of a model -- the integers and their
  scales, in execution order -- for comparing with an NPU's own layer dump;
* :func:`compare_dumps` compares a candidate folder (another dump, or bare ``.bin`` files from
  a board, read with the reference's manifest) with a reference, per tensor.

Every file is written to a temporary name and renamed, so an interrupted dump never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .capture import get_raw_features

__all__ = ["dump_tensors", "dump_layers", "compare_dumps", "read_dump", "MANIFEST",
           "COMPARE_COLUMNS"]

MANIFEST = "manifest.json"
FORMAT = "qatkit-dump-1"
COMPARE_COLUMNS = ["Name", "Shape", "Dtype", "Max Abs Error", "Mismatched Fraction", "Pass",
                   "Note"]
_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
          "uint8": np.uint8, "bool": np.bool_}


def _file_stem(name: str) -> str:
    if not name or not re.fullmatch(r"[\w.()\-]+", name):
        raise ValueError(f"dump name {name!r}: use letters, digits, '_', '.', '-', '(', ')' "
                         "(it becomes a file name)")
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _write(out: Path, entries: list[dict], arrays: list[np.ndarray]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for entry, array in zip(entries, arrays, strict=True):
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        bin_path, npy_path = out / entry["bin"], out / entry["npy"]
        _atomic_write(bin_path, np.ascontiguousarray(little).tobytes())
        tmp = npy_path.with_name(f".{npy_path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, npy_path)
        paths[entry["name"]] = bin_path
    manifest = {"format": FORMAT, "tensors": entries}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    paths["manifest"] = out / MANIFEST
    return paths


def _entry(name: str, array: np.ndarray, scale: float | None, order: int) -> dict:
    if array.dtype.name not in _NUMPY:
        raise ValueError(f"dump '{name}': dtype {array.dtype} cannot be dumped; use one of "
                         f"{sorted(_NUMPY)}")
    stem = _file_stem(name)
    return {"name": name, "order": order, "shape": list(array.shape),
            "dtype": array.dtype.name, "scale": scale, "bin": f"{stem}.bin",
            "npy": f"{stem}.npy", "bytes": int(array.nbytes)}


def dump_tensors(out_dir: str | os.PathLike, scales: Mapping[str, float] | None = None,
                 **named_tensors: Any) -> dict[str, Path]:
    """Write each tensor as ``<name>.bin`` (raw little-endian) and ``<name>.npy``, and a
    ``manifest.json`` (order, shape, dtype, scale, files, bytes).

    Args:
        out_dir: the folder (created); existing dumps of the same names are replaced.
        scales: the quantization scale of tensors holding integers (by name), if any.
        **named_tensors: the tensors (or arrays), e.g. ``original=img, preprocessed=x,
            output=logits, postprocessed=boxes``.

    Returns:
        the ``.bin`` path of each tensor, and ``"manifest"``.

    Raises:
        ValueError: no tensor, a name that cannot be a file name, an unsupported dtype.

    Example::

        >>> dump_tensors("align/sample0", original=img, preprocessed=x, output=model(x))
        {'original': PosixPath('align/sample0/original.bin'), ...}
    """
    if not named_tensors:
        raise ValueError("dump_tensors: give the tensors as keywords, e.g. "
                         "dump_tensors(out_dir, preprocessed=x, output=y)")
    scales = dict(scales or {})
    unknown = set(scales) - set(named_tensors)
    if unknown:
        raise ValueError(f"dump_tensors: scales for {sorted(unknown)} but no such tensor")
    arrays = [_as_array(v) for v in named_tensors.values()]
    entries = [_entry(name, a, scales.get(name), i)
               for i, (name, a) in enumerate(zip(named_tensors, arrays, strict=True))]
    return _write(Path(out_dir), entries, arrays)


def dump_layers(model: nn.Module, example_inputs: Any, out_dir: str | os.PathLike,
                device: Any = None) -> dict[str, Path]:
    """Dump every quantized op's output of ``model`` for one input, in execution order: the
    integers (int8 / int16 ``.bin``) and their scales in the manifest; float outputs as
    float32.  For comparing an integer model (``convert_fx``) with an NPU's layer dump.

    File names are ``<order>_<op name>`` (``0003_layer1.0.conv1.bin``).

    Args:
        model: an integer (or calibrated fake-quant) model; not changed.
        example_inputs: one sample (a batch of one), or a tuple of inputs.
        out_dir: the folder (created).
        device: run there (default: the model's device).

    Example::

        >>> dump_layers(int_model, x[:1], "align/layers")["manifest"]
        PosixPath('align/layers/manifest.json')
    """
    records = [r for r in get_raw_features(model, example_inputs, device=device,
                                           preserve_int=True) if r.attr == "output"]
    entries, arrays = [], []
    for i, r in enumerate(records):
        array = _as_array(r.data)
        if r.is_int:
            array = array.astype(np.int16 if r.dtype == "qint16" else np.int8)
        safe = re.sub(r"[^\w.()\-]", "_", r.name)
        name = f"{i:04d}_{safe}"
        entry = _entry(name, array, r.scale, i)
        entry["op"] = r.name
        entries.append(entry)
        arrays.append(array)
    return _write(Path(out_dir), entries, arrays)


def _manifest(folder: Path) -> dict[str, dict] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a qatkit dump manifest (format {manifest.get('format')!r})")
    return {t["name"]: t for t in manifest["tensors"]}


def read_dump(folder: str | os.PathLike, name: str, like: Mapping[str, Any] | None = None
              ) -> np.ndarray:
    """Read tensor ``name`` of a dump folder from its ``.bin``, with the shape and dtype of its
    manifest entry (or of ``like``, the reference's entry, for a board's bare ``.bin``).

    Raises:
        ValueError: no such tensor, or a ``.bin`` whose size does not match the manifest.

    Example::

        >>> read_dump("align/sample0", "preprocessed").shape
        (1, 3, 224, 224)
    """
    folder = Path(folder)
    entries = _manifest(folder) or {}
    entry = entries.get(name, like)
    if entry is None:
        raise ValueError(f"{folder} has no tensor '{name}' (manifest: {sorted(entries)[:8]})")
    path = folder / entry.get("bin", f"{name}.bin")
    if not path.exists():
        raise ValueError(f"{folder}: '{path.name}' is missing")
    dtype = np.dtype(_NUMPY[entry["dtype"]]).newbyteorder("<")
    size = path.stat().st_size
    expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but the manifest says {entry['dtype']} "
                         f"{entry['shape']} = {expected} bytes: the dump is truncated or was "
                         "written with another shape / dtype")
    return np.fromfile(path, dtype=dtype).reshape(entry["shape"])


def compare_dumps(reference_dir: str | os.PathLike, candidate_dir: str | os.PathLike,
                  atol: float = 1e-4, rtol: float = 0.0) -> pd.DataFrame:
    """Compare every tensor of a reference dump with the candidate's.

    A value passes when ``|candidate - reference| <= atol + rtol * |reference|`` (integer
    dumps: compare integers with ``atol=0``, or pass ``atol`` in steps).  The candidate may be
    another :func:`dump_tensors` folder or a board's bare ``.bin`` files named as the
    reference's (read with the reference's shape and dtype).

    Args:
        reference_dir: the reference dump (with ``manifest.json``).
        candidate_dir: the dump to check.
        atol: absolute tolerance (the guides use 1e-4 for preprocessing, 1e-3 for
            post-processing).
        rtol: relative tolerance.

    Returns:
        one row per reference tensor: "Name", "Shape", "Dtype", "Max Abs Error",
        "Mismatched Fraction" (share of values beyond the tolerance), "Pass", "Note" (a
        missing tensor or a shape mismatch fails with the reason).

    Raises:
        ValueError: the reference has no manifest, or a ``.bin`` does not match its manifest.

    Example::

        >>> compare_dumps("align/sample0", "board/sample0", atol=1e-4)
    """
    reference = _manifest(Path(reference_dir))
    if reference is None:
        raise ValueError(f"{reference_dir} has no {MANIFEST}: write the reference with "
                         "qatkit.profiler.dump_tensors")
    candidate_manifest = _manifest(Path(candidate_dir)) or {}
    rows = []
    for name, entry in sorted(reference.items(), key=lambda kv: kv[1]["order"]):
        ref = read_dump(reference_dir, name)
        row = {"Name": name, "Shape": tuple(entry["shape"]), "Dtype": entry["dtype"],
               "Max Abs Error": math.nan, "Mismatched Fraction": math.nan, "Pass": False,
               "Note": ""}
        has_bin = (Path(candidate_dir) / entry["bin"]).exists()
        if name not in candidate_manifest and not has_bin:
            row["Note"] = "missing in the candidate"
            rows.append(row)
            continue
        got = read_dump(candidate_dir, name, like=entry)
        if got.shape != ref.shape:
            row["Note"] = f"shape {list(got.shape)} instead of {list(ref.shape)}"
            rows.append(row)
            continue
        a, b = ref.astype(np.float64), got.astype(np.float64)
        err = np.abs(b - a)
        bad = ~(err <= atol + rtol * np.abs(a))  # NaN counts as a mismatch
        row.update({"Max Abs Error": float(np.nanmax(err)) if err.size else 0.0,
                    "Mismatched Fraction": float(bad.mean()) if bad.size else 0.0,
                    "Pass": not bool(bad.any())})
        rows.append(row)
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)
