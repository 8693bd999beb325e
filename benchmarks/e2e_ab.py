"""End to end, the bundle's predictor as shipped against variants of it, run alternately on one image.

Alternating runs (shipped, variant 1, ..., shipped, ...) after one warm-up run each put every variant under the same
neighbours on a shared machine, where the speed benchmark's single series of runs per setting can disagree by a
fifth between runs. The image is the speed benchmark's real-tissue mosaic (CryoNuSeg's tiles laid side by side, as
a pyramidal BigTIFF at 0.25 um/px). Variants are keywords of ``SlidePredictor.from_bundle`` (config ids included):

    python benchmarks/e2e_ab.py --bundle bundles/nuclei_unet_small --rounds 4 \\
        --variants '{"windows": {"roi_size": 256, "region_size": 1792},
                     "narrow": {"checkpoint": "runs/narrow/models/model.pt", "network_def#features": [8,16,32,64,128]}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.speed.inputs import add_mosaic_arguments, cryonuseg_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mosaic_arguments(parser)
    parser.add_argument("--variants", required=True, help="JSON: name -> from_bundle keywords")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating (default 3)")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.speed.common import rate, ratio
    from benchmarks.speed.end_to_end import timed_runs
    from nucleiseg_monai.inference import SlidePredictor

    torch.set_num_threads(args.threads)
    variants = {"shipped": {}, **json.loads(args.variants)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, _ = cryonuseg_image(Path(args.cryonuseg), args.size, work)
        predictors = {name: SlidePredictor.from_bundle(args.bundle, progress=False, overwrite=True, **keywords)
                      for name, keywords in variants.items()}
        for name, predictor in predictors.items():  # warm-up: every region shape once, outside the timing
            predictor.predict_slide(image.path, work / name)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, predictor in predictors.items():
                seconds[name] += timed_runs(predictor, predictor.network.device, image, work / name, 1)[0]
    mp = args.size * args.size / 1e6
    figures = {name: {"overrides": variants[name], **rate(mp, s, "mp"), "seconds": [round(x, 3) for x in s]}
               for name, s in seconds.items()}
    for name, f in figures.items():
        f["x_shipped"] = ratio(f["mp_per_s"], figures["shipped"]["mp_per_s"])
        print(f"{name:24s} {f['mp_per_s']:.3f} MP/s (median of {args.rounds}: {f['seconds']} s), "
              f"{f['x_shipped']:.2f}x shipped")
    if args.output:
        Path(args.output).write_text(json.dumps({"bundle": args.bundle, "image": f"cryonuseg mosaic {args.size} px",
                                                 "rounds": args.rounds, "threads": args.threads,
                                                 "variants": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
