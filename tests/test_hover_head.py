"""Six outputs: HoVer-Net's horizontal and vertical maps as target, loss and marker cut."""

import numpy as np
import pytest
import torch

from nucleiseg_monai.losses import MaskedDiceCELoss
from nucleiseg_monai.postprocess import hover_edges, instances_from_probs
from nucleiseg_monai.transforms import ThreeClassTargetd, distance_map, encode_three_class, hover_maps
from nucleiseg_monai.tuning import default_grid

from test_distance_head import discs

torch.set_num_threads(1)


def test_hover_maps_are_offsets_from_each_centroid_scaled_to_one_on_each_side():
    labels = np.zeros((5, 9), dtype=np.int32)
    labels[2, 1:6] = 1  # a bar 5 px wide, centroid at x = 3
    labels[0:5, 7] = 2  # a bar 5 px tall, centroid at y = 2
    h, v = hover_maps(labels)
    assert np.allclose(h[2, 1:6], [-1, -0.5, 0, 0.5, 1]) and np.allclose(v[2, 1:6], 0)
    assert np.allclose(v[0:5, 7], [-1, -0.5, 0, 0.5, 1]) and np.allclose(h[0:5, 7], 0)
    assert h[labels == 0].max() == 0 == v[labels == 0].max()
    assert h.dtype == np.float32


def test_target_with_hover_has_classes_distance_then_both_maps_before_the_weight():
    labels = discs((32, 48), [(16, 14), (16, 31)], [8, 8])
    target = ThreeClassTargetd("label", distance=True, hover=True, contact_weight=2)(
        {"label": torch.from_numpy(labels[None])})["label"]
    assert target.shape == (5, 32, 48)
    assert np.array_equal(target[0].numpy(), encode_three_class(labels))
    assert np.allclose(target[1].numpy(), distance_map(labels))
    assert np.allclose(target[2:4].numpy(), hover_maps(labels))
    assert target[4].min() == 1 and target[4].max() == 3
    with pytest.raises(ValueError, match="distance=True"):
        ThreeClassTargetd("label", hover=True)


def test_six_output_loss_adds_a_soft_target_term_and_hovernets_slope_term_for_the_maps():
    torch.manual_seed(0)
    labels = discs((32, 48), [(16, 14), (16, 31)], [8, 8])
    target = ThreeClassTargetd("label", distance=True, hover=True)({"label": torch.from_numpy(labels[None])})["label"]
    target = target[None]
    logits = torch.randn(1, 6, 32, 48)
    loss = MaskedDiceCELoss()
    offsets = (target[:, 2:4] + 1) / 2
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 4:6], offsets)
    predicted = 2 * torch.sigmoid(logits[0, 4:6]).numpy() - 1
    true = target[0, 2:4].numpy()
    errors = [np.gradient(predicted[0], axis=1) - np.gradient(true[0], axis=1),  # each map along its own axis
              np.gradient(predicted[1], axis=0) - np.gradient(true[1], axis=0)]
    msge = np.mean([e[labels > 0] ** 2 for e in errors])  # on nucleus pixels only (none at the patch's edge here)
    expected = loss(logits[:, :4], target[:, :2]) + bce + msge
    assert loss(logits, target).item() == pytest.approx(expected.item(), abs=1e-5)
    right = logits.clone()
    right[:, 4:6] = torch.logit(offsets.clamp(1e-4, 1 - 1e-4))
    assert loss(right, target) < loss(logits, target)
    with pytest.raises(ValueError, match="hover=True"):
        loss(logits, target[:, :2])
    with pytest.raises(ValueError, match="or 6"):
        loss(torch.randn(1, 5, 32, 48), target)


def perfect_probs(labels, distance=None):
    classes = encode_three_class(labels)
    probs = np.zeros((6, *labels.shape), dtype=np.float32)
    for c in range(3):
        probs[c] = classes == c
    probs[3] = distance_map(labels) if distance is None else distance
    probs[4:6] = (hover_maps(labels) + 1) / 2
    return probs


