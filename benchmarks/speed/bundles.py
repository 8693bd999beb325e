"""A bundle as the benchmarks use it: its train.json for the network and training, its inference.json (through
``SlidePredictor.from_bundle``) for predictors, and the weights both load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import REPO

# the keywords of SlidePredictor and its parts that are not settings of speed (objects, paths, what a rerun does)
NOT_SETTINGS = ("network", "planner", "outputs", "device", "channel_stats", "checkpoint", "input_mpp", "overwrite")


@dataclass
class Bundle:
    name: str
    root: Path
    features: list[int]
    checkpoint: Path  # the trained model.pt, or a random state dict of the same network
    weights_note: str
    stats: tuple[list[float], list[float]] | None
    settings: dict  # the keywords of the predictor and its parts as inference.json sets them
    patch_size: int = 256
    batch_size: int = 8

    @property
    def train_config(self) -> Path:
        return self.root / "configs" / "train.json"

    def parser(self, updates: dict | None = None):
        """train.json with its metadata, as ``monai.bundle run`` reads it, with ``updates`` applied."""
        from monai.bundle import ConfigParser

        from nucleiseg_monai.bundle import own_folder

        parser = ConfigParser()
        parser.read_config(str(self.train_config))
        parser.read_meta(str(self.root / "configs" / "metadata.json"))
        parser.update({**own_folder(self.root), **(updates or {})})
        return parser

    def network(self) -> torch.nn.Module:
        """A fresh network from ``network_def`` with this bundle's weights."""
        from nucleiseg_monai.networks import load_weights

        return load_weights(self.parser().get_parsed_content("network_def", lazy=False), self.checkpoint).eval()

    def predictor(self, device: torch.device, **overrides):
        """The bundle's own predictor (``SlidePredictor.from_bundle``) with these weights, on ``device``, writing
        over earlier outputs, without a progress bar; ``overrides`` are keywords of the predictor or its parts
        (``roi_size=64``)."""
        from nucleiseg_monai.inference import SlidePredictor

        return SlidePredictor.from_bundle(self.root, checkpoint=str(self.checkpoint),
                                          device=f"$torch.device('{device}')",
                                          **{"progress": False, "overwrite": True, **overrides})


def _inference_settings(root: Path) -> dict:
    """The keywords of the predictor and its parts that the bundle's inference config (alone or as the overlay over
    train.json) sets, as parsed, leaving out objects and paths."""
    from monai.bundle import ConfigParser

    from nucleiseg_monai.bundle import own_folder
    from nucleiseg_monai.inference import inference_configs, predictor_ids
    from nucleiseg_monai.overrides import load_config

    parser = ConfigParser(load_config(inference_configs(root)))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update(own_folder(root))
    parser.get_parsed_content("imports")
    return {key: parser.get_parsed_content(id_) for key, id_ in predictor_ids().items()
            if key not in NOT_SETTINGS and id_ in parser}


def load_bundle(bundles_dir: Path, name: str, workdir: Path) -> Bundle | str:
    """The bundle, or a sentence saying why it cannot be benchmarked. Without trained weights that fit its
    ``network_def``, a random state dict of that network is written under ``workdir`` and used instead: speed does
    not depend on the weights (post-processing does, through the number of nuclei)."""
    from monai.bundle import ConfigParser

    from nucleiseg_monai.networks import load_weights

    root = bundles_dir.resolve() / name
    train_config = root / "configs" / "train.json"
    if not train_config.is_file() or not (root / "configs" / "inference.json").is_file():
        return f"{root / 'configs'} lacks train.json or inference.json"
    parser = ConfigParser()
    parser.read_config(str(train_config))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    network = parser.get_parsed_content("network_def", lazy=False)
    weights = root / "models" / "model.pt"
    shown = weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights
    if weights.is_file():
        try:  # a checkpoint from an older network_def must not pass for this one
            load_weights(network, weights)
            checkpoint, note = weights, f"trained: {shown}"
        except (RuntimeError, ValueError, KeyError) as err:
            checkpoint, note = None, f"random init ({shown} does not fit network_def: {str(err)[:120]})"
    else:
        checkpoint, note = None, f"random init (no {shown})"
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = workdir / f"{name}_random.pt"
        torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), checkpoint)
    stats_file = root / "models" / "channel_stats.json"
    stats = None
    if stats_file.is_file():
        data = json.loads(stats_file.read_text())
        stats = ([float(v) for v in data["mean"]], [float(v) for v in data["std"]])
    return Bundle(
        name=name, root=root, features=list(parser.get("network_def#features", [])), checkpoint=checkpoint,
        weights_note=note, stats=stats, settings=_inference_settings(root),
        patch_size=int(parser.get("patch_size", [256])[0]), batch_size=int(parser.get("batch_size", 8)),
    )
