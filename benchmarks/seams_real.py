"""Seams with the shipped network: a real-tissue image analysed in regions against in one region.

The seam test (``tests/test_inference.py``) shows that stitching and the watershed are exact with a network that
sees one pixel. A real network sees about 180 px; each region is read with a 128 px margin, so its outputs inside a
core should match a whole-image run's, up to floating-point sums that differ with the size of the input (and, for
int8, its quantised arithmetic). This measures what is left: the bundle's predictor over the speed benchmark's
real-tissue mosaic (CryoNuSeg's tiles side by side, 0.25 um/px) with its default regions and with one region
covering the image, as shipped and in plain float32. Reported per runtime: nuclei in each run, nuclei matched
pixel for pixel, nuclei that differ, and differing pixels by distance to the nearest seam.

    python benchmarks/seams_real.py --bundle bundles/nuclei_unet_small        # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOAT32 = {"amp": False, "int8": False, "channels_last": False, "runtime": "eager"}
BANDS = (4, 16, 64)  # px from the nearest seam


def compare(regions: np.ndarray, whole: np.ndarray, size: int) -> dict:
    """Nuclei of the region-wise map against the one-region map: equal pixel sets, and where the rest differ."""
    a, b = regions.astype(np.int64), whole.astype(np.int64)
    pairs, counts = np.unique(a * (b.max() + 1) + b, return_counts=True)
    ia, ib = pairs // (b.max() + 1), pairs % (b.max() + 1)
    area_a, area_b = np.bincount(a.ravel()), np.bincount(b.ravel())
    same = (ia > 0) & (ib > 0) & (counts == area_a[ia]) & (counts == area_b[ib])
    equal_ids = np.zeros(area_a.size, bool)
    equal_ids[ia[same]] = True
    differing = ~(((a == 0) & (b == 0)) | equal_ids[a])
    rows, cols = np.nonzero(differing)
    seam = np.minimum(_to_seam(rows, size), _to_seam(cols, size))
    bands = {f"within_{d}px": int((seam < d).sum()) for d in BANDS}
    return {"nuclei_regions": int(a.max()), "nuclei_whole": int(b.max()), "nuclei_equal": int(same.sum()),
            "differing_pixels": int(differing.sum()), "differing_pixels_by_seam_distance": bands,
            "farthest_differing_pixel_from_a_seam": int(seam.max()) if seam.size else None}


def _to_seam(x: np.ndarray, size: int) -> np.ndarray:
    """Distance of coordinate x to the nearest region boundary strictly inside the image (multiples of size)."""
    r = x % size
    return np.minimum(r, size - r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--size", type=int, default=2560, help="side of the mosaic in px (default 2560: 3 x 3 regions)")
    parser.add_argument("--cryonuseg", default=str(REPO.parent / "shared" / "datasets" / "cryonuseg"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "seams_real.json"))
    args = parser.parse_args(argv)

    from benchmarks.speed.inputs import cryonuseg_image
    from nucleiseg_monai.atomic import write_json_atomic
    from nucleiseg_monai.inference import SlidePredictor

    report = {"command": "python benchmarks/seams_real.py " + " ".join(argv or sys.argv[1:]), "bundle": args.bundle,
              "size": args.size, "runtimes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, _ = cryonuseg_image(Path(args.cryonuseg), args.size, work)
        for runtime, overrides in (("as shipped", {}), ("float32", FLOAT32)):
            predictor = SlidePredictor.from_bundle(args.bundle, progress=False, overwrite=True, **overrides)
            size = predictor.planner.region_size
            maps = []
            for name, region_size in (("regions", size), ("whole", args.size)):
                predictor.planner.region_size = region_size
                out = work / f"{runtime}_{name}".replace(" ", "_")
                predictor.predict_slide(image.path, out)
                maps.append(tifffile.imread(out / f"{image.path.stem}.labels.tif"))
            row = {"region_size": size, **compare(*maps, size)}
            report["runtimes"][runtime] = row
            print(f"{runtime:10s} {json.dumps(row)}", flush=True)
    write_json_atomic(report, Path(args.output))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