def test_hover_edges_are_flat_inside_a_nucleus_and_steep_where_two_meet():
    labels = discs((40, 64), [(20, 20), (20, 37)], [10, 10])  # the border runs between x=30 and 31
    edges = hover_edges(perfect_probs(labels))
    assert edges[20, 12:29].max() == 0  # rising maps: no edge
    assert edges[20, 30:32].max() > 0.8 and edges[20, 30:32].min() > 0.3  # the Sobel kernel spreads the jump


def test_the_hover_cut_parts_nuclei_whose_distance_peaks_run_together():
    labels = discs((40, 64), [(20, 20), (20, 37)], [10, 10])
    probs = perfect_probs(labels, distance=(labels > 0) * 0.9)  # one plateau over both: one marker
    params = {"markers": "distance_map", "marker_threshold": 0.5, "min_marker_size": 4}
    assert instances_from_probs(probs, **params).max() == 1
    out = instances_from_probs(probs, **params, hover_threshold=0.3)
    assert out.max() == 2
    assert np.array_equal(np.unique(out[labels == 1]), [1]) and np.array_equal(np.unique(out[labels == 2]), [2])
    with pytest.raises(ValueError, match="6 outputs"):
        instances_from_probs(probs[:4], **params, hover_threshold=0.3)


def test_tuning_searches_the_hover_cut_only_for_a_network_that_has_the_maps():
    assert "hover_threshold" not in default_grid(4)
    assert None in default_grid(6)["hover_threshold"] and default_grid(6)["markers"] == ("distance_map",)


def test_each_piece_of_an_id_gets_its_own_centred_maps_and_huge_ids_stay_apart():
    labels = np.zeros((12, 30), np.int64)
    labels[4:9, 2:9] = labels[4:9, 20:27] = 7  # one id shown twice (a reflected border, a rotation's corner)
    h, _ = hover_maps(labels)
    for piece in (np.s_[6, 2:9], np.s_[6, 20:27]):
        assert h[piece][0] == -1 and h[piece][-1] == 1 and h[piece][3] == 0
    huge = np.where(labels > 0, 2**24 + 1, 0)
    huge[4:9, 5:9] = np.where(labels[4:9, 5:9] > 0, 2**24, 0)  # two ids float32 cannot tell apart
    h, _ = hover_maps(huge)
    assert h[6, 2] == -1 and h[6, 4] == 1 and h[6, 5] == -1 and h[6, 8] == 1


class HoverOracle(torch.nn.Module):
    """Flip-equivariant as a trained network would be: segments the bright discs of its input and answers with
    their true maps as logits, so the mean over flips must give back the maps of one pass."""

    def forward(self, x):
        out = []
        for image in x:
            labels = discs_from(image[0].numpy())
            probs = perfect_probs(labels)
            out.append(torch.logit(torch.from_numpy(probs).clamp(1e-3, 1 - 1e-3)))
        return torch.stack(out)


def discs_from(image):
    from scipy.ndimage import label

    return label(image > 0.5)[0]


def test_test_time_flips_keep_the_hover_maps():
    from monai.inferers import SimpleInferer

    from nucleiseg_monai.inferers import FlipInferer

    labels = discs((40, 64), [(14, 18), (26, 44)], [8, 10])
    image = torch.from_numpy((labels > 0).astype(np.float32))[None, None].repeat(1, 3, 1, 1)
    one = HoverOracle()(image)
    for flips in (2, 4):
        averaged = FlipInferer(SimpleInferer(), flips)(image, HoverOracle())
        assert torch.allclose(averaged[:, 4:6], one[:, 4:6], atol=1e-4)


def test_distillation_takes_a_six_output_teacher():
    from nucleiseg_monai.distillation import DistillationLoss

    labels = discs((32, 48), [(16, 14), (16, 31)], [8, 8])
    target = ThreeClassTargetd("label", distance=True, hover=True)({"label": torch.from_numpy(labels[None])})["label"]
    teacher = torch.randn(1, 6, 32, 48)
    distill = DistillationLoss(MaskedDiceCELoss(), weight=0.5)
    assert torch.isfinite(distill(torch.randn(1, 6, 32, 48), torch.cat([target[None], teacher], 1)))
