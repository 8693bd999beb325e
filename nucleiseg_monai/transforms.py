"""MONAI dictionary transforms: loading, H&E stain jitter, the 3-class target, and the train / eval pipelines.

Keys used throughout: ``image`` (float32, 3 x H x W, z-scored once normalised), ``label`` (the training target,
1 x H x W classes 0 background / 1 interior / 2 boundary) and ``label_inst`` (1 x H x W instance ids, kept for
instance metrics). Spatial transforms move image and labels together, labels with nearest-neighbour sampling, so
instance ids are carried, never interpolated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ComputeHoVerMaps,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialCrop,
    SpatialPadd,
)
from scipy.ndimage import distance_transform_edt, find_objects, gaussian_filter, maximum_filter, minimum_filter
from skimage.color import rgb_from_hed
from skimage.measure import label as label_pieces
from skimage.segmentation import find_boundaries

from .data import read_image, read_instance_labels
from .hard_examples import error_map_path

logger = logging.getLogger(__name__)

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
IGNORE = 255  # target value the loss skips: background too far from any annotation to be trusted
# px at the working scale, drawn per axis: from barely softer to blurrier than any tile of the three sources
BLUR_SIGMA = (0.25, 1.5)
CONTACT_RADIUS = 3  # px at the working scale: the gap between touching nuclei and the rims on both sides of it

# Stain matrix of Ruifrok & Johnston as scikit-image ships it (rows: haematoxylin, eosin, DAB optical densities).
_RGB_FROM_HED = torch.as_tensor(rgb_from_hed, dtype=torch.float32)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def encode_three_class(labels: np.ndarray) -> np.ndarray:
    """Instance ids -> uint8 classes: 0 background, 1 interior, 2 the inner one-pixel rim of each nucleus.

    Rims are drawn per id, so two touching nuclei are parted by two boundary pixels and a watershed on the
    interior recovers them; a nucleus split into two pieces by an overlapping outline keeps both pieces.
    """
    labels = np.asarray(labels)
    classes = (labels > 0).astype(np.uint8)
    classes[find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)] = BOUNDARY
    return classes


def distance_map(labels: np.ndarray) -> np.ndarray:
    """Instance ids -> float32 map: in each nucleus its distance to the nucleus's own outline, divided by that
    nucleus's largest (1 at its centre, towards 0 at its rim); 0 on background.

    Normalised per nucleus so that small and large nuclei have peaks of the same height: a single marker threshold
    finds both, and two touching nuclei always meet in a valley.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = labels[box] == index
        dist = distance_transform_edt(inside)
        out[box][inside] = dist[inside] / dist.max()
    return out


def hover_maps(labels: np.ndarray) -> np.ndarray:
    """Instance ids -> float32 (2, H, W): in each nucleus each pixel's horizontal and vertical offset from the
    nucleus's centroid, scaled to [-1, 1] on each side of it (HoVer-Net's maps, MONAI's ``ComputeHoVerMaps``);
    0 on background.

    Where two nuclei touch, the maps jump from +1 to -1 across the line between them, however faint the rim:
    ``postprocess`` cuts markers there. Each connected piece counts as a nucleus of its own: a patch's reflected
    border or a rotation's corner can show one nucleus twice, and one centroid between the copies would give each
    a map of one sign (HoVer-Net's ``fix_mirror_padding``). The pieces are numbered 1..n first, also because MONAI
    compares ids in float32, where ids above 2^24 collide."""
    pieces = label_pieces(np.asarray(labels), background=0, connectivity=2)
    return np.asarray(ComputeHoVerMaps()(pieces[None]), dtype=np.float32)


def contact_map(labels: np.ndarray, radius: int = CONTACT_RADIUS) -> np.ndarray:
    """Pixels with two different nuclei within ``radius`` px (a square window): where touching nuclei meet.

    Ronneberger et al.'s U-Net weighted such pixels so that the thin background between touching cells is learnt;
    here they are where a missing rim or a distance map without a valley merges two nuclei into one.
    """
    labels = np.asarray(labels)
    size = 2 * int(radius) + 1
    ids = labels.astype(np.int32)
    empty = int(ids.max()) + 1  # above every id; scipy's cval is a float, so no dtype limit stands in for "none"
    highest = maximum_filter(ids, size=size, mode="constant", cval=0)
    lowest = minimum_filter(np.where(ids > 0, ids, empty), size=size, mode="constant", cval=empty)
    return (lowest != empty) & (highest != lowest)


