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

import importlib
import inspect
import math
import re
import traceback
import warnings
from types import FunctionType
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import PH

from .._modules import set_module
from ..nn.stubs import DeQuantStub, QuantStub

__all__ = ["QatkitTracer", "TraceFailure", "register_leaf_module", "wrap", "symbolic_trace",
           "list_leaf_modules", "list_wrapped_functions", "same_pad", "SAME_PAD_CONVS",
           "as_output_type"]

_LEAF_MODULE_TYPES: set[type] = {QuantStub, DeQuantStub}
_WRAPPED_FUNCTIONS: list[Callable] = []

#: conv classes that pad their input by a rule on its size, at run time (TensorFlow's "SAME"
#: padding), as ``(module, class name)``: traced as a :func:`same_pad` node (it moves data:
#: zeros are on every grid) then the conv with padding 0, so the conv is quantized (and fused)
#: like any other instead of stopping the trace at ``math.ceil`` of a traced size
SAME_PAD_CONVS: tuple[tuple[str, str], ...] = (("timm.layers.conv2d_same", "Conv2dSame"),)


def same_pad(x: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...],
             dilation: tuple[int, ...]) -> Tensor:
    """Zero-pad the last two dims of ``x`` as TensorFlow's "SAME" convolution does (one
    opaque node of a trace: the sizes are read at run time).

    Example::

        >>> same_pad(torch.zeros(1, 3, 5, 5), (3, 3), (2, 2), (1, 1)).shape
        torch.Size([1, 3, 7, 7])
    """
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        return F.pad(x, [left, right, top, bottom])
    return x


def as_output_type(value: Any, type_path: str) -> Any:
    """``value`` (a dict or tuple a trace made of a module's output) as the output class at
    ``type_path`` (``module:QualName``): torch.fx returns a Hugging Face ``ModelOutput`` as
    a plain dict and a named tuple as a tuple, which the caller of a traced part may not
    accept (``outputs.last_hidden_state``).

    Example::

        >>> as_output_type({"last_hidden_state": h},
        ...                "transformers.modeling_outputs:BaseModelOutput").last_hidden_state
    """
    module, _, qualname = type_path.partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if isinstance(value, dict):
        return cls(**value)
    return cls(*value)


def _is_same_pad_conv(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__module__, cls.__name__) in SAME_PAD_CONVS and isinstance(m, nn.Conv2d)


