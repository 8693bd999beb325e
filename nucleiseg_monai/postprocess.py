"""Network probabilities -> uint32 nucleus instance labels.

``instances_from_probs`` is the method: a marker-controlled watershed on the 3-class softmax (background,
interior, boundary). Confident interior cores become markers; they flood the foreground, so the boundary class
that runs between touching nuclei is split between them instead of merging them. A network with a fourth output
also predicts each nucleus's distance map (``transforms.distance_map``: 1 at its centre, falling to 0 at its rim);
its peaks part touching nuclei whose interiors run together, and ``markers="distance_map"`` uses them. A network
with six outputs adds HoVer-Net's horizontal and vertical maps (``transforms.hover_maps``), which jump from +1 to -1
where two nuclei meet; ``hover_threshold`` cuts the markers along those jumps.
``activate`` turns network outputs into these probabilities, for every caller. ``instances_from_foreground``
(threshold + connected components) is the reference that merges touching nuclei, kept to measure the gain.
``InstancesFromProbsd`` wraps the method as a MONAI dictionary transform for bundle post-processing.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep
from scipy import ndimage as ndi
from skimage.morphology import disk
from skimage.segmentation import watershed

# Nuclei in CryoNuSeg (40x, ~0.25 um/px) have a median area of 239 px and a 0.5th percentile of 15 px; objects
# under 16 px (1 um^2) are specks of noise, not nuclei.
MIN_SIZE = 16
# Interior cores smaller than this are noise; dropping them lets their pixels join the neighbouring basin instead
# of splitting a nucleus. On CryoNuSeg truth turned into one-hot, blurred and noisy probabilities, 2-4 px scored
# best (mean AJI 0.992 / 0.975 / 0.935) and 8 px lost small nuclei that touch others (0.990 / 0.969 / 0.931).
MIN_MARKER_SIZE = 4

logger = logging.getLogger(__name__)

_CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity, like the encoding's find_boundaries(connectivity=1)
# The watershed's tie-free keys (see _flood) pack an 8-bit level, the steps to the nearest marker (clipped far
# beyond any nucleus) and a raster position into one float64 integer (exact below 2^53).
_DISTANCE_BITS = 16
_MAX_FLOOD_PIXELS = 2**53 >> (8 + _DISTANCE_BITS)

__all__ = [
    "MIN_MARKER_SIZE", "MIN_SIZE", "Activated", "InstancesFromProbsd", "activate", "hover_edges",
    "instances_from_foreground", "instances_from_probs",
]


def _float_array(x: Any) -> np.ndarray:
    """float32 numpy from numpy or torch (any dtype incl. bfloat16, any device, MetaTensor)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def activate(logits: torch.Tensor, dim: int = 1, inplace: bool = False) -> torch.Tensor:
    """Network outputs -> probabilities: softmax over the 3 classes, a sigmoid for each further map (the distance
    map; the HoVer maps, as (offset + 1) / 2); float32.

    ``inplace`` overwrites float32 ``logits`` instead of allocating: for a whole-slide region's outputs, whose
    copies would otherwise add to the predictor's peak memory.
    """
    logits = logits.float()
    classes, rest = logits.split([3, logits.shape[dim] - 3], dim=dim)
    if not inplace:
        return torch.cat([torch.softmax(classes, dim=dim), torch.sigmoid(rest)], dim=dim)
    classes.sub_(classes.amax(dim, keepdim=True)).exp_()
    classes.div_(classes.sum(dim, keepdim=True))
    rest.sigmoid_()
    return logits


def _check_probs(probs: Any) -> np.ndarray:
    p = _float_array(probs)
    if p.ndim != 3 or p.shape[0] not in (3, 4, 6):
        raise ValueError(
            f"expected probabilities of shape (3,H,W) for (background, interior, boundary), (4,H,W) with the "
            f"distance map or (6,H,W) with the HoVer maps too, got {p.shape}; squeeze the batch axis and activate "
            "logits first "
            "(postprocess.activate, or InstancesFromProbsd(softmax=True))"
        )
    return p


