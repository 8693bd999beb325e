"""How much a bundle's accuracy moves when a file's stated pixel size is off by a few percent.

A scanner's calibration, a file converted without its tags, a slide stated at 40x that is 0.26 um/px: the
predictor resamples each file from the pixel size it states, so a wrong one shows the network every nucleus larger
or smaller than it learnt them. This script runs the bundle's validation evaluation with its working pixel size
multiplied by each ``--factors`` value (the same weights, watershed and tiles, scored on each tile's own grid):
working at 1.08x shows the network nuclei 8% smaller, as a file stating a pixel size 8% smaller than its true one
does (0.25 um/px stated by a 0.27 um/px scanner); below 1, a file stating too large a pixel size. Training's
``scale_jitter`` is what should keep these figures level. Per factor: each source's mean AJI and recall, and the
mean over the sources; ``--checkpoint`` scores other weights with the bundle's config.

    python benchmarks/scale_error.py --out runs/scale_error [--bundle bundles/nuclei_unet_small] \\
        [--checkpoint runs/x/models/model.pt] [--factors 0.85 0.92 1 1.08 1.15]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from training_options import REPO, SOURCES, nucleiseg, scored_with

sys.path.insert(0, str(REPO))

from nucleiseg_monai.atomic import write_json_atomic  # noqa: E402

KEYS = ("aji", "recall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--checkpoint", default=None, help="weights to score (default: the bundle's)")
    parser.add_argument("--out", required=True, help="folder for the evaluations' reports (resumable)")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.85, 0.92, 1.0, 1.08, 1.15])
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/scale_error.json for the "
                        "bundle's weights, OUT/scale_error.json for --checkpoint)")
    args = parser.parse_args()
    bundle, out = Path(args.bundle).resolve(), Path(args.out).resolve()
    output = Path(args.output) if args.output else (
        REPO / "benchmarks" / "results" / "scale_error.json" if args.checkpoint is None else out / "scale_error.json")
    weights = Path(args.checkpoint).resolve() if args.checkpoint else bundle / "models" / "model.pt"
    out.mkdir(parents=True, exist_ok=True)
    working = float(json.loads((bundle / "configs" / "metadata.json").read_text())["microns_per_pixel"])
    extra = [] if args.checkpoint is None else ["--checkpoint", repr(str(weights))]
    results = {}
    for factor in args.factors:
        folder = out / f"x{factor:g}"
        if not scored_with(folder / "metrics.json", weights):  # none yet, or of other weights: not taken for these
            nucleiseg("evaluate", "--bundle", str(bundle), "--split", "validation", "--output_dir", repr(str(folder)),
                      "--rescans", "{}", "--working_mpp", repr(round(working * factor, 6)), *extra,
                      log=out / f"x{factor:g}.log")
        report = json.loads((folder / "metrics.json").read_text())["sources"]
        per_source = {s: {k: round(report[s]["model"]["mean"][k], 4) for k in KEYS} for s in SOURCES}
        mean = {k: round(float(np.mean([per_source[s][k] for s in SOURCES])), 4) for k in KEYS}
        results[f"{factor:g}"] = {"sources": per_source, "mean": mean}
        print(f"x{factor:<5g} AJI mean {mean['aji']:.3f}  " + "  ".join(
            f"{s} {per_source[s]['aji']:.3f}/{per_source[s]['recall']:.3f}" for s in SOURCES), flush=True)
    named = bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle
    write_json_atomic({"bundle": str(named), "checkpoint": args.checkpoint or "the bundle's", "split": "validation",
                       "working_mpp": working, "results": results,
                       "method": __doc__.split("\n\n")[1].replace("\n", " ")}, output)
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
