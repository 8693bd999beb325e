"""Pixel, count and object metrics on instance label maps, and an ignite wrapper for MONAI evaluators.

Every function takes the prediction first and the truth second (``aji(pred, true)``; HoVer-Net's helpers take
them the other way round). Label maps are 2-D integer arrays, 0 = background; ids are arbitrary (gaps, huge values)
and one id may cover several disconnected pieces (it is still one object). Every object metric of an image comes
from ONE contingency table of (true id, pred id) pixel counts built with ``np.bincount``, which is what makes
``instance_metrics`` take milliseconds where per-instance loops (``monai.metrics.compute_panoptic_quality``) take
seconds on a dense tile.

Conventions for degenerate images (so that per-image means stay finite):
- Every score in [0, 1] (Dice, precision, recall, F1, DQ, SQ, PQ, AJI, AJI+) is 1.0 when both maps are empty and
  0.0 when exactly one is empty. SQ is 0.0 when nothing is matched (as MONAI). ``missed``, ``merged`` and
  ``misdrawn``, the shares of true nuclei left unmatched for those reasons (they add up to 1 - recall), are 0.0
  without true nuclei.
- ``count_ape`` (absolute percentage error of the nuclei count) is 0.0 when both counts are 0 and NaN when the
  truth has no nucleus but the prediction has some (a percentage of zero is undefined); means skip NaN.

Raw counts are returned beside the scores so that ``summarize`` can also pool them over a data set (pooled PQ,
AJI, F1, ... are the micro averages that papers such as CoNIC report next to per-image means).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from monai.utils import convert_to_numpy
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from scipy.ndimage import label as connected_pieces
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MATCH_IOU = 0.5
# Dense bincount of the pair table up to this many cells (32 MiB of int64); sparse np.unique above it.
_DENSE_TABLE_CELLS = 1 << 22
# A label map whose one id covers this many separate pieces is taken for a binary mask, and named in a warning.
BINARY_PIECES = 3

COUNT_KEYS = (
    "pixel_tp", "pixel_fp", "pixel_fn", "pixel_tn",
    "n_true", "n_pred", "tp", "iou_sum",
    "aji_inter", "aji_union", "aji_plus_inter", "aji_plus_union", "fn_missed", "fn_merged",
)  # fmt: skip
SCORE_KEYS = ("dice", "count_ape", "precision", "recall", "f1", "dq", "sq", "pq", "aji", "aji_plus", "missed", "merged",
              "misdrawn")
METRIC_NAMES = COUNT_KEYS + ("fp", "fn") + SCORE_KEYS

logger = logging.getLogger(__name__)

__all__ = [
    "COUNT_KEYS",
    "METRIC_NAMES",
    "SCORE_KEYS",
    "InstanceMetric",
    "Overlap",
    "aji",
    "aji_plus",
    "as_label_map",
    "count_ape",
    "count_nuclei",
    "detection_scores",
    "dice",
    "dice_from_confusion",
    "instance_metrics",
    "iou_matrix",
    "overlap",
    "panoptic_quality",
    "pixel_confusion",
    "summarize",
]


def as_label_map(x: Any, what: str = "labels") -> np.ndarray:
    """A 2-D non-negative integer numpy array from a numpy/torch label map (leading singleton axes dropped; float
    maps of whole ids, as MONAI tensors carry them, taken as ids); ValueError naming ``what`` otherwise."""
    a = convert_to_numpy(x)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D label map (H,W) or (1,H,W), got shape {a.shape}")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f":
        # MONAI may hand over label maps as float tensors of whole ids; a map resized with interpolation is not one
        if a.size and not np.array_equal(a, np.floor(a)):
            raise ValueError(f"{what}: a float label map with fractional values, so not ids: a label map resized "
                             "with interpolation? Resize label maps with nearest neighbour (order=0)")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected an integer label map, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError(f"{what}: label ids must be >= 0 (0 = background), got min {a.min()}")
    return a


def _object_map(x: Any, what: str) -> np.ndarray:
    """``as_label_map`` for the object metrics, which a binary mask would score as one nucleus: named in a warning.
    (Pixel metrics take binary masks as they are.)"""
    a = as_label_map(x, what)
    if a.size and a.max() == 1:
        pieces = connected_pieces(a)[1]
        if pieces >= BINARY_PIECES:
            logger.warning("%s: one id covers %d separate pieces, scored as one nucleus: a binary mask? Give each "
                           "nucleus its own id (skimage.measure.label(mask))", what, pieces)
    return a


def _relabel(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ids to 0..K (0 stays background, others by increasing id); returns (index per pixel, original ids).

    Same mapping as ``np.unique(flat, return_inverse=True)`` (which is the fallback for huge ids), but through a
    lookup table when ids are at most a few times the pixel count: O(n) instead of a sort, 8-40x faster.
    """
    top = int(flat.max()) if flat.size else 0
    if top <= max(4 * flat.size, 1 << 16):
        flat = flat.astype(np.intp, copy=False)
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return inv.astype(np.intp, copy=False), uniq[1:]
    return inv.astype(np.intp) + 1, uniq


