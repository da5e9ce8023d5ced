"""FloatFunctional: functional ops as a module, for models prepared by module swapping.

Eager-mode preparation (:func:`qatkit.prepare_qat`) swaps *modules*; a functional op in a
forward (``x + y``, ``torch.cat``) has no module to swap, so it would run in float.  As in
torch.ao, such ops are written as calls of a :class:`FloatFunctional` module, one per op::

    self.skip_add = qatkit.nn.FloatFunctional()
    ...
    out = self.skip_add.add(identity, out)        # becomes a quantized add

In a float model every method is the plain torch op (through the module's ``forward``, so FX
tracing names it inside the module: ``skip_add.add``).  :func:`qatkit.prepare_qat` replaces
the module by :class:`qatkit.eager.QATFloatFunctional` (the op with its own output fake
quant) and :func:`qatkit.convert` by the op's integer module, called by the same methods.
``prepare_qat_fx`` traces through it like any functional op.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["FloatFunctional", "FUNCTIONAL_OPS", "FunctionalMethods", "add_relu"]


def add_relu(input: Tensor, other: Tensor) -> Tensor:
    """``relu(input + other)``: one op with one output rounding in a quantized model.

    Example::

        >>> add_relu(torch.tensor([1.0, -3.0]), torch.tensor([1.0, 1.0]))
        tensor([2., 0.])
    """
    return torch.relu(torch.add(input, other))


#: method name -> (op kind of the quantized op, the function it calls); the kind picks the
#: converter (:data:`qatkit.quantized.CONVERTERS`)
FUNCTIONAL_OPS: dict[str, tuple[str, Callable[..., Any]]] = {
    "add": ("add", torch.add),
    "add_scalar": ("add", torch.add),
    "sub": ("sub", torch.sub),
    "mul": ("mul", torch.mul),
    "mul_scalar": ("mul", torch.mul),
    "cat": ("cat", torch.cat),
    "stack": ("stack", torch.stack),
    "matmul": ("matmul", torch.matmul),
    "add_relu": ("add_relu", add_relu),
}


class FunctionalMethods:
    """The methods of a float-functional module (float, QAT and integer versions share
    them): each calls :meth:`_functional` with its name.

    Example::

        >>> class Twice(FunctionalMethods):
        ...     def _functional(self, method, *args, **kwargs):
        ...         return FUNCTIONAL_OPS[method][1](*args, **kwargs) * 2
        >>> Twice().add(torch.ones(1), torch.ones(1))
        tensor([4.])
    """

    def _functional(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + y``."""
        return self._functional("add", x, y)

    def add_scalar(self, x: Tensor, y: float) -> Tensor:
        """``x + y`` for a python number ``y``."""
        return self._functional("add_scalar", x, y)

    def sub(self, x: Tensor, y: Tensor) -> Tensor:
        """``x - y``."""
        return self._functional("sub", x, y)

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        """``x * y``."""
        return self._functional("mul", x, y)

    def mul_scalar(self, x: Tensor, y: float) -> Tensor:
        """``x * y`` for a python number ``y``."""
        return self._functional("mul_scalar", x, y)

    def cat(self, x: list[Tensor], dim: int = 0) -> Tensor:
        """``torch.cat(x, dim)``."""
        return self._functional("cat", x, dim=dim)

    def stack(self, x: list[Tensor], dim: int = 0) -> Tensor:
        """``torch.stack(x, dim)``."""
        return self._functional("stack", x, dim=dim)

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        """``x @ y``."""
        return self._functional("matmul", x, y)

    def add_relu(self, x: Tensor, y: Tensor) -> Tensor:
        """``relu(x + y)``."""
        return self._functional("add_relu", x, y)


class FloatFunctional(FunctionalMethods, nn.Module):
    """Functional ops as a module (``add``, ``add_scalar``, ``sub``, ``mul``, ``mul_scalar``,
    ``cat``, ``stack``, ``matmul``, ``add_relu``): use one instance per op in the model.

    In a float model each method computes the torch op.  :func:`qatkit.prepare_qat` makes it
    a quantized op with its own output fake quant; one instance used for two different ops is
    an error there (they would share one output scale).

    Example::

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(8, 8, 3, padding=1)
        ...         self.skip = qatkit.nn.FloatFunctional()
        ...     def forward(self, x):
        ...         return self.skip.add_relu(self.conv(x), x)
    """

    def forward(self, *args: Any, op: str | None = None, **kwargs: Any) -> Any:
        """The op ``op`` (a method name); call the methods instead (``ff.add(x, y)``)."""
        if op is None:
            raise RuntimeError(
                "FloatFunctional is called through its methods (ff.add(x, y), ff.cat([a, b], "
                f"dim=1), ...: {sorted(FUNCTIONAL_OPS)}), not through forward()")
        if op not in FUNCTIONAL_OPS:
            raise ValueError(f"FloatFunctional has no op {op!r}; choose one of "
                             f"{sorted(FUNCTIONAL_OPS)}")
        return FUNCTIONAL_OPS[op][1](*args, **kwargs)

    def _functional(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self(*args, op=method, **kwargs)
