"""End to end: the bundle's ``SlidePredictor`` from an image file to all its outputs (label BigTIFF, GeoJSON, CSV,
overlay), in megapixels of image per second, and where the time goes, from the seconds per phase the predictor
records itself (``SlideResult.timings``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .bundles import Bundle
from .common import rate, ratio, sig, sync
from .inputs import Image


def end_to_end(bundle: Bundle, device: torch.device, image: Image, args, workdir: Path) -> dict:
    """Megapixels per second of ``predict_slide`` over ``image`` with the bundle's settings (median of
    ``--e2e-repeats`` runs), then one run without prefetching for the per-phase breakdown."""
    predictor = bundle.predictor(device, **args.predictor_overrides)
    # warm-up on one region window: the same network call shapes (incl. the last, partial sliding-window batch)
    planner = predictor.planner
    side = min(planner.region_size, max(image.shape)) + 2 * planner.region_margin
    predictor.network.probs(np.full((side, side, 3), 200, np.uint8))
    out_dir = workdir / f"e2e_{bundle.name}_{device.type}_{image.name}"
    times, result = timed_runs(predictor, device, image, out_dir, args.e2e_repeats)
    height, width = image.shape
    figures = rate(height * width / 1e6, times, "mp")
    figures.update({"image": image.name, "image_shape": [height, width], "nuclei": result.nuclei,
                    "regions_processed": result.regions_processed, "tissue_fraction": sig(result.tissue_fraction)})
    # the phases overlap when the network runs ahead in its own thread; one serial run shows what each costs and
    # what the overlap gains
    prefetch, predictor.prefetch = predictor.prefetch, False
    try:
        figures["serial"] = serial_breakdown(predictor, device, image, out_dir)
    finally:
        predictor.prefetch = prefetch
    figures["prefetch_gain"] = ratio(figures["mp_per_s"], figures["serial"]["mp_per_s"])
    figures["settings"] = {**bundle.settings, **args.predictor_overrides}
    return figures


# the shipped settings with one end-to-end lever changed at a time, to say what each is worth on the whole pipeline
# rather than on the network alone; the last is not shipped: it raises peak memory (wsi_memory.py)
E2E_LEVERS = {
    "without int8 (OpenVINO bf16)": {"int8": False},
    "without prefetching": {"prefetch": False},
    "256 px windows in 1792 px regions instead of one pass per 1024 px region (0.4.0's settings)":
        {"roi_size": 256, "region_size": 1792},
    "one pass per 1792 px region instead of 1024 (not shipped: memory)": {"region_size": 1792},
}


def end_to_end_levers(bundle: Bundle, device: torch.device, image: Image, args, workdir: Path,
                      shipped_mp_per_s: float) -> list[dict]:
    """Megapixels per second end to end with each of ``E2E_LEVERS`` applied, and the shipped figure's gain over
    it (median of ``--e2e-repeats`` runs after a warm-up run, so set-up costs stay out)."""
    rows = []
    for name, overrides in E2E_LEVERS.items():
        predictor = bundle.predictor(device, **{**args.predictor_overrides, **overrides})
        out_dir = workdir / f"e2e_lever_{bundle.name}_{image.name}"
        predictor.predict_slide(image.path, out_dir)
        times, _ = timed_runs(predictor, device, image, out_dir, args.e2e_repeats)
        figures = rate(image.shape[0] * image.shape[1] / 1e6, times, "mp")
        rows.append({"lever": name, "overrides": overrides, **figures,
                     "shipped_gain": ratio(shipped_mp_per_s, figures["mp_per_s"])})
    return rows


def timed_runs(predictor, device: torch.device, image: Image, out_dir: Path, repeats: int) -> tuple[list[float], object]:
    """Wall seconds of ``repeats`` runs of ``predict_slide`` over ``image`` (the device synchronised around each),
    and the last run's result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = predictor.predict_slide(image.path, out_dir)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, result


def serial_breakdown(predictor, device: torch.device, image: Image, out_dir: Path) -> dict:
    """One run with no prefetching: megapixels per second and the predictor's own seconds per phase; "other" is
    what no phase holds (opening the outputs, the completion record)."""
    sync(device)
    t0 = time.perf_counter()
    result = predictor.predict_slide(image.path, out_dir)
    sync(device)
    total = time.perf_counter() - t0
    height, width = image.shape
    breakdown = {f"{phase}_s": seconds for phase, seconds in result.timings.items()}
    breakdown["other_s"] = max(0.0, total - sum(breakdown.values()))
    return {
        "mp_per_s": sig(height * width / 1e6 / total), "seconds": sig(total),
        "breakdown_s": {k: sig(v) for k, v in breakdown.items()},
        "breakdown_share": {k.removesuffix("_s"): sig(v / total, 3) for k, v in breakdown.items()},
        "postprocess_mp_per_s": sig(height * width / 1e6 / breakdown["watershed_s"])
        if breakdown["watershed_s"] > 0 else None,
    }
