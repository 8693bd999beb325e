"""Where a trained network errs on its own training tiles, so that training can centre patches there.

``error_map`` marks the pixels of every true nucleus that no prediction matches at IoU > 0.5 (missed, merged or
misdrawn) and of every prediction that matches no true nucleus. In sparsely annotated tiles a prediction that
touches no annotated nucleus may be an unannotated one, so it is not marked. ``write_error_maps`` makes one map per
training tile from an evaluation's instance maps::

    nucleiseg evaluate --bundle B --split training --rescans "{}" --output_dir runs/train_eval
    python -m nucleiseg_monai.hard_examples --bundle B --predictions runs/train_eval --output runs/errors

and training with ``--hard_examples 0.5 --hard_examples_dir runs/errors`` centres half of the patches it cuts from a
tile with marked pixels on one of them (``transforms.LoadErrorMapd``, ``transforms.RandErrorCropd``). A large
nucleus has more pixels and so is drawn more often than a small one: the large pale nuclei the model misses weigh
most.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .data import read_instance_labels
from .metrics import MATCH_IOU, overlap

logger = logging.getLogger(__name__)


def error_map(pred: np.ndarray, true: np.ndarray, sparse: bool = False) -> np.ndarray:
    """Boolean map of the nuclei a prediction gets wrong: true nuclei without a match at IoU > 0.5 and predictions
    without one; with ``sparse``, only predictions that overlap an annotated nucleus count."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"error_map: prediction {pred.shape} and truth {true.shape} differ in shape")
    ov = overlap(pred, true)
    matched = ov.iou > MATCH_IOU
    wrong_true = np.setdiff1d(ov.true_ids, ov.true_ids[ov.ti[matched]])
    candidates = ov.pred_ids[np.unique(ov.pi)] if sparse else ov.pred_ids
    wrong_pred = np.setdiff1d(candidates, ov.pred_ids[ov.pi[matched]])
    return np.isin(true, wrong_true) | np.isin(pred, wrong_pred)


def error_map_path(folder: str | os.PathLike, record: dict) -> Path:
    """Where a tile's map lies: ``<folder>/<source>/<name>.png``, as evaluation names its instance maps."""
    return Path(folder) / str(record["source"]).replace("/", "_") / f"{record['name']}.png"


def write_error_maps(records: list[dict], predictions: str | os.PathLike, output: str | os.PathLike) -> dict:
    """One PNG (0 or 255) per record from ``<predictions>/<source>/<name>.tif`` against the record's labels, on the
    file's own grid. Returns {source: {"tiles": n, "marked": share of pixels marked}}."""
    import tifffile
    from PIL import Image

    summary: dict[str, dict] = {}
    for r in records:
        source = str(r["source"])
        pred_file = error_map_path(predictions, r).with_suffix(".tif")
        if not pred_file.is_file():
            raise FileNotFoundError(f"{pred_file}: no prediction for training tile {r['name']!r}; make them with "
                                    "nucleiseg evaluate --split training --rescans \"{}\" --output_dir "
                                    f"{predictions}")
        true = read_instance_labels(r["label"], r.get("label_kind", "instance"))
        pred = tifffile.imread(pred_file)
        if pred.shape != true.shape:
            raise ValueError(f"{pred_file}: {pred.shape} against the labels' {true.shape} ({r['label']}); "
                             "the predictions must be an evaluation's, on each file's own grid")
        errors = error_map(pred, true, bool(r.get("sparse", False)))
        out = error_map_path(output, r)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Image.fromarray(errors.astype(np.uint8) * 255).save(tmp, format="PNG")
        row = summary.setdefault(source, {"tiles": 0, "pixels": 0, "marked": 0})
        row["tiles"] += 1
        row["pixels"] += errors.size
        row["marked"] += int(errors.sum())
    return {s: {"tiles": v["tiles"], "marked": round(v["marked"] / v["pixels"], 4)} for s, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    from .sources import bundle_records

    parser = argparse.ArgumentParser(prog="python -m nucleiseg_monai.hard_examples",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="the bundle whose training tiles were predicted")
    parser.add_argument("--predictions", required=True,
                        help="an evaluation's output folder of the training split (<source>/<name>.tif)")
    parser.add_argument("--output", required=True, help="folder for the maps (<source>/<name>.png)")
    parser.add_argument("--data_root", help="the datasets' folder (default: the bundle's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records, _ = bundle_records(args.bundle, args.data_root, split="training", rescans={})
    records = [r for r in records if r["part"] == "training"]
    for source, row in write_error_maps(records, args.predictions, args.output).items():
        logger.info("%s: %d tiles, %.1f%% of pixels marked", source, row["tiles"], 100 * row["marked"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