@dataclass(frozen=True)
class Overlap:
    """Contingency table of one image: object areas and the pixel count of every overlapping (true, pred) pair.

    Object k of ``true_ids``/``true_area`` is row k; pairs are listed sparsely as (ti, pi, inter) with
    0-based object indices and inter > 0. ``pixel`` holds the foreground confusion counts (tp, fp, fn, tn).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    ti: np.ndarray
    pi: np.ndarray
    inter: np.ndarray
    pixel: dict[str, int]

    @cached_property
    def iou(self) -> np.ndarray:
        """IoU of each listed pair."""
        union = self.true_area[self.ti] + self.pred_area[self.pi] - self.inter
        return self.inter / union

    def iou_matrix(self) -> np.ndarray:
        """Dense (n_true, n_pred) IoU matrix, 0 where objects do not overlap."""
        m = np.zeros((self.true_area.size, self.pred_area.size))
        m[self.ti, self.pi] = self.iou
        return m


def overlap(pred: Any, true: Any) -> Overlap:
    """Build the contingency table of a predicted and a true label map (same shape) in one pass."""
    p = _object_map(pred, "pred").ravel()
    t = _object_map(true, "true").ravel()
    if p.size != t.size:
        raise ValueError(f"pred and true differ in shape: {np.shape(pred)} vs {np.shape(true)}")
    p_idx, pred_ids = _relabel(p)
    t_idx, true_ids = _relabel(t)
    n_pred, n_true = pred_ids.size, true_ids.size
    codes = t_idx * (n_pred + 1) + p_idx
    if (n_true + 1) * (n_pred + 1) <= _DENSE_TABLE_CELLS:
        table = np.bincount(codes, minlength=(n_true + 1) * (n_pred + 1))
        cells = np.flatnonzero(table)
        counts = table[cells]
        table = table.reshape(n_true + 1, n_pred + 1)
        true_area, pred_area = table.sum(axis=1), table.sum(axis=0)
    else:
        cells, counts = np.unique(codes, return_counts=True)
        true_area = np.bincount(cells // (n_pred + 1), weights=counts, minlength=n_true + 1).astype(np.int64)
        pred_area = np.bincount(cells % (n_pred + 1), weights=counts, minlength=n_pred + 1).astype(np.int64)
    rows, cols = np.divmod(cells, n_pred + 1)
    both = (rows > 0) & (cols > 0)  # cells stay sorted by (row, col), which _aji_plus_counts relies on
    ti, pi, inter = rows[both] - 1, cols[both] - 1, counts[both]
    tp = int(inter.sum())
    fn = int(true_area[1:].sum()) - tp
    fp = int(pred_area[1:].sum()) - tp
    pixel = {"tp": tp, "fp": fp, "fn": fn, "tn": int(t.size) - tp - fp - fn}
    return Overlap(true_ids, pred_ids, true_area[1:], pred_area[1:], ti, pi, inter, pixel)


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """num/den, with the module's convention for an empty denominator."""
    if den > 0:
        return float(num / den)
    return 1.0 if both_empty else 0.0


