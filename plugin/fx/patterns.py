"""What prepare does with each op, as data tables a user can read and extend.

* ``WEIGHTED_MODULES``: become QAT modules with ``weight_fake_quant`` (and fuse bn/add/relu);
* ``BN_FOR``: which BatchNorm fuses into which weighted module;
* ``FUSED_ACTIVATIONS``: activations fused into a weighted module (module, function, method);
* ``ADD_OPS``: residual adds fused into a weighted module;
* ``QUANTIZED_FUNCTIONS`` / ``QUANTIZED_METHODS``: functional ops that become named
  :class:`~qatkit.nn.qat.FunctionalOp` modules owning an output fake quant (module types are
  in :data:`qatkit.nn.qat.OUTPUT_QUANTIZED_MODULES`);
* ``PASSTHROUGH_*``: ops that only move data: they share their input's scale, no fake quant;
* ``NON_TENSOR_*``: ops on shapes/sizes/dtypes: ignored.

Anything else stays float and is listed in a warning.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.stubs import DeQuantStub
from .tracer import as_output_type, same_pad

try:  # the check torch.fx adds for a ``concrete_args`` entry fixed to None
    from torch.fx._symbolic_trace import _assert_is_none
except ImportError:  # pragma: no cover - private in torch.fx
    _assert_is_none = torch._assert

try:  # torchvision's stochastic depth: dropout of whole residual branches
    from torchvision.ops import StochasticDepth as _StochasticDepth
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover - torchvision is a dependency
    _StochasticDepth, _stochastic_depth = nn.Dropout, F.dropout

WEIGHTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
)

BN_FOR: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,), nn.Conv2d: (nn.BatchNorm2d,), nn.Conv3d: (nn.BatchNorm3d,),
    nn.ConvTranspose1d: (nn.BatchNorm1d,), nn.ConvTranspose2d: (nn.BatchNorm2d,),
    nn.Linear: (nn.BatchNorm1d,),
}

FUSED_ACTIVATION_MODULES: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
FUSED_ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
}
FUSED_ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

ADD_FUNCTIONS: tuple[object, ...] = (operator.add, operator.iadd, torch.add)
ADD_METHODS: tuple[str, ...] = ("add", "add_", "__add__", "__iadd__")

QUANTIZED_FUNCTIONS: dict[object, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.einsum: "einsum",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.reciprocal: "reciprocal",
    torch.log: "log",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    F.softmax: "softmax", torch.softmax: "softmax",
    torch.mean: "mean",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "adaptive_avg_pool", F.adaptive_avg_pool2d: "adaptive_avg_pool",
    F.adaptive_avg_pool3d: "adaptive_avg_pool",
    F.interpolate: "interpolate", F.upsample: "interpolate", F.grid_sample: "grid_sample",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", F.gelu: "gelu",
    F.mish: "mish", F.leaky_relu: "leaky_relu",
    F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.batch_norm: "batch_norm",
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.relu6: "relu6", F.hardtanh: "hardtanh", torch.clamp: "clamp", torch.clip: "clamp",
}

QUANTIZED_METHODS: dict[str, str] = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
    "matmul": "matmul", "bmm": "matmul", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "exp": "exp", "softmax": "softmax", "mean": "mean", "relu": "relu",
    "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal", "log": "log",
    "div": "div", "div_": "div", "true_divide": "div", "__truediv__": "div",
    "relu_": "relu", "clamp": "clamp", "clamp_": "clamp", "clip": "clamp",
}

#: in-place ops run out of place in QAT modules (a fake-quantized tensor must not be mutated)
OUT_OF_PLACE: dict[object, object] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    F.relu_: F.relu, torch.relu_: torch.relu,
}

PASSTHROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ChannelShuffle, nn.PixelShuffle,
    nn.PixelUnshuffle, _StochasticDepth,
)
PASSTHROUGH_FUNCTIONS: tuple[object, ...] = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.roll, torch.flip,
    torch.movedim, torch.swapaxes, torch.t, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, torch.dropout, F.pixel_shuffle, F.pixel_unshuffle,
    torch.channel_shuffle, torch.nn.functional.pad, _stochastic_depth, same_pad,
)
PASSTHROUGH_METHODS: tuple[str, ...] = (
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "chunk", "split", "expand", "expand_as", "repeat", "flip", "narrow", "t", "unflatten",
    "view_as", "reshape_as", "clone", "detach", "roll", "movedim", "swapaxes", "unbind",
    "__getitem__", "max_pool2d",
)

NON_TENSOR_METHODS: tuple[str, ...] = ("size", "dim", "numel", "tolist", "item", "__len__",
                                       "type", "is_contiguous", "stride", "data_ptr")
NON_TENSOR_FUNCTIONS: tuple[object, ...] = (
    getattr, len, operator.floordiv, operator.mod, torch._assert, _assert_is_none, torch.Size,
    int, float,
    isinstance, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.not_, operator.and_, operator.or_, operator.neg, operator.pos, operator.truth,
    as_output_type,
)
#: float modules that mark the end of quantization: their output is float, no warning
FLOAT_BOUNDARY_MODULES: tuple[type[nn.Module], ...] = (DeQuantStub,)
