"""The fourth output: each nucleus's distance map as target, loss and watershed cue, and starting from 3-class weights."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from nucleiseg_monai.handlers import InitialWeights
from nucleiseg_monai.losses import MaskedDiceCELoss
from nucleiseg_monai.metrics import iou_matrix
from nucleiseg_monai.networks import UNet
from nucleiseg_monai.postprocess import Activated, InstancesFromProbsd, activate, instances_from_probs
from nucleiseg_monai.transforms import IGNORE, ThreeClassTargetd, distance_map, encode_three_class

torch.set_num_threads(1)


def discs(shape, centres, radii):
    labels = np.zeros(shape, dtype=np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) & (labels == 0)] = i
    return labels


def test_distance_map_peaks_at_one_in_every_nucleus_whatever_its_size():
    labels = discs((64, 96), [(32, 20), (32, 70)], [6, 15])
    d = distance_map(labels)
    assert d[labels == 0].max() == 0
    for i, (cy, cx) in enumerate([(32, 20), (32, 70)], start=1):
        assert d[labels == i].max() == pytest.approx(1.0)
        assert d[cy, cx] == pytest.approx(1.0)
    rim = encode_three_class(labels) == 2
    assert d[rim].max() < 0.2  # one pixel in of a 6 px radius: 1/6
    assert d.dtype == np.float32


def test_touching_nuclei_meet_in_a_valley_of_the_distance_map():
    labels = discs((40, 64), [(20, 20), (20, 37)], [10, 10])  # 17 px apart: the border runs between x=30 and 31
    d = distance_map(labels)
    assert labels[20, 30] == 1 and labels[20, 31] == 2
    assert d[20, 30] < 0.15 and d[20, 31] < 0.15
    assert d[20, 20] == pytest.approx(1.0) and d[labels == 2].max() == pytest.approx(1.0)


def test_target_with_distance_has_classes_then_the_map():
    labels = discs((32, 32), [(16, 16)], [8])
    d = ThreeClassTargetd("label", distance=True)({"label": torch.from_numpy(labels[None])})
    assert d["label"].shape == (2, 32, 32) and d["label"].dtype == torch.float32
    assert np.array_equal(d["label"][0].numpy(), encode_three_class(labels))
    assert np.allclose(d["label"][1].numpy(), distance_map(labels))
    assert np.array_equal(d["label_inst"][0].numpy(), labels)


def test_four_output_loss_is_the_class_loss_plus_a_masked_distance_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    classes = torch.randint(0, 3, (2, 1, 16, 16))
    dist = torch.rand(2, 1, 16, 16)
    target = torch.cat([classes.float(), dist], dim=1)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits[:, :3], classes)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 3:], dist)
    assert MaskedDiceCELoss()(logits, target).item() == pytest.approx((expected + bce).item(), abs=1e-5)
    # ignored pixels count for neither term
    ignored = target.clone()
    ignored[:, 0, :, 8:] = IGNORE
    changed = logits.clone()
    changed[..., 8:] = torch.randn(2, 4, 16, 8) * 10
    assert MaskedDiceCELoss()(logits, ignored).item() == pytest.approx(MaskedDiceCELoss()(changed, ignored).item(),
                                                                      abs=1e-5)
    with pytest.raises(ValueError, match="distance=True"):
        MaskedDiceCELoss()(logits, classes)
    with pytest.raises(ValueError, match="target of 1 channel"):
        MaskedDiceCELoss()(logits[:, :3], target)


def test_activate_is_softmax_over_the_classes_and_a_sigmoid_for_the_map():
    logits = torch.randn(1, 4, 5, 5)
    p = activate(logits)
    assert torch.allclose(p[:, :3], torch.softmax(logits[:, :3], 1))
    assert torch.allclose(p[:, 3], torch.sigmoid(logits[:, 3]))
    assert torch.allclose(activate(logits[:, :3]), torch.softmax(logits[:, :3], 1))
    for channels in (3, 4):  # in place: the same probabilities in the caller's tensor, large logits included
        owned = torch.cat([logits[:, :channels] * 30, torch.zeros(1, channels, 5, 5)], dim=-1)
        expected = activate(owned)
        assert activate(owned, inplace=True) is owned and torch.allclose(owned, expected, atol=1e-6)
    # the evaluators' transform, per item (C,H,W): MONAI's Activationsd(softmax=True) would mix the map in
    item = Activated("pred")({"pred": logits[0], "other": 1})
    assert torch.allclose(item["pred"], p[0]) and item["other"] == 1


def merged_interior_probs(labels):
    """A network that sees one blob: interior everywhere inside (no boundary between the two), but whose
    distance map keeps the two peaks."""
    fg = (labels > 0).astype(np.float32)
    return np.stack([1 - fg, fg, np.zeros_like(fg), distance_map(labels)])


def test_distance_markers_part_nuclei_whose_interiors_run_together():
    labels = discs((48, 72), [(24, 24), (24, 44)], [12, 12])
    probs = merged_interior_probs(labels)
    assert instances_from_probs(probs, marker_threshold=0.5).max() == 1  # interior markers: one merged object
    out = instances_from_probs(probs, markers="distance_map", elevation="distance_map", marker_threshold=0.5)
    assert out.max() == 2
    iou, _, _ = iou_matrix(out, labels)
    assert (iou.max(axis=1) > 0.9).all()
    item = InstancesFromProbsd("pred", params={"markers": "distance_map", "elevation": "distance_map",
                                               "marker_threshold": 0.5})({"pred": torch.from_numpy(probs)})
    assert item["pred"].max() == 2


def test_distance_settings_need_a_fourth_channel():
    probs = merged_interior_probs(discs((32, 32), [(16, 16)], [8]))[:3]
    with pytest.raises(ValueError, match="4 or 6 outputs"):
        instances_from_probs(probs, markers="distance_map")
    with pytest.raises(ValueError, match="markers"):
        instances_from_probs(probs, markers="centroid")


def test_initial_weights_widen_a_three_class_head_and_keep_its_classes(tmp_path):
    torch.manual_seed(0)
    three = UNet(out_channels=3, features=(4, 8))
    path = tmp_path / "model.pt"
    torch.save(three.state_dict(), path)
    four = UNet(out_channels=4, features=(4, 8))
    fresh = four.head.weight[3].detach().clone()
    InitialWeights(path, four)()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(four.eval()(x)[:, :3], three.eval()(x), atol=1e-6)
    assert torch.equal(four.head.weight[3], fresh)
    with pytest.raises(ValueError, match="cannot start"):
        InitialWeights(path, UNet(out_channels=2, features=(4, 8)))()
    assert InitialWeights("null", four).path is None and InitialWeights(path, four, resume="true").resume


def test_tuning_searches_the_distance_map_only_for_a_network_that_has_one():
    from nucleiseg_monai.tuning import default_grid, score, settings

    assert "distance_map" not in {*default_grid(3).get("markers", ()), *default_grid(3)["elevation"]}
    assert default_grid(4)["markers"] == ("distance_map",)
    labels = discs((48, 72), [(24, 24), (24, 44)], [12, 12])
    cached = [({"name": "a", "organ": "x", "source": "s"}, merged_interior_probs(labels), labels)]
    best = max(settings({**default_grid(4), "fg_threshold": (0.5,), "min_size": (25,)}),
               key=lambda p: score(p, cached)["aji"])
    assert score(best, cached)["aji"] > 0.9


def test_the_default_grid_searches_the_same_areas_at_any_working_pixel_size():
    from nucleiseg_monai.tuning import default_grid

    at_025, at_05 = default_grid(4), default_grid(4, 0.5)
    assert at_025["min_size"] == (25, 40, 60) and at_05["min_size"] == (6, 10, 15)  # um^2 kept: 4x fewer pixels
    assert at_05["min_marker_size"] == (1, 2, 5) and default_grid(4, 0.125)["min_size"] == (100, 160, 240)
    assert at_05["fg_threshold"] == at_025["fg_threshold"]  # probabilities do not scale
