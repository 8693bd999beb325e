"""Accuracy cost of the bundle's fast inference settings: the same weights in plain float32 vs as configured.

Runs the bundle's predictor (``SlidePredictor.from_bundle``) twice over the test split's tiles
(``models/datalist.json``), once with bf16, channels-last, its inference runtime (``predictor#runtime``) and window
settings, once in plain float32 with 512 px windows at 0.25 overlap, and prints the test means of pixel Dice, AJI, PQ and count error for both and their difference
(target: Dice, AJI and PQ within 0.01), and writes them to a JSON file (default
``benchmarks/results/fast_vs_float32_<bundle>.json``).

    python benchmarks/fast_vs_float32.py --bundle bundles/nuclei_unet_small --dataset_dir ../shared/datasets/cryonuseg
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg_monai.atomic import atomic_path
from nucleiseg_monai.data import resolve
from nucleiseg_monai.inference import SlidePredictor
from nucleiseg_monai.metrics import instance_metrics

REPO = Path(__file__).resolve().parents[1]
KEYS = ("dice", "aji", "pq", "count_ape")
TARGET = 0.01  # largest allowed loss of Dice, AJI and PQ
FLOAT32 = {"amp": False, "channels_last": False, "runtime": "eager", "roi_size": 512, "overlap": 0.25,
           "sw_batch_size": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/nuclei_unet_small")
    parser.add_argument("--dataset_dir", default="../shared/datasets/cryonuseg")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/fast_vs_float32_<bundle>.json)")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    output = args.output or REPO / "benchmarks" / "results" / f"fast_vs_float32_{bundle.resolve().name}.json"
    records = resolve(json.loads((bundle / "models" / "datalist.json").read_text()), args.dataset_dir, "test")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "in")
        inputs.mkdir()
        for r in records:
            (inputs / Path(r["image"]).name).symlink_to(Path(r["image"]).resolve())
        for name, overrides in (("float32", FLOAT32), ("bundle settings", {})):
            out = Path(tmp, name.replace(" ", "_"))
            summary = SlidePredictor.from_bundle(bundle, progress=False, **overrides).run(inputs, out)
            if not summary.ok:
                raise SystemExit(f"{len(summary.failed)} tile(s) failed: {summary.failed[:3]}")
            rows = [instance_metrics(tifffile.imread(out / f"{Path(r['image']).stem}.labels.tif"),
                                     tifffile.imread(r["label"])) for r in records]
            results[name] = {k: float(np.mean([row[k] for row in rows])) for k in KEYS}
    difference = {k: results["bundle settings"][k] - results["float32"][k] for k in KEYS}
    for name, figures in results.items():
        print(f"{name:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    print("difference       " + "  ".join(f"{k} {v:+.4f}" for k, v in difference.items()))
    within = all(abs(difference[k]) <= TARGET for k in ("dice", "aji", "pq"))
    print(f"Dice, AJI and PQ within {TARGET} of float32: {'yes' if within else 'NO'}")
    report = {"bundle": str(bundle), "split": "test", "tiles": len(records), "float32_overrides": FLOAT32,
              "means": results, "difference": difference, "target": TARGET, "within_target": within}
    with atomic_path(output) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