def hover_edges(probs: np.ndarray) -> np.ndarray:
    """(H, W) float32: how steeply the HoVer maps fall, per pixel, in their own direction (horizontal map along x,
    vertical along y; the larger of the two, 0 where both rise). Inside a nucleus they rise by about 2 / its
    diameter per pixel; where two nuclei meet they fall by up to 2 within a pixel or two. A fixed 3 x 3 Sobel
    kernel on the maps as predicted, not HoVer-Net's per-image min-max scaling, so a region of a slide gets the
    values the whole image would."""
    horizontal, vertical = 2 * probs[4] - 1, 2 * probs[5] - 1
    fall_x = -ndi.sobel(horizontal, axis=1) / 8  # a ramp of slope 1 gives 1
    fall_y = -ndi.sobel(vertical, axis=0) / 8
    return np.maximum(np.maximum(fall_x, fall_y), 0).astype(np.float32)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects under min_size pixels and renumber the rest 1..N in order of their old ids, as uint32."""
    area = np.bincount(labels.ravel())
    keep = area >= min_size
    keep[0] = False
    lut = np.zeros(area.size, dtype=np.uint32)
    lut[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.uint32)
    return lut[labels]


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by a single object; a gap enclosed by several touching nuclei stays."""
    # Holes = 4-connected background components off the image border (as ndi.binary_fill_holes, 3x faster).
    background, n_bg = ndi.label(labels == 0, structure=_CROSS)
    outside = np.zeros(n_bg + 1, dtype=bool)
    outside[0] = True
    outside[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    if outside.all():
        return labels
    hole_ids = np.where(outside[background], 0, background)
    # Smallest and largest label 4-adjacent to each hole: equal means exactly one enclosing object.
    lo = np.full(n_bg + 1, np.iinfo(labels.dtype).max, dtype=labels.dtype)
    hi = np.zeros(n_bg + 1, dtype=labels.dtype)
    for a, b in (
        (np.s_[1:, :], np.s_[:-1, :]),
        (np.s_[:-1, :], np.s_[1:, :]),
        (np.s_[:, 1:], np.s_[:, :-1]),
        (np.s_[:, :-1], np.s_[:, 1:]),
    ):
        h, lab = hole_ids[a], labels[b]
        edge = (h > 0) & (lab > 0)
        np.minimum.at(lo, h[edge], lab[edge])
        np.maximum.at(hi, h[edge], lab[edge])
    fill = np.where(lo == hi, hi, 0)
    fill[0] = 0
    return np.where(hole_ids > 0, fill[hole_ids], labels)


def _flood(levels: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Watershed of markers over mask on uint8 ``levels``, with ties broken by the pixel's own surroundings.

    skimage breaks equal elevations by the order pixels enter its queue, and which of two tied neighbours entered
    first goes back to the order in which the heap released equal markers: a function of the whole image. A region
    read with a margin could then split a plateau between touching nuclei differently from a whole-image run. Here
    every pixel's key is unique, ordered by (level, 4-connected steps to the nearest marker, raster position), and
    each term depends only on the pixel's neighbourhood (raster order is the same in a crop as in the image), so a
    plateau goes to the nearest marker, as queue order roughly did, and a crop floods exactly like the image around
    it. That needs skimage to release markers by their key too: every release does but 0.25.0 and 0.25.1, which
    gave all markers one priority (pyproject excludes them, and ``_check_marker_order`` warns about any other).

    A marker pixel whose 4 neighbours all belong to the same marker can never flood anything, so only the
    marker rims seed the watershed and the cores are pasted back afterwards.
    """
    _check_marker_order()
    n = levels.size
    if n > _MAX_FLOOD_PIXELS:
        raise ValueError(f"the watershed runs on at most {_MAX_FLOOD_PIXELS} pixels at a time (its keys are exact "
                         f"float64 integers), got {levels.shape}; analyse the image in regions (SlidePredictor)")
    # 4-connected steps to the nearest marker: the distance a tie-free queue would flood over
    steps = ndi.distance_transform_cdt(markers == 0, metric="taxicab")
    key = levels.astype(np.int64) << _DISTANCE_BITS
    key |= np.minimum(steps, (1 << _DISTANCE_BITS) - 1)
    key *= n
    key += np.arange(n, dtype=np.int64).reshape(levels.shape)
    core = ndi.binary_erosion(markers > 0, structure=_CROSS)
    labels = watershed(key.astype(np.float64), np.where(core, 0, markers), connectivity=1, mask=mask & ~core)
    labels[core] = markers[core]
    return labels


@functools.cache
def _check_marker_order() -> bool:
    """Whether this scikit-image releases markers by their elevation, which the tie-free keys rely on; says once
    when it does not (a release after 0.26 could, as 0.25.0-0.25.1 did): labels stay right, seams may differ by
    contested pixels."""
    ordered = bool(watershed(np.array([[5.0, 0.0, 1.0]]), np.array([[1, 0, 2]]), connectivity=1)[0, 1] == 2)
    if not ordered:
        from skimage import __version__

        logger.warning("scikit-image %s gives every watershed marker the same priority, so whole-slide regions may "
                       "split contested pixels between touching nuclei differently from one pass over the image; "
                       "scikit-image 0.26.0 orders them (pip install 'scikit-image==0.26.0')", __version__)
    return ordered


def _split_markers(marker_ids: np.ndarray, n_markers: int, high: np.ndarray, min_part: int) -> np.ndarray:
    """Markers (ids 1..n) whose pixels above the higher threshold (``high``) form two or more 4-connected parts of
    at least ``min_part`` px are replaced by those parts, with ids from n + 1 on (the split markers' ids stay
    unused: ids need only be distinct, and the result's are renumbered at the end)."""
    parts, n_parts = ndi.label(high & (marker_ids > 0), structure=_CROSS)
    if n_parts < 2:
        return marker_ids
    inside = parts > 0
    owner = np.zeros(n_parts + 1, dtype=np.int64)
    owner[parts[inside]] = marker_ids[inside]  # a part lies inside one marker
    big = np.bincount(parts[inside], minlength=n_parts + 1) >= min_part
    big[0] = False
    split = np.bincount(owner[big], minlength=n_markers + 1) >= 2
    split[0] = False
    if not split.any():
        return marker_ids
    keep = big & split[owner]
    lut = np.zeros(n_parts + 1, dtype=np.int64)
    lut[keep] = np.arange(n_markers + 1, n_markers + 1 + np.count_nonzero(keep))
    return np.where(split[marker_ids], lut[parts], marker_ids).astype(np.int32)


def instances_from_probs(
    probs: Any,
    *,
    fg_threshold: float = 0.5,
    marker_threshold: float = 0.7,
    min_marker_size: int = MIN_MARKER_SIZE,
    marker_erosion: int = 0,
    marker_split_threshold: float | None = None,
    min_size: int = MIN_SIZE,
    fill_holes: bool = True,
    elevation: str = "interior",
    markers: str = "interior",
    hover_threshold: float | None = None,
) -> np.ndarray:
    """Instance labels (H,W) uint32, ids 1..N, from softmax probabilities (3,H,W) by marker-controlled watershed.

    - foreground mask: 1 - p_background > fg_threshold;
    - markers: 4-connected components of the marker map > marker_threshold inside the mask, optionally eroded by
      a disk of radius marker_erosion (separates cores joined by a thin bridge), those under min_marker_size px
      dropped; the marker map is p_interior (markers "interior") or the predicted distance map ("distance_map",
      4-channel probabilities only); with marker_split_threshold, a marker holding two or more parts above that
      higher threshold, each of at least min_marker_size px, is replaced by those parts (two peaks joined by a
      saddle above marker_threshold are two nuclei; a faint nucleus with one low peak keeps its marker); with
      hover_threshold (6-channel probabilities only), marker pixels where ``hover_edges`` exceeds it are dropped
      first, so a marker that spans two nuclei falls apart along the line where their HoVer maps jump;
    - watershed of the markers over the mask on elevation "interior" (1 - p_interior: basins meet on the
      boundary class), "distance" (negative distance to the background: basins meet at the narrowest neck) or
      "distance_map" (1 - the predicted distance map: basins meet where two nuclei's maps fall to their rims);
    - foreground components that no marker reached (small nuclei with no confident core) become objects of
      their own;
    - holes enclosed by one object are filled (fill_holes), objects under min_size px are removed.

    Defaults: fg_threshold 0.5 calls a pixel nucleus when background is the less likely side; marker_threshold
    0.7 keeps markers to confident cores (the interior probability drops between touching nuclei; 0.6 let noisy
    cores merge in simulations, 0.8 lost faint nuclei).
    """
    p = _check_probs(probs)
    maps = {"interior": 1, "distance_map": 3}
    if elevation not in ("interior", "distance", "distance_map"):
        raise ValueError(f"elevation must be 'interior', 'distance' or 'distance_map', got {elevation!r}")
    if markers not in maps:
        raise ValueError(f"markers must be 'interior' or 'distance_map', got {markers!r}")
    if "distance_map" in (elevation, markers) and p.shape[0] < 4:
        raise ValueError(f"{elevation=!r}, {markers=!r} need a network with a distance map (4 or 6 outputs); "
                         f"these probabilities have {p.shape[0]} channels: use 'interior'")
    if hover_threshold is not None and p.shape[0] != 6:
        raise ValueError(f"hover_threshold needs a network with HoVer maps (6 outputs); these probabilities have "
                         f"{p.shape[0]} channels: leave hover_threshold null")
    mask = p[0] < 1.0 - fg_threshold
    seeds = (p[maps[markers]] > marker_threshold) & mask
    if hover_threshold is not None:
        seeds &= hover_edges(p) <= hover_threshold
    if marker_erosion > 0:
        seeds = ndi.binary_erosion(seeds, structure=disk(marker_erosion))
    marker_ids, n_markers = ndi.label(seeds, structure=_CROSS)
    if marker_split_threshold is not None and n_markers:
        marker_ids = _split_markers(marker_ids, n_markers, p[maps[markers]] > marker_split_threshold,
                                    max(min_marker_size, 1))
        n_markers = int(marker_ids.max())
    if min_marker_size > 1 and n_markers:
        marker_ids = _remove_small(marker_ids, min_marker_size).astype(np.int32)
        n_markers = int(marker_ids.max())
    if n_markers == 0:
        labels = np.zeros(mask.shape, dtype=np.int32)
    elif elevation in maps:
        # steps of 1/255 in probability: the 8 bits the watershed's keys hold for the level
        surface = np.round((1.0 - np.clip(p[maps[elevation]], 0.0, 1.0)) * 255).astype(np.uint8)
        labels = _flood(surface, marker_ids, mask)
    else:
        # quarter-pixel steps of the distance to the background, deepest first (a nucleus is < 64 px in radius)
        depth = np.minimum(np.rint(ndi.distance_transform_edt(mask) * 4), 255)
        labels = _flood((255 - depth).astype(np.uint8), marker_ids, mask)
    unseeded = mask & (labels == 0)
    if unseeded.any():
        extra, _ = ndi.label(unseeded, structure=_CROSS)
        labels = np.where(extra > 0, extra + n_markers, labels)
    if fill_holes:
        labels = _fill_holes(labels)
    return _remove_small(labels, min_size)


def instances_from_foreground(mask_or_prob: Any, threshold: float = 0.5, min_size: int = MIN_SIZE) -> np.ndarray:
    """Reference instances: 4-connected components of (map > threshold), specks under min_size removed; uint32.

    Accepts a binary mask or foreground probability (H,W), or the 3-class probabilities (3,H,W) (foreground is
    then 1 - p_background). Touching nuclei merge into one object, which is what the watershed method fixes.
    """
    x = _float_array(mask_or_prob)
    if x.ndim == 3 and x.shape[0] in (3, 4, 6):
        x = 1.0 - x[0]
    if x.ndim != 2:
        raise ValueError(f"expected a (H,W) mask/probability or (3,H,W) / (4,H,W) / (6,H,W) probabilities, got shape "
                         f"{x.shape}")
    labels, _ = ndi.label(x > threshold, structure=_CROSS)
    return _remove_small(labels, min_size)


class Activated(MapTransform):
    """Dictionary transform: each item's logits (C,H,W) -> ``activate``'s probabilities, in place of MONAI's
    ``Activationsd(softmax=True)``, which would also softmax a distance map into the classes."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = activate(torch.as_tensor(d[key]), dim=0)
        return d


class InstancesFromProbsd(MapTransform):
    """Dictionary transform: (3,H,W) or (4,H,W) probabilities (or logits with softmax=True, which runs
    ``activate``) -> (1,H,W) uint32 instances.

    Accepts torch tensors (MetaTensor included) or numpy per item, i.e. after ``decollate_batch`` in an
    evaluator's postprocessing. The result is written to ``output_keys`` (default: overwrite ``keys``); the
    leading channel axis lets it batch and go through ``from_engine`` to ``metrics.InstanceMetric``.
    ``params`` are the keyword arguments of ``instances_from_probs`` (e.g. marker_threshold, min_size), so a
    bundle config can set them, e.g. in an evaluate config::

        {"_target_": "nucleiseg_monai.postprocess.InstancesFromProbsd", "keys": "pred",
         "output_keys": "pred_inst", "softmax": true, "min_size": 16}
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        softmax: bool = False,
        allow_missing_keys: bool = False,
        params: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        # a config names its one postprocess_params dict ("params": "@postprocess_params") instead of splatting it
        params = {**(params or {}), **kwargs}
        self.output_keys = self.keys if output_keys is None else ensure_tuple_rep(output_keys, len(self.keys))
        allowed = set(inspect.signature(instances_from_probs).parameters) - {"probs"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(f"InstancesFromProbsd: unknown parameters {unknown}; allowed: {sorted(allowed)}")
        self.softmax = softmax
        self.params = params

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            x = d[key]
            if self.softmax:
                x = activate(torch.as_tensor(_float_array(x)), dim=0)
            x = _float_array(x)
            d[out_key] = instances_from_probs(x, **self.params)[None]
        return d
