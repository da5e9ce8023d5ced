"""Symbolic tracing for qatkit: leaf modules, wrapped functions, and errors that say the fix.

``symbolic_trace(model)`` is ``torch.fx.symbolic_trace`` plus three escape hatches users
need on real models, kept in registries that can be listed:

* :func:`register_leaf_module` — a module class (or one instance's name) is not traced
  through; it becomes one opaque ``call_module`` node (it stays float unless qatkit knows it);
* :func:`wrap` — a function that cannot be traced becomes one opaque ``call_function`` node;
* ``concrete_args`` — fixes keyword arguments (flags, modes) that steer Python control flow.

When tracing fails (control flow on tensors, iterating over a Proxy, ...), the error names the
module being traced and the source line, and says which of the three fixes applies.
"""

from __future__ import annotations

import inspect
import re
import traceback
from types import FunctionType
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from ..nn.stubs import DeQuantStub, QuantStub

__all__ = ["QatkitTracer", "TraceFailure", "register_leaf_module", "wrap", "symbolic_trace",
           "list_leaf_modules", "list_wrapped_functions"]

_LEAF_MODULE_TYPES: set[type] = {QuantStub, DeQuantStub}
_WRAPPED_FUNCTIONS: list[Callable] = []


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Never trace through modules of this class (usable as a class decorator).

    Example::

        >>> @qatkit.fx.register_leaf_module
        ... class MyNMS(nn.Module): ...
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module takes an nn.Module subclass, got {cls!r}")
    _LEAF_MODULE_TYPES.add(cls)
    return cls


def wrap(fn: Callable) -> Callable:
    """Keep calls of ``fn`` as one opaque node instead of tracing into it (a decorator).

    The function must be called through a module-level name in the model's source.

    Example::

        >>> @qatkit.fx.wrap
        ... def decode(x):
        ...     return x if x.sum() > 0 else -x
    """
    if not callable(fn):
        raise TypeError(f"wrap takes a function, got {fn!r}")
    _check_wrappable(fn)
    if fn not in _WRAPPED_FUNCTIONS:
        _WRAPPED_FUNCTIONS.append(fn)
    return fn


def _check_wrappable(fn: Callable) -> None:
    """torch.fx only patches module-level names that do not start with ``_``: refuse what it
    would silently trace into."""
    name = getattr(fn, "__name__", "")
    if name.startswith("_"):
        raise ValueError(f"cannot wrap {name!r}: torch.fx ignores functions whose name starts "
                         f"with '_', so calls of it would still be traced into. Rename it "
                         f"(e.g. {name.lstrip('_') or 'fn'!r}), or move the call into a module "
                         "and register it with leaf_modules")


def list_leaf_modules() -> list[type]:
    """The registered leaf module classes, sorted by name.

    Example::

        >>> qatkit.DeQuantStub in qatkit.fx.list_leaf_modules()
        True
    """
    return sorted(_LEAF_MODULE_TYPES, key=lambda c: c.__qualname__)


def list_wrapped_functions() -> list[Callable]:
    """The functions registered with :func:`wrap`, in registration order.

    Example::

        >>> @qatkit.fx.wrap
        ... def decode(x): ...
        >>> decode in qatkit.fx.list_wrapped_functions()
        True
    """
    return list(_WRAPPED_FUNCTIONS)


class TraceFailure(RuntimeError):
    """Tracing failed; the message names the module, the source line and the fix.

    Example::

        >>> try:
        ...     qatkit.prepare_qat_fx(model_with_tensor_if, {"": qconfig})
        ... except qatkit.fx.TraceFailure as e:
        ...     print(e)   # "... in module 'head' (Head) at model.py:42 ... Fix: ..."
    """


