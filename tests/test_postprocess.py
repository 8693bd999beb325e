"""Watershed post-processing on probabilities built from hand-made instance maps (and the real truth)."""

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from nucleiseg_monai.metrics import instance_metrics, iou_matrix
from nucleiseg_monai.postprocess import InstancesFromProbsd, instances_from_foreground, instances_from_probs
from nucleiseg_monai.synthetic import make_slide
from nucleiseg_monai.transforms import encode_three_class
from conftest import same_up_to_ids

torch.set_num_threads(1)


def one_hot_probs(labels):
    """Probabilities of a perfect network: the one-hot 3-class target (background, interior, inner boundary)."""
    enc = encode_three_class(labels)
    return np.stack([enc == c for c in range(3)]).astype(np.float32)


def soft_probs(labels, sigma=1.0):
    """One-hot probabilities blurred like a network's: the interior fades towards the boundary."""
    p = np.stack([ndi.gaussian_filter(c, sigma) for c in one_hot_probs(labels)])
    return (p / p.sum(axis=0, keepdims=True)).astype(np.float32)


def discs(shape, centres, radius):
    """Discs painted in order with ids 1..n, so each later disc cuts a straight border into its neighbour."""
    labels = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def assert_matches(pred, true, min_iou=0.9):
    """Same number of objects and every true object has a distinct predicted one at IoU > min_iou."""
    assert pred.max() == len(np.unique(true)) - 1
    iou, _, _ = iou_matrix(pred, true)
    best = iou.max(axis=1)
    assert (best > min_iou).all(), best
    assert len(set(iou.argmax(axis=1))) == len(best)


TWO_TOUCHING = discs((64, 64), [(32, 22), (32, 40)], 10)  # centres 18 px apart, radius 10: a shared border
CHAIN = discs((48, 112), [(24, 14 + 16 * k) for k in range(6)], 9)  # 6 nuclei, each touching the next


@pytest.mark.parametrize("labels", [TWO_TOUCHING, CHAIN], ids=["two_touching", "chain"])
@pytest.mark.parametrize("make_probs", [one_hot_probs, soft_probs], ids=["one_hot", "soft"])
def test_touching_nuclei_come_out_separate(labels, make_probs):
    probs = make_probs(labels)
    out = instances_from_probs(probs)
    assert_matches(out, labels)
    # The reference (threshold + connected components) merges every touching group into one object.
    assert instances_from_foreground(probs).max() == 1


@pytest.mark.parametrize("elevation", ["interior", "distance"])
def test_a_window_with_a_margin_floods_its_core_exactly_like_the_whole_image(elevation):
    """The whole-slide predictor's premise: with one-hot probabilities every pixel between touching nuclei is a
    watershed tie, and still each window's core comes out pixel for pixel as in the whole image, up to ids."""
    probs = one_hot_probs(make_slide((384, 384), seed=6).labels())  # ~100 nuclei, half in touching clusters
    whole = instances_from_probs(probs, elevation=elevation)
    core, margin = 128, 48
    for y0 in range(0, 384, core):
        for x0 in range(0, 384, core):
            top, left = max(y0 - margin, 0), max(x0 - margin, 0)
            window = instances_from_probs(probs[:, top:y0 + core + margin, left:x0 + core + margin],
                                          elevation=elevation)
            a = window[y0 - top:y0 - top + core, x0 - left:x0 - left + core]
            assert same_up_to_ids(a, whole[y0:y0 + core, x0:x0 + core]), (y0, x0)


def test_a_scikit_image_that_ignores_marker_elevations_is_named_once(monkeypatch, caplog):
    """The tie-free keys need markers released by their elevation (every scikit-image release but 0.25.0-0.25.1);
    this one does, and one that does not gets one warning, not one per region."""
    from nucleiseg_monai import postprocess

    postprocess._check_marker_order.cache_clear()
    assert postprocess._check_marker_order()
    postprocess._check_marker_order.cache_clear()
    # as 0.25.0 did: markers released in the heap's own order, here the lower id first whatever the elevation
    monkeypatch.setattr(postprocess, "watershed", lambda image, markers, **kw: np.where(markers > 0, markers, 1))
    probs = one_hot_probs(TWO_TOUCHING)
    with caplog.at_level("WARNING", logger="nucleiseg_monai.postprocess"):
        for _ in range(3):
            instances_from_probs(probs)
    assert sum("same priority" in r.getMessage() for r in caplog.records) == 1
    postprocess._check_marker_order.cache_clear()


