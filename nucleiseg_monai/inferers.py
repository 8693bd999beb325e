"""How the network meets an image: one pass over the whole image, or MONAI's gaussian sliding window; optionally
averaged over flips of the image.

Both bundles run each image, and each whole-slide region (which brings its own context margin), in one pass
(``window: null`` in train.json): a U-Net is fully convolutional, so a window the size of the image needs no overlap
and no blending, and each pixel goes through the network once. Windows (``window``: a size in px, overlapping by
``window_overlap``) hold one window's activations at a time, for devices where a region's activations do not fit.
``test_time_flips`` (1, 2 or 4) averages the network's outputs over the image and its flips: more accurate, and that
many network passes. Validation, evaluation and the inference predictor all build their inferer here, so they score
and run the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = ["FlipInferer", "WholeImageInferer", "window_inferer"]

FLIPS = {1: [()], 2: [(), (-1,)], 4: [(), (-1,), (-2,), (-2, -1)]}


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


class FlipInferer(Inferer):
    """The mean of ``inner``'s outputs over the input and its flips, each flipped back first: 1 (none), 2 (and the
    left-right mirror) or 4 (and the up-down mirror, and both). The flips run one after another, so memory is one
    pass's; the outputs averaged are the network's logits, as every inferer here returns them."""

    def __init__(self, inner: Inferer, flips: int = 4):
        super().__init__()
        if int(flips) not in FLIPS:
            raise ValueError(f"test_time_flips must be one of {sorted(FLIPS)}, got {flips}")
        self.inner, self.dims = inner, FLIPS[int(flips)]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        total = None
        for dims in self.dims:
            out = self.inner(torch.flip(inputs, dims) if dims else inputs, network, *args, **kwargs)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
        return total.div_(len(self.dims)) if len(self.dims) > 1 else total


def window_inferer(window: int | None, overlap: float = 0.125, multiple: int = 1, sw_batch_size: int = 1,
                   padding_mode: str = "constant", device: torch.device | str | None = None,
                   flips: int = 1) -> Inferer:
    """``WholeImageInferer`` when ``window`` is None (or 0), else a gaussian ``SlidingWindowInferer`` of
    ``window`` x ``window`` px windows overlapping by ``overlap``, ``sw_batch_size`` at a time; averaged over
    ``flips`` flips of the input (``FlipInferer``) when ``flips`` is 2 or 4."""
    if not window:
        inferer: Inferer = WholeImageInferer(multiple)
    else:
        if int(window) % multiple:
            raise ValueError(f"window must be a multiple of {multiple} for this network, got {window}")
        inferer = SlidingWindowInferer(roi_size=int(window), sw_batch_size=sw_batch_size, overlap=overlap,
                                       mode="gaussian", padding_mode=padding_mode, sw_device=device, device=device,
                                       progress=False)
    return inferer if int(flips) == 1 else FlipInferer(inferer, flips)
