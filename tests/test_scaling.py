"""The working scale: scales as fractions whose windows resample exactly as the whole image does."""

from fractions import Fraction

import numpy as np
import torch

from nucleiseg_monai.scaling import lattice_scale, to_read_grid, to_working_scale


def test_scales_are_fractions_whose_windows_resample_like_the_whole_image():
    assert [lattice_scale(r / 0.25) for r in (0.5, 1.0, 0.3, 0.125, 0.2527, 0.2451)] == \
        [2, 4, Fraction(6, 5), Fraction(1, 2), 1, 1]
    for ratio in np.exp(np.linspace(np.log(0.1), np.log(40), 2000)):
        scale = lattice_scale(ratio)
        if abs(ratio - 1) <= 0.02:
            assert scale == 1  # analysed as read
        else:
            assert abs(ratio / scale - 1) <= 0.02 and scale.denominator <= 64
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 255, (1, 3, 150, 180)).astype(np.float32))
    for scale in (Fraction(2), Fraction(6, 5), Fraction(1, 2), Fraction(17, 16)):
        p, q = scale.numerator, scale.denominator
        y, x, h, w = 2 * q, 3 * q, 4 * q, 3 * q  # a window on the lattice: origin a multiple of q
        whole, part = to_working_scale(image, scale), to_working_scale(image[..., y:y + h, x:x + w], scale)
        wy, wx, wh, ww = (v * p // q for v in (y, x, h, w))
        assert part.shape[-2:] == (wh, ww)
        inner = (..., slice(3, -3), slice(3, -3))  # away from the window's border, where context differs
        # equal up to float32 rounding of the lattice coordinates (values are on the 0-255 scale)
        torch.testing.assert_close(part[inner], whole[..., wy:wy + wh, wx:wx + ww][inner], atol=1e-2, rtol=0)
        labels = rng.integers(0, 50, whole.shape[-2:])
        np.testing.assert_array_equal(to_read_grid(labels[wy:wy + wh, wx:wx + ww], (h, w), scale),
                                      to_read_grid(labels, image.shape[-2:], scale)[y:y + h, x:x + w])