def _plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` without padding sharing ``m``'s parameters."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation,
                     m.groups, bias=m.bias is not None, device=m.weight.device,
                     dtype=m.weight.dtype)
    conv.weight = m.weight
    conv.bias = m.bias
    conv.train(m.training)
    return conv


def _has_placeholder(value: Any) -> bool:
    if value is PH:
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_placeholder(v) for v in value)
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    return False


def _fix_arguments(root_fn: Callable, concrete_args: dict[str, Any], inline: bool
                   ) -> tuple[Callable, dict[str, Any]]:
    """A function torch.fx can trace in place of ``root_fn`` with ``concrete_args``, and the
    ``concrete_args`` to trace it with.

    Its parameters are ``root_fn``'s, with fixed ``*name`` / ``**name`` (keys "*name" /
    "**name") turned into one parameter per item (``name_0``, ``name_1``; the keys of
    ``**name``) and keyword-only parameters made positional-or-keyword (torch.fx writes no
    ``*`` in a signature).  With ``inline``, a fixed value holding no placeholder (``PH``) is
    passed to ``root_fn`` as a constant (its parameter is kept, unused, with that default)
    instead of through torch.fx's ``concrete_args`` (whose generated signature breaks on
    fixed tuples next to defaults)."""
    sig = inspect.signature(root_fn)
    P = inspect.Parameter
    concrete: dict[str, Any] = {}
    params: list[str] = []  # the generated function's parameters (after self)
    defaults: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    positional: list[str] = []
    keywords: list[tuple[str, str]] = []
    star: list[str] = []
    taken = set(sig.parameters)

    def add(name: str, fixed: Any = P.empty, default: Any = P.empty) -> str:
        """A parameter; returns what the call passes for it (itself, or a constant)."""
        if fixed is not P.empty and inline and not _has_placeholder(fixed):
            constants[name] = fixed
            default = fixed
        elif fixed is not P.empty:
            concrete[name] = fixed
        if default is P.empty and defaults:
            default = None
        params.append(name)
        if default is not P.empty:
            defaults[name] = default
        return f"_c_{name}" if name in constants else name

    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name == "self":
            continue
        fixed = concrete_args.get(p.name, P.empty)
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            positional.append(add(p.name, fixed, p.default))
        elif p.kind == P.KEYWORD_ONLY:
            keywords.append((p.name, add(p.name, fixed, None if p.default is P.empty
                                         else p.default)))
        elif p.kind == P.VAR_POSITIONAL:
            for k, value in enumerate(concrete_args.get("*" + p.name, ())):
                name = f"{p.name}_{k}"
                while name in taken:
                    name += "_"
                taken.add(name)
                star.append(add(name, P.empty if value is PH else value, None))
        else:  # VAR_KEYWORD
            for key, value in concrete_args.get("**" + p.name, {}).items():
                if not (isinstance(key, str) and key.isidentifier()) or key in taken:
                    raise ValueError(f"cannot fix keyword argument {key!r} of **{p.name}")
                taken.add(key)
                keywords.append((key, add(key, P.empty if value is PH else value, None)))
    names = {n: f"_d_{n}" for n in defaults}
    head = ", ".join(["self", *(f"{n}={names[n]}" if n in defaults else n for n in params)])
    call = ", ".join(["self", *positional, *star, *(f"{k}={v}" for k, v in keywords)])
    namespace = {"_root_fn": root_fn, **{names[n]: d for n, d in defaults.items()},
                 **{f"_c_{n}": v for n, v in constants.items()}}
    exec(f"def forward({head}):\n    return _root_fn({call})\n", namespace)  # noqa: S102
    return namespace["forward"], concrete


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

    Attributes:
        module_path: qualified name of the module whose code could not be traced ("" for
            the module traced itself).
        module_type: its class name.
        where: ``file:line`` of the source line, "" when unknown.
        line: the source line.

    Example::

        >>> try:
        ...     qatkit.prepare_qat_fx(model_with_tensor_if, {"": qconfig})
        ... except qatkit.fx.TraceFailure as e:
        ...     print(e)   # "... in module 'head' (Head) at model.py:42 ... Fix: ..."
    """

    def __init__(self, message: str, module_path: str = "", module_type: str = "",
                 where: str = "", line: str = "") -> None:
        super().__init__(message)
        self.module_path, self.module_type, self.where, self.line = (
            module_path, module_type, where, line)

    @property
    def reason(self) -> str:
        """One line: where tracing stopped and why (``file:line `source```)."""
        text = str(self).splitlines()[0]
        if self.where:
            return f"{self.where} `{self.line}`"
        return text


class QatkitTracer(fx.Tracer):
    """An FX tracer honouring qatkit's leaf modules and wrapped functions.

    Args:
        leaf_modules: extra leaf module classes for this trace.
        leaf_module_names: qualified names of module instances not to trace through.
        wrapped_functions: extra functions to keep opaque for this trace.
        inline_constants: pass the ``concrete_args`` values that hold no ``PH`` to the
            traced forward as constants (no placeholder, no check), as partial tracing does;
            ``concrete_args`` may then fix ``"*args"`` / ``"**kwargs"`` too.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), leaf_module_names: Iterable[str] = (),
                 wrapped_functions: Iterable[Callable] = (), inline_constants: bool = False
                 ) -> None:
        wrapped_functions = tuple(wrapped_functions)
        for fn in wrapped_functions:
            _check_wrappable(fn)
        super().__init__(autowrap_functions=tuple(_WRAPPED_FUNCTIONS) + wrapped_functions)
        self.leaf_types = tuple(_LEAF_MODULE_TYPES | set(leaf_modules))
        self.leaf_names = set(leaf_module_names)
        self.inline_constants = inline_constants
        #: qualified name -> a "SAME"-padding conv, replaced by a plain conv after tracing
        self.same_pad_convs: dict[str, nn.Conv2d] = {}

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if (_is_same_pad_conv(m) and len(args) == 1 and not kwargs
                and isinstance(args[0], fx.Proxy)):
            name = self.path_of_module(m)
            if name not in self.leaf_names and not isinstance(m, self.leaf_types):
                args = (self.create_proxy("call_function", same_pad, (
                    args[0], tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)), {}),)
                self.same_pad_convs[name] = m
        return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn: Callable, is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        # torch.fx cannot fix ``*args`` / ``**kwargs`` (concrete_args keys "*args" /
        # "**kwargs", as partial tracing records them): trace a function whose parameters
        # are their items instead (see _fix_arguments)
        if isinstance(concrete_args, dict) and (self.inline_constants or any(
                k.startswith("*") for k in concrete_args)):
            root_fn, concrete_args = _fix_arguments(root_fn, concrete_args,
                                                    self.inline_constants)
        self.effective_concrete_args = concrete_args
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        if module_qualified_name in self.same_pad_convs:
            return True
        if getattr(m, "_qatkit_leaf", False):  # qatkit's own QAT / quantized modules
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, concrete_args: dict[str, Any] | None = None,
                   leaf_modules: Iterable[type] = (), leaf_module_names: Iterable[str] = (),
                   wrapped_functions: Iterable[Callable] = (), inline_constants: bool = False
                   ) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with qatkit's tracer (the model is not modified).

    Raises:
        TraceFailure: naming the module and source line that cannot be traced, and the fix.

    Example::

        >>> gm = qatkit.fx.symbolic_trace(torchvision.models.resnet18())
    """
    tracer = QatkitTracer(leaf_modules, leaf_module_names, wrapped_functions, inline_constants)
    try:
        with warnings.catch_warnings():  # fx: "cannot add an assertion" for a fixed object
            warnings.filterwarnings("ignore", "Was not able to add assertion")
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _failure(model, tracer, e) from e
    _restore_concrete_arg_names(graph, getattr(tracer, "effective_concrete_args", None))
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    for target, conv in tracer.same_pad_convs.items():  # the conv after its padding node
        set_module(gm, target, _plain_conv(conv))
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


def _failure(model: nn.Module, tracer: QatkitTracer, err: Exception) -> TraceFailure:
    stack = list(getattr(tracer, "module_stack", {}).values())
    module_name, module_type = (stack[-1] if stack else ("", type(model)))
    frame, _ = _user_frame(err)
    where = f"{frame.filename}:{frame.lineno}" if frame is not None else ""
    line = (frame.line or "").strip() if frame is not None else ""
    return TraceFailure(_explain(model, tracer, err), module_name, module_type.__name__, where,
                        line)


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
    torch_dir = torch.__file__.rsplit("/", 1)[0] + "/"  # not torchvision's files
    qatkit_dir = __file__.rsplit("/", 2)[0] + "/"
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
