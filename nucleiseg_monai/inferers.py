"""How the network meets an image: one pass over the whole image, or MONAI's gaussian sliding window; optionally
averaged over flips of the image.

Both bundles run each image, and each whole-slide region (which brings its own context margin), in one pass
(``window: null`` in train.json): a U-Net is fully convolutional, so a window the size of the image needs no overlap
and no blending, and each pixel goes through the network once. Windows (``window``: a size in px, overlapping by
``window_overlap``) hold one window's activations at a time, for devices where a region's activations do not fit.
``test_time_flips`` (1, 2 or 4) averages the network's outputs over the image and its flips: more accurate, and that
many network passes. Validation, evaluation and the inference predictor all build their inferer here, so they score
and run the same thing. An image is padded to the network's multiple (or to one window) by mirroring its edge: zeros
there cost nuclei near the border (``pad_centred``), and a tile resampled to the working scale is rarely a multiple.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

__all__ = ["FlipInferer", "PaddedSlidingWindowInferer", "WholeImageInferer", "pad_centred", "window_inferer"]

FLIPS = {1: [()], 2: [(), (-1,)], 4: [(), (-1,), (-2,), (-2, -1)]}
PADDING_MODES = ("reflect", "replicate", "constant")


def _padding_mode(mode: str) -> str:
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    return mode


def pad_centred(x: torch.Tensor, ph: int, pw: int, mode: str = "reflect") -> tuple[torch.Tensor, int, int]:
    """(N, C, H, W) padded by ``ph`` rows and ``pw`` columns split evenly around it: (padded, top, left).

    "reflect" mirrors the image's own edge (as the training augmentation pads), so the network sees tissue-like
    context at an image border; "constant" fills zeros, the mean colour once z-scored, which the network never saw
    in training and which disturbs nuclei up to its receptive field away. Reflection needs each pad shorter than the
    side it mirrors; tinier inputs are padded by repeating their edge instead.
    """
    _padding_mode(mode)
    if not (ph or pw):
        return x, 0, 0
    top, left = ph // 2, pw // 2
    h, w = x.shape[-2:]
    if mode == "reflect" and (ph - top >= h or pw - left >= w):
        mode = "replicate"
    return F.pad(x, (left, pw - left, top, ph - top), mode=mode), top, left


def _padded(inputs: torch.Tensor, ph: int, pw: int, mode: str, run: Callable[[torch.Tensor], torch.Tensor]):
    """``run`` on ``inputs`` padded by ``pad_centred``, its output cropped back to the input's height and width."""
    h, w = inputs.shape[-2:]
    padded, top, left = pad_centred(inputs, ph, pw, mode)
    out = run(padded)
    return out if padded is inputs else out[..., top:top + h, left:left + w]


class WholeImageInferer(Inferer):
    """The network on the whole (N, C, H, W) input at once, padded (centred, ``pad_centred``) to multiples of
    ``multiple`` and cropped back."""

    def __init__(self, multiple: int = 1, padding_mode: str = "reflect"):
        super().__init__()
        if int(multiple) < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple, self.padding_mode = int(multiple), _padding_mode(padding_mode)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        h, w = inputs.shape[-2:]
        return _padded(inputs, -h % self.multiple, -w % self.multiple, self.padding_mode,
                       lambda x: network(x, *args, **kwargs))


class PaddedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's gaussian sliding window, on an input first padded (``pad_centred``) to at least one window: MONAI
    would pad a smaller input itself, with a mode that fails where reflection is longer than the image."""

    def __init__(self, *args, padding_mode: str = "reflect", **kwargs):
        super().__init__(*args, padding_mode="constant", **kwargs)
        self.edge_mode = _padding_mode(padding_mode)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        h, w = inputs.shape[-2:]
        roi_h, roi_w = ensure_tuple_rep(self.roi_size, 2)
        return _padded(inputs, max(roi_h - h, 0), max(roi_w - w, 0), self.edge_mode,
                       lambda x: super(PaddedSlidingWindowInferer, self).__call__(x, network, *args, **kwargs))


class FlipInferer(Inferer):
    """The mean of ``inner``'s outputs over the input and its flips, each flipped back first: 1 (none), 2 (and the
    left-right mirror) or 4 (and the up-down mirror, and both). The flips run one after another, so memory is one
    pass's; the outputs averaged are the network's logits, as every inferer here returns them. With six outputs the
    HoVer maps (offsets from each centroid) change sign under their own axis's mirror, and so do their logits
    (those of (offset + 1) / 2): they are negated back too, or the mean would cancel them."""

    def __init__(self, inner: Inferer, flips: int = 4):
        super().__init__()
        if int(flips) not in FLIPS:
            raise ValueError(f"test_time_flips must be one of {sorted(FLIPS)}, got {flips}")
        self.inner, self.dims = inner, FLIPS[int(flips)]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        total = None
        for dims in self.dims:
            out = self.inner(torch.flip(inputs, dims) if dims else inputs, network, *args, **kwargs)
            if dims:
                out = torch.flip(out, dims)
                if out.shape[1] == 6:  # horizontal map (channel 4) along x, vertical (5) along y
                    for channel, axis in ((4, -1), (5, -2)):
                        if axis in dims:
                            out[:, channel].neg_()
            total = out if total is None else total.add_(out)
        return total.div_(len(self.dims)) if len(self.dims) > 1 else total


def window_inferer(window: int | None, overlap: float = 0.125, multiple: int = 1, sw_batch_size: int = 1,
                   padding_mode: str = "reflect", device: torch.device | str | None = None,
                   flips: int = 1) -> Inferer:
    """``WholeImageInferer`` when ``window`` is None (or 0), else a gaussian ``SlidingWindowInferer`` of
    ``window`` x ``window`` px windows overlapping by ``overlap``, ``sw_batch_size`` at a time; averaged over
    ``flips`` flips of the input (``FlipInferer``) when ``flips`` is 2 or 4. ``padding_mode``: how an image is
    padded to the network's multiple or to one window (``pad_centred``)."""
    if not window:
        inferer: Inferer = WholeImageInferer(multiple, padding_mode)
    else:
        if int(window) % multiple:
            raise ValueError(f"window must be a multiple of {multiple} for this network, got {window}")
        inferer = PaddedSlidingWindowInferer(roi_size=int(window), sw_batch_size=sw_batch_size, overlap=overlap,
                                             mode="gaussian", padding_mode=padding_mode, sw_device=device,
                                             device=device, progress=False)
    return inferer if int(flips) == 1 else FlipInferer(inferer, flips)
