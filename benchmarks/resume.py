"""An image killed halfway and run again: what the region journal keeps on disk, and what the second run costs.

On the speed benchmark's real-tissue mosaic (CryoNuSeg's tiles as a pyramidal BigTIFF at 0.25 um/px), the bundle's
predictor as shipped runs the whole image once (warm-up, every region shape), then once timed; then a run is killed
after ``--kill_at`` of its regions (the network raises, as a Ctrl-C or a cluster's time limit would stop it), the
journal's files are counted, and the same run goes on from them, timed. The outputs of the resumed run are compared
byte for byte with the uninterrupted run's:

    python benchmarks/resume.py --output benchmarks/results/resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUTPUTS = (".labels.tif", ".geojson", ".nuclei.csv", ".overlay.png")


class Killed(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    from benchmarks.speed.inputs import add_mosaic_arguments, cryonuseg_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mosaic_arguments(parser)
    parser.add_argument("--kill_at", type=float, default=0.5, help="share of the regions done before the kill")
    args = parser.parse_args(argv)

    import torch

    from nucleiseg_monai.inference import SlidePredictor

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, _ = cryonuseg_image(Path(args.cryonuseg), args.size, work)
        predictor = SlidePredictor.from_bundle(args.bundle, progress=False)
        predictor.predict_slide(image.path, work / "warm-up")
        start = time.perf_counter()
        whole = predictor.predict_slide(image.path, work / "whole")
        whole_s = time.perf_counter() - start

        kill_after = max(1, round(args.kill_at * whole.regions_processed))
        real, computed = predictor._predict_region, []

        def predict_region(plan, timings, ij):
            if len(computed) == kill_after:
                raise Killed
            computed.append(ij)
            return real(plan, timings, ij)

        predictor._predict_region = predict_region
        start = time.perf_counter()
        try:
            predictor.predict_slide(image.path, work / "resumed")
        except Killed:
            killed_s = time.perf_counter() - start
        journal = work / "resumed" / f".{whole.name}.regions"
        kept = sorted(journal.rglob("r*.npy.z"))
        kept_bytes = sum(p.stat().st_size for p in kept)

        computed.clear()
        kill_after = -1  # no more kills
        start = time.perf_counter()
        predictor.predict_slide(image.path, work / "resumed")
        resumed_s = time.perf_counter() - start
        identical = all((work / "resumed" / f"{whole.name}{s}").read_bytes() ==
                        (work / "whole" / f"{whole.name}{s}").read_bytes() for s in OUTPUTS)
        figures = {
            "bundle": os.path.relpath(args.bundle, REPO), "image": f"cryonuseg mosaic {args.size} px",
            "threads": args.threads,
            "region_size": predictor.planner.region_size, "regions": whole.regions_processed,
            "nuclei": whole.nuclei, "whole_run_s": round(whole_s, 2), "killed_after_regions": len(kept),
            "killed_run_s": round(killed_s, 2), "kept_mb": round(kept_bytes / 1e6, 2),
            "kept_kb_per_region": round(kept_bytes / 1e3 / max(1, len(kept)), 1),
            "resumed_run_s": round(resumed_s, 2), "regions_computed_on_resume": len(computed),
            "resumed_over_whole": round(resumed_s / whole_s, 3), "journal_left": journal.exists(),
            "outputs_identical": identical,
        }
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
