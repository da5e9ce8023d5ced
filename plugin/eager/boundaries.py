"""Quantize float tensors where they enter quantized ops (eager mode's ``<op>_quant``).

prepare_qat_fx inserts a ``QuantStub`` wherever a float tensor (a graph input, a float op, a
float island, a 32-bit output) feeds a quantized op.  Eager mode cannot insert nodes, so it
attaches the stub to a module, read from the annotated trace of the prepared model:

* a float tensor made by a **module** (a float island, a module without a quantized
  implementation, a 32-bit-output layer) is quantized at that module's output: its class gets
  :class:`OutputQuantExit` and its child ``output_quant`` (quantized once, where it is made,
  as prepare_qat_fx's ``<producer>_quant``);
* one made by a **functional op** is quantized where it enters the quantized module: the
  consumer's class gets :class:`InputQuantEntry` and its child ``input_quant[<argument>]``;
* a **model input** that enters a quantized module without a ``QuantStub`` is an error
  naming the input and the module (eager mode quantizes where the model says, as torch.ao's
  does; prepare_qat_fx inserts that stub by itself).

Either way the module's own ``forward`` is untouched (``__call__`` applies the stubs), so the
trace shows the float op, then the stub node, then the quantized op; in the trace the module
node runs a *twin* (:func:`twin_boundary_leaves`: the same object state, the class without
the mixin), so the graph does not quantize twice.  The mixed classes pickle (and deep-copy)
by their recipe, base class and mixins.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, fx, nn

from .._modules import module_device
from ..annotation import NodeAnnotation, map_arguments, source_annotation
from ..nn import qat

__all__ = ["OutputQuantExit", "InputQuantEntry", "mixed_class", "unmixed_class",
           "insert_boundaries", "twin_boundary_leaves", "entry_key", "MixedModule"]


def _rebuild(base: type, mixins: tuple[type, ...]) -> nn.Module:
    cls = base
    for mixin in mixins:
        cls = mixed_class(mixin, cls)
    return cls.__new__(cls)


class MixedModule:
    """Base of the mixins applied to a module's class at run time: instances pickle and
    deep-copy by the recipe (base class, mixins), so no generated class needs a global
    name.

    Example::

        >>> isinstance(qat_model.conv2, MixedModule)   # a float island with an output_quant
        True
    """

    _qatkit_base: type
    _qatkit_mixins: tuple[type, ...] = ()

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild, (self._qatkit_base, self._qatkit_mixins), self.__dict__)


_MIXED: dict[tuple[type, type], type] = {}


def mixed_class(mixin: type, base: type) -> type:
    """``base`` with ``mixin`` in front (one class per pair; the name stays ``base``'s).

    Example::

        >>> conv.__class__ = mixed_class(InputQuantEntry, type(conv))
    """
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _MIXED:
        root = getattr(base, "_qatkit_base", base) if issubclass(base, MixedModule) else base
        mixins = getattr(base, "_qatkit_mixins", ()) + (mixin,)
        new = type(base.__name__, (mixin, base), {
            "__module__": base.__module__, "_qatkit_base": root, "_qatkit_mixins": mixins})
        new.__qualname__ = base.__qualname__
        _MIXED[key] = new
    return _MIXED[key]


def unmixed_class(cls: type) -> type:
    """The class a mixed class was made from (``cls`` itself otherwise).

    Example::

        >>> unmixed_class(type(qat_model.conv1)) is qatkit.nn.qat.Conv2d
        True
    """
    return getattr(cls, "_qatkit_base", cls) if issubclass(cls, MixedModule) else cls


class OutputQuantExit(MixedModule):
    """The module's output goes through its child ``output_quant`` (a QAT ``QuantStub``; an
    integer ``Quantize`` after convert).

    Example::

        >>> qat_model.conv2.output_quant          # conv2 has qconfig None
        QuantStub(...)
    """

    output_quant: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.output_quant(super().__call__(*args, **kwargs))  # type: ignore[misc]


def entry_key(name: str) -> str:
    """The ``input_quant`` key of argument ``name`` (``"tensors.1"`` -> ``"tensors_1"``).

    Example::

        >>> entry_key("tensors.1")
        'tensors_1'
    """
    return name.replace(".", "_")


def _is_value(v: Any) -> bool:
    return isinstance(v, (Tensor, fx.Proxy))


class InputQuantEntry(MixedModule):
    """The arguments named in the child ``input_quant`` (an ``nn.ModuleDict`` of QAT
    ``QuantStub`` by :func:`entry_key`) are quantized before the module runs.

    Example::

        >>> qat_model.conv2.input_quant["input"]  # conv2 takes the float sum ``x + y``
        QuantStub(...)
    """

    input_quant: nn.ModuleDict

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stubs = self.input_quant

        def quantize(name: str, value: Any) -> Any:
            key = entry_key(name)
            return stubs[key](value) if key in stubs else value

        args, kwargs = map_arguments(self.qatkit_signature, args, kwargs, quantize, _is_value)
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


def twin_boundary_leaves(gm: fx.GraphModule) -> None:
    """In a trace, make each leaf node of a module with a boundary mixin run the module's
    twin: an instance of the unmixed class sharing the module's ``__dict__`` (parameters,
    children, flags, links: one state), so the stubs, already nodes of their own, do not run
    twice.

    Example::

        >>> twin_boundary_leaves(gm)        # eager_graph does this
    """
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, MixedModule):
            continue
        base = unmixed_class(type(mod))
        twin = base.__new__(base)
        object.__setattr__(twin, "__dict__", mod.__dict__)
        parent, _, leaf = str(node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, twin)


def insert_boundaries(model: nn.Module, gm: fx.GraphModule,
                      anns: dict[fx.Node, NodeAnnotation],
                      qconfig_of: Callable[[nn.Module], Any]) -> int:
    """Attach a stub wherever a float tensor enters a quantized op of ``model`` (see the module
    docstring), read from its annotated trace ``gm``.

    Args:
        model: the eager model (its modules are changed in place).
        gm: its trace (:func:`qatkit.eager.eager_graph`), sharing its modules.
        anns: the trace's annotation.
        qconfig_of: the qconfig whose activation quantizes a tensor entering a module.

    Returns:
        how many stubs were attached.

    Example::

        >>> insert_boundaries(model, gm, get_annotations(gm), qconfig_of)
        2
    """
    by_node = {a.node: a for a in anns.values()}
    exits: dict[str, tuple[Any, str]] = {}
    entries: dict[str, dict[str, tuple[Any, str]]] = {}
    for node, ann in anns.items():
        if not ann.is_quantized or ann.kind == "quant_stub" or node.op != "call_module":
            continue
        consumer = model.get_submodule(str(node.target))
        for inp in ann.inputs:
            src = by_node.get(inp.node)
            if inp.spec is not None or src is None or src.role in ("non_tensor", "attr"):
                continue
            origin = source_annotation(src, by_node)
            if origin.role == "input":
                raise ValueError(_missing_quant_stub(model, origin.name, str(node.target)))
            qc = qconfig_of(consumer)
            if origin.module is not None and origin.role in ("float", "quantized"):
                exits.setdefault(origin.module, (qc, origin.float_name))
            else:
                entries.setdefault(str(node.target), {}).setdefault(
                    inp.name, (qc, origin.float_name))
    for path, (qc, float_name) in exits.items():
        mod = model.get_submodule(path)
        _check_free(path, mod, "output_quant")
        mod.__class__ = mixed_class(OutputQuantExit, type(mod))
        mod.output_quant = _stub(qc, float_name, mod)
    for path, names in entries.items():
        mod = model.get_submodule(path)
        _check_free(path, mod, "input_quant")
        mod.__class__ = mixed_class(InputQuantEntry, type(mod))
        mod.input_quant = nn.ModuleDict({entry_key(n): _stub(qc, fname, mod)
                                         for n, (qc, fname) in names.items()})
    return len(exits) + sum(map(len, entries.values()))


def _missing_quant_stub(model: nn.Module, input_name: str, consumer: str) -> str:
    return (f"prepare_qat: the input '{input_name}' of {type(model).__name__} enters the "
            f"quantized module '{consumer}' without a QuantStub. Eager mode quantizes where the "
            "model says: add `self.quant = qatkit.QuantStub()` to the model and call "
            f"`{input_name} = self.quant({input_name})` first in forward (a qatkit.DeQuantStub "
            f"before a float output), or keep '{consumer}' float (`.qconfig = None`); "
            "qatkit.prepare_qat_fx inserts the QuantStub by itself")


def _check_free(path: str, mod: nn.Module, attr: str) -> None:
    if attr in mod._modules or attr in mod.__dict__ or hasattr(type(mod), attr):
        raise ValueError(f"prepare_qat: module '{path}' already has an attribute '{attr}'; "
                         "rename it (qatkit quantizes a float tensor entering a quantized op "
                         "there)")


def _stub(qc: Any, float_name: str, near: nn.Module) -> nn.Module:
    stub = qat.QuantStub(qc.activation())
    stub.qconfig = qc
    stub.qatkit_float_name = float_name
    dev = module_device(near)
    return stub if dev is None else stub.to(dev)