# ---------------------------------------------------------------------------------------------- pixel level
def pixel_confusion(pred: Any, true: Any) -> dict[str, int]:
    """Foreground (label > 0) confusion counts over all pixels: tp, fp, fn, tn."""
    p = as_label_map(pred, "pred") > 0
    t = as_label_map(true, "true") > 0
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(p.size) - tp - fp - fn}


def dice_from_confusion(conf: Mapping[str, int]) -> float:
    """Dice = F1 = 2tp / (2tp + fp + fn); 1.0 for two empty masks."""
    den = 2 * conf["tp"] + conf["fp"] + conf["fn"]
    return _ratio(2 * conf["tp"], den, both_empty=True)


def dice(pred: Any, true: Any) -> float:
    """Pixel Dice (F1) of the foregrounds of two label maps (or binary masks)."""
    return dice_from_confusion(pixel_confusion(pred, true))


# ------------------------------------------------------------------------------------------------- counting
def count_nuclei(labels: Any) -> int:
    """Number of distinct non-zero ids (an id in two pieces is one nucleus)."""
    return int(_relabel(_object_map(labels, "labels").ravel())[1].size)


def count_ape(n_pred: int, n_true: int) -> float:
    """Absolute percentage error of a count: |pred - true| / true * 100; 0 if both are 0, NaN if only true is 0."""
    if n_true == 0:
        return 0.0 if n_pred == 0 else math.nan
    return abs(n_pred - n_true) / n_true * 100.0


# ------------------------------------------------------------------------------------------- object level
def _detection_counts(ov: Overlap) -> tuple[int, float]:
    """(matches, sum of their IoU) at IoU > 0.5, where a match is necessarily unique."""
    iou = ov.iou
    matched = iou > MATCH_IOU
    return int(np.count_nonzero(matched)), float(iou[matched].sum())


