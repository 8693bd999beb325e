"""Tuning the watershed's parameters on the validation split, and nowhere else.

The network runs once per validation tile; every parameter setting then re-runs only the post-processing on the
cached probabilities. All settings and their validation figures are recorded, so the choice written into the
bundle configs can be checked and redone.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from tqdm import tqdm

from .data import write_json_atomic
from .metrics import instance_metrics, summarize
from .postprocess import instances_from_probs

logger = logging.getLogger(__name__)

DEFAULT_GRID: dict[str, Sequence] = {
    "fg_threshold": (0.3, 0.4, 0.5, 0.6),
    "marker_threshold": (0.6, 0.7, 0.8, 0.9),
    "min_marker_size": (4, 10, 20),
    "min_size": (10, 25, 40),
    "elevation": ("interior", "distance"),
}
CRITERION = ("aji", "pq")  # mean of the two, per-tile means over the validation split


def settings(grid: Mapping[str, Sequence]) -> Iterable[dict]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def score(params: dict, cached: Sequence[tuple[dict, np.ndarray, np.ndarray]]) -> dict:
    rows = [{"name": r["name"], "organ": r["organ"], **instance_metrics(instances_from_probs(p, **params), t)}
            for r, p, t in cached]
    mean = summarize(rows)["mean"]
    return {k: mean[k] for k in ("aji", "pq", "dice", "f1", "count_ape")}


def validation_probabilities(config_file: str | os.PathLike, overrides: Mapping | None = None):
    """Runs the bundle's evaluate config's network over its validation split once: (record, probs, truth) per tile."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({"split": "validation", **(overrides or {})})
    network = parser.get_parsed_content("network")
    network.eval()
    records = parser.get_parsed_content("evaluate#records")
    transform = parser.get_parsed_content("evaluate#preprocessing")
    inferer = parser.get_parsed_content("evaluate#inferer")
    device = parser.get_parsed_content("device")
    cached = []
    with torch.inference_mode():
        for record in tqdm(records, desc="validation tiles"):
            item = transform(record)
            logits = inferer(item["image"][None].to(device), network)
            probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
            cached.append((record, probs, np.asarray(item["label_inst"][0])))
    return cached


def tune(
    config_file: str | os.PathLike, report_file: str | os.PathLike, grid: Mapping[str, Sequence] = DEFAULT_GRID,
    overrides: Mapping | None = None,
) -> dict:
    """Grid search on the validation split; writes every setting's figures and the choice to ``report_file``."""
    cached = validation_probabilities(config_file, overrides)
    results = []
    for params in tqdm(list(settings(grid)), desc="settings", mininterval=5):
        results.append({"params": params, "validation": score(params, cached)})
    best = max(results, key=lambda r: np.mean([r["validation"][k] for k in CRITERION]))
    report = {
        "criterion": f"mean of validation {' and '.join(CRITERION)} (per-tile means)",
        "validation_tiles": [r["name"] for r, _, _ in cached],
        "chosen": best,
        "grid": {k: list(v) for k, v in grid.items()},
        "results": sorted(results, key=lambda r: -np.mean([r["validation"][k] for k in CRITERION])),
    }
    write_json_atomic(report, report_file)
    logger.info("chose %s: validation %s", best["params"], best["validation"])
    return report
