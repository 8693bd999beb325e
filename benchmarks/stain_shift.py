"""How much a bundle's accuracy moves when the same tissue is stained lighter, darker or in other proportions.

Other labs stain differently from the three sources the models learnt from, and no tile of such a lab is at hand.
This script makes the differences: every validation tile of every source is restained (``transforms.restain``:
each stain's concentration in Ruifrok and Johnston's haematoxylin-eosin-DAB optical densities multiplied by a
fixed factor), written as a TIFF stating its source's pixel size, segmented by the bundle's predictor exactly as
``nucleiseg predict`` runs it, and scored against its truth. Training's stain jitter varies each concentration by
up to 5% (``stain_jitter``); the shifts here are 30%. Per shift: each source's mean AJI and recall over its tiles,
and the mean over the sources; ``--checkpoint`` scores other weights with the bundle's config.

``--normalise`` measures stain normalisation at inference: each tile, restained or not, is normalised on its own by
MONAI's Macenko normaliser (``NormalizeHEStains``) to the stain matrix and 99th-percentile concentrations of the
training tiles, every source's pixels pooled in equal shares, before the predictor sees it.

    python benchmarks/stain_shift.py [--bundle bundles/nuclei_unet_small] [--checkpoint runs/x/models/model.pt]
    python benchmarks/stain_shift.py --normalise --output benchmarks/results/stain_shift_macenko.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from monai.apps.pathology.transforms.stain.array import ExtractHEStains, NormalizeHEStains
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
PIXELS_PER_SOURCE = 60_000  # pooled for the target stains, drawn evenly from each source's training tiles


def training_stains(bundle: str, data_root: str | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The Macenko stain matrix (RGB x H, E optical densities) of the training tiles, and the 99th percentile of
    each stain's concentration over their pixels: the target that ``NormalizeHEStains`` normalises to."""
    records, _ = bundle_records(bundle, data_root, split="training", rescans={})
    rng = np.random.default_rng(seed)
    pooled = []
    for source in sorted({r["source"] for r in records}):
        tiles = [r for r in records if r["source"] == source]
        per_tile = -(-PIXELS_PER_SOURCE // len(tiles))
        pixels = np.concatenate([rng.choice(read_image(r["image"]).reshape(-1, 3), per_tile) for r in tiles])
        pooled.append(pixels[rng.choice(len(pixels), PIXELS_PER_SOURCE, replace=False)])
    pixels = np.concatenate(pooled)[:, None, :]
    extractor = ExtractHEStains()
    he = extractor(pixels)
    # concentrations as NormalizeHEStains computes them (same light intensity and clipping), over all pixels
    absorbance = -np.log((pixels.reshape(-1, 3).astype(np.float32) + 1).clip(max=extractor.tli) / extractor.tli)
    concentrations = np.linalg.lstsq(he, absorbance.T, rcond=None)[0]
    return he, np.percentile(concentrations, 99, axis=1)


def stain_closeness(images: dict[str, np.ndarray], target_he: np.ndarray) -> dict[str, dict[str, float]]:
    """Per source, how close its tiles' own Macenko stain vectors lie to the target's: the cosine of each tile's
    less well aligned stain (lowest and median over the tiles), and how many tiles have the two stains swapped."""
    extractor = ExtractHEStains()
    rows: dict[str, list[tuple[float, bool]]] = {}
    for name, image in images.items():
        cosines = target_he.T @ extractor(np.ascontiguousarray(image.transpose(1, 2, 0)))  # unit columns
        swapped = bool(cosines[0, 1] + cosines[1, 0] > cosines[0, 0] + cosines[1, 1])
        rows.setdefault(name.split("__")[0], []).append((float(min(cosines[0, 0], cosines[1, 1])), swapped))
    return {source: {"lowest": round(min(c for c, _ in r), 3), "median": round(float(np.median([c for c, _ in r])), 3),
                     "swapped": sum(w for _, w in r)} for source, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/nuclei_unet_small")
    parser.add_argument("--checkpoint", default=None, help="weights to score (default: the bundle's)")
    parser.add_argument("--data_root", default=None, help="folder holding the sources (default: as the bundle's)")
    parser.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    parser.add_argument("--normalise", action="store_true",
                        help="Macenko-normalise each tile to the training tiles' stains before the predictor")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "stain_shift.json")
    args = parser.parse_args()
    records, _ = bundle_records(args.bundle, args.data_root, split="validation", rescans={})
    sources = sorted({r["source"] for r in records})
    overrides = {} if args.checkpoint is None else {"checkpoint": str(Path(args.checkpoint).resolve())}
    predictor = SlidePredictor.from_bundle(args.bundle, progress=False, **overrides)
    truths = {f"{r['source']}__{r['name']}": read_instance_labels(r["label"], r.get("label_kind", "instance"))
              for r in records}
    images = {f"{r['source']}__{r['name']}": read_image(r["image"]).transpose(2, 0, 1) for r in records}
    normalise, target, closeness = None, None, None
    if args.normalise:
        target = training_stains(args.bundle, args.data_root)
        normalise = NormalizeHEStains(target_he=target[0], max_cref=target[1])
        closeness = stain_closeness(images, target[0])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shift in args.shifts:
            inputs, outputs = Path(tmp, "in", shift), Path(tmp, "out", shift)
            inputs.mkdir(parents=True)
            for r in records:
                name = f"{r['source']}__{r['name']}"
                shifted = restain(images[name], SHIFTS[shift]).round().byte().numpy().transpose(1, 2, 0)
                if normalise is not None:
                    shifted = normalise(shifted)
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
                       "normalised": None if target is None else {
                           "method": "monai NormalizeHEStains (Macenko), each tile on its own",
                           "target_he": target[0].round(4).tolist(), "max_cref": target[1].round(4).tolist(),
                           "tiles_stain_cosine_to_target": closeness},
                       "settings": predictor.settings()}, args.output)
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