def resample_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) float image to ``size`` with anti-aliasing (bilinear, area-weighted when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return torch.nn.functional.interpolate(image[None].float(), size=tuple(size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def resample_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) instance ids to ``size`` by nearest neighbour (ids are carried, never blended)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    # float64 holds any int32 id exactly
    out = torch.nn.functional.interpolate(labels[None].double(), size=tuple(size), mode="nearest-exact")[0]
    return out.to(labels.dtype)


def scaled_size(shape: Sequence[int], scale: float) -> tuple[int, int]:
    return tuple(max(1, int(round(n * scale))) for n in shape[-2:])


class LoadTiled(MapTransform):
    """Reads an RGB tile and its instance labels (validated by `data`) into channel-first tensors.

    ``image`` becomes float32 (3, H, W) on the 0-255 scale; ``label`` int32 (1, H, W) instance ids. The record's
    ``label_kind`` says whether the label file is an instance map or a binary mask. The image's path stays under
    ``image_path`` so reports can name and redraw the tile. A record's ``scale`` (its pixel size over the
    bundle's working pixel size) resamples both to the working scale; with ``keep_native`` the labels as read
    stay under ``label_native`` so evaluation can score predictions on the file's own pixel grid.
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label", keep_native: bool = False):
        super().__init__([k for k in (image_key, label_key) if k], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.keep_native = keep_native

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[f"{self.image_key}_path"] = str(d[self.image_key])
        image = read_image(d[self.image_key])
        rescan = d.get("rescan_scale")
        if rescan:
            # a copy of the tile as a scanner at another pixel size would have made it: image and labels are
            # resampled first, and that copy (not the original) is what the model sees and is scored against
            image = rescan_image(image, float(rescan))
        if self.label_key and self.label_key in d:
            labels = read_instance_labels(d[self.label_key], d.get("label_kind", "instance"))
            if rescan:
                labels = resample_labels(torch.from_numpy(labels[None]), image.shape[:2])[0].numpy()
            if labels.shape != image.shape[:2]:
                raise ValueError(
                    f"size mismatch: {d[f'{self.image_key}_path']} {image.shape[:2]} vs {d[self.label_key]} "
                    f"{labels.shape}; they must be the same tile"
                )
            d[self.label_key] = torch.from_numpy(labels[None])
        d[self.image_key] = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
        scale = float(d.get("scale", 1.0))
        if self.keep_native and self.label_key in d:
            d[f"{self.label_key}_native"] = d[self.label_key]
        if scale != 1.0:
            size = scaled_size(image.shape[:2], scale)
            d[self.image_key] = resample_image(d[self.image_key], size)
            if self.label_key and self.label_key in d:
                d[self.label_key] = resample_labels(d[self.label_key], size)
        return d


class LoadErrorMapd(MapTransform):
    """Puts a tile's error map (``hard_examples.error_map_path`` under ``folder``: where a trained network erred)
    under ``key`` as a uint8 (1, H, W) tensor on the grid of ``like`` (the labels, already at the working scale);
    all zeros where the tile has no map, so that every record carries the key."""

    def __init__(self, folder: str | os.PathLike, key: str = "errors", like: str = "label"):
        super().__init__([like])
        self.folder, self.key, self.like = Path(folder), key, like
        self._warned = False

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from PIL import Image

        d = dict(data)
        size = tuple(torch.as_tensor(d[self.like]).shape[-2:])
        path = error_map_path(self.folder, d)
        if path.is_file():
            with Image.open(path) as im:
                errors = torch.from_numpy((np.asarray(im) > 0).astype(np.uint8)[None])
            d[self.key] = resample_labels(errors, size)
        else:
            if not self._warned:  # once: a cached dataset loads every tile
                logger.warning("no error map at %s: this tile's patches, and those of any other tile without one, "
                               "are cut anywhere (said once)", path)
                self._warned = True
            d[self.key] = torch.zeros((1, *size), dtype=torch.uint8)
        return d


class RandErrorCropd(RandomizableTransform, MapTransform):
    """Crops ``roi_size`` from ``keys``, with probability ``prob`` centred on a pixel drawn from ``error_key``'s
    marked ones (``LoadErrorMapd``), else anywhere in the image (as ``RandSpatialCropd``); then drops the map.
    A crop centred near the edge is shifted inwards; inputs must be at least ``roi_size`` (pad them first)."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], prob: float, error_key: str = "errors"):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.roi_size, self.error_key = tuple(int(r) for r in roi_size), error_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        errors = torch.as_tensor(d.pop(self.error_key))
        h, w = errors.shape[-2:]
        rh, rw = self.roi_size
        if h < rh or w < rw:
            raise ValueError(f"RandErrorCropd: image {h} x {w} is smaller than the crop {rh} x {rw}; pad it first")
        self.randomize(None)
        marked = np.flatnonzero(errors.numpy().reshape(h, w)) if self._do_transform else np.empty(0, np.int64)
        if marked.size:
            cy, cx = divmod(int(marked[self.R.randint(marked.size)]), w)
            top, left = min(max(cy - rh // 2, 0), h - rh), min(max(cx - rw // 2, 0), w - rw)
        else:
            top, left = self.R.randint(h - rh + 1), self.R.randint(w - rw + 1)
        crop = SpatialCrop(roi_start=(top, left), roi_end=(top + rh, left + rw))
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


def rescan_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An (H, W, 3) uint8 tile resampled by ``scale`` with anti-aliasing, rounded back to uint8 as a file holds it."""
    tensor = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
    out = resample_image(tensor, scaled_size(image.shape[:2], scale))
    return out.round().clamp(0, 255).to(torch.uint8).numpy().transpose(1, 2, 0)


class ResampleLabelsd(MapTransform):
    """Instance maps predicted at the working scale back onto the grid of ``like`` (the labels as read)."""

    def __init__(self, keys: KeysCollection, like: str = "label_native", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.like = like

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        size = tuple(torch.as_tensor(d[self.like]).shape[-2:])
        for key in self.key_iterator(d):
            d[key] = resample_labels(torch.as_tensor(d[key]), size)
        return d


class ThreeClassTargetd(MapTransform):
    """Keeps the instance ids under ``instance_key`` and turns ``keys`` into the 3-class training target; with
    ``distance``, a second float channel holds ``distance_map`` (for networks with a fourth output); with ``hover``
    too, two more hold ``hover_maps`` (networks with six outputs); with ``contact_weight`` > 0, a last channel holds
    each pixel's loss weight: ``1 + contact_weight`` where two nuclei meet (``contact_map``), 1 elsewhere.

    In records marked ``sparse`` (sources whose annotators left some nuclei out), background farther than
    ``ignore_beyond`` pixels from every annotated nucleus becomes ``IGNORE``: the loss neither rewards nor punishes
    the network there, so an unannotated pale nucleus is not taught as background.
    """

    def __init__(self, keys: KeysCollection = "label", instance_key: str = "label_inst", ignore_beyond: float = 0,
                 distance: bool = False, contact_weight: float = 0, hover: bool = False):
        super().__init__(keys)
        self.instance_key = instance_key
        self.ignore_beyond = float(ignore_beyond)
        self.distance = bool(distance)
        self.hover = bool(hover)
        if self.hover and not self.distance:
            raise ValueError("hover maps follow the distance map in the target (6 outputs: classes, distance map, "
                             "horizontal, vertical): pass distance=True with hover=True")
        self.contact_weight = float(contact_weight)
        if self.contact_weight < 0:
            raise ValueError(f"contact_weight must be 0 (off) or positive, got {contact_weight}")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key]).round().to(torch.int32)
            d[self.instance_key] = labels
            classes = encode_three_class(labels[0].numpy())
            if self.ignore_beyond > 0 and bool(d.get("sparse", False)):
                classes[far_background(classes > 0, self.ignore_beyond)] = IGNORE
            target = torch.from_numpy(classes[None]).long()
            if self.distance:
                dist = torch.from_numpy(distance_map(labels[0].numpy())[None])
                target = torch.cat([target.float(), dist])
            if self.hover:
                target = torch.cat([target, torch.from_numpy(hover_maps(labels[0].numpy()))])
            if self.contact_weight > 0:
                weight = 1.0 + self.contact_weight * contact_map(labels[0].numpy()).astype(np.float32)
                target = torch.cat([target.float(), torch.from_numpy(weight[None])])
            d[key] = target
        return d


def far_background(foreground: np.ndarray, distance: float) -> np.ndarray:
    """Background pixels more than ``distance`` pixels from any foreground pixel (all of it when none)."""
    if not foreground.any():
        return np.ones_like(foreground, dtype=bool)
    return distance_transform_edt(~foreground) > distance


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Random stain variation in haematoxylin-eosin-DAB optical-density space (Tellez et al. 2018).

    Each stain's concentration c becomes ``c * alpha + beta`` with ``alpha`` from [1 - sigma, 1 + sigma] and
    ``beta`` from [-bias, bias]; one draw per image. Works on RGB on the 0-255 scale.
    """

    def __init__(self, keys: KeysCollection = "image", prob: float = 0.5, sigma: float = 0.05, bias: float = 0.02):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.sigma, self.bias = sigma, bias
        self.alpha = np.ones(3)
        self.beta = np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        self.beta = self.R.uniform(-self.bias, self.bias, 3)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = restain(d[key], self.alpha, self.beta)
        return d


class RandPaleNucleid(RandomizableTransform, MapTransform):
    """Some nuclei of a patch stained paler: each annotated nucleus (instance ids under ``label_key``) is chosen with
    probability ``share`` and its haematoxylin concentration multiplied by a factor drawn from ``factor``, the rest
    of the patch untouched.

    The nuclei the network misses are pale ones, with open chromatin, beside darker nuclei in the same tissue; a
    global stain jitter keeps that contrast, this shows the network its pale end (``prob``: the share of patches so
    treated). ``edge``: the sigma (px) of a Gaussian that blends each lightened nucleus into its surroundings; 0
    keeps the outline's sharp step, which real pale nuclei, with their soft edges, do not have. A training option,
    off as trained: the model card's "Options tried" has what it did."""

    def __init__(self, keys: KeysCollection = "image", label_key: str = "label", prob: float = 0.5,
                 share: float = 0.3, factor: Sequence[float] = (0.4, 0.8), edge: float = 0.0):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.label_key, self.share, self.factor = label_key, float(share), (float(factor[0]), float(factor[1]))
        self.edge = float(edge)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        ids, index = torch.unique(torch.as_tensor(d[self.label_key])[0].round().long(), return_inverse=True)
        nuclei = ids > 0
        chosen = torch.from_numpy(self.R.random(int(nuclei.sum())) < self.share)
        factors = torch.from_numpy(self.R.uniform(*self.factor, int(nuclei.sum()))).float()
        if not chosen.any():
            return d
        per_id = torch.ones(len(ids))
        per_id[nuclei] = torch.where(chosen, factors, 1.0)
        alpha = torch.ones(3, *index.shape)
        alpha[0] = per_id[index]
        if self.edge > 0:
            alpha[0] = torch.from_numpy(gaussian_filter(alpha[0].numpy(), self.edge, mode="nearest"))
        for key in self.key_iterator(d):
            d[key] = restain(d[key], alpha)
        return d


def restain(image, alpha, beta: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """An RGB image (3, H, W) on the 0-255 scale with each stain's concentration c (haematoxylin, eosin, DAB)
    made ``c * alpha + beta``, as float32 on the same scale: how another lab's staining would show the tissue.
    ``alpha``: 3 factors, or 3 maps (3, H, W) of factors per pixel."""
    image = torch.as_tensor(image, dtype=torch.float32)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    alpha = alpha.reshape(3, -1) if alpha.numel() > 3 else alpha.reshape(3, 1)
    beta = torch.as_tensor(beta, dtype=torch.float32).reshape(3, 1)
    c, h, w = image.shape
    od = -torch.log10((image.reshape(3, -1) + 1.0) / 256.0)
    stains = _HED_FROM_RGB.T @ od
    od = _RGB_FROM_HED.T @ (stains * alpha + beta)
    return (256.0 * torch.pow(10.0, -od) - 1.0).clamp(0, 255).reshape(c, h, w)


def train_transforms(
    mean: Sequence[float], std: Sequence[float], patch_size: Sequence[int] = (256, 256), load: bool = True,
    ignore_beyond: float = 0, distance: bool = False, contact_weight: float = 0, hover: bool = False,
    stain_jitter: Sequence[float] = (0.05, 0.02), blur: float = 0, pale_nuclei: float = 0, pale_nuclei_edge: float = 0,
    scale_jitter: float | Sequence[float] = (0.1, 0.0), hard_examples: float = 0,
    hard_examples_dir: str | os.PathLike | None = None,
) -> Compose:
    """Load -> crop a margin larger than the patch -> flips, 90-degree turns, one elastic+affine resampling
    (reflection-padded) -> crop to the patch -> blur -> paler nuclei -> stain, contrast and intensity jitter ->
    target -> z-score.

    ``scale_jitter``: each axis's scale drawn from 1 +- its value, (rows, columns) or one value for both: nuclei of
    other sizes, scanners of other pixel sizes, mis-tagged files. ``stain_jitter``: ``RandHEDJitterd``'s (sigma,
    bias). ``blur``: the probability of a Gaussian blur of ``BLUR_SIGMA`` px (drawn per axis), for out-of-focus
    tissue and softer scanners. ``pale_nuclei``: the share of
    patches in which some nuclei are stained paler (``RandPaleNucleid``), ``pale_nuclei_edge`` the sigma (px) that
    softens their edges. ``hard_examples``: the share of the patches of a tile with marked pixels that are centred on
    one, by the maps in ``hard_examples_dir`` of where a trained network erred (``hard_examples.write_error_maps``;
    tiles without a map or a marked pixel are cropped anywhere)."""
    patch = tuple(int(p) for p in patch_size)
    # MONAI draws a scale for as many axes as it is given numbers: a bare 0.1 stretched the rows only (shear_range's
    # 0.1 likewise draws one of the two shears, kept as trained)
    scale = (float(scale_jitter),) * 2 if np.isscalar(scale_jitter) else tuple(float(s) for s in scale_jitter)
    if len(scale) != 2:
        raise ValueError(f"scale_jitter: one number or two (rows, columns), not {scale_jitter!r}")
    if scale[1] == 0:  # no draw for a fixed last axis: the recipe's random numbers stay those it was trained with
        scale = scale[:1]
    # square, so 90-degree turns keep the shape and the final crop yields the patch size for non-square patches
    margin = (int(round(max(patch) * 1.25)),) * len(patch)
    both = ["image", "label"]
    steps = [LoadTiled()] if load else []
    if not 0 <= float(hard_examples) <= 1:
        raise ValueError(f"hard_examples is a share of patches, from 0 to 1, not {hard_examples!r}")
    if hard_examples:  # absent at 0, so that the recipe draws the random numbers it was trained with
        if load:  # items given in memory carry their own "errors"
            if not hard_examples_dir or not any(Path(hard_examples_dir).glob("*/*.png")):
                raise FileNotFoundError(f"hard_examples {hard_examples} needs hard_examples_dir, a folder of error "
                                        f"maps (python -m nucleiseg_monai.hard_examples), not {hard_examples_dir!r}")
            steps.append(LoadErrorMapd(hard_examples_dir))
        steps += [  # the map padded with zeros: a mirrored margin would draw nuclei near the edge twice
            SpatialPadd([*both, "errors"], spatial_size=margin, mode=("reflect", "reflect", "constant")),
            RandErrorCropd(both, roi_size=margin, prob=float(hard_examples)),
        ]
    else:
        steps += [
            SpatialPadd(both, spatial_size=margin, mode="reflect"),
            RandSpatialCropd(both, roi_size=margin, random_size=False),
        ]
    steps += [
        RandFlipd(both, prob=0.5, spatial_axis=0),
        RandFlipd(both, prob=0.5, spatial_axis=1),
        RandRotate90d(both, prob=0.75, max_k=3),
        Rand2DElasticd(
            both, spacing=(48, 48), magnitude_range=(0.0, 1.5), prob=0.7, rotate_range=np.pi, shear_range=0.1,
            scale_range=scale, mode=("bilinear", "nearest"), padding_mode="reflection",
        ),
        CenterSpatialCropd(both, roi_size=patch),
    ]
    if blur:  # absent, not at probability 0, so that the other transforms draw the random numbers they drew before
        steps.append(RandGaussianSmoothd("image", sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, prob=float(blur)))
    if pale_nuclei:
        steps.append(RandPaleNucleid("image", prob=float(pale_nuclei), edge=float(pale_nuclei_edge)))
    steps += [
        RandHEDJitterd("image", prob=0.8, sigma=float(stain_jitter[0]), bias=float(stain_jitter[1])),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensityd("image", prob=0.3, factors=0.1),
        RandShiftIntensityd("image", prob=0.3, offsets=10.0),
        ThreeClassTargetd("label", ignore_beyond=ignore_beyond, distance=distance, contact_weight=contact_weight,
                          hover=hover),
        NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped(["label", "label_inst"], track_meta=False),
    ]
    return Compose(steps)


def eval_transforms(
    mean: Sequence[float], std: Sequence[float], with_label: bool = True, keep_native: bool = False
) -> Compose:
    """Whole tiles, no randomness: load (resampled to the working scale), target (when labelled), z-score."""
    steps = [LoadTiled(label_key="label" if with_label else None, keep_native=keep_native)]
    if with_label:
        steps.append(ThreeClassTargetd("label"))
    steps += [
        NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
    ]
    if with_label:
        steps.append(EnsureTyped(["label", "label_inst"], track_meta=False))
    return Compose(steps)