def test_a_marker_with_two_high_peaks_is_split_and_a_faint_nucleus_keeps_its_own():
    """Distance maps of two nuclei whose saddle (0.51) is above the marker threshold (0.4), so their markers run
    together, and of a faint nucleus peaking at 0.5: the split threshold 0.6 parts the first two only."""
    yy, xx = np.mgrid[:48, :128]
    bump = lambda cy, cx, h: h * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 72.0)  # noqa: E731
    dist = np.maximum.reduce([bump(24, 20, 1.0), bump(24, 34, 1.0), bump(24, 100, 0.5)])
    fg = (dist > 0.1).astype(np.float32)
    probs = np.stack([1 - fg, fg * dist, fg * (1 - dist), dist]).astype(np.float32)
    params = dict(markers="distance_map", marker_threshold=0.4, min_marker_size=10, min_size=10)
    merged = instances_from_probs(probs, **params)
    assert merged.max() == 2 and merged[24, 20] == merged[24, 34]
    split = instances_from_probs(probs, marker_split_threshold=0.6, **params)
    assert split.max() == 3 and len({split[24, 20], split[24, 34], split[24, 100]}) == 3
    # parted at the saddle
    assert (split[24, 20:28] == split[24, 20]).all() and (split[24, 28:35] == split[24, 34]).all()
    # parts under min_marker_size do not split a marker (nor lose it)
    assert np.array_equal(instances_from_probs(probs, marker_split_threshold=0.99, **params) > 0, merged > 0)
    assert instances_from_probs(probs, marker_split_threshold=0.99, **params).max() == 2


def test_cores_touching_at_a_corner_stay_two_nuclei():
    true = np.zeros((40, 40), dtype=np.int64)
    true[10:20, 10:20] = 1
    true[20:30, 20:30] = 2  # meets the first square only diagonally, at one corner
    probs = np.stack([true == 0, true > 0, np.zeros_like(true, dtype=bool)]).astype(np.float32)
    assert_matches(instances_from_probs(probs), true, min_iou=0.99)


def test_distance_elevation_also_separates():
    assert_matches(instances_from_probs(soft_probs(TWO_TOUCHING), elevation="distance"), TWO_TOUCHING)
    with pytest.raises(ValueError, match="elevation"):
        instances_from_probs(soft_probs(TWO_TOUCHING), elevation="height")


def test_hole_in_a_nucleus_is_filled():
    true = discs((48, 48), [(24, 24)], 12)
    probs = soft_probs(true)
    yy, xx = np.mgrid[:48, :48]
    pale = (yy - 24) ** 2 + (xx - 24) ** 2 <= 16  # a pale centre (r = 4) the network calls background
    probs[:, pale] = np.array([1.0, 0.0, 0.0], dtype=np.float32)[:, None]
    filled = instances_from_probs(probs)
    assert_matches(filled, true, min_iou=0.97)
    assert (filled[pale] == 1).all()
    assert (instances_from_probs(probs, fill_holes=False)[pale] == 0).all()


def test_gap_between_several_nuclei_is_not_filled():
    # Two half rings (ids 1 top, 2 bottom) enclose a background gap: it belongs to neither, so it stays.
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    ring = (r2 <= 18**2) & (r2 > 7**2)
    true = np.where(ring, np.where(yy < 32, 1, 2), 0)
    out = instances_from_probs(one_hot_probs(true))
    assert_matches(out, true)
    assert (out[r2 <= 7**2] == 0).all()


def test_specks_removed_by_min_size():
    true = discs((64, 64), [(32, 32)], 10)
    with_specks = true.copy()
    with_specks[2:4, 2:4] = 2  # 4 px
    with_specks[10:13, 55:58] = 3  # 9 px
    with_specks[58:62, 5:8] = 4  # 12 px
    probs = one_hot_probs(with_specks)
    assert_matches(instances_from_probs(probs), true)  # default min_size 16 drops all three specks
    assert instances_from_probs(probs, min_size=1).max() == 4  # specks without interior become objects too
    assert instances_from_probs(probs, min_size=10).max() == 2


