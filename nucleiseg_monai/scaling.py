"""One physical scale: windows read at the file's pixel size, analysed at the model's (the *working* scale).

A read level whose pixel size is within ``SCALE_TOLERANCE`` of the working one is analysed as read. Otherwise each
whole window (core and margin) is resampled to the working scale (bilinear, anti-aliased), analysed there, and its
instance labels are mapped back (nearest: each read pixel takes the working pixel under its centre), so every output
is on the input's own grid. Seams stay exact: the scale is taken as a fraction p / q (``lattice_scale``: the
smallest denominator within ``SCALE_TOLERANCE`` of the true ratio: 1 for 0.245-0.255 um/px, 2 for a 20x level, 6/5
for 0.3 um/px), and windows start on multiples of q read pixels, so each resamples exactly as the same pixels of the
whole image would (``to_working_scale``, ``to_read_grid``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

# Resampling scales are fractions within this relative distance of the true ratio (one with a denominator of at
# most 64 is always within 0.8%, so cores and margins grow by less than 64 read pixels). A read level this close to
# the working pixel size is analysed as read: no resampling, so the common 40x case costs nothing extra and gives
# exactly what it gave before resampling existed.
SCALE_TOLERANCE = 0.02


def lattice_scale(ratio: float) -> Fraction:
    """``ratio`` as the fraction with the smallest denominator within ``SCALE_TOLERANCE`` of it: windows starting at
    multiples of the denominator start on whole working pixels."""
    candidates = [Fraction(max(1, round(ratio * q)), q) for q in range(1, 65)]
    error = [abs(ratio / float(f) - 1.0) for f in candidates]
    return next((f for f, e in zip(candidates, error) if e <= SCALE_TOLERANCE), candidates[int(np.argmin(error))])


def to_working_scale(x: torch.Tensor, scale: Fraction) -> torch.Tensor:
    """(N, C, h, w) float image -> (N, C, floor(h * scale), floor(w * scale)), bilinear, anti-aliased when shrinking.

    The sample lattice is ``scale`` itself, not the ratio of the rounded sizes, so a window whose origin falls on a
    whole working pixel is resampled exactly as the same pixels of the whole image.
    """
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=float(scale), mode="bilinear", antialias=True, align_corners=False,
                         recompute_scale_factor=False)


def to_read_grid(labels: np.ndarray, shape: tuple[int, int], scale: Fraction) -> np.ndarray:
    """Working-scale labels -> labels of ``shape`` read pixels: each read pixel takes the working pixel under its
    centre (nearest; ids are carried, never blended), in integer arithmetic so every window agrees on it."""
    if scale == 1:
        return labels
    p, q = scale.numerator, scale.denominator
    rows, cols = (np.minimum((2 * np.arange(n, dtype=np.int64) + 1) * p // (2 * q), m - 1)
                  for n, m in zip(shape, labels.shape))
    return labels[np.ix_(rows, cols)]
