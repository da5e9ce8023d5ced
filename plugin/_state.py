"""state_dict support shared by observers and integer modules."""

from __future__ import annotations

from torch import nn

__all__ = ["ResizeBuffersOnLoad"]


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
