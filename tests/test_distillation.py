"""Distillation: the teacher's probabilities travel with the label, and the loss pulls the student towards them."""

import json
from pathlib import Path

import pytest
import torch

from conftest import bundle_outputs, saved_random_unet
from nucleiseg_monai.distillation import DistillationLoss, TeacherBatch
from nucleiseg_monai.losses import MaskedDiceCELoss
from nucleiseg_monai.networks import UNet, unet_from_checkpoint
from nucleiseg_monai.postprocess import activate

REPO = Path(__file__).resolve().parents[1]


def saved_unet(path: Path, out_channels: int = 4, features=(4, 8, 16)) -> UNet:
    return saved_random_unet(path, out_channels, features)


def test_unet_from_checkpoint_rebuilds_widths_outputs_and_weights(tmp_path):
    net = saved_unet(tmp_path / "model.pt", out_channels=4, features=(4, 8, 16, 32))
    rebuilt = unet_from_checkpoint(tmp_path / "model.pt").eval()
    assert rebuilt.out_channels == 4 and rebuilt.depth == 3
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt does not hold the weights of a UNet"):
        unet_from_checkpoint(tmp_path / "other.pt")


def test_teacher_batch_appends_the_teachers_probabilities_to_the_label(tmp_path):
    teacher = saved_unet(tmp_path / "model.pt")
    image = torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 3, (2, 2, 32, 32)).float()
    prepare = TeacherBatch(tmp_path / "model.pt", amp_dtype=None)
    got_image, target = prepare({"image": image, "label": label})
    assert torch.equal(got_image, image) and target.shape == (2, 6, 32, 32)
    assert torch.equal(target[:, :2], label)
    with torch.no_grad():
        assert torch.allclose(target[:, 2:], activate(teacher(image)), atol=1e-6)
    assert not target.requires_grad


def test_a_teacher_over_flips_is_their_mean_and_sees_a_flipped_image_flipped(tmp_path):
    teacher = saved_unet(tmp_path / "model.pt")
    torch.manual_seed(3)
    image, label = torch.randn(1, 3, 32, 32), torch.zeros(1, 2, 32, 32)
    prepare = TeacherBatch(tmp_path / "model.pt", amp_dtype=None, flips=4)
    target = prepare({"image": image, "label": label})[1][:, 2:]
    with torch.no_grad():
        mean = sum(torch.flip(teacher(torch.flip(image, d)), d) if d else teacher(image)
                   for d in [(), (-1,), (-2,), (-2, -1)]) / 4
        assert torch.allclose(target, activate(mean), atol=1e-5)
        assert not torch.allclose(target, activate(teacher(image)), atol=1e-3)  # a random net is not symmetric
    mirrored = prepare({"image": torch.flip(image, (-1,)), "label": label})[1][:, 2:]
    assert torch.allclose(mirrored, torch.flip(target, (-1,)), atol=1e-5)


def test_teacher_of_other_channel_statistics_is_refused(tmp_path):
    saved_unet(tmp_path / "model.pt")
    (tmp_path / "channel_stats.json").write_text(json.dumps({"mean": [180.0, 120.0, 170.0], "std": [40.0] * 3}))
    TeacherBatch(tmp_path / "model.pt", amp_dtype=None, channel_stats={"mean": [180.0, 120.0, 170.0], "std": [40.0] * 3})
    with pytest.raises(ValueError, match="channel_stats.json"):
        TeacherBatch(tmp_path / "model.pt", channel_stats={"mean": [170.0, 120.0, 170.0], "std": [40.0] * 3})
    with pytest.raises(ValueError, match="--teacher PATH"):
        TeacherBatch(None)


def test_distillation_loss_is_the_label_loss_at_weight_0_and_still_at_the_teacher():
    torch.manual_seed(1)
    base = MaskedDiceCELoss()
    label = torch.cat([torch.randint(0, 3, (2, 1, 16, 16)).float(), torch.rand(2, 1, 16, 16)], dim=1)
    teacher_logits = torch.randn(2, 4, 16, 16)
    target = torch.cat([label, activate(teacher_logits)], dim=1)
    logits = torch.randn(2, 4, 16, 16)
    assert torch.allclose(DistillationLoss(base, weight=0.0)(logits, target), base(logits, label))

    # the soft term alone has its minimum where the student's outputs are the teacher's: no gradient there
    at_teacher = teacher_logits.clone().requires_grad_(True)
    DistillationLoss(base, weight=1.0)(at_teacher, target).backward()
    assert at_teacher.grad.abs().max() < 1e-6
    elsewhere = logits.clone().requires_grad_(True)
    DistillationLoss(base, weight=1.0)(elsewhere, target).backward()
    assert elsewhere.grad.abs().max() > 1e-4


def test_distillation_loss_refuses_a_teacher_of_other_outputs():
    target = torch.zeros(1, 1 + 4, 8, 8)  # a class label and a 4-output teacher, for a 3-output student
    with pytest.raises(ValueError, match="the teacher must have the student's outputs"):
        DistillationLoss(MaskedDiceCELoss())(torch.zeros(1, 3, 8, 8), target)
    with pytest.raises(ValueError, match="between 0 and 1"):
        DistillationLoss(MaskedDiceCELoss(), weight=1.5)


@pytest.mark.parametrize("bundle", ["nuclei_unet_small", "nuclei_unet_full"])
def test_distill_overlay_builds_the_teacher_batch_and_loss(bundle, tmp_path):
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "distill.json")])
    parser.read_meta(str(configs / "metadata.json"))
    out = bundle_outputs(configs.parent)
    saved_unet(tmp_path / "teacher.pt", out_channels=out)
    parser.update({"bundle_root": str(tmp_path), "teacher": str(tmp_path / "teacher.pt"), "teacher_flips": 4,
                   "channel_stats": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    prepare = parser.get_parsed_content("train#trainer#prepare_batch", lazy=False)
    loss = parser.get_parsed_content("train#trainer#loss_function", lazy=False)
    assert isinstance(prepare, TeacherBatch) and prepare.out_channels == out
    assert isinstance(loss, DistillationLoss) and loss.weight == 0.5 and isinstance(loss.loss, MaskedDiceCELoss)
    assert len(prepare.inferer.dims) == 4
