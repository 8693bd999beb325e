"""The training loss: Dice + cross-entropy over the three classes, skipping pixels whose target is ``IGNORE``; for a
network with a fourth output, plus a binary cross-entropy on its distance map, and with six, on its two HoVer maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import MaskedDiceLoss
from torch import nn

from .transforms import IGNORE

# target channels (classes, then distance map, then the two HoVer maps) for each number of network outputs
TARGET_CHANNELS = {3: 1, 4: 2, 6: 4}


class MaskedDiceCELoss(nn.Module):
    """MONAI's DiceCELoss (softmax, one-hot target) where pixels labelled ``ignore_index`` count for neither term.

    Without ignored pixels it equals ``DiceCELoss(to_onehot_y=True, softmax=True)``. With 4 output channels the
    target has two (``ThreeClassTargetd(distance=True)``: classes, then ``transforms.distance_map``), and the
    fourth output learns the distance map by a soft-target binary cross-entropy on its logits, over the same
    pixels, weighted by ``lambda_distance``. A cross-entropy rather than a squared error: its gradient is of the
    size of the class terms', so the map is learnt at the classes' pace without a tuned weight.

    A target with one more channel (``ThreeClassTargetd(contact_weight=...)``) weights each pixel's cross-entropy
    terms by it; still divided by the number of valid pixels, so the weight adds to the loss where nuclei meet
    rather than taking from it elsewhere. Dice stays unweighted: it is a ratio over the whole patch.

    Six outputs add the horizontal and vertical maps (``ThreeClassTargetd(hover=True)``: offsets from each nucleus's
    centroid in [-1, 1]), learnt the distance map's way on (offset + 1) / 2, plus HoVer-Net's gradient term: the
    squared error of each map's slope along its own axis on nucleus pixels, which the jump where two nuclei meet
    dominates, so that the maps are pushed to learn it; both weighted by ``lambda_hover``.

    ``class_weights`` (background, interior, boundary) weight the classes' cross-entropy by each pixel's true class,
    on the same terms: a pale nucleus called background then costs more than the reverse, which is where recall is
    lost. ``None`` weighs every class 1.
    """

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 lambda_distance: float = 1.0, lambda_hover: float = 1.0, class_weights: Sequence[float] | None = None):
        super().__init__()
        if class_weights is not None:
            class_weights = torch.tensor([float(w) for w in class_weights])
            if class_weights.shape != (3,) or bool((class_weights <= 0).any()):
                raise ValueError("class_weights: three positive weights (background, interior, boundary) or None, "
                                 f"got {class_weights.tolist()}")
        self.register_buffer("class_weights", class_weights)
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce, self.lambda_distance = lambda_dice, lambda_ce, lambda_distance
        self.lambda_hover = lambda_hover
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = logits.shape[1]
        if outputs not in TARGET_CHANNELS:
            raise ValueError(f"the loss takes 3 outputs (classes), 4 (and a distance map) or 6 (and HoVer maps), got "
                             f"{outputs}")
        channels = TARGET_CHANNELS[outputs]
        distance = outputs > 3
        if target.shape[1] not in (channels, channels + 1):
            raise ValueError(f"{logits.shape[1]} network outputs need a target of {channels} channel(s) (and at most "
                             f"one more, the loss weight), got {target.shape[1]}: a network with a distance map trains "
                             "on ThreeClassTargetd(distance=True) (train_transforms(distance=True)), one without on "
                             "classes; six outputs train on ThreeClassTargetd(distance=True, hover=True)")
        classes = target[:, :1].round().long()
        valid = classes != self.ignore_index
        classes = torch.where(valid, classes, torch.zeros_like(classes))
        weight = valid[:, 0].float()
        total = weight.sum().clamp(min=1.0)
        if target.shape[1] > channels:  # ThreeClassTargetd(contact_weight=...): where touching nuclei meet
            extra = target[:, channels].float()
            if bool((extra < 1).any()):  # weights are >= 1; a distance map (0 on background) is not a weight
                raise ValueError(f"{logits.shape[1]} network outputs need a target of {channels} channel(s) and "
                                 "optionally a loss weight (>= 1), got a channel with values below 1: a distance map "
                                 "for a network without one? Train it on ThreeClassTargetd(distance=False)")
            weight = weight * extra
        ce = nn.functional.cross_entropy(logits[:, :3], classes[:, 0], reduction="none")
        if self.class_weights is not None:
            ce = ce * self.class_weights.to(ce.device)[classes[:, 0]]
        ce = (ce * weight).sum() / total
        dice = self.dice(logits[:, :3], classes, mask=valid.to(logits.dtype))
        loss = self.lambda_dice * dice + self.lambda_ce * ce
        if distance:
            bce = nn.functional.binary_cross_entropy_with_logits(logits[:, 3].float(), target[:, 1].float(),
                                                                 reduction="none")
            loss = loss + self.lambda_distance * (bce * weight).sum() / total
        if outputs == 6:
            offsets = (target[:, 2:4].float() + 1) / 2
            bce = nn.functional.binary_cross_entropy_with_logits(logits[:, 4:6].float(), offsets, reduction="none")
            bce = bce.mean(1)
            nuclei = (classes[:, 0] > 0).float()
            slope_error = (_slopes(2 * torch.sigmoid(logits[:, 4:6].float()) - 1) - _slopes(target[:, 2:4].float()))
            msge = (slope_error.pow(2).mean(1) * nuclei).sum() / nuclei.sum().clamp(min=1.0)
            loss = loss + self.lambda_hover * ((bce * weight).sum() / total + msge)
        return loss


def _slopes(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) horizontal and vertical maps -> the horizontal one's slope along x and the vertical one's along y
    (central differences, edges repeated), per pixel."""
    padded = nn.functional.pad(maps, (1, 1, 1, 1), mode="replicate")
    along_x = (padded[:, 0:1, 1:-1, 2:] - padded[:, 0:1, 1:-1, :-2]) / 2
    along_y = (padded[:, 1:2, 2:, 1:-1] - padded[:, 1:2, :-2, 1:-1]) / 2
    return torch.cat([along_x, along_y], dim=1)
