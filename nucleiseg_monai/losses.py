"""The training loss: Dice + cross-entropy over the three classes, skipping pixels whose target is ``IGNORE``."""

from __future__ import annotations

import torch
from monai.losses import MaskedDiceLoss
from torch import nn

from .transforms import IGNORE


class MaskedDiceCELoss(nn.Module):
    """MONAI's DiceCELoss (softmax, one-hot target) where pixels labelled ``ignore_index`` count for neither term.

    Without ignored pixels it equals ``DiceCELoss(to_onehot_y=True, softmax=True)``.
    """

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        target = torch.where(valid, target, torch.zeros_like(target))
        ce = nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
        weight = valid[:, 0].to(ce.dtype)
        ce = (ce * weight).sum() / weight.sum().clamp(min=1.0)
        dice = self.dice(logits, target, mask=valid.to(logits.dtype))
        return self.lambda_dice * dice + self.lambda_ce * ce
