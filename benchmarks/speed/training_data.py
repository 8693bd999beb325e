"""The data the training benchmark feeds the bundle's train.json: the real sources of the registry when they are
all present under the data root, else one synthetic source in the Kaggle layout with a one-entry registry. Either
way a datalist of a few tiles per source (``--train-tiles``), in the registry's own format, so the config's own
``resolve``, ``sampling_weights`` and ``CacheDataset`` run on it unchanged and cache seconds, not minutes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .common import sig

SYNTHETIC_SPLIT = {"kind": "organ_stratified", "val_fraction": 0.15, "test_fraction": 0.3, "seed": 0}


@dataclass
class TrainingData:
    overrides: dict  # config ids of train.json -> values
    channel_stats: tuple[list[float], list[float]]
    description: dict


def _subset(datalist: dict, per_source: int) -> dict:
    """``per_source`` training tiles of each source, evenly spread over its list, and one validation tile each
    (the validator is built with the trainer; a 1-epoch run never calls it)."""
    out = {**datalist, "training": [], "validation": [], "test": []}
    for name in datalist["sources"]:
        train = [r for r in datalist["training"] if r["source"] == name]
        n = min(per_source, len(train))
        out["training"] += [train[i * len(train) // n] for i in range(n)]
        out["validation"] += [r for r in datalist["validation"] if r["source"] == name][:1]
    return out


def training_data(bundle_root: Path, args, workdir: Path) -> TrainingData:
    from nucleiseg_monai.data import DataError
    from nucleiseg_monai.sources import default_data_root, load_sources, make_datalist, prepare
    from nucleiseg_monai.synthetic import ORGANS, write_dataset

    t0 = time.perf_counter()
    data_root = Path(default_data_root(bundle_root))
    sources = load_sources()
    missing = [s.name for s in sources.values() if not s.folder(data_root).is_dir()]
    sources_file = None
    if args.synthetic_data or missing:
        data_root = workdir / "data"
        write_dataset(data_root / "synthetic", n_tiles=args.train_tiles, size=args.train_tile,
                      organs=ORGANS[:2], seed=args.seed)
        sources_file = data_root / "sources.json"
        sources_file.write_text(json.dumps({"synthetic": {"root": "synthetic", "layout": "kaggle", "mpp": 0.25,
                                                          "organs": "name", "split": SYNTHETIC_SPLIT}}))
        datalist = make_datalist(load_sources(sources_file), data_root)
        kind = "synthetic, Kaggle layout" + (f" (absent under {data_root}: {', '.join(missing)})" if missing else "")
    else:
        # the split the bundle trains on, read (never written) from its models/, else made here
        try:
            datalist = prepare(data_root, bundle_root / "models" / "datalist.json", sources)
        except DataError:
            datalist = prepare(data_root, workdir / "full_datalist.json", sources)
        kind = "the registry's sources"
    subset = _subset(datalist, args.train_tiles)
    datalist_file = workdir / "datalist.json"
    datalist_file.write_text(json.dumps(subset))
    stats = (datalist["channel_stats"]["mean"], datalist["channel_stats"]["std"])
    return TrainingData(
        overrides={"data_root": str(data_root), "sources_file": None if sources_file is None else str(sources_file),
                   "datalist_file": str(datalist_file)},
        channel_stats=stats,
        description={"data": kind, "data_root": str(data_root),
                     "tiles": {name: sum(r["source"] == name for r in subset["training"])
                               for name in subset["sources"]},
                     "seconds": sig(time.perf_counter() - t0)})
