"""How much a bundle's accuracy moves when the same tissue is stained lighter, darker or in other proportions.

Other labs stain differently from the three sources the models learnt from, and no tile of such a lab is at hand.
This script makes the differences: every validation tile of every source is restained (``transforms.restain``:
each stain's concentration in Ruifrok and Johnston's haematoxylin-eosin-DAB optical densities multiplied by a
fixed factor), written as a TIFF stating its source's pixel size, segmented by the bundle's predictor exactly as
``nucleiseg predict`` runs it, and scored against its truth. Training's stain jitter varies each concentration by
up to 5% (``stain_jitter``); the shifts here are 30%. Per shift: each source's mean AJI and recall over its tiles,
and the mean over the sources; ``--checkpoint`` scores other weights with the bundle's config.

    python benchmarks/stain_shift.py [--bundle bundles/nuclei_unet_small] [--checkpoint runs/x/models/model.pt]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scale_20x import REPO, write_tile

from nucleiseg_monai.atomic import write_json_atomic
from nucleiseg_monai.data import read_image, read_instance_labels
from nucleiseg_monai.inference import SlidePredictor
from nucleiseg_monai.metrics import instance_metrics
from nucleiseg_monai.sources import bundle_records
from nucleiseg_monai.transforms import restain

# name: (haematoxylin, eosin, DAB) concentration factors
SHIFTS = {
    "as scanned": (1.0, 1.0, 1.0),
    "haematoxylin 0.7x": (0.7, 1.0, 1.0),
    "haematoxylin 1.3x": (1.3, 1.0, 1.0),
    "eosin 0.7x": (1.0, 0.7, 1.0),
    "eosin 1.3x": (1.0, 1.3, 1.0),
    "both 0.7x": (0.7, 0.7, 1.0),
    "both 1.3x": (1.3, 1.3, 1.0),
}
KEYS = ("aji", "recall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/nuclei_unet_small")
    parser.add_argument("--checkpoint", default=None, help="weights to score (default: the bundle's)")
    parser.add_argument("--data_root", default=None, help="folder holding the sources (default: as the bundle's)")
    parser.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "stain_shift.json")
    args = parser.parse_args()
    records, _ = bundle_records(args.bundle, args.data_root, split="validation", rescans={})
    sources = sorted({r["source"] for r in records})
    overrides = {} if args.checkpoint is None else {"checkpoint": str(Path(args.checkpoint).resolve())}
    predictor = SlidePredictor.from_bundle(args.bundle, progress=False, **overrides)
    truths = {f"{r['source']}__{r['name']}": read_instance_labels(r["label"], r.get("label_kind", "instance"))
              for r in records}
    images = {f"{r['source']}__{r['name']}": read_image(r["image"]).transpose(2, 0, 1) for r in records}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shift in args.shifts:
            inputs, outputs = Path(tmp, "in", shift), Path(tmp, "out", shift)
            inputs.mkdir(parents=True)
            for r in records:
                name = f"{r['source']}__{r['name']}"
                shifted = restain(images[name], SHIFTS[shift]).round().byte().numpy().transpose(1, 2, 0)
                write_tile(inputs / f"{name}.tif", np.ascontiguousarray(shifted), r["mpp"])
            summary = predictor.run(inputs, outputs)
            if not summary.ok:
                raise SystemExit(f"{len(summary.failed)} tile(s) failed: {summary.failed[:3]}")
            rows: dict[str, list[dict]] = {s: [] for s in sources}
            for name, truth in truths.items():
                rows[name.split("__")[0]].append(instance_metrics(tifffile.imread(outputs / f"{name}.labels.tif"),
                                                                  truth))
            per_source = {s: {k: round(float(np.mean([row[k] for row in rows[s]])), 4) for k in KEYS} for s in sources}
            mean = {k: round(float(np.mean([per_source[s][k] for s in sources])), 4) for k in KEYS}
            results[shift] = {"sources": per_source, "mean": mean}
            print(f"{shift:18s} AJI mean {mean['aji']:.3f}  " + "  ".join(
                f"{s} {per_source[s]['aji']:.3f}/{per_source[s]['recall']:.3f}" for s in sources), flush=True)
    write_json_atomic({"bundle": args.bundle, "checkpoint": args.checkpoint or "the bundle's", "split": "validation",
                       "tiles": {s: sum(r["source"] == s for r in records) for s in sources},
                       "shifts": {s: SHIFTS[s] for s in args.shifts}, "results": results,
                       "settings": predictor.settings()}, args.output)
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
