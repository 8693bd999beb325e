"""The whole-image inferer against the network run by hand, and the choice between it and the sliding window."""

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from nucleiseg_monai.inferers import WholeImageInferer, window_inferer
from nucleiseg_monai.networks import UNet


def _needs_multiple(x: torch.Tensor) -> torch.Tensor:
    assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0, x.shape
    return x * 2 + 1


@pytest.mark.parametrize("shape", [(32, 48), (33, 50), (303, 303), (1, 17)])
def test_whole_image_pads_to_the_multiple_centred_and_crops_back(shape):
    x = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(1, 1, *shape)
    out = WholeImageInferer(16)(x, _needs_multiple)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * 2 + 1)  # each input pixel lands on its own output pixel


def test_padding_is_centred_zero():
    seen = {}

    def record(x):
        seen["x"] = x
        return x

    WholeImageInferer(16)(torch.ones(1, 1, 10, 13), record)
    padded = seen["x"][0, 0]
    assert padded.shape == (16, 16)
    rows, cols = torch.nonzero(padded, as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (3, 12)  # 6 rows of padding: 3 above, 3 below
    assert (cols.min().item(), cols.max().item()) == (1, 13)  # 3 columns: 1 left, 2 right
    assert padded.sum().item() == 10 * 13  # the padding is zeros


def test_a_unet_on_the_whole_image_equals_the_same_pass_on_a_pre_padded_input():
    torch.manual_seed(0)
    net = UNet(features=(4, 8, 16)).eval()
    x = torch.randn(1, 3, 30, 37)
    with torch.no_grad():
        out = WholeImageInferer(net.multiple)(x, net)
        padded = net(torch.nn.functional.pad(x, (1, 2, 1, 1)))[..., 1:31, 1:38]
    torch.testing.assert_close(out, padded)


def test_window_inferer_chooses_by_window():
    assert isinstance(window_inferer(None, multiple=16), WholeImageInferer)
    assert isinstance(window_inferer(0, multiple=16), WholeImageInferer)
    sliding = window_inferer(256, 0.125, 16)
    assert isinstance(sliding, SlidingWindowInferer) and sliding.roi_size == 256 and sliding.overlap == 0.125
    with pytest.raises(ValueError, match="multiple of 16"):
        window_inferer(200, multiple=16)
