"""Tuning the watershed's parameters on the validation split, and nowhere else.

The network runs once per validation tile; every parameter setting then re-runs only the post-processing on the
cached probabilities. All settings and their validation figures are recorded, so the choice written into the
bundle configs can be checked and redone.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from tqdm import tqdm

from .atomic import write_json_atomic
from .metrics import instance_metrics, summarize
from .networks import MixedPrecision, load_weights
from .postprocess import activate, instances_from_probs
from .transforms import resample_labels

logger = logging.getLogger(__name__)

# Sizes (min_marker_size, min_size) are pixel areas at GRID_MPP; ``default_grid`` scales them to the bundle's
# working pixel size, so that a bundle working at another one searches the same areas in um^2.
GRID_MPP = 0.25
DEFAULT_GRID: dict[str, Sequence] = {
    "fg_threshold": (0.3, 0.4, 0.5, 0.6),
    "marker_threshold": (0.6, 0.7, 0.8, 0.9),
    "min_marker_size": (4, 10, 20),
    "min_size": (10, 25, 40),
    "elevation": ("interior", "distance"),
}
# A network with a distance map (4 outputs): markers from its peaks, whose height (1 at every centre) asks for
# lower thresholds than the interior's confidence.
DISTANCE_GRID: dict[str, Sequence] = {
    "fg_threshold": (0.4, 0.5, 0.6, 0.7),
    "marker_threshold": (0.3, 0.4, 0.5, 0.6),
    "min_marker_size": (4, 10, 20),
    "min_size": (25, 40, 60),
    "markers": ("distance_map",),
    "elevation": ("distance_map", "interior"),
}

# With HoVer maps (6 outputs), the distance map's grid and the cut along the maps' jumps, off (None) included: true
# maps fall by about 0.9 where two nuclei meet, maps learnt in 16 epochs by 0.01-0.15 (the small card, 0.5.17).
HOVER_THRESHOLDS = (None, 0.05, 0.2, 0.5)


def default_grid(channels: int, mpp: float | None = GRID_MPP) -> dict[str, Sequence]:
    """The grid searched unless the user names values: by the network's outputs (3 classes, a distance map, or
    HoVer maps too), its areas in pixels of ``mpp`` (the bundle's working pixel size; None: as written)."""
    grid = dict(DISTANCE_GRID if channels > 3 else DEFAULT_GRID)
    if channels == 6:
        grid["hover_threshold"] = HOVER_THRESHOLDS
    if mpp is not None and mpp != GRID_MPP:
        area = (GRID_MPP / mpp) ** 2
        for key in ("min_marker_size", "min_size"):
            grid[key] = tuple(sorted({max(1, round(v * area)) for v in grid[key]}))
    return grid


CRITERION = ("aji", "pq")  # mean of the two, per-tile means over the validation split


def settings(grid: Mapping[str, Sequence]) -> Iterable[dict]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def score(params: dict, cached: Sequence[tuple[dict, np.ndarray, np.ndarray]]) -> dict:
    """Validation figures of one setting: per-tile means within each source, then the mean over sources (so a
    source with many tiles does not outvote the others); per-source figures alongside."""
    by_source: dict[str, list[dict]] = {}
    for r, p, t in cached:
        pred = instances_from_probs(p, **params)
        if pred.shape != t.shape:  # analysed at the working pixel size, scored on the file's grid
            pred = resample_labels(torch.from_numpy(pred[None].astype(np.int64)), t.shape)[0].numpy()
        by_source.setdefault(r.get("source", "tiles"), []).append(
            {"name": r["name"], "organ": r["organ"], **instance_metrics(pred, t)})
    keys = ("aji", "pq", "dice", "f1", "recall", "count_ape")
    sources = {src: {k: summarize(rows)["mean"][k] for k in keys} for src, rows in by_source.items()}
    return {**{k: float(np.mean([s[k] for s in sources.values()])) for k in keys}, "sources": sources}


def _validation_parser(config_files: Sequence[str | os.PathLike], overrides: Mapping | None) -> ConfigParser:
    files = [str(f) for f in config_files]
    parser = ConfigParser()
    parser.read_config(files)
    parser.read_meta(str(Path(files[0]).parent / "metadata.json"))
    parser.update({"split": "validation", "rescans": {}, **(overrides or {})})
    return parser


def tuned_checkpoint(config_files: Sequence[str | os.PathLike], overrides: Mapping | None = None) -> Path:
    """The weights ``tune`` scores with these settings (the config's ``checkpoint``), resolved, nothing else built."""
    return Path(_validation_parser(config_files, overrides).get_parsed_content("checkpoint")).resolve()


def validation_probabilities(config_files: Sequence[str | os.PathLike], overrides: Mapping | None = None):
    """Runs the bundle's network over the validation split of every source once: (record, probs, truth) per tile.

    ``config_files`` are those of the bundle's evaluation (train.json, then the evaluate.json overlay); the
    weights are its checkpoint, the truth the labels on each file's own pixel grid.
    """
    parser = _validation_parser(config_files, overrides)
    device = parser.get_parsed_content("device")
    network = load_weights(parser.get_parsed_content("network_def"), parser.get_parsed_content("checkpoint"))
    network = MixedPrecision(network.to(device), parser.get_parsed_content("amp_dtype")).eval()
    records = parser.get_parsed_content("validate#records")
    transform = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    cached = []
    with torch.inference_mode():
        for record in tqdm(records, desc="validation tiles"):
            item = transform(record)
            logits = inferer(item["image"][None].to(device), network)
            probs = activate(logits)[0].cpu().numpy()
            cached.append((record, probs, np.asarray(item["label_native"][0])))
    return cached


def tune(
    config_files: Sequence[str | os.PathLike], report_file: str | os.PathLike,
    grid: Mapping[str, Sequence] | None = None, overrides: Mapping | None = None,
) -> dict:
    """Grid search on the validation split; writes every setting's figures and the choice to ``report_file``.

    ``grid`` names the values to try for some parameters; the others keep ``default_grid``'s for the network and
    its working pixel size."""
    cached = validation_probabilities(config_files, overrides)
    working_mpp = _validation_parser(config_files, overrides).get_parsed_content("working_mpp")
    grid = {**default_grid(cached[0][1].shape[0], working_mpp), **(grid or {})}
    results = []
    for params in tqdm(list(settings(grid)), desc="settings", mininterval=5):
        results.append({"params": params, "validation": score(params, cached)})
    best = max(results, key=lambda r: np.mean([r["validation"][k] for k in CRITERION]))
    report = {
        "criterion": f"mean of validation {' and '.join(CRITERION)} (per-tile means within each source, then the "
                     "mean over sources)",
        "validation_tiles": [f"{r.get('source', '')}/{r['name']}" for r, _, _ in cached],
        "chosen": best,
        "grid": {k: list(v) for k, v in grid.items()},
        "results": sorted(results, key=lambda r: -np.mean([r["validation"][k] for k in CRITERION])),
    }
    write_json_atomic(report, report_file)
    logger.info("chose %s: validation %s", best["params"], best["validation"])
    return report


def apply(train_config: str | os.PathLike, params: Mapping) -> None:
    """Writes ``params`` as the bundle's one ``postprocess_params`` (in train.json; evaluation and inference
    read it from there)."""
    path = Path(train_config)
    config = json.loads(path.read_text(encoding="utf-8"))
    if "postprocess_params" not in config:
        raise KeyError(f"{path} has no postprocess_params to replace; is it a bundle's train.json?")
    config["postprocess_params"] = dict(params)
    write_json_atomic(config, path, indent=4)
