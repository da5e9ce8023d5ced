"""prepare_qat_fx: turn a float model into a QAT GraphModule.

Trace the model (:mod:`.tracer`) and prepare the trace (:mod:`.prepare_graph`: naming,
qconfigs with hybrid float islands, fusion, QAT modules and fake quants, the quantization
annotation); a model that does not trace whole is prepared region by region
(:mod:`.partial`), its untraceable code kept float.  :func:`get_provenance` reads, from the
annotation, which float op each op of a prepared model reproduces.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from ..annotation import get_annotations, has_annotations
from ..model_graph import annotated_graph
from .partial import is_partially_traced, partial_trace_of, prepare_partial, regions
from .prepare_graph import prepare_traced, warn_prepare
from .qconfig_dict import check_hybrid_args
from .tracer import TraceFailure, symbolic_trace

__all__ = ["prepare_qat_fx", "get_provenance"]

_CUSTOM_KEYS = {"concrete_args", "leaf_module_types", "leaf_module_names", "wrapped_functions",
                "partial_tracing"}


def prepare_qat_fx(
    model: nn.Module,
    qconfig_dict: dict,
    example_inputs: tuple | None = None,
    hybrid: bool = False,
    hybrid_dict: dict | None = None,
    prepare_custom_config_dict: dict | None = None,
) -> fx.GraphModule:
    """Prepare a float model for calibration and quantization-aware training.

    Args:
        model: the float model; it is deep-copied, never modified.
        qconfig_dict: ``{"": qconfig, "module_type": [(type, qc)], "module_name": [(name, qc)]}``
            (see :mod:`qatkit.fx.qconfig_dict`); ``None`` as a qconfig keeps an op float.
        example_inputs: a tuple of example inputs; when given, prepare runs them once (in eval
            mode, without gradients) to learn which values are float tensors.
        hybrid: step quantization: keep the modules of ``hybrid_dict`` float during QAT.
        hybrid_dict: ``{"module_name": [...], "module_type": [...]}`` float islands.
        prepare_custom_config_dict: ``{"concrete_args": {...}, "leaf_module_types": [...],
            "leaf_module_names": [...], "wrapped_functions": [...]}`` for tracing.

    Returns:
        a GraphModule with the model's call signature, in the QAT fake-quant state.

    Example::

        >>> qat_model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig},
        ...                            example_inputs=(x,))
        >>> set_fake_quant_state(qat_model, FakeQuantState.CALIBRATION)
    """
    custom = dict(prepare_custom_config_dict or {})
    bad = set(custom) - _CUSTOM_KEYS
    if bad:
        raise ValueError(f"unknown prepare_custom_config_dict keys {sorted(bad)}; valid: "
                         f"{sorted(_CUSTOM_KEYS)}")
    partial = custom.pop("partial_tracing", True)
    if not isinstance(partial, bool):
        raise ValueError(f"prepare_custom_config_dict['partial_tracing'] must be True or False, "
                         f"got {partial!r}")
    float_islands = check_hybrid_args(hybrid, hybrid_dict)
    # qconfigs are values shared by reference: the copy keeps the user's own objects
    memo = {id(m.__dict__["qconfig"]): m.__dict__["qconfig"] for m in model.modules()
            if "qconfig" in m.__dict__}
    original = model
    model = copy.deepcopy(model, memo)
    trace_kwargs = {"leaf_modules": custom.get("leaf_module_types", ()),
                    "leaf_module_names": custom.get("leaf_module_names", ()),
                    "wrapped_functions": custom.get("wrapped_functions", ())}
    try:
        gm = symbolic_trace(model, concrete_args=custom.get("concrete_args"), **trace_kwargs)
    except TraceFailure as failure:
        if not partial:
            raise TraceFailure(f"{failure}\n(partial tracing is off: "
                               "prepare_custom_config_dict={'partial_tracing': False})",
                               failure.module_path, failure.module_type, failure.where,
                               failure.line) from failure
        if example_inputs is None:
            raise TraceFailure(
                f"{failure}\nOr pass example_inputs=(...) to prepare_qat_fx: partial tracing "
                "then keeps this code float and prepares the traceable submodules (it runs "
                "the inputs once to learn how each submodule is called)",
                failure.module_path, failure.module_type, failure.where,
                failure.line) from failure
        return prepare_partial(original, model, qconfig_dict, example_inputs, float_islands,
                               custom, trace_kwargs, failure)
    gm, float_ops, shared = prepare_traced(gm, model, qconfig_dict, float_islands,
                                           example_inputs)
    warn_prepare(float_ops, shared)
    return gm


def get_provenance(model: fx.GraphModule) -> dict[str, str]:
    """For each op of a prepared (or converted) model, the float op whose output it reproduces.

    Keys are the prepared model's op names (module names; ``name(k)`` per call of a module
    called several times), values the float model's names (:mod:`qatkit.fx.naming`).
    A fused conv+bn+relu maps to the relu's float name.  Read from the quantization
    annotation (:func:`qatkit.annotation.get_annotations`).

    Raises:
        ValueError: ``model`` was not made by :func:`prepare_qat_fx`.

    Example::

        >>> get_provenance(qat_model)["layer1.0.conv1"]
        'layer1.0.relu(0)'
    """
    model = annotated_graph(model)  # an eager-mode model: its annotated trace
    if is_partially_traced(model):  # every region's, named from the root
        found = regions(model)
        return {(f"{r.path}.{name}" if r.path else name): r.name(float_name)
                for r in partial_trace_of(model).regions
                for name, float_name in _graph_provenance(found[r.path]).items()}
    return _graph_provenance(model)


def _graph_provenance(model: nn.Module) -> dict[str, str]:
    if not has_annotations(model):
        raise ValueError(f"{type(model).__name__} has no qatkit provenance: it was not made by "
                         "qatkit.prepare_qat_fx")
    return {a.name: a.float_name for a in get_annotations(model).values()
            if a.role not in ("input", "attr", "output")}
