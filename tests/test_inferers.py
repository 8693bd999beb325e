"""The whole-image inferer against the network run by hand, the choice between it and the sliding window, and
test-time flips against their known mean."""

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from nucleiseg_monai.inferers import FlipInferer, WholeImageInferer, window_inferer
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


def _seen_by_network(inferer, x):
    seen = {}

    def record(t):
        seen["x"] = t.clone()  # the sliding window weights what the network returns in place
        return t

    inferer(x, record)
    return seen["x"][0, 0]


def test_constant_padding_is_centred_zero():
    padded = _seen_by_network(WholeImageInferer(16, "constant"), torch.ones(1, 1, 10, 13))
    assert padded.shape == (16, 16)
    rows, cols = torch.nonzero(padded, as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (3, 12)  # 6 rows of padding: 3 above, 3 below
    assert (cols.min().item(), cols.max().item()) == (1, 13)  # 3 columns: 1 left, 2 right
    assert padded.sum().item() == 10 * 13  # the padding is zeros


def test_default_padding_mirrors_the_image_edge():
    x = torch.arange(10 * 13, dtype=torch.float32).reshape(1, 1, 10, 13)
    padded = _seen_by_network(WholeImageInferer(16), x)
    assert padded.shape == (16, 16)
    torch.testing.assert_close(padded[3:13, 1:14], x[0, 0])  # the image, centred as with zeros
    torch.testing.assert_close(padded[2, 1:14], x[0, 0, 1])  # the row above mirrors the image's second row
    torch.testing.assert_close(padded[13, 1:14], x[0, 0, 8])  # and the row below its second-last
    torch.testing.assert_close(padded[3:13, 0], x[0, 0, :, 1])
    torch.testing.assert_close(padded[3:13, 14], x[0, 0, :, 11])


def test_inputs_too_small_to_mirror_repeat_their_edge():
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]])  # one row: nothing to mirror it with
    padded = _seen_by_network(WholeImageInferer(16), x)
    assert padded.shape == (16, 16)
    torch.testing.assert_close(padded[:, 6:9], x[0, 0].expand(16, 3))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        WholeImageInferer(16, "zeros")


def test_sliding_window_pads_a_small_image_to_one_window_by_mirroring():
    x = torch.rand(1, 1, 20, 24)
    inferer = window_inferer(32, 0.25, 16)
    seen = _seen_by_network(inferer, x)
    assert seen.shape == (32, 32)  # one window: 6 mirrored rows above and below, 4 columns left and right
    torch.testing.assert_close(seen[6:26, 4:28], x[0, 0])
    torch.testing.assert_close(seen[5, 4:28], x[0, 0, 1])
    torch.testing.assert_close(seen[6:26, 3], x[0, 0, :, 1])
    with torch.no_grad():
        out = inferer(x, lambda t: t * 2 + 1)
    torch.testing.assert_close(out, x * 2 + 1)


def test_a_unet_on_the_whole_image_equals_the_same_pass_on_a_pre_padded_input():
    torch.manual_seed(0)
    net = UNet(features=(4, 8, 16)).eval()
    x = torch.randn(1, 3, 30, 37)
    with torch.no_grad():
        out = WholeImageInferer(net.multiple)(x, net)
        padded = net(torch.nn.functional.pad(x, (1, 2, 1, 1), mode="reflect"))[..., 1:31, 1:38]
    torch.testing.assert_close(out, padded)


def test_window_inferer_chooses_by_window():
    assert isinstance(window_inferer(None, multiple=16), WholeImageInferer)
    assert isinstance(window_inferer(0, multiple=16), WholeImageInferer)
    sliding = window_inferer(256, 0.125, 16)
    assert isinstance(sliding, SlidingWindowInferer) and sliding.roi_size == 256 and sliding.overlap == 0.125
    with pytest.raises(ValueError, match="multiple of 16"):
        window_inferer(200, multiple=16)


def _ramps(x: torch.Tensor) -> torch.Tensor:
    """A network that is not flip-equivariant: each output pixel is its own column (channel 0) and row (channel 1)
    index, plus the input."""
    h, w = x.shape[-2:]
    cols = torch.arange(w, dtype=x.dtype).expand(h, w)
    rows = torch.arange(h, dtype=x.dtype)[:, None].expand(h, w)
    return torch.stack([cols, rows])[None] + x


def test_flips_average_each_pass_flipped_back():
    x = torch.randn(1, 2, 16, 32)
    h, w = x.shape[-2:]
    with torch.no_grad():
        two = window_inferer(None, multiple=16, flips=2)(x, _ramps)
        four = window_inferer(None, multiple=16, flips=4)(x, _ramps)
    # each flipped pass, flipped back, still adds the input where it was; the column ramp and its mirror average to
    # (w - 1) / 2 everywhere; the rows mirror only with the up-down flips
    torch.testing.assert_close(two[0, 0], x[0, 0] + (w - 1) / 2)
    torch.testing.assert_close(two[0, 1], x[0, 1] + torch.arange(h, dtype=x.dtype)[:, None].expand(h, w))
    torch.testing.assert_close(four[0], x[0] + torch.tensor([(w - 1) / 2, (h - 1) / 2]).view(2, 1, 1))


def test_flips_wrap_the_sliding_window_too():
    x = torch.randn(1, 2, 40, 56)
    flipped = window_inferer(16, 0.25, 16, flips=4)
    assert isinstance(flipped, FlipInferer) and isinstance(flipped.inner, SlidingWindowInferer)
    assert not isinstance(window_inferer(16, 0.25, 16), FlipInferer)
    with torch.no_grad():  # a pixel-wise network: every flipped pass, flipped back, is the plain pass
        torch.testing.assert_close(flipped(x, lambda t: t * 2 + 1), x * 2 + 1)


def test_flips_of_a_flip_equivariant_network_change_nothing_and_other_counts_are_refused():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 48)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric in both axes commutes with every flip
        conv.weight.copy_((conv.weight + conv.weight.flip(-1) + conv.weight.flip(-2) + conv.weight.flip(-1, -2)) / 4)
        torch.testing.assert_close(FlipInferer(WholeImageInferer(16), 4)(x, conv), conv(x))
    with pytest.raises(ValueError, match="test_time_flips must be one of \\[1, 2, 4\\], got 3"):
        window_inferer(None, flips=3)
