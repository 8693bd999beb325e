"""The training loss: Dice + cross-entropy over the three classes, skipping pixels whose target is ``IGNORE``; for a
network with a fourth output, plus a binary cross-entropy on its distance map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import MaskedDiceLoss
from torch import nn

from .transforms import IGNORE


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

    ``class_weights`` (background, interior, boundary) weight the classes' cross-entropy by each pixel's true class,
    on the same terms: a pale nucleus called background then costs more than the reverse, which is where recall is
    lost. ``None`` weighs every class 1.
    """

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 lambda_distance: float = 1.0, class_weights: Sequence[float] | None = None):
        super().__init__()
        if class_weights is not None:
            class_weights = torch.tensor([float(w) for w in class_weights])
            if class_weights.shape != (3,) or bool((class_weights <= 0).any()):
                raise ValueError("class_weights: three positive weights (background, interior, boundary) or None, "
                                 f"got {class_weights.tolist()}")
        self.register_buffer("class_weights", class_weights)
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce, self.lambda_distance = lambda_dice, lambda_ce, lambda_distance
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distance = logits.shape[1] > 3
        channels = 2 if distance else 1
        if target.shape[1] not in (channels, channels + 1):
            raise ValueError(f"{logits.shape[1]} network outputs need a target of {channels} channel(s) (and at most "
                             f"one more, the loss weight), got {target.shape[1]}: a network with a distance map trains "
                             "on ThreeClassTargetd(distance=True) (train_transforms(distance=True)), one without on "
                             "classes")
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
        return loss
