"""Accuracy cost of the bundle's fast inference settings: the same weights in plain float32 vs as configured.

Runs the bundle's predictor (``SlidePredictor.from_bundle``) twice over every source's held-out tiles (CryoNuSeg
test, MoNuSeg validation, NuInsSeg's test organ groups, as ``models/datalist.json`` holds them), once as configured
(its runtime, int8 or bf16, channels-last), once in plain float32 (eager torch), both with the bundle's windows, each
file at its source's pixel size; prints each source's means of pixel Dice, AJI, PQ and
count error for both and their difference (target: Dice, AJI and PQ within 0.01 on every source), and writes them to
a JSON file (default ``benchmarks/results/fast_vs_float32_<bundle>.json``).

    python benchmarks/fast_vs_float32.py --bundle bundles/nuclei_unet_small [--data_root ../shared/datasets]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg_monai.atomic import write_json_atomic
from nucleiseg_monai.inference import SlidePredictor
from nucleiseg_monai.metrics import instance_metrics
from nucleiseg_monai.sources import bundle_records

REPO = Path(__file__).resolve().parents[1]
KEYS = ("dice", "aji", "pq", "count_ape")
TARGET = 0.01  # largest allowed loss of Dice, AJI and PQ
FLOAT32 = {"amp": False, "int8": False, "channels_last": False, "runtime": "eager"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/nuclei_unet_small")
    parser.add_argument("--data_root", default=None, help="folder holding the sources (default: as the bundle's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/fast_vs_float32_<bundle>.json)")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    output = args.output or REPO / "benchmarks" / "results" / f"fast_vs_float32_{bundle.resolve().name}.json"
    records, _ = bundle_records(bundle, args.data_root)
    sources = sorted({r["source"] for r in records})
    results: dict[str, dict] = {name: {} for name in ("float32", "bundle settings")}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            mine = [r for r in records if r["source"] == source]
            inputs = Path(tmp, source)
            inputs.mkdir()
            for r in mine:
                (inputs / Path(r["image"]).name).symlink_to(Path(r["image"]).resolve())
            for name, overrides in (("float32", FLOAT32), ("bundle settings", {})):
                out = Path(tmp, f"{source}_{name.replace(' ', '_')}")
                # files that state no pixel size are read at their source's (a file's own tags win)
                predictor = SlidePredictor.from_bundle(bundle, progress=False, input_mpp=mine[0]["mpp"], **overrides)
                summary = predictor.run(inputs, out)
                if not summary.ok:
                    raise SystemExit(f"{len(summary.failed)} tile(s) failed: {summary.failed[:3]}")
                rows = [instance_metrics(tifffile.imread(out / f"{Path(r['image']).stem}.labels.tif"),
                                         tifffile.imread(r["label"])) for r in mine]
                results[name][source] = {k: float(np.mean([row[k] for row in rows])) for k in KEYS}
    difference = {s: {k: results["bundle settings"][s][k] - results["float32"][s][k] for k in KEYS} for s in sources}
    for source in sources:
        for name in results:
            print(f"{source:18s} {name:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in results[name][source].items()))
        print(f"{source:18s} difference       " + "  ".join(f"{k} {v:+.4f}" for k, v in difference[source].items()))
    within = all(abs(difference[s][k]) <= TARGET for s in sources for k in ("dice", "aji", "pq"))
    print(f"Dice, AJI and PQ within {TARGET} of float32 on every source: {'yes' if within else 'NO'}")
    report = {"bundle": str(bundle), "tiles": {s: sum(r["source"] == s for r in records) for s in sources},
              "float32_overrides": FLOAT32, "means": results, "difference": difference, "target": TARGET,
              "within_target": within}
    write_json_atomic(report, output)
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
