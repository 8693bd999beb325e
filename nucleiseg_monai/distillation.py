"""Knowledge distillation: a network learns from a trained teacher's outputs as well as from the labels.

A narrower student trained this way sees, on every pixel, the teacher's graded belief (how likely a pixel is rim
rather than interior, where a nucleus's centre is) instead of the labels' hard classes, and the teacher's
predictions on NuInsSeg's unannotated background, where the labels are ignored. The overlay
``configs/distill.json`` turns it on for a training run:

    python -m monai.bundle run training --config_file "['configs/train.json','configs/distill.json']" \
        --teacher runs/small/models/model.pt --network_def#features "[8,16,32,64,128]"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.inferers import SimpleInferer
from monai.utils import convert_to_tensor
from torch import nn

from .bundle import STATS_NAME
from .data import load_stats
from .inferers import FlipInferer
from .losses import TARGET_CHANNELS
from .networks import MixedPrecision, unet_from_checkpoint
from .postprocess import activate

__all__ = ["DistillationLoss", "TeacherBatch"]


class TeacherBatch(PrepareBatch):
    """A trainer's ``prepare_batch``: (image, label) as MONAI's default gives them, with the teacher's probabilities
    (``postprocess.activate`` of its outputs on the same augmented image) appended to the label's channels.

    Args:
        teacher: a checkpoint of a ``UNet`` of this package (``networks.unet_from_checkpoint``); it runs in eval mode,
            without gradients, in ``amp_dtype``.
        device: where the teacher runs (the trainer's device).
        amp_dtype: autocast dtype of the teacher's forward pass (as the student trains: "auto" is bf16 where it is
            native, ``networks.resolve_dtype``; None: float32).
        channel_stats: this run's normalisation ({"mean", "std"}); the teacher must have learnt with the same, and a
            ``channel_stats.json`` beside its checkpoint is checked against it.
        flips: 1, or 2 or 4 to average the teacher's outputs over the image and its flips (``inferers.FlipInferer``,
            as ``test_time_flips`` does at inference): a better teacher than one pass, at that many forward passes.
    """

    def __init__(self, teacher: str | os.PathLike | None, device: str | torch.device | None = None,
                 amp_dtype: str | torch.dtype | None = "auto", channel_stats: Mapping | None = None, flips: int = 1):
        if not teacher:
            raise ValueError("distillation needs a teacher: pass --teacher PATH (the model.pt of a trained bundle)")
        path = Path(teacher)
        if channel_stats is not None:
            _check_stats(path.parent / STATS_NAME, channel_stats)
        network = unet_from_checkpoint(path).to(device or "cpu").eval()
        self.teacher = MixedPrecision(network, amp_dtype).eval()
        self.out_channels = network.out_channels
        self.inferer = FlipInferer(SimpleInferer(), int(flips))

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        with torch.no_grad():
            probs = activate(self.inferer(convert_to_tensor(image, track_meta=False), self.teacher))
        return image, torch.cat([label.float(), probs.to(label.device)], dim=1)


class DistillationLoss(nn.Module):
    """``(1 - weight) * loss(logits, label) + weight * soft``, where the target is ``TeacherBatch``'s: the label's
    channels, then the teacher's probabilities (as many as the network has outputs).

    ``soft``: the cross-entropy of the student's class softmax against the teacher's class probabilities, plus,
    for a fourth output, the binary cross-entropy of its distance map against the teacher's, over every pixel:
    the teacher has a prediction where the labels are ignored.
    """

    def __init__(self, loss: nn.Module, weight: float = 0.5):
        super().__init__()
        weight = float(weight)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"the distillation weight must be between 0 and 1, got {weight}")
        self.loss, self.weight = loss, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = logits.shape[1]
        labels = TARGET_CHANNELS.get(outputs, 1)  # the classes, and the maps (distance, HoVer) a network has
        if target.shape[1] == labels + 1 + outputs and bool((target[:, labels] > 1).any()):
            raise ValueError("distillation learns from the teacher where nuclei meet, not from a loss weight: "
                             "set contact_weight to 0 (--contact_weight 0)")
        if target.shape[1] != labels + outputs:
            raise ValueError(f"a target of {target.shape[1]} channels does not hold a label and a teacher of "
                             f"{outputs} outputs: the teacher must have the student's outputs (3 classes, or 3 "
                             "and the distance map, or those and the HoVer maps)")
        label, teacher = target[:, :labels], target[:, labels:].float()
        logits32 = logits.float()
        soft = nn.functional.cross_entropy(logits32[:, :3], teacher[:, :3])
        if outputs > 3:
            soft = soft + nn.functional.binary_cross_entropy_with_logits(logits32[:, 3:], teacher[:, 3:])
        return (1.0 - self.weight) * self.loss(logits, label) + self.weight * soft


def _check_stats(path: Path, channel_stats: Mapping) -> None:
    if not path.is_file():
        return
    theirs = load_stats(path)
    for key in ("mean", "std"):
        if any(abs(float(a) - float(b)) > 1e-4 for a, b in zip(theirs[key], channel_stats[key])):
            raise ValueError(f"the teacher learnt with other channel statistics ({path}: {theirs}) than this run "
                             f"({dict(channel_stats)}); distil on the teacher's datalist (the same training tiles)")
