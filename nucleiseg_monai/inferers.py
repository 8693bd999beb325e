"""How the network meets an image: MONAI's gaussian sliding window, or one pass over the whole image.

Both bundles ship 256 px windows overlapping by 0.125 (``window`` and ``window_overlap`` in train.json): they hold
one window's activations at a time, so a whole-slide region's memory does not grow with its size. One pass
(``window: null``) is the alternative where memory is not tight: a U-Net is fully convolutional, so a window the
size of the image (or of a whole-slide region, which brings its own context margin) needs no overlap and no
blending, and each pixel goes through the network once, where the windows run a 2048 px region's pixels about 1.27
times. Validation, evaluation and the inference predictor all build their inferer here, so they score and run the
same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = ["WholeImageInferer", "window_inferer"]


class WholeImageInferer(Inferer):
    """The network on the whole (N, C, H, W) input at once, zero-padded (centred) to multiples of ``multiple`` and
    cropped back; zero is the mean colour once the input is z-scored, as MONAI's sliding window pads."""

    def __init__(self, multiple: int = 1):
        super().__init__()
        if int(multiple) < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple = int(multiple)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        h, w = inputs.shape[-2:]
        m = self.multiple
        ph, pw = -h % m, -w % m
        if not (ph or pw):
            return network(inputs, *args, **kwargs)
        top, left = ph // 2, pw // 2
        padded = F.pad(inputs, (left, pw - left, top, ph - top))
        return network(padded, *args, **kwargs)[..., top:top + h, left:left + w]


def window_inferer(window: int | None, overlap: float = 0.125, multiple: int = 1, sw_batch_size: int = 1,
                   padding_mode: str = "constant", device: torch.device | str | None = None) -> Inferer:
    """``WholeImageInferer`` when ``window`` is None (or 0), else a gaussian ``SlidingWindowInferer`` of
    ``window`` x ``window`` px windows overlapping by ``overlap``, ``sw_batch_size`` at a time."""
    if not window:
        return WholeImageInferer(multiple)
    if int(window) % multiple:
        raise ValueError(f"window must be a multiple of {multiple} for this network, got {window}")
    return SlidingWindowInferer(roi_size=int(window), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
                                padding_mode=padding_mode, sw_device=device, device=device, progress=False)
