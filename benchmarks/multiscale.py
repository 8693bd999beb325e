"""Do the nuclei the model misses appear when the network sees the tissue at a coarser scale?

Large pale nuclei are the share of true nuclei the model misses most (the model card's Results). If they were
missed because a nucleus is large for the network's view, a second pass at a coarser working scale, where it looks
as small as the nuclei the network finds, would find them. This script runs the bundle's evaluation on the
validation tiles twice, at the working pixel size and at ``--factor`` times it (``--working_mpp``: the same weights,
watershed and tiles), and reports per source:

* each pass's AJI and recall;
* ``found_coarse``: of the true nuclei the first pass leaves unmatched (no prediction with IoU > 0.5), the share the
  coarse pass matches;
* the union: the first pass's nuclei, plus each coarse-pass nucleus of which at most ``--overlap`` of the pixels
  lie on them, drawn on the pixels no first-pass nucleus holds.

    python benchmarks/multiscale.py --out runs/multiscale [--bundle bundles/nuclei_unet_small] [--factor 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from training_options import REPO, nucleiseg

sys.path.insert(0, str(REPO))

from nucleiseg_monai.atomic import write_json_atomic  # noqa: E402
from nucleiseg_monai.data import read_instance_labels  # noqa: E402
from nucleiseg_monai.metrics import MATCH_IOU, instance_metrics, overlap  # noqa: E402
from nucleiseg_monai.sources import bundle_records  # noqa: E402


def evaluate(bundle: Path, folder: Path, mpp: float) -> None:
    """The bundle's validation evaluation at working pixel size ``mpp``, its label maps kept in ``folder``."""
    if not (folder / "metrics.json").exists():
        nucleiseg("evaluate", "--bundle", str(bundle), "--split", "validation", "--output_dir", repr(str(folder)),
                  "--rescans", "{}", "--working_mpp", repr(mpp), log=folder.parent / f"{folder.name}.log")


def union(fine: np.ndarray, coarse: np.ndarray, max_overlap: float) -> np.ndarray:
    """``fine``'s nuclei, plus every ``coarse`` nucleus with at most ``max_overlap`` of its pixels on them, drawn on
    the pixels ``fine`` leaves free (new ids after fine's)."""
    area = np.bincount(coarse.ravel())
    covered = np.bincount(coarse.ravel(), weights=fine.ravel() > 0, minlength=area.size)
    added = np.flatnonzero((area > 0) & (covered <= max_overlap * area))
    added = added[added > 0]
    out = fine.astype(np.int64)
    free = np.isin(coarse, added) & (fine == 0)
    out[free] = coarse[free].astype(np.int64) + int(fine.max(initial=0))
    return out


def found_by(coarse: np.ndarray, fine: np.ndarray, true: np.ndarray) -> tuple[int, int]:
    """(true nuclei unmatched in ``fine``, of those matched in ``coarse``): a match is IoU > MATCH_IOU."""
    def matched(pred: np.ndarray) -> np.ndarray:
        ov = overlap(pred, true)
        hit = np.zeros(ov.true_area.size, bool)
        hit[ov.ti[ov.iou > MATCH_IOU]] = True
        return hit

    missed = ~matched(fine)
    return int(missed.sum()), int((missed & matched(coarse)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--out", required=True, help="folder for both evaluations' reports and label maps")
    parser.add_argument("--factor", type=float, default=2.0, help="the coarse pass's pixel size over the working one")
    parser.add_argument("--overlap", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "multiscale.json"))
    args = parser.parse_args()
    bundle, out = Path(args.bundle).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records, working = bundle_records(bundle, split="validation", rescans={})
    passes = {"working": working, "coarse": working * args.factor}
    for name, mpp in passes.items():
        evaluate(bundle, out / name, mpp)

    per_source: dict[str, list[dict]] = {}
    for r in records:
        true = read_instance_labels(r["label"], r.get("label_kind", "instance"))
        fine, coarse = (tifffile.imread(out / name / r["source"] / f"{r['name']}.tif") for name in passes)
        row = {name: instance_metrics(labels, true) for name, labels in (("working", fine), ("coarse", coarse))}
        for f in args.overlap:
            row[f"union_{f}"] = instance_metrics(union(fine, coarse, f), true)
        row["missed"], row["found_coarse"] = found_by(coarse, fine, true)
        per_source.setdefault(r["source"], []).append(row)

    variants = ["working", "coarse", *(f"union_{f}" for f in args.overlap)]
    sources = {}
    for source, rows in per_source.items():
        sources[source] = {v: {k: round(float(np.mean([row[v][k] for row in rows])), 4) for k in ("aji", "recall")}
                           for v in variants}
        missed = sum(row["missed"] for row in rows)
        sources[source]["missed_by_working"] = missed
        sources[source]["found_coarse"] = round(sum(row["found_coarse"] for row in rows) / max(missed, 1), 4)
    mean = {v: round(float(np.mean([s[v]["aji"] for s in sources.values()])), 4) for v in variants}
    for source, s in sources.items():
        print(f"{source:18s} " + "  ".join(f"{v} {s[v]['aji']:.3f}/{s[v]['recall']:.3f}" for v in variants)
              + f"  missed {s['missed_by_working']}, found at the coarse scale {s['found_coarse']:.3f}")
    print("mean AJI " + "  ".join(f"{v} {a:.3f}" for v, a in mean.items()))
    named = bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle
    write_json_atomic({"bundle": str(named), "split": "validation", "working_mpp": working, "coarse_mpp":
                       passes["coarse"], "overlap": args.overlap, "sources": sources, "mean_aji": mean,
                       "method": __doc__.split("\n\n")[1].replace("\n", " ")}, Path(args.output))


if __name__ == "__main__":
    main()
