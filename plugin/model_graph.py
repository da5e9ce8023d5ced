"""The annotated graph of any prepared model: what the passes, the exporter and the profiler
read.

Every fact about a prepared model's quantization is in its quantization annotation
(:mod:`qatkit.annotation`), which lives on a graph.  :func:`annotated_graph` is the one place
that turns a prepared (or converted) model of any kind into the GraphModule holding it:

* a model of :func:`qatkit.prepare_qat_fx` / :func:`qatkit.convert_fx` is its own graph;
* a partially traced one is its root, whose regions hold the annotated graphs
  (:func:`qatkit.fx.partial.regions`);
* an eager-mode model (:func:`qatkit.prepare_qat` / :func:`qatkit.convert`) has no graph of
  its own: its annotated trace is made by eager mode (:func:`qatkit.eager.eager_graph`),
  which registers how here (:func:`register_graph_reader`) -- eager mode sits above the
  passes, and this module below them, so that the passes can read eager models too.
"""

from __future__ import annotations

from typing import Callable

from torch import fx, nn

__all__ = ["annotated_graph", "register_graph_reader", "GraphReader"]

#: the annotated trace of a kind of prepared model without a graph of its own, or None when
#: the model is not of that kind
GraphReader = Callable[[nn.Module], "fx.GraphModule | None"]
_READERS: list[GraphReader] = []


def register_graph_reader(reader: GraphReader) -> GraphReader:
    """Register ``reader`` for :func:`annotated_graph` (usable as a decorator).

    Example::

        >>> @register_graph_reader
        ... def _eager(model):
        ...     return eager_graph(model) if is_eager_model(model) else None
    """
    if reader not in _READERS:
        _READERS.append(reader)
    return reader


def annotated_graph(model: nn.Module) -> nn.Module:
    """The model the quantization tools read: an eager-mode model's annotated trace, any
    other model itself (see the module docstring).

    Example::

        >>> annotated_graph(eager_qat_model) is eager_qat_model, annotated_graph(fx_qat) is fx_qat
        (False, True)
    """
    for reader in _READERS:
        graph = reader(model)
        if graph is not None:
            return graph
    return model
