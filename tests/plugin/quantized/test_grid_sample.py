"""grid_sample quantized with an int16 grid (the NPU guides' recipe): the exact sampler equals
torch's, the grid scale helper, and integer model == fake-quant model, module and function."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.grid_sample_rule import grid_sample_scale, sample_grid
from torch import nn


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("align", [False, True])
def test_the_integer_sampler_is_torchs_grid_sample(mode, padding, align):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, generator=gen)
    g = torch.rand(2, 5, 4, 2, dtype=torch.float64, generator=gen) * 2.6 - 1.3
    ref = F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=align)
    torch.testing.assert_close(sample_grid(x, g, mode, padding, align), ref, atol=1e-14, rtol=0)


def test_grid_scale_keeps_the_integer_bits_of_the_largest_coordinate():
    assert grid_sample_scale((64, 200)) == 2.0 ** -7  # 199 needs 8 integer bits
    assert grid_sample_scale(1000) == 2.0 ** -5
    assert grid_sample_scale(4) == 2.0 ** -8 and grid_sample_scale(1) == 2.0 ** -8  # clamped
    assert grid_sample_scale(2 ** 16) == 1.0  # clamped at shift 0
    assert grid_sample_scale((640, 480), normalized=True) == 2.0 ** -8
    with pytest.raises(ValueError, match="positive int"):
        grid_sample_scale((0, 4))


class Warp(nn.Module):
    """A feature map warped by a flow field in pixels (module) and by a normalized grid
    (function), the grids through int16 fixed-scale QuantStubs."""

    def __init__(self, size=(12, 16)):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grid_quant = qatkit.QuantStub(scale=grid_sample_scale(size), dtype="qint16")
        self.norm_quant = qatkit.QuantStub(scale=grid_sample_scale(size, normalized=True),
                                           dtype="qint16")
        self.warp = qatkit.nn.GridSample(normalized=False, padding_mode="border")

    def forward(self, x, pixels, grid):
        f = self.conv(x)
        a = self.warp(f, self.grid_quant(pixels))
        b = F.grid_sample(f, self.norm_quant(grid), mode="bilinear", align_corners=True)
        return a + b


def test_integer_grid_sample_equals_the_fake_quant_model():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, 16, generator=gen)
    pixels = torch.rand(2, 6, 8, 2, generator=gen) * torch.tensor([15.0, 11.0])
    grid = torch.rand(2, 6, 8, 2, generator=gen) * 2 - 1
    torch.manual_seed(0)
    model = Warp().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x, pixels, grid)).eval()
    qatkit.calibrate(qm, [(x, pixels, grid)], progress=False)
    anns = qatkit.annotation.annotation_by_name(qm)
    assert anns["warp"].kind == "grid_sample" and anns["grid_sample"].kind == "grid_sample"
    assert anns["warp"].input_spec("grid").dtype == "qint16"
    assert anns["warp"].input_spec("grid").fixed_scale == 2.0 ** -8  # 15 px: 4 integer bits
    im = qatkit.convert_fx(qm)
    assert type(im.get_submodule("warp")).__name__ == "QuantizedGridSample"
    with torch.no_grad():
        ref, fake, integer = model(x, pixels, grid), qm(x, pixels, grid), im(x, pixels, grid)
    torch.testing.assert_close(integer, fake, atol=0, rtol=0)
    assert F.cosine_similarity(fake.flatten(), ref.flatten(), 0) > 0.99
