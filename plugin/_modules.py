"""Module plumbing shared across qatkit: state_dict support for observers and integer
modules, a module's device, replacing a submodule by name."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResizeBuffersOnLoad", "module_device", "set_module"]


def module_device(mod: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of ``mod``'s first parameter or buffer (``default`` when it has none).

    Example::

        >>> module_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return default


def set_module(root: nn.Module, target: str, mod: nn.Module, create: bool = False) -> None:
    """Replace (or add) the submodule at dotted path ``target`` of ``root``.

    Args:
        create: add an empty ``nn.Module`` for each missing parent on the path (building a
            model from parts) instead of raising ``AttributeError``.

    Example::

        >>> set_module(model, "layer1.0.conv1", qat_conv)
        >>> set_module(nn.Module(), "a.b.conv", conv, create=True)
    """
    parent = root
    *heads, leaf = target.split(".")
    for head in heads:
        if create and not hasattr(parent, head):
            parent.add_module(head, nn.Module())
        parent = parent.get_submodule(head)
    setattr(parent, leaf, mod)


class ResizeBuffersOnLoad(nn.Module):
    """Buffers whose shape depends on the data (statistics, histograms, integer weights) take
    the shape of the ``state_dict`` being loaded, so a fresh module loads a trained one's."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing,
                              unexpected, error_msgs):
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                self._buffers[name] = buf.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, error_msgs)
