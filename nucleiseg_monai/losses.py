"""The training loss: Dice + cross-entropy over the three classes, skipping pixels whose target is ``IGNORE``; for a
network with a fourth output, plus a binary cross-entropy on its distance map."""

from __future__ import annotations

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
    """

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 lambda_distance: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce, self.lambda_distance = lambda_dice, lambda_ce, lambda_distance
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distance = logits.shape[1] > 3
        if distance != (target.shape[1] == 2):
            raise ValueError(f"{logits.shape[1]} network outputs need a target of {2 if distance else 1} channel(s), "
                             f"got {target.shape[1]}: a network with a distance map trains on "
                             "ThreeClassTargetd(distance=True) (train_transforms(distance=True)), one without on classes")
        if distance:
            target, dist_target = target[:, :1].round().long(), target[:, 1:].float()
            logits, dist_logits = logits[:, :3], logits[:, 3:]
        valid = target != self.ignore_index
        target = torch.where(valid, target, torch.zeros_like(target))
        ce = nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
        weight = valid[:, 0].to(ce.dtype)
        total = weight.sum().clamp(min=1.0)
        ce = (ce * weight).sum() / total
        dice = self.dice(logits, target, mask=valid.to(logits.dtype))
        loss = self.lambda_dice * dice + self.lambda_ce * ce
        if distance:
            bce = nn.functional.binary_cross_entropy_with_logits(dist_logits[:, 0].float(), dist_target[:, 0],
                                                                 reduction="none")
            loss = loss + self.lambda_distance * (bce * weight).sum() / total
        return loss
