"""MONAI dictionary transforms: loading, H&E stain jitter, the 3-class target, and the train / eval pipelines.

Keys used throughout: ``image`` (float32, 3 x H x W, z-scored once normalised), ``label`` (the training target,
1 x H x W classes 0 background / 1 interior / 2 boundary) and ``label_inst`` (1 x H x W instance ids, kept for
instance metrics). Spatial transforms move image and labels together, labels with nearest-neighbour sampling, so
instance ids are carried, never interpolated.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from skimage.color import rgb_from_hed
from skimage.segmentation import find_boundaries

from .data import read_image, read_instance_labels

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2

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


class LoadTiled(MapTransform):
    """Reads an RGB tile and its instance labels (validated by `data`) into channel-first tensors.

    ``image`` becomes float32 (3, H, W) on the 0-255 scale; ``label`` int32 (1, H, W) instance ids. The record's
    ``label_kind`` says whether the label file is an instance map or a binary mask. The image's path stays under
    ``image_path`` so reports can name and redraw the tile.
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label"):
        super().__init__([k for k in (image_key, label_key) if k], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[f"{self.image_key}_path"] = str(d[self.image_key])
        image = read_image(d[self.image_key])
        d[self.image_key] = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
        if self.label_key and self.label_key in d:
            labels = read_instance_labels(d[self.label_key], d.get("label_kind", "instance"))
            if labels.shape != image.shape[:2]:
                raise ValueError(
                    f"size mismatch: {d[f'{self.image_key}_path']} {image.shape[:2]} vs {d[self.label_key]} "
                    f"{labels.shape}; they must be the same tile"
                )
            d[self.label_key] = torch.from_numpy(labels[None])
        return d


class ThreeClassTargetd(MapTransform):
    """Keeps the instance ids under ``instance_key`` and turns ``keys`` into the 3-class training target."""

    def __init__(self, keys: KeysCollection = "label", instance_key: str = "label_inst"):
        super().__init__(keys)
        self.instance_key = instance_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key]).round().to(torch.int32)
            d[self.instance_key] = labels
            d[key] = torch.from_numpy(encode_three_class(labels[0].numpy())[None]).long()
        return d


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
        alpha = torch.as_tensor(self.alpha, dtype=torch.float32)[:, None]
        beta = torch.as_tensor(self.beta, dtype=torch.float32)[:, None]
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            c, h, w = image.shape
            od = -torch.log10((image.reshape(3, -1) + 1.0) / 256.0)
            stains = _HED_FROM_RGB.T @ od
            od = _RGB_FROM_HED.T @ (stains * alpha + beta)
            d[key] = (256.0 * torch.pow(10.0, -od) - 1.0).clamp(0, 255).reshape(c, h, w)
        return d


def train_transforms(
    mean: Sequence[float], std: Sequence[float], patch_size: Sequence[int] = (256, 256), load: bool = True
) -> Compose:
    """Load -> crop a margin larger than the patch -> flips, 90-degree turns, one elastic+affine resampling
    (reflection-padded) -> crop to the patch -> stain, contrast and intensity jitter -> target -> z-score."""
    patch = tuple(int(p) for p in patch_size)
    # square, so 90-degree turns keep the shape and the final crop yields the patch size for non-square patches
    margin = (int(round(max(patch) * 1.25)),) * len(patch)
    both = ["image", "label"]
    steps = [LoadTiled()] if load else []
    steps += [
        SpatialPadd(both, spatial_size=margin, mode="reflect"),
        RandSpatialCropd(both, roi_size=margin, random_size=False),
        RandFlipd(both, prob=0.5, spatial_axis=0),
        RandFlipd(both, prob=0.5, spatial_axis=1),
        RandRotate90d(both, prob=0.75, max_k=3),
        Rand2DElasticd(
            both, spacing=(48, 48), magnitude_range=(0.0, 1.5), prob=0.7, rotate_range=np.pi, shear_range=0.1,
            scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="reflection",
        ),
        CenterSpatialCropd(both, roi_size=patch),
        RandHEDJitterd("image", prob=0.8),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensityd("image", prob=0.3, factors=0.1),
        RandShiftIntensityd("image", prob=0.3, offsets=10.0),
        ThreeClassTargetd("label"),
        NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped(["label", "label_inst"], track_meta=False),
    ]
    return Compose(steps)


def eval_transforms(mean: Sequence[float], std: Sequence[float], with_label: bool = True) -> Compose:
    """Whole tiles, no randomness: load, target (when labelled), z-score."""
    steps = [LoadTiled(label_key="label" if with_label else None)]
    if with_label:
        steps.append(ThreeClassTargetd("label"))
    steps += [
        NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
    ]
    if with_label:
        steps.append(EnsureTyped(["label", "label_inst"], track_meta=False))
    return Compose(steps)
