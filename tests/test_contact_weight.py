"""The loss weight where touching nuclei meet (``contact_weight``): the map, the target channel and the loss."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from nucleiseg_monai.distillation import DistillationLoss
from nucleiseg_monai.losses import MaskedDiceCELoss
from nucleiseg_monai.transforms import IGNORE, ThreeClassTargetd, contact_map, distance_map, encode_three_class

torch.set_num_threads(1)


def two_touching_and_one_alone():
    labels = np.zeros((24, 24), np.int32)
    labels[4:10, 2:8] = 1
    labels[4:10, 8:14] = 2  # shares column 7 | 8 with nucleus 1
    labels[17:21, 17:21] = 3  # 7 px from the others
    return labels


def logits_and_targets():
    """Random logits (2, 4, 16, 16) and the class and distance targets of two touching nuclei."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    labels = np.zeros((16, 16), np.int32)
    labels[3:9, 2:8], labels[3:9, 8:14] = 1, 2
    classes = torch.from_numpy(encode_three_class(labels))[None, None].repeat(2, 1, 1, 1).float()
    dist = torch.from_numpy(distance_map(labels))[None, None].repeat(2, 1, 1, 1)
    return logits, classes, dist


def test_contact_map_marks_a_band_where_two_nuclei_meet_and_nothing_around_a_lone_one():
    labels = two_touching_and_one_alone()
    contact = contact_map(labels, radius=2)
    # the band: columns 7 - 2 .. 8 + 2 across the rows of the pair, and two rows of background above and below
    expected = np.zeros_like(contact)
    expected[2:12, 6:10] = True
    assert np.array_equal(contact, expected)
    assert not contact[15:23, 15:23].any()
    assert not contact_map(np.zeros((8, 8), np.int32)).any()
    # two nuclei with a 3 px gap still meet (the gap between them is what the weight is for), within their radius
    apart = np.zeros((12, 12), np.int32)
    apart[2:10, 1:4], apart[2:10, 7:10] = 1, 2
    assert contact_map(apart, radius=3)[5, 4:7].all() and contact_map(apart, radius=2)[5].tolist().count(True) == 1
    assert not contact_map(apart, radius=1).any()


def test_target_gains_a_weight_channel_only_when_asked():
    labels = torch.from_numpy(two_touching_and_one_alone()[None])
    plain = ThreeClassTargetd("label", distance=True)({"label": labels})["label"]
    weighted = ThreeClassTargetd("label", distance=True, contact_weight=4)({"label": labels})["label"]
    assert plain.shape == (2, 24, 24) and weighted.shape == (3, 24, 24)
    assert torch.equal(weighted[:2], plain)
    expected = 1 + 4 * contact_map(labels[0].numpy()).astype(np.float32)
    assert np.array_equal(weighted[2].numpy(), expected) and set(np.unique(expected)) == {1.0, 5.0}
    classes_only = ThreeClassTargetd("label", contact_weight=4)({"label": labels})["label"]
    assert classes_only.shape == (2, 24, 24)
    assert np.array_equal(classes_only[0].numpy(), encode_three_class(labels[0].numpy()))
    with pytest.raises(ValueError, match="contact_weight"):
        ThreeClassTargetd("label", contact_weight=-1)


def test_loss_weights_the_cross_entropy_terms_per_pixel_and_leaves_dice_alone():
    logits, classes, dist = logits_and_targets()
    weight = torch.ones(2, 1, 16, 16)
    weight[..., 4:12] = 3.0
    target = torch.cat([classes, dist, weight], dim=1)
    dice = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.0)(logits[:, :3], classes.long())
    ce = torch.nn.functional.cross_entropy(logits[:, :3], classes[:, 0].long(), reduction="none")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 3], dist[:, 0], reduction="none")
    expected = dice + (ce * weight[:, 0]).mean() + (bce * weight[:, 0]).mean()
    assert MaskedDiceCELoss()(logits, target).item() == pytest.approx(expected.item(), abs=1e-5)
    # a weight of 1 everywhere is the unweighted loss
    ones = torch.cat([classes, dist, torch.ones(2, 1, 16, 16)], dim=1)
    assert MaskedDiceCELoss()(logits, ones).item() == pytest.approx(
        MaskedDiceCELoss()(logits, target[:, :2]).item(), abs=1e-6)
    # ignored pixels stay ignored, whatever their weight
    ignored = target.clone()
    ignored[:, 0, :, 8:] = IGNORE
    changed = logits.clone()
    changed[..., 8:] = torch.randn(2, 4, 16, 8) * 10
    assert MaskedDiceCELoss()(logits, ignored).item() == pytest.approx(
        MaskedDiceCELoss()(changed, ignored).item(), abs=1e-5)


def test_a_distance_map_is_not_taken_for_a_weight_and_distillation_refuses_one():
    classes = torch.zeros(1, 1, 8, 8)
    dist = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="below 1"):
        MaskedDiceCELoss()(torch.zeros(1, 3, 8, 8), torch.cat([classes, dist], dim=1))
    weighted = torch.cat([classes, dist, torch.full((1, 1, 8, 8), 6.0)], dim=1)
    teacher = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="contact_weight"):
        DistillationLoss(MaskedDiceCELoss())(torch.zeros(1, 4, 8, 8), torch.cat([weighted, teacher], dim=1))


def test_class_weights_weigh_each_pixels_cross_entropy_by_its_true_class():
    logits, classes, dist = logits_and_targets()
    target = torch.cat([classes, dist], dim=1)
    plain = MaskedDiceCELoss()(logits, target).item()
    ce = torch.nn.functional.cross_entropy(logits[:, :3], classes[:, 0].long(), reduction="none")
    nuclei = (classes[:, 0] > 0).float()
    # weights [1, 2, 2] add the nucleus pixels' cross-entropy once more, over the same pixel count
    assert MaskedDiceCELoss(class_weights=[1, 2, 2])(logits, target).item() == pytest.approx(
        plain + (ce * nuclei).mean().item(), abs=1e-5)
    assert MaskedDiceCELoss(class_weights=[1, 1, 1])(logits, target).item() == pytest.approx(plain, abs=1e-6)
    for bad in ([1, 2], [1, 0, 2]):
        with pytest.raises(ValueError, match="class_weights"):
            MaskedDiceCELoss(class_weights=bad)
