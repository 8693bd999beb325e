"""The watershed's tie-breaking, before and after, on the same probabilities: speed and accuracy.

Before (``postprocess.py`` at ``BEFORE``, read from git): skimage breaks equal elevations by queue order, which
goes back to the order in which its heap releases equal markers, a function of the whole image. After: every
pixel's key is unique and depends only on its neighbourhood (``postprocess._flood``), so a region floods exactly
like the whole image around it.

The bundle's predictor (its runtime, as configured) computes the probabilities of every source's held-out tiles
once, at the working pixel size; both versions of ``instances_from_probs`` then run on them with the bundle's
watershed parameters, alternating, ``--repeats`` times. Reported per source: each version's mean AJI and PQ against
the truth (labels mapped back to the file's grid, as evaluation does), the AJI between the two versions, and the
seconds of each version (minimum over the repeats; the ratio comes from this run).

    python benchmarks/watershed_ties.py --bundle bundles/nuclei_unet_small      # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.past_code import module_at  # noqa: E402
from nucleiseg_monai import postprocess  # noqa: E402
from nucleiseg_monai.atomic import write_json_atomic  # noqa: E402
from nucleiseg_monai.data import read_image, read_instance_labels  # noqa: E402
from nucleiseg_monai.inference import SlidePredictor  # noqa: E402
from nucleiseg_monai.scaling import lattice_scale, to_read_grid  # noqa: E402
from nucleiseg_monai.metrics import instance_metrics  # noqa: E402
from nucleiseg_monai.sources import bundle_records  # noqa: E402

BEFORE = "f7bf2a905597f054caf6a5bf701a219a7d1e6435"  # the last commit with queue-order ties


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/nuclei_unet_small")
    parser.add_argument("--data_root", default=None, help="folder holding the sources (default: as the bundle's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "watershed_ties.json")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    records, working = bundle_records(bundle, args.data_root)
    predictor = SlidePredictor.from_bundle(bundle, progress=False)
    params = predictor.postprocess_params
    versions = {"before": module_at(BEFORE, "postprocess").instances_from_probs, "after": postprocess.instances_from_probs}

    tiles = []
    for r in records:
        scale = lattice_scale(float(r["mpp"]) / working)
        tiles.append((r["source"], scale, predictor.network.probs(read_image(r["image"]), scale),
                      read_instance_labels(r["label"])))
    print(f"{len(tiles)} tiles' probabilities computed", flush=True)

    seconds = {name: [0.0] * args.repeats for name in versions}
    labels: dict[str, list[np.ndarray]] = {}
    for repeat in range(args.repeats):
        for name, fn in versions.items():
            out = []
            for _, _, probs, _ in tiles:
                start = time.perf_counter()
                out.append(fn(probs, **params))
                seconds[name][repeat] += time.perf_counter() - start
            labels[name] = out

    report: dict = {"command": "python benchmarks/watershed_ties.py " + " ".join(argv or sys.argv[1:]),
                    "before_commit": BEFORE, "bundle": str(bundle), "postprocess_params": params,
                    "repeats": args.repeats, "python": platform.python_version(), "sources": {}}
    for source in sorted({t[0] for t in tiles}):
        index = [i for i, t in enumerate(tiles) if t[0] == source]
        row: dict = {"tiles": len(index)}
        for name in versions:
            scores = [instance_metrics(to_read_grid(labels[name][i], tiles[i][3].shape, tiles[i][1]), tiles[i][3])
                      for i in index]
            row[name] = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in ("aji", "pq", "recall")}
        row["aji_between_versions"] = round(float(np.mean(
            [instance_metrics(labels["after"][i], labels["before"][i])["aji"] for i in index])), 4)
        diff = [np.mean((labels["after"][i] > 0) != (labels["before"][i] > 0)) for i in index]
        row["foreground_pixels_differing"] = round(float(np.mean(diff)), 6)
        report["sources"][source] = row
        print(f"{source:22s} AJI/PQ before {row['before']['aji']:.4f}/{row['before']['pq']:.4f}  after "
              f"{row['after']['aji']:.4f}/{row['after']['pq']:.4f}  AJI between {row['aji_between_versions']:.4f}")
    report["seconds"] = {name: {"min_s": round(min(s), 3), "runs_s": [round(x, 3) for x in s]}
                         for name, s in seconds.items()}
    report["after_over_before_time"] = round(min(seconds["after"]) / min(seconds["before"]), 3)
    print(f"seconds (min of {args.repeats}): before {min(seconds['before']):.2f}, after {min(seconds['after']):.2f} "
          f"({report['after_over_before_time']:.2f}x the time)")
    write_json_atomic(report, args.output)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