def _unmatched_counts(ov: Overlap) -> tuple[int, int]:
    """Why true nuclei went unmatched: (missed, merged).

    Missed: less than half of it lies in any prediction. Merged: the prediction overlapping it most also covers at
    least half of another true nucleus (one prediction for two or more nuclei). The rest of the unmatched (``fn`` -
    missed - merged) were found but cut into pieces or drawn too large or too small for an IoU above 0.5.
    """
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    matched = np.zeros(n_true, dtype=bool)
    matched[ov.ti[ov.iou > MATCH_IOU]] = True
    covered = np.bincount(ov.ti, weights=ov.inter, minlength=n_true)
    missed = ~matched & (2 * covered < ov.true_area)
    halves = 2 * ov.inter >= ov.true_area[ov.ti]
    halves_per_pred = np.bincount(ov.pi[halves], minlength=n_pred)
    order = np.lexsort((ov.pi, -ov.inter, ov.ti))
    best = order[_run_starts(ov.ti[order])]
    others = np.zeros(n_true, dtype=np.int64)
    others[ov.ti[best]] = halves_per_pred[ov.pi[best]] - halves[best]
    merged = ~matched & ~missed & (others > 0)
    return int(missed.sum()), int(merged.sum())


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal keys."""
    return np.diff(sorted_keys, prepend=-1) != 0


def _aji_counts(ov: Overlap) -> tuple[int, int]:
    """(intersection, union) of AJI (Kumar et al. 2017) as in HoVer-Net's get_fast_aji.

    Each true object takes the pred of highest IoU (ties: lowest pred id, like np.argmax); preds may be reused;
    true objects without overlap and preds never chosen add their whole area to the union.
    """
    if ov.ti.size == 0:
        return 0, int(ov.true_area.sum() + ov.pred_area.sum())
    order = np.lexsort((ov.pi, -ov.iou, ov.ti))
    best = order[_run_starts(ov.ti[order])]
    return _pairs_inter_union(ov, best)


def _aji_plus_counts(ov: Overlap) -> tuple[int, int]:
    """(intersection, union) of AJI+ (HoVer-Net): one-to-one pairs maximising the summed IoU (Hungarian).

    The assignment separates over connected components of the overlap graph. A component with one true or one
    pred object (nearly all of them) keeps its highest-IoU pair; only components with several objects on both
    sides need ``linear_sum_assignment``, each on a tiny block.
    """
    if ov.ti.size == 0:
        return 0, int(ov.true_area.sum() + ov.pred_area.sum())
    n_true = ov.true_area.size
    n_nodes = n_true + ov.pred_area.size
    graph = coo_matrix((np.ones(ov.ti.size), (ov.ti, n_true + ov.pi)), shape=(n_nodes, n_nodes))
    n_comp, component = connected_components(graph, directed=False)
    trues_in = np.bincount(component[:n_true], minlength=n_comp)
    preds_in = np.bincount(component[n_true:], minlength=n_comp)
    iou = ov.iou
    edge_comp = component[ov.ti]
    star = (trues_in == 1) | (preds_in == 1)
    simple = np.flatnonzero(star[edge_comp])
    simple = simple[np.lexsort((-iou[simple], edge_comp[simple]))]
    chosen = [simple[_run_starts(edge_comp[simple])]]
    hard = np.flatnonzero(~star[edge_comp])
    if hard.size:
        hard = hard[np.argsort(edge_comp[hard], kind="stable")]
        edge_key = ov.ti * ov.pred_area.size + ov.pi  # sorted, as overlap() lists pairs by (ti, pi)
        for group in np.split(hard, np.flatnonzero(np.diff(edge_comp[hard])) + 1):
            row_ids, rows = np.unique(ov.ti[group], return_inverse=True)
            col_ids, cols = np.unique(ov.pi[group], return_inverse=True)
            block = np.zeros((row_ids.size, col_ids.size))
            block[rows, cols] = iou[group]
            r, c = linear_sum_assignment(block, maximize=True)
            keep = block[r, c] > 0  # a zero-IoU assignment is no pair (as in HoVer-Net)
            key = row_ids[r[keep]] * ov.pred_area.size + col_ids[c[keep]]
            chosen.append(np.searchsorted(edge_key, key))
    return _pairs_inter_union(ov, np.concatenate(chosen))


def _pairs_inter_union(ov: Overlap, pairs: np.ndarray) -> tuple[int, int]:
    """AJI-style totals for chosen pairs: their intersections; their unions plus every unpaired object's area."""
    inter = ov.inter[pairs]
    ti, pi = ov.ti[pairs], ov.pi[pairs]
    union = int((ov.true_area[ti] + ov.pred_area[pi] - inter).sum())
    true_paired = np.zeros(ov.true_area.size, dtype=bool)
    true_paired[ti] = True
    pred_paired = np.zeros(ov.pred_area.size, dtype=bool)
    pred_paired[pi] = True
    union += int(ov.true_area[~true_paired].sum() + ov.pred_area[~pred_paired].sum())
    return int(inter.sum()), union


def _counts(ov: Overlap) -> dict[str, Any]:
    tp, iou_sum = _detection_counts(ov)
    aji_inter, aji_union = _aji_counts(ov)
    ajip_inter, ajip_union = _aji_plus_counts(ov)
    fn_missed, fn_merged = _unmatched_counts(ov)
    return {
        "pixel_tp": ov.pixel["tp"],
        "pixel_fp": ov.pixel["fp"],
        "pixel_fn": ov.pixel["fn"],
        "pixel_tn": ov.pixel["tn"],
        "n_true": int(ov.true_area.size),
        "n_pred": int(ov.pred_area.size),
        "tp": tp,
        "iou_sum": iou_sum,
        "aji_inter": aji_inter,
        "aji_union": aji_union,
        "aji_plus_inter": ajip_inter,
        "aji_plus_union": ajip_union,
        "fn_missed": fn_missed,
        "fn_merged": fn_merged,
    }