def test_output_dtype_and_contiguous_ids():
    out = instances_from_probs(one_hot_probs(CHAIN * 7 + (CHAIN > 0) * 1000))  # input ids do not matter
    assert out.dtype == np.uint32 and out.shape == CHAIN.shape
    assert np.unique(out).tolist() == list(range(7))
    empty = instances_from_probs(np.stack([np.ones((16, 16)), np.zeros((16, 16)), np.zeros((16, 16))]))
    assert empty.dtype == np.uint32 and not empty.any()
    with pytest.raises(ValueError, match=r"\(3,H,W\)"):
        instances_from_probs(np.zeros((2, 16, 16)))


def test_marker_erosion_cuts_a_thin_bridge_between_cores():
    # Two nuclei whose confident cores are joined by a 1 px line of high interior probability.
    true = discs((48, 80), [(24, 24), (24, 56)], 12)
    probs = one_hot_probs(true)
    bridge = np.zeros(true.shape, dtype=bool)
    bridge[24, 24:57] = True
    probs[:, bridge] = np.array([0.0, 1.0, 0.0], dtype=np.float32)[:, None]
    assert instances_from_probs(probs).max() == 1  # one marker floods both nuclei
    assert_matches(instances_from_probs(probs, marker_erosion=1), true, min_iou=0.85)


def test_min_marker_size_drops_spurious_cores():
    # A nucleus with a detached 1x2 fragment of interior, walled off from the main core by boundary pixels.
    true = discs((48, 48), [(24, 24)], 12)
    probs = one_hot_probs(true)
    probs[:, 22:25, 30:34] = np.array([0.0, 0.0, 1.0], dtype=np.float32)[:, None, None]
    probs[:, 23, 31:33] = np.array([0.0, 1.0, 0.0], dtype=np.float32)[:, None]
    assert instances_from_probs(probs, min_marker_size=1, min_size=1).max() == 2  # the fragment seeds a 2nd
    assert_matches(instances_from_probs(probs), true, min_iou=0.99)  # default 4 px drops the 2 px fragment


def test_foreground_reference_inputs():
    mask = (TWO_TOUCHING > 0).astype(np.uint8) * 255
    out = instances_from_foreground(mask)
    assert out.dtype == np.uint32 and out.max() == 1
    assert instances_from_foreground(mask > 0).max() == 1
    two_apart = discs((64, 64), [(16, 16), (48, 48)], 8)
    assert_matches(instances_from_foreground(soft_probs(two_apart)[1] + soft_probs(two_apart)[2]), two_apart)
    with pytest.raises(ValueError, match="shape"):
        instances_from_foreground(np.zeros((2, 3, 4, 5)))


def test_dictionary_transform():
    probs = soft_probs(CHAIN)
    ref = instances_from_probs(probs, min_size=1)
    logits = torch.log(torch.as_tensor(probs).clamp_min(1e-6))
    data = {"pred": logits.to(torch.bfloat16), "probs": probs, "label": CHAIN}
    out = InstancesFromProbsd(keys="pred", output_keys="pred_inst", softmax=True)(data)
    assert out["pred_inst"].shape == (1, *CHAIN.shape) and out["pred_inst"].dtype == np.uint32
    assert_matches(out["pred_inst"][0], CHAIN)
    out = InstancesFromProbsd(keys="probs", min_size=1)({"probs": torch.as_tensor(probs)})
    np.testing.assert_array_equal(out["probs"][0], ref)  # in place of the input key, same as the function
    with pytest.raises(ValueError, match="unknown parameters"):
        InstancesFromProbsd(keys="pred", min_area=3)


def test_truth_through_encoding_gives_high_aji_on_cryonuseg(cryonuseg_dir):
    paths = sorted((cryonuseg_dir / "label masks modify").glob("Human_*_01.tif"))
    assert len(paths) == 10
    ajis = []
    for path in paths:
        true = tifffile.imread(path)
        ajis.append(instance_metrics(instances_from_probs(one_hot_probs(true)), true)["aji"])
    # Losses come from ids in two pieces and nuclei thinner than 3 px (no interior); measured mean 0.986.
    assert np.mean(ajis) >= 0.9, dict(zip([p.name for p in paths], np.round(ajis, 3)))