class QatkitTracer(fx.Tracer):
    """An FX tracer honouring qatkit's leaf modules and wrapped functions.

    Args:
        leaf_modules: extra leaf module classes for this trace.
        leaf_module_names: qualified names of module instances not to trace through.
        wrapped_functions: extra functions to keep opaque for this trace.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), leaf_module_names: Iterable[str] = (),
                 wrapped_functions: Iterable[Callable] = ()) -> None:
        wrapped_functions = tuple(wrapped_functions)
        for fn in wrapped_functions:
            _check_wrappable(fn)
        super().__init__(autowrap_functions=tuple(_WRAPPED_FUNCTIONS) + wrapped_functions)
        self.leaf_types = tuple(_LEAF_MODULE_TYPES | set(leaf_modules))
        self.leaf_names = set(leaf_module_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        if getattr(m, "_qatkit_leaf", False):  # qatkit's own QAT / quantized modules
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, concrete_args: dict[str, Any] | None = None,
                   leaf_modules: Iterable[type] = (), leaf_module_names: Iterable[str] = (),
                   wrapped_functions: Iterable[Callable] = ()) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with qatkit's tracer (the model is not modified).

    Raises:
        TraceFailure: naming the module and source line that cannot be traced, and the fix.

    Example::

        >>> gm = qatkit.fx.symbolic_trace(torchvision.models.resnet18())
    """
    tracer = QatkitTracer(leaf_modules, leaf_module_names, wrapped_functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise TraceFailure(_explain(model, tracer, e)) from e
    _restore_concrete_arg_names(graph, concrete_args)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = model.training
    return gm


def _restore_concrete_arg_names(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """Give a concrete argument's placeholder back its parameter name.

    torch.fx names it ``<name>_1``, which would change the GraphModule's signature: calling it
    with the model's own keyword (``mode="a"``) would raise a TypeError.
    """
    if not concrete_args:
        return
    targets = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    for name in concrete_args:
        node = targets.get(f"{name}_1")
        if node is not None and name not in targets and f"{name}_2" not in targets:
            node.target = name


_CONTROL_FLOW_HINTS = ("control flow", "cannot be iterated", "iterate", "__bool__", "__len__",
                       "len(", "bool(")


def _explain(model: nn.Module, tracer: QatkitTracer, err: Exception) -> str:
    stack = list(getattr(tracer, "module_stack", {}).values())
    module_name, module_type = (stack[-1] if stack else ("", type(model)))
    module_label = f"'{module_name}' ({module_type.__name__})" if module_name else (
        f"the root module ({type(model).__name__})")
    frame, is_function = _user_frame(err)
    where = ""
    line = ""
    fn_name = ""
    if frame is not None:
        line = (frame.line or "").strip()
        where = f" at {frame.filename}:{frame.lineno} in {frame.name}(): `{line}`"
        fn_name = frame.name
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    control_flow = any(h in str(err) for h in _CONTROL_FLOW_HINTS)
    flags = {k: v for k, v in _keyword_defaults(model).items()
             if re.search(rf"\b{re.escape(k)}\b", line)} if not module_name else {}
    if is_function and fn_name.startswith("_"):
        fix = (f"wrap the function `{fn_name}` so it is kept as one opaque node: rename it "
               f"without the leading '_' (torch.fx does not wrap such names), then decorate "
               f"it with @qatkit.fx.wrap (it must be called through its module-level name)")
    elif is_function:
        fix = (f"wrap the function `{fn_name}` so it is kept as one opaque node: decorate it "
               f"with @qatkit.fx.wrap (it must be called through its module-level name)")
    elif flags:
        fix = ("the branch depends on a forward() keyword argument: fix its value with "
               f"prepare_custom_config_dict={{'concrete_args': {flags!r}}}")
    elif control_flow and module_name:
        fix = (f"register the module as a leaf so it is not traced through: "
               f"qatkit.fx.register_leaf_module({module_type.__name__}) or "
               f"prepare_custom_config_dict={{'leaf_module_names': ['{module_name}']}} "
               "(it then stays float)")
    elif control_flow:  # on a tensor, in the root's forward
        fix = ("the root module cannot be a leaf: move this code into a module-level function "
               "decorated with @qatkit.fx.wrap (kept as one opaque node), or into a submodule "
               "registered with qatkit.fx.register_leaf_module")
    else:
        fix = ("if the branch depends on a forward() keyword argument, fix its value with "
               "prepare_custom_config_dict={'concrete_args': {'<arg>': <value>}}; otherwise "
               "register the module as a leaf (qatkit.fx.register_leaf_module) or wrap the "
               "function (@qatkit.fx.wrap)")
    kind = "control flow / iteration on a traced tensor" if control_flow else "tracing error"
    return (f"cannot trace {type(model).__name__}: {kind} in module {module_label}{where}: "
            f"{type(err).__name__}: {msg}\nFix: {fix}.")


def _keyword_defaults(model: nn.Module) -> dict[str, Any]:
    """The root forward()'s arguments that have a default value (flags, modes, options)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _user_frame(err: Exception) -> tuple[traceback.FrameSummary | None, bool]:
    """The innermost traceback frame outside torch and qatkit (the user's source line), and
    whether it runs a module-level function (one that :func:`wrap` can keep opaque)."""
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    qatkit_dir = __file__.rsplit("/", 2)[0]
    tbs = []
    tb = err.__traceback__
    while tb is not None:
        tbs.append(tb)
        tb = tb.tb_next
    for tb in reversed(tbs):
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(torch_dir) or code.co_filename.startswith(qatkit_dir):
            continue
        summary = traceback.extract_tb(tb, limit=1)[0]
        fn = tb.tb_frame.f_globals.get(code.co_name)
        is_function = isinstance(fn, FunctionType) and fn.__code__ is code
        return summary, is_function
    return None, False