def _scores(c: Mapping[str, Any]) -> dict[str, float]:
    """All scores from (per-image or summed) raw counts; one place for the empty-image conventions."""
    n_true, n_pred, tp = c["n_true"], c["n_pred"], c["tp"]
    fp, fn = n_pred - tp, n_true - tp
    empty = n_true == 0 and n_pred == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty)
    sq = _ratio(c["iou_sum"], tp, empty)
    return {
        "dice": dice_from_confusion({"tp": c["pixel_tp"], "fp": c["pixel_fp"], "fn": c["pixel_fn"]}),
        "count_ape": count_ape(n_pred, n_true),
        "precision": _ratio(tp, n_pred, empty),
        "recall": _ratio(tp, n_true, empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
        "aji": _ratio(c["aji_inter"], c["aji_union"], empty),
        "aji_plus": _ratio(c["aji_plus_inter"], c["aji_plus_union"], empty),
        # shares of the true nuclei left unmatched for each reason (_unmatched_counts); 0 without true nuclei
        "missed": c["fn_missed"] / n_true if n_true else 0.0,
        "merged": c["fn_merged"] / n_true if n_true else 0.0,
        # the rest of the unmatched: found, but cut or drawn so that no prediction reaches IoU 0.5 with them
        "misdrawn": (fn - c["fn_missed"] - c["fn_merged"]) / n_true if n_true else 0.0,
    }


def iou_matrix(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense IoU matrix (n_true, n_pred) of all object pairs, with the true and pred ids of its rows/columns."""
    ov = overlap(pred, true)
    return ov.iou_matrix(), ov.true_ids, ov.pred_ids


def detection_scores(pred: Any, true: Any) -> dict[str, float]:
    """Object detection at IoU > 0.5 (unique matching): tp, fp, fn, precision, recall, f1."""
    ov = overlap(pred, true)
    tp, _ = _detection_counts(ov)
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    empty = n_true == 0 and n_pred == 0
    return {
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_true - tp,
        "precision": _ratio(tp, n_pred, empty),
        "recall": _ratio(tp, n_true, empty),
        "f1": _ratio(2 * tp, n_pred + n_true, empty),
    }


def panoptic_quality(pred: Any, true: Any) -> dict[str, float]:
    """Panoptic quality (Kirillov et al. 2019) at IoU > 0.5: pq = dq * sq."""
    s = _scores(_counts(overlap(pred, true)))
    return {"pq": s["pq"], "dq": s["dq"], "sq": s["sq"]}


def aji(pred: Any, true: Any) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017)."""
    ov = overlap(pred, true)
    inter, union = _aji_counts(ov)
    return _ratio(inter, union, both_empty=True)


def aji_plus(pred: Any, true: Any) -> float:
    """AJI+ (Graham et al. 2019, HoVer-Net): AJI with one-to-one (Hungarian) pairing, no pred counted twice."""
    ov = overlap(pred, true)
    inter, union = _aji_plus_counts(ov)
    return _ratio(inter, union, both_empty=True)


def instance_metrics(pred: Any, true: Any) -> dict[str, Any]:
    """Every metric of one image from one contingency table: raw counts (COUNT_KEYS, fp, fn) and SCORE_KEYS."""
    counts = _counts(overlap(pred, true))
    counts["fp"] = counts["n_pred"] - counts["tp"]
    counts["fn"] = counts["n_true"] - counts["tp"]
    return {**counts, **_scores(counts)}


# -------------------------------------------------------------------------------------------- aggregation
def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = [k for k in rows[0] if k not in ("name", "organ") and isinstance(rows[0][k], (int, float))]
    mean = {}
    for k in keys:
        v = np.array([float(r[k]) for r in rows])
        v = v[~np.isnan(v)]
        mean[k] = float(v.mean()) if v.size else math.nan
    totals = {k: sum(r[k] for r in rows) for k in COUNT_KEYS}
    return {"n_images": len(rows), "mean": mean, "pooled": _scores(totals)}


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-image ``instance_metrics`` rows, each optionally carrying "name" and "organ" (without them:
    the row's position, zero-padded so that rows keep their order, and one organ "all").

    Returns {"n_images", "mean", "pooled", "per_organ": {organ: {"n_images", "mean", "pooled"}}, "per_image"}:
    "mean" averages each numeric key over images (NaN skipped), "pooled" recomputes the scores from counts summed
    over the images (dataset-level Dice, F1, PQ, AJI, ...), "per_image" is the rows sorted by name.
    """
    rows = list(rows)
    rows = [{"name": f"{i:0{len(str(len(rows)))}d}", "organ": "all", **r} for i, r in enumerate(rows)]
    rows = sorted(rows, key=lambda r: str(r["name"]))
    if not rows:
        raise ValueError("summarize: no per-image rows to aggregate")
    missing = [k for k in COUNT_KEYS if k not in rows[0]]
    if missing:
        raise ValueError(f"summarize: rows must be instance_metrics() dicts; missing keys {missing}")
    organs: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        organs.setdefault(str(r["organ"]), []).append(r)
    return {
        **_summary(rows),
        "per_organ": {o: _summary(rs) for o, rs in sorted(organs.items())},
        "per_image": [dict(r) for r in rows],
    }


# ------------------------------------------------------------------------------------------ ignite wrapper
def _images(x: Any) -> list[Any]:
    """Split a batch into 2-D label maps: (H,W), (1,H,W), (B,H,W), (B,1,H,W), or lists of any of these."""
    if isinstance(x, (list, tuple)):
        return [img for item in x for img in _images(item)]
    if x.ndim == 2:
        return [x]
    if x.ndim < 2:
        raise ValueError(f"expected label maps of at least 2 dimensions, got shape {tuple(x.shape)}")
    return [img for item in x for img in _images(item)]


class InstanceMetric(Metric):
    """Mean over images of one ``instance_metrics`` value, as an ignite Metric (works in MONAI evaluators).

    ``name`` is any key of ``instance_metrics`` ("aji", "aji_plus", "pq", "dq", "sq", "f1", "precision",
    "recall", "dice", "count_ape", ...). Each engine output gives (y_pred, y) instance label maps, torch or numpy,
    shaped (B,1,H,W), (B,H,W), (1,H,W), (H,W) or lists of such; images whose value is NaN (``count_ape`` with an
    empty truth) are skipped. Sum and count are reduced across processes in distributed runs.

    In a MONAI ``SupervisedEvaluator`` whose postprocessing writes "pred_inst" (e.g. ``InstancesFromProbsd``)::

        from monai.handlers import from_engine

        pairs = from_engine(["pred_inst", "label_inst"])
        evaluator = SupervisedEvaluator(
            ...,
            key_val_metric={"val_aji": InstanceMetric("aji", output_transform=pairs)},
            additional_metrics={"val_pq": InstanceMetric("pq", output_transform=pairs)},
        )

    ("label_inst" must reach engine.state.output, e.g. copied there by a CopyItemsd in the postprocessing.)
    """

    def __init__(
        self,
        name: str = "aji",
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | torch.device = "cpu",
        skip_unrolling: bool = False,
        groups: Sequence[str] | None = None,
    ) -> None:
        if name not in METRIC_NAMES:
            raise ValueError(f"InstanceMetric: unknown metric {name!r}; choose one of {METRIC_NAMES}")
        self.name = name
        # with groups (e.g. data sources) each output carries a third item naming the image's group, and the
        # result is the mean of the groups' means, so a source with many tiles does not outvote the others
        self.groups = list(groups) if groups else None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=skip_unrolling)

    @reinit__is_reduced
    def reset(self) -> None:
        n = len(self.groups) if self.groups else 1
        self._sum = torch.zeros(n, dtype=torch.float64, device=self._device)
        self._num = torch.zeros(n, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        preds, trues = _images(output[0]), _images(output[1])
        if len(preds) != len(trues):
            raise ValueError(f"InstanceMetric: {len(preds)} predicted maps but {len(trues)} true maps in a batch")
        if self.groups:
            names = output[2]
            names = [names] if isinstance(names, str) else list(names)
            if len(names) != len(preds):
                raise ValueError(f"InstanceMetric: {len(preds)} maps but {len(names)} group names in a batch")
            index = [self.groups.index(str(n)) for n in names]
        else:
            index = [0] * len(preds)
        for p, t, i in zip(preds, trues, index):
            value = float(instance_metrics(p, t)[self.name])
            if not math.isnan(value):
                self._sum[i] += value
                self._num[i] += 1

    @sync_all_reduce("_sum", "_num")
    def compute(self) -> float:
        seen = self._num > 0
        if not bool(seen.any()):
            raise NotComputableError(f"InstanceMetric({self.name!r}) needs at least one image with a defined value")
        return float((self._sum[seen] / self._num[seen]).mean().item())
