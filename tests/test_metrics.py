"""Metrics against hand-computed answers, MONAI's implementations and a brute-force AJI."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from monai.handlers import from_engine
from monai.metrics import DiceMetric, PanopticQualityMetric, compute_panoptic_quality
from scipy.optimize import linear_sum_assignment

from nucleiseg_monai.metrics import (
    COUNT_KEYS,
    METRIC_NAMES,
    InstanceMetric,
    aji,
    aji_plus,
    count_ape,
    count_nuclei,
    detection_scores,
    dice,
    instance_metrics,
    iou_matrix,
    overlap,
    panoptic_quality,
    pixel_confusion,
    summarize,
)

torch.set_num_threads(1)


def rect(shape, y0, x0, h, w, value=1, out=None):
    out = np.zeros(shape, dtype=np.int64) if out is None else out
    out[y0 : y0 + h, x0 : x0 + w] = value
    return out


def random_labels(rng, shape=(64, 64), n=10):
    """Discs with random sparse ids painted in turn (later discs cover earlier ones, leaving some in pieces)."""
    labels = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in rng.choice(np.arange(1, 100_000), size=n, replace=False):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 9)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def perturbed(rng, labels):
    """A prediction related to the truth: shifted 0-3 px, some ids merged into one, some objects dropped."""
    pred = np.roll(labels, rng.integers(-3, 4), axis=int(rng.integers(0, 2)))
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, ids[::4])] = ids[1] if ids.size > 1 else 0
    pred[np.isin(pred, ids[2::5])] = 0
    return pred


def brute_force_aji(pred, true, one_to_one):
    """AJI / AJI+ straight from the definitions, one object mask at a time."""
    t_ids, p_ids = np.unique(true)[1:], np.unique(pred)[1:]
    t_masks = [true == i for i in t_ids]
    p_masks = [pred == i for i in p_ids]
    inter = np.array([[np.sum(t & p) for p in p_masks] for t in t_masks]).reshape(len(t_ids), len(p_ids))
    union = np.array([[np.sum(t | p) for p in p_masks] for t in t_masks]).reshape(len(t_ids), len(p_ids))
    iou = inter / np.maximum(union, 1)
    if one_to_one:
        rows, cols = linear_sum_assignment(iou, maximize=True)
        keep = iou[rows, cols] > 0
        pairs = list(zip(rows[keep], cols[keep]))
    else:
        pairs = [(i, int(np.argmax(iou[i]))) for i in range(len(t_ids)) if iou.shape[1] and iou[i].max() > 0]
    c = sum(inter[i, j] for i, j in pairs)
    u = sum(union[i, j] for i, j in pairs)
    u += sum(t_masks[i].sum() for i in range(len(t_ids)) if i not in {i for i, _ in pairs})
    u += sum(p_masks[j].sum() for j in range(len(p_ids)) if j not in {j for _, j in pairs})
    return c / u


SHAPE = (16, 24)


# -------------------------------------------------------------------------------------------- pixel level
def test_pixel_confusion_and_dice_by_hand():
    true = rect(SHAPE, 0, 0, 4, 4)  # 16 px
    pred = rect(SHAPE, 0, 2, 4, 4, value=9)  # 16 px, columns 2-5; overlap columns 2-3 -> 8 px
    # tp 8, fp 16-8 = 8, fn 16-8 = 8, tn 16*24 - 24 = 360; dice = 2*8 / (2*8 + 8 + 8) = 0.5
    assert pixel_confusion(pred, true) == {"tp": 8, "fp": 8, "fn": 8, "tn": 360}
    assert dice(pred, true) == 0.5
    assert dice(np.zeros(SHAPE, int), np.zeros(SHAPE, int)) == 1.0  # two empty masks agree perfectly


def test_dice_matches_monai_dice_metric():
    rng = np.random.default_rng(0)
    true, pred = random_labels(rng), random_labels(rng)
    metric = DiceMetric(include_background=True, reduction="mean")
    metric(torch.as_tensor(pred > 0)[None, None].float(), torch.as_tensor(true > 0)[None, None].float())
    assert dice(pred, true) == pytest.approx(metric.aggregate().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ counting
def test_counting():
    pieces = rect(SHAPE, 0, 0, 3, 3, value=5, out=rect(SHAPE, 10, 10, 3, 3, value=5))
    assert count_nuclei(pieces) == 1  # one id in two pieces is one nucleus
    assert count_nuclei(rect(SHAPE, 0, 0, 2, 2, value=7, out=rect(SHAPE, 5, 5, 2, 2, value=1000))) == 2
    assert count_nuclei(rect(SHAPE, 0, 0, 2, 2, value=2**40, out=rect(SHAPE, 5, 5, 2, 2, value=3))) == 2
    assert count_ape(3, 4) == 25.0  # |3-4| / 4 * 100
    assert count_ape(0, 0) == 0.0
    assert math.isnan(count_ape(2, 0))


# -------------------------------------------------------------------------------------- object level cases
def two_objects():
    """Truth: ids 7 (4x6 = 24 px) and 1000 (4x4 = 16 px), side by side, touching."""
    return rect(SHAPE, 2, 2, 4, 6, value=7, out=rect(SHAPE, 2, 8, 4, 4, value=1000))


def test_perfect_prediction_with_other_ids():
    true = two_objects()
    pred = np.where(true == 7, 2, np.where(true == 1000, 1, 0))  # same objects, different ids
    m = instance_metrics(pred, true)
    for k in ("dice", "precision", "recall", "f1", "dq", "sq", "pq", "aji", "aji_plus"):
        assert m[k] == 1.0, k
    assert (m["tp"], m["fp"], m["fn"], m["n_true"], m["n_pred"], m["count_ape"]) == (2, 0, 0, 2, 2, 0.0)


def test_empty_prediction():
    true = two_objects()
    m = instance_metrics(np.zeros(SHAPE, np.uint32), true)
    # 40 true px all missed: dice = 0 / (0 + 0 + 40) = 0; AJI = 0 / 40; count |0-2|/2 = 100 %
    assert (m["pixel_tp"], m["pixel_fp"], m["pixel_fn"], m["pixel_tn"]) == (0, 0, 40, 16 * 24 - 40)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 2)
    for k in ("dice", "precision", "recall", "f1", "dq", "sq", "pq", "aji", "aji_plus"):
        assert m[k] == 0.0, k
    assert m["count_ape"] == 100.0


def test_empty_truth():
    m = instance_metrics(two_objects(), np.zeros(SHAPE, np.uint16))
    assert (m["tp"], m["fp"], m["fn"], m["pixel_fp"]) == (0, 2, 0, 40)
    for k in ("dice", "precision", "recall", "f1", "dq", "sq", "pq", "aji", "aji_plus"):
        assert m[k] == 0.0, k
    assert math.isnan(m["count_ape"])  # a percentage of a zero count is undefined


def test_both_empty():
    m = instance_metrics(np.zeros(SHAPE, int), np.zeros(SHAPE, int))
    for k in ("dice", "precision", "recall", "f1", "dq", "sq", "pq", "aji", "aji_plus"):
        assert m[k] == 1.0, k
    assert m["count_ape"] == 0.0 and m["n_true"] == m["n_pred"] == 0


def test_one_nucleus_split_in_two():
    true = rect(SHAPE, 2, 2, 4, 10, value=3)  # 40 px
    pred = rect(SHAPE, 2, 2, 4, 6, value=1, out=rect(SHAPE, 2, 8, 4, 4, value=2))  # 24 px + 16 px
    # IoU(t, p1) = 24/40 = 0.6 (match), IoU(t, p2) = 16/40 = 0.4 -> tp 1, fp 1, fn 0
    # precision 1/2, recall 1/1, F1 = 2*1 / (2*1 + 1 + 0) = 2/3; DQ = 1 / (1 + 0.5) = 2/3, SQ = 0.6, PQ = 0.4
    # AJI: t picks p1: C = 24, U = 40; p2 unused: U += 16 -> 24/56 = 3/7; AJI+ pairs the same -> 3/7
    m = instance_metrics(pred, true)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3) and m["dq"] == pytest.approx(2 / 3)
    assert m["sq"] == pytest.approx(0.6) and m["pq"] == pytest.approx(0.4)
    assert m["aji"] == pytest.approx(3 / 7) and m["aji_plus"] == pytest.approx(3 / 7)
    assert m["dice"] == 1.0 and m["count_ape"] == 100.0


def test_two_nuclei_merged():
    true = two_objects()  # 24 px (id 7) + 16 px (id 1000)
    pred = rect(SHAPE, 2, 2, 4, 10, value=4)  # 40 px covering both
    # IoU(t7, p) = 24/40 = 0.6 (match), IoU(t1000, p) = 16/40 = 0.4 -> tp 1, fp 0, fn 1
    # F1 = 2 / (2 + 0 + 1) = 2/3, DQ 2/3, SQ 0.6, PQ 0.4; count |1-2|/2 = 50 %
    # AJI reuses p for both trues: C = 24 + 16 = 40, U = 40 + 40 = 80 -> 0.5
    # AJI+ pairs p once (with t7): C = 24, U = 40 + 16 (unpaired t1000) = 56 -> 3/7
    m = instance_metrics(pred, true)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["precision"] == 1.0 and m["recall"] == 0.5 and m["f1"] == pytest.approx(2 / 3)
    assert m["pq"] == pytest.approx(0.4) and m["sq"] == pytest.approx(0.6)
    assert m["aji"] == 0.5 and m["aji_plus"] == pytest.approx(3 / 7)
    assert m["count_ape"] == 50.0


@pytest.mark.parametrize(
    "shift, matched, iou",
    [
        (32, True, 67 / 131),  # 2x99 bar shifted 32 columns: inter 2*67, union 2*131 -> 0.5115 > 0.5
        (33, False, 0.5),  # inter 2*66, union 2*132 -> exactly 0.5 is not a match (IoU > 0.5 required)
        (34, False, 65 / 133),  # 0.4887
    ],
)
def test_shifted_nucleus_around_iou_half(shift, matched, iou):
    shape = (4, 140)
    true = rect(shape, 1, 0, 2, 99, value=1)
    pred = rect(shape, 1, shift, 2, 99, value=1)
    m = instance_metrics(pred, true)
    assert m["tp"] == int(matched)
    assert m["pq"] == pytest.approx(iou if matched else 0.0)  # DQ = 1 when matched, SQ = the IoU
    assert m["aji"] == pytest.approx(iou)  # one pair: C / U is its IoU whether matched or not
    assert iou_matrix(pred, true)[0][0, 0] == pytest.approx(iou)


def test_non_contiguous_and_huge_ids_change_nothing():
    rng = np.random.default_rng(1)
    true = random_labels(rng)
    pred = perturbed(rng, true)
    ref = instance_metrics(pred, true)
    # Ids beyond the lookup-table range take the np.unique path; the result must be the same.
    big_pred = np.where(pred > 0, pred.astype(np.uint64) + 2**40, 0)
    big_true = np.where(true > 0, true.astype(np.uint64) * 7919 + 2**35, 0)
    got = instance_metrics(big_pred, big_true)
    assert got == pytest.approx(ref, nan_ok=True)


def test_one_id_in_two_pieces():
    true = rect(SHAPE, 0, 0, 3, 3, value=5, out=rect(SHAPE, 10, 10, 3, 3, value=5))  # one nucleus, 18 px
    same = true.copy()
    assert instance_metrics(same, true)["aji"] == 1.0 and instance_metrics(same, true)["tp"] == 1
    split = np.where(true > 0, 1, 0) + rect(SHAPE, 10, 10, 3, 3, value=1)  # pieces as ids 1 and 2
    # IoU of each piece = 9/18 = 0.5 -> no match: tp 0, fp 2, fn 1; AJI: C = 9, U = 18 + 9 (unused) -> 1/3
    m = instance_metrics(split, true)
    assert (m["n_true"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (1, 2, 0, 2, 1)
    assert m["aji"] == pytest.approx(1 / 3) and m["aji_plus"] == pytest.approx(1 / 3)


def test_aji_takes_highest_iou_pred_and_breaks_ties_by_lowest_id_like_hovernet():
    true = rect(SHAPE, 0, 0, 4, 10, value=1)  # 40 px
    pred = rect(SHAPE, 0, 0, 4, 2, value=3)  # p3: 8 px inside -> IoU 8/40 = 0.2
    pred = rect(SHAPE, 0, 7, 4, 4, value=8, out=pred)  # p8: 12 px inside + 4 outside -> 12/(40+4) = 0.2727
    pred = rect(SHAPE, 0, 2, 4, 3, value=5, out=pred)  # p5: 12 px inside -> IoU 12/40 = 0.3
    assert instance_metrics(pred, true)["aji"] == pytest.approx(12 / (40 + 8 + 16))  # p5 wins; p3, p8 unused
    # Equal IoU 0.25 with different sizes: p2 (10 px inside) and p6 (12 inside + 8 outside: 12/48).
    pred = np.zeros(SHAPE, np.int64)
    pred[0:2, 0:5] = 2
    pred[2:4, 0:6] = 6
    pred[4:6, 0:4] = 6
    # np.argmax takes the lower id 2: C = 10, U = 40 + 20 (unused p6) = 60; taking p6 would give 12/58
    assert instance_metrics(pred, true)["aji"] == pytest.approx(10 / 60)


def test_iou_matrix_and_overlap_table():
    true = two_objects()
    pred = rect(SHAPE, 2, 2, 4, 10, value=4, out=rect(SHAPE, 12, 0, 2, 2, value=9))
    iou, true_ids, pred_ids = iou_matrix(pred, true)
    assert true_ids.tolist() == [7, 1000] and pred_ids.tolist() == [4, 9]
    np.testing.assert_allclose(iou, [[0.6, 0.0], [0.4, 0.0]])  # 24/40, 16/40; pred 9 overlaps nothing
    ov = overlap(pred, true)
    assert ov.true_area.tolist() == [24, 16] and ov.pred_area.tolist() == [40, 4]
    assert ov.pixel == {"tp": 40, "fp": 4, "fn": 0, "tn": 16 * 24 - 44}


def test_single_metric_functions_agree_with_instance_metrics():
    true = two_objects()
    pred = rect(SHAPE, 2, 2, 4, 10, value=4)
    m = instance_metrics(pred, true)
    assert aji(pred, true) == m["aji"] and aji_plus(pred, true) == m["aji_plus"]
    assert panoptic_quality(pred, true) == {"pq": m["pq"], "dq": m["dq"], "sq": m["sq"]}
    det = detection_scores(pred, true)
    assert {k: det[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")} == {
        k: m[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")
    }
    assert set(m) == set(METRIC_NAMES)


def test_accepts_torch_batched_and_float_maps():
    true = two_objects()
    pred = rect(SHAPE, 2, 2, 4, 10, value=4)
    ref = instance_metrics(pred, true)
    assert instance_metrics(torch.as_tensor(pred)[None].float(), torch.as_tensor(true)[None, None]) == ref
    with pytest.raises(ValueError, match="shape"):
        instance_metrics(pred[:8], true)
    with pytest.raises(ValueError, match=">= 0"):
        instance_metrics(-pred, true)


# ------------------------------------------------------------------------------- against MONAI / brute force
@pytest.mark.parametrize("seed", range(6))
def test_panoptic_quality_matches_monai(seed):
    rng = np.random.default_rng(seed)
    true = random_labels(rng)
    pred = perturbed(rng, true) if seed % 2 else random_labels(rng)
    mine = panoptic_quality(pred, true)
    p, t = torch.as_tensor(pred), torch.as_tensor(true)
    # MONAI adds smooth_numerator (1e-6) to denominators; without it the two differ only by float32 rounding.
    for name, key in (("pq", "pq"), ("rq", "dq")):
        ref = compute_panoptic_quality(p, t, metric_name=name, smooth_numerator=0.0).item()
        assert mine[key] == pytest.approx(ref, abs=1e-6), name
    tp = detection_scores(pred, true)["tp"]
    ref_sq = compute_panoptic_quality(p, t, metric_name="sq", smooth_numerator=0.0 if tp else 1e-6).item()
    assert mine["sq"] == pytest.approx(ref_sq, abs=1e-6)  # no match: MONAI's 0 / (0 + 1e-6) = 0 as ours
    # The batched metric takes (B, 2, H, W): instance map and class map (all nuclei are class 1).
    metric = PanopticQualityMetric(num_classes=1, smooth_numerator=0.0)
    metric(torch.stack([p, (p > 0).long()])[None], torch.stack([t, (t > 0).long()])[None])
    assert mine["pq"] == pytest.approx(metric.aggregate().item(), abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_aji_and_aji_plus_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    true = random_labels(rng, n=int(rng.integers(1, 14)))
    pred = perturbed(rng, true) if seed % 2 else random_labels(rng, n=int(rng.integers(1, 14)))
    m = instance_metrics(pred, true)
    assert m["aji"] == pytest.approx(brute_force_aji(pred, true, one_to_one=False), abs=1e-12)
    assert m["aji_plus"] == pytest.approx(brute_force_aji(pred, true, one_to_one=True), abs=1e-12)


# ------------------------------------------------------------------------------------------------ summary
def test_summarize_means_pooled_and_per_organ():
    true = two_objects()
    merged = rect(SHAPE, 2, 2, 4, 10, value=4)
    rows = [
        {"name": "b", "organ": "Skin", **instance_metrics(true, true)},  # perfect
        {"name": "a", "organ": "Skin", **instance_metrics(merged, true)},  # merge case: pq 0.4, aji 0.5
        {"name": "c", "organ": "Lung", **instance_metrics(merged, np.zeros(SHAPE, int))},  # empty truth
    ]
    s = summarize(rows)
    assert s["n_images"] == 3 and [r["name"] for r in s["per_image"]] == ["a", "b", "c"]
    assert s["mean"]["pq"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    assert s["mean"]["count_ape"] == pytest.approx((0.0 + 50.0) / 2)  # the NaN of the empty truth is skipped
    skin = s["per_organ"]["Skin"]
    assert skin["n_images"] == 2 and skin["mean"]["aji"] == pytest.approx(0.75)
    # Pooled over Skin: tp 2 + 1, fp 0, fn 0 + 1 -> F1 = 6 / (6 + 0 + 1) = 6/7;
    # AJI C = 40 + 40, U = 40 + 80 -> 2/3; count |3 - 4| / 4 = 25 %
    assert skin["pooled"]["f1"] == pytest.approx(6 / 7)
    assert skin["pooled"]["aji"] == pytest.approx(80 / 120)
    assert skin["pooled"]["count_ape"] == pytest.approx(25.0)
    # All three: tp 3, fp 1 (the prediction on the empty tile), fn 1 -> F1 = 6 / (6 + 1 + 1) = 0.75
    assert s["pooled"]["f1"] == pytest.approx(0.75)
    assert s["per_organ"]["Lung"]["mean"]["pq"] == 0.0
    with pytest.raises(ValueError, match="missing keys"):
        summarize([{"name": "x", "organ": "y", "aji": 1.0}])


# ------------------------------------------------------------------------------------------ ignite wrapper
def run_engine(batches, metric_name, output_transform=lambda x: x):
    engine = Engine(lambda e, batch: batch)
    InstanceMetric(metric_name, output_transform=output_transform).attach(engine, metric_name)
    return engine.run(batches, max_epochs=1).metrics[metric_name]


def test_instance_metric_on_batched_tensors():
    true = two_objects()
    merged = rect(SHAPE, 2, 2, 4, 10, value=4)
    y = torch.as_tensor(np.stack([true, true]))[:, None]  # (B, 1, H, W)
    batches = [
        (torch.as_tensor(np.stack([true, merged]))[:, None], y),  # AJI 1.0 and 0.5
        (torch.as_tensor(np.stack([merged, merged])), y[:, 0]),  # (B, H, W): AJI 0.5, 0.5
    ]
    assert run_engine(batches, "aji") == pytest.approx((1.0 + 0.5 + 0.5 + 0.5) / 4)
    assert run_engine(batches, "pq") == pytest.approx((1.0 + 0.4 * 3) / 4)


def test_instance_metric_with_from_engine_on_decollated_outputs():
    true = two_objects()
    merged = rect(SHAPE, 2, 2, 4, 10, value=4)
    empty = np.zeros(SHAPE, np.uint32)
    # What a MONAI evaluator holds after decollate + postprocessing: a list of per-item dicts.
    outputs = [
        [{"pred_inst": merged[None].astype(np.uint32), "label_inst": torch.as_tensor(true)[None]}],
        [
            {"pred_inst": true[None].astype(np.uint32), "label_inst": torch.as_tensor(true)[None]},
            {"pred_inst": merged[None].astype(np.uint32), "label_inst": torch.as_tensor(empty)[None]},
        ],
    ]
    transform = from_engine(["pred_inst", "label_inst"])
    assert run_engine(outputs, "count_ape", transform) == pytest.approx((50.0 + 0.0) / 2)  # NaN skipped
    assert run_engine(outputs, "f1", transform) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    with pytest.raises(NotComputableError):
        run_engine([outputs[1][1:]], "count_ape", transform)  # only an empty-truth image: nothing defined


def test_instance_metric_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown metric"):
        InstanceMetric("hausdorff")
    assert "aji" in METRIC_NAMES and all(k in METRIC_NAMES for k in COUNT_KEYS)


def test_unmatched_nuclei_are_told_apart_as_missed_merged_or_misdrawn():
    true = np.zeros((40, 40), np.int32)
    true[2:8, 2:8] = 1  # found
    true[2:8, 12:18], true[2:8, 18:24] = 2, 3  # two touching nuclei found as one
    true[20:26, 2:8] = 4  # missed: nothing there
    true[20:26, 12:18] = 5  # a third of it found: missed too
    true[30:38, 20:36] = 6  # found in two halves: neither is a match, nor a merge
    pred = np.zeros_like(true)
    pred[2:8, 2:8] = 10
    pred[2:8, 12:24] = 20
    pred[20:26, 12:14] = 50
    pred[30:38, 20:28], pred[30:38, 28:36] = 60, 61
    m = instance_metrics(pred, true)
    assert (m["tp"], m["fn"], m["fn_missed"], m["fn_merged"]) == (1, 5, 2, 2)
    assert m["missed"] == pytest.approx(2 / 6) and m["merged"] == pytest.approx(2 / 6)
    assert m["misdrawn"] == pytest.approx(1 / 6)  # the split nucleus is the rest
    assert m["recall"] + m["missed"] + m["merged"] + m["misdrawn"] == pytest.approx(1.0)
    empty = instance_metrics(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32))
    assert empty["missed"] == empty["merged"] == empty["misdrawn"] == 0.0
    nothing = instance_metrics(np.zeros_like(true), true)
    assert nothing["missed"] == 1.0 and nothing["merged"] == nothing["misdrawn"] == 0.0
    pooled = summarize([{**m, "name": "a", "organ": "x"}, {**nothing, "name": "b", "organ": "x"}])["pooled"]
    assert pooled["missed"] == pytest.approx((2 + 6) / 12) and pooled["merged"] == pytest.approx(2 / 12)


def test_label_maps_that_are_no_ids_are_refused_or_named(caplog):
    """What a notebook hands over by mistake: a label map resized with interpolation (fractional ids) is refused;
    whole ids in floats (as MONAI tensors carry them) are ids; a binary mask passes but is named in a warning,
    since it scores every nucleus as one; one nucleus in two pieces is one nucleus and no warning."""
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6], labels[10:14, 10:14] = 1, 2
    assert count_nuclei(labels.astype(np.float32)) == 2
    with pytest.raises(ValueError, match="nearest neighbour"):
        count_nuclei(labels * 0.5)
    with caplog.at_level("WARNING", logger="nucleiseg_monai.metrics"):
        aji(labels, labels > 0)
        assert "binary mask" not in caplog.text  # two pieces of one id: one nucleus in two parts
        mask = labels > 0
        mask[16:19, 2:5] = True
        aji(labels, mask)
    assert "true: one id covers 3 separate pieces" in caplog.text


def test_summarize_takes_rows_without_names_or_organs():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 1
    summary = summarize([instance_metrics(labels, labels), instance_metrics(labels, np.zeros_like(labels))])
    assert summary["n_images"] == 2 and summary["mean"]["aji"] == pytest.approx(0.5)
    assert list(summary["per_organ"]) == ["all"] and [r["name"] for r in summary["per_image"]] == ["0", "1"]


def test_pixel_metrics_take_binary_masks_without_a_word_and_summaries_keep_row_order(caplog):
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = mask[8:11, 8:11] = mask[15:18, 2:5] = True
    with caplog.at_level("WARNING", logger="nucleiseg_monai.metrics"):
        assert dice(mask, mask) == 1.0
    assert caplog.text == ""
    rows = [instance_metrics(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32)) for _ in range(11)]
    assert [r["name"] for r in summarize(rows)["per_image"]] == [f"{i:02d}" for i in range(11)]
