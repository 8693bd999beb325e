"""Post-processing speed, before and after, in one run: per-nucleus measurements + GeoJSON + CSV, and the watershed.

Measurements and outputs: the per-nucleus code as it landed (``nucleiseg_monai/outputs.py`` at ``BEFORE``, read
from git) against ``measurements.measure_nuclei`` with the column-wise writers of ``outputs``, on one synthetic
label window with a few thousand nuclei, both writing real files. The results are checked to be the same (rings
equal up to their start vertex, columns within 1e-9), and the GeoJSON and CSV texts are timed apart from measuring.

Watershed: ``postprocess._flood`` on the whole window against one call per connected foreground component on
its smallest crop (``scipy.ndimage.find_objects``), on probabilities made from the same labels (one-hot,
blurred, noisy). The candidate would be kept only if faster with identical labels; the JSON says which it is.

Old and new alternate, ``--repeats`` times each; the minimum of each is reported and ratios come from this run.

    python benchmarks/postprocess_speed.py                       # 2048 px window, ~1 min on 2 busy cores
    python benchmarks/postprocess_speed.py --size 512 --output /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
import skimage
from scipy import ndimage as ndi
from skimage.segmentation import watershed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.past_code import module_at  # noqa: E402
from nucleiseg_monai import postprocess  # noqa: E402
from nucleiseg_monai.atomic import atomic_path  # noqa: E402
from nucleiseg_monai.measurements import measure_nuclei  # noqa: E402
from nucleiseg_monai.outputs import CSVStream, GeoJSONStream  # noqa: E402
from nucleiseg_monai.synthetic import make_tile  # noqa: E402
from nucleiseg_monai.transforms import encode_three_class  # noqa: E402

BEFORE = "c1ffdf48182732da200829a6d9e5415565abcb77"  # last commit with the per-nucleus measurements in outputs.py
MPP = 0.25
# the small bundle's watershed settings
POSTPROCESS = {"min_marker_size": 10, "min_size": 25}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def alternate(variants: dict, repeats: int) -> tuple[dict, dict]:
    """Run each variant ``repeats`` times, interleaved: (seconds, results) per variant, one entry per run."""
    times = {name: [] for name in variants}
    results = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, result = timed(fn)
            times[name].append(seconds)
            results[name].append(result)
    return times, results


def summary(seconds: list[float]) -> dict:
    return {"min_s": round(min(seconds), 4), "median_s": round(float(np.median(seconds)), 4),
            "runs_s": [round(s, 4) for s in seconds]}


# ---------------------------------------------------------------------------------------------- measurements


def before_outputs(before, labels, rgb, folder):
    """The landed path: one Nucleus at a time, each written to both streams (as SlideOutputs.add_nuclei did)."""
    measure = write = 0.0
    nuclei = []
    with open(folder / "before.geojson", "w") as geo, open(folder / "before.csv", "w", newline="") as table:
        geojson, csv_stream = before.GeoJSONStream(geo, "bench"), before.CSVStream(table)
        t = time.perf_counter()
        for nucleus in before.measure_nuclei(labels, rgb, (0, 0), 1.0, MPP):
            t1 = time.perf_counter()
            geojson.write(nucleus)
            csv_stream.write(nucleus)
            t2 = time.perf_counter()
            measure, write = measure + t1 - t, write + t2 - t1
            nuclei.append(nucleus)
            t = time.perf_counter()
        geojson.close()
    return {"measure": measure, "write": write}, nuclei


def after_outputs(labels, rgb, folder):
    with open(folder / "after.geojson", "w") as geo, open(folder / "after.csv", "w", newline="") as table:
        geojson, csv_stream = GeoJSONStream(geo, "bench"), CSVStream(table)
        measure, nuclei = timed(measure_nuclei, labels, rgb, (0, 0), 1.0, MPP)
        t = time.perf_counter()
        geojson.write(nuclei)
        csv_stream.write(nuclei)
        geojson.close()
    return {"measure": measure, "write": time.perf_counter() - t}, nuclei


def same_results(before_nuclei, after) -> dict:
    """Largest column difference and the number of rings that differ (other than where they start)."""
    worst, rings = 0.0, 0
    assert [n.id for n in before_nuclei] == after.id.tolist()
    for i, n in enumerate(before_nuclei):
        for column in ("centroid_x", "centroid_y", "area_px", "area_um2", "perimeter_px", "eccentricity",
                       "solidity", "mean_haematoxylin"):
            worst = max(worst, abs(float(getattr(n, column)) - float(getattr(after, column)[i])))
        a, b = n.polygon[:-1], after.polygon(i)[:-1]
        start = np.flatnonzero((b == a[0]).all(axis=1)) if a.shape == b.shape else []
        rings += not (len(start) == 1 and np.array_equal(np.roll(b, -start[0], axis=0), a))
    return {"nuclei": len(before_nuclei), "max_abs_difference": worst, "rings_differing": rings}


def bench_measurements(labels, rgb, repeats: int) -> dict:
    before = module_at(BEFORE, "outputs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, runs = alternate({"before": lambda: before_outputs(before, labels, rgb, folder),
                             "after": lambda: after_outputs(labels, rgb, folder)}, repeats)
        sizes = {name: {kind: (folder / f"{name}.{kind}").stat().st_size for kind in ("geojson", "csv")}
                 for name in ("before", "after")}
    out = {"check": same_results(runs["before"][-1][1], runs["after"][-1][1]), "bytes": sizes}
    for name, results in runs.items():
        parts = [seconds for seconds, _ in results]
        out[name] = {part: summary([p[part] for p in parts]) for part in ("measure", "write")}
        out[name]["total"] = summary([p["measure"] + p["write"] for p in parts])
    for part in ("measure", "write", "total"):
        out[f"speedup_{part}"] = round(out["before"][part]["min_s"] / out["after"][part]["min_s"], 2)
    return out


# ---------------------------------------------------------------------------------------------- watershed


def flood_per_component(surface: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The candidate: ``postprocess._flood`` run on the smallest crop of each connected foreground component."""
    core = ndi.binary_erosion(markers > 0, structure=postprocess._CROSS)
    seeds, free = np.where(core, 0, markers), mask & ~core
    components, _ = ndi.label(mask, structure=postprocess._CROSS)
    labels = np.zeros(markers.shape, markers.dtype)
    for k, box in enumerate(ndi.find_objects(components), start=1):
        inside = free[box] & (components[box] == k)
        crop_seeds = np.where(inside, seeds[box], 0)
        if crop_seeds.any():
            labels[box][inside] = watershed(surface[box], crop_seeds, connectivity=1, mask=inside)[inside]
    labels[core] = markers[core]
    return labels


