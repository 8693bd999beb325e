"""A 20x scan analysed at the model's 40x scale: CryoNuSeg's test tiles, and a copy of each as a scanner at 0.5 um/px
would give it (image downsampled with anti-aliasing, written as a TIFF whose resolution tags say 0.5 um/px), both
segmented by the bundle's predictor exactly as `nucleiseg predict` does (it resamples each file to the working
pixel size and maps the labels back), and each scored against its own truth (the copy's truth: the labels
downsampled by nearest neighbour). Issue target: the copy within 0.02 AJI of the originals.

    python benchmarks/scale_20x.py [--bundle bundles/nuclei_unet_small] [--data_root ../shared/datasets]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nucleiseg_monai.atomic import write_json_atomic  # noqa: E402
from nucleiseg_monai.data import read_image, read_instance_labels  # noqa: E402
from nucleiseg_monai.inference import SlidePredictor  # noqa: E402
from nucleiseg_monai.metrics import instance_metrics  # noqa: E402
from nucleiseg_monai.sources import bundle_records  # noqa: E402
from nucleiseg_monai.transforms import rescan_image, resample_labels  # noqa: E402

KEYS = ("aji", "pq", "dice", "recall", "f1")


def write_tile(path: Path, image: np.ndarray, mpp: float) -> None:
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--data_root", default=None, help="folder holding cryonuseg/ (default: as the bundle's)")
    parser.add_argument("--mpp", type=float, default=0.5, help="pixel size of the rescanned copy")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "scale_20x.json"))
    args = parser.parse_args()
    bundle = Path(args.bundle)
    records, working = bundle_records(bundle, args.data_root)
    records = [r for r in records if r["source"] == "cryonuseg"]
    predictor = SlidePredictor.from_bundle(bundle, progress=False)
    rows = {"original": [], "rescanned": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {name: tmp / name for name in rows}
        truths = {name: {} for name in rows}
        for folder in folders.values():
            folder.mkdir()
        for r in records:
            image, labels = read_image(r["image"]), read_instance_labels(r["label"])
            write_tile(folders["original"] / f"{r['name']}.tif", image, r["mpp"])
            copy = rescan_image(image, r["mpp"] / args.mpp)
            write_tile(folders["rescanned"] / f"{r['name']}.tif", copy, args.mpp)
            truths["original"][r["name"]] = labels
            truths["rescanned"][r["name"]] = resample_labels(torch.from_numpy(labels[None]), copy.shape[:2])[0].numpy()
        seconds = {}
        for name, folder in folders.items():
            start = time.perf_counter()
            summary = predictor.run(folder, tmp / f"{name}_out")
            seconds[name] = round(time.perf_counter() - start, 1)
            if summary.failed:
                raise SystemExit(f"{name}: {summary.failed}")
            for r in records:
                pred = tifffile.imread(tmp / f"{name}_out" / f"{r['name']}.labels.tif")
                row = instance_metrics(pred, truths[name][r["name"]])
                rows[name].append({"name": r["name"], **{k: float(row[k]) for k in KEYS}})
    means = {name: {k: float(np.mean([row[k] for row in rs])) for k in KEYS} for name, rs in rows.items()}
    result = {
        "bundle": str(bundle.relative_to(REPO) if bundle.resolve().is_relative_to(REPO) else bundle),
        "working_mpp": working, "rescanned_mpp": args.mpp, "tiles": len(records), "seconds": seconds,
        "mean": means,
        "difference_rescanned_minus_original": {k: means["rescanned"][k] - means["original"][k] for k in KEYS},
        "target": "rescanned AJI within 0.02 of the original",
        "met": abs(means["rescanned"]["aji"] - means["original"]["aji"]) <= 0.02,
        "per_tile": rows,
    }
    write_json_atomic(result, args.output)
    print(json.dumps({k: result[k] for k in ("mean", "difference_rescanned_minus_original", "met")}, indent=2))


if __name__ == "__main__":
    main()