def soft_probs(labels: np.ndarray, seed: int) -> np.ndarray:
    """A network-like softmax: the one-hot 3-class target, blurred, with noise, renormalised."""
    enc = encode_three_class(labels)
    p = np.stack([ndi.gaussian_filter((enc == c).astype(np.float32), 1.5) for c in range(3)])
    p += np.random.default_rng(seed).normal(0, 0.05, p.shape).astype(np.float32)
    p = np.clip(p, 1e-3, None)
    return p / p.sum(axis=0, keepdims=True)


def flood_inputs(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(surface, markers, mask) as ``instances_from_probs`` hands them to ``_flood`` with its default thresholds."""
    mask = probs[0] < 0.5
    markers, _ = ndi.label((probs[1] > 0.7) & mask, structure=postprocess._CROSS)
    markers = postprocess._remove_small(markers, POSTPROCESS["min_marker_size"]).astype(np.int32)
    surface = np.round((1.0 - np.clip(probs[1], 0.0, 1.0)) * 255).astype(np.uint8)
    return surface, markers, mask


def bench_watershed(labels: np.ndarray, repeats: int, seed: int, noise_seeds: int) -> dict:
    probs = soft_probs(labels, seed)
    surface, markers, mask = flood_inputs(probs)
    times, results = alternate({"whole_window": lambda: postprocess._flood(surface, markers, mask),
                                "per_component_crop": lambda: flood_per_component(surface, markers, mask)}, repeats)
    speedup = min(times["whole_window"]) / min(times["per_component_crop"])
    # identity is checked on more noise draws than the one timed: ties between seeds are where crops differ
    differing = {seed: int((results["whole_window"][-1] != results["per_component_crop"][-1]).sum())}
    for other in range(noise_seeds):
        if other != seed:
            inputs = flood_inputs(soft_probs(labels, other))
            differing[other] = int((postprocess._flood(*inputs) != flood_per_component(*inputs)).sum())
    instances_s, instances = timed(lambda: postprocess.instances_from_probs(probs, **POSTPROCESS))
    return {
        "components": int(ndi.label(mask, structure=postprocess._CROSS)[1]),
        "markers": int(markers.max()),
        "instances": int(instances.max()),
        "instances_from_probs_s": round(instances_s, 4),
        "whole_window": summary(times["whole_window"]),
        "per_component_crop": summary(times["per_component_crop"]),
        "speedup": round(speedup, 2),
        "pixels_differing_per_noise_seed": differing,
        "kept": not any(differing.values()) and speedup > 1,
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="side of the synthetic label window in px")
    p.add_argument("--seed", type=int, default=3, help="synthetic tile seed")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--noise-seeds", type=int, default=4, help="probability maps on which the watershed crop must "
                   "give identical labels (noise seeds 0..N-1, and the timed one)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "postprocess_speed.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rgb, labels = make_tile(args.size, seed=args.seed)
    results = {
        "command": "python benchmarks/postprocess_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "before_commit": BEFORE,
        "window": {"size_px": args.size, "seed": args.seed, "nuclei": int(labels.max()), "mpp": MPP},
        "repeats": args.repeats,
        "environment": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                        "scipy": scipy.__version__, "scikit_image": skimage.__version__,
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "measurements_and_outputs": bench_measurements(labels, rgb, args.repeats),
        "watershed": bench_watershed(labels, args.repeats, args.seed, args.noise_seeds),
    }
    m, w = results["measurements_and_outputs"], results["watershed"]
    print(f"{labels.max()} nuclei in a {args.size} px window")
    for part in ("measure", "write", "total"):
        print(f"  {part:8s} before {m['before'][part]['min_s']:.3f} s  after {m['after'][part]['min_s']:.3f} s  "
              f"x{m[f'speedup_{part}']}")
    print(f"  same results: {m['check']}")
    print(f"  watershed whole window {w['whole_window']['min_s']:.3f} s, per component crop "
          f"{w['per_component_crop']['min_s']:.3f} s (x{w['speedup']}), px differing per noise seed "
          f"{w['pixels_differing_per_noise_seed']}: "
          f"{'kept' if w['kept'] else 'not kept'}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
