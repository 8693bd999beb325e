"""Batch-norm statistics measured again for given weights, on training patches drawn as training draws them.

A weight average (``scripts/average_weights.py``) averages the batch-norm statistics of its members too, which are
not the statistics of the averaged network's own activations; SWA (Izmailov et al. 2018) measures them again
(``torch.optim.swa_utils.update_bn``). So does this script, for any checkpoint of a bundle's network::

    python scripts/recalibrate_bn.py runs/avg/model.pt --bundle bundles/nuclei_unet_small --out runs/avg_bn/model.pt

Patches come from the bundle's training tiles, a third from each source as trained, through its training transforms
(``--unaugmented``: cut as inference sees tissue), normalised with the ``channel_stats.json`` beside the weights
(else the bundle's), which is copied beside the output. Only the batch-norm buffers change. Whether it helps is
measured, not assumed: for the small bundle's shipped weights it did not (its card, 0.5.19).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nucleiseg_monai.bundle import own_folder, weights_stats_file  # noqa: E402
from nucleiseg_monai.data import load_stats  # noqa: E402
from nucleiseg_monai.networks import unet_from_checkpoint  # noqa: E402


def recalibrate(network: torch.nn.Module, images) -> torch.nn.Module:
    """``network`` with every batch norm's running statistics replaced by their plain mean over ``images`` (an
    iterable of input batches); the weights are untouched, the network is left in eval mode."""
    torch.optim.swa_utils.update_bn(images, network)
    return network.eval()


def training_patches(bundle: Path, stats: dict, batches: int, batch_size: int, data_root: str | None, seed: int,
                     augment: bool = True, num_workers: int = 1):
    """Batches of training patches as the bundle's ``train`` section draws them (its records, transforms and
    per-source sampling weights, read through its configs), normalised with ``stats``. ``num_workers``: loading
    processes; the recorded measurements used 1, whose draws differ from loading in this process (0)."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, RandSpatialCropd, SelectItemsd, SpatialPadd
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update({**own_folder(bundle), "channel_stats": stats,
                   **({"data_root": data_root} if data_root else {})})
    records = parser.get_parsed_content("train#records")
    set_determinism(seed)
    if augment:
        transform = parser.get_parsed_content("train#preprocessing")
    else:  # patches as inference sees tissue: no flips, turns, resampling or stain and intensity jitter
        patch = parser.get_parsed_content("patch_size")
        transform = Compose([parser.get_parsed_content("validate#preprocessing"),
                             SpatialPadd("image", patch, mode="reflect"),
                             RandSpatialCropd("image", patch, random_size=False)])
    sampler = torch.utils.data.WeightedRandomSampler(parser.get_parsed_content("train#sampler#weights"),
                                                     batches * batch_size,
                                                     generator=torch.Generator().manual_seed(seed))
    # only the images are batched: the training targets of tiles of different sizes need not stack
    transform = Compose([transform, SelectItemsd("image")])
    loader = DataLoader(Dataset(records, transform), batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    for batch in loader:
        yield batch["image"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "nuclei_unet_small")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batches", type=int, default=100, help="batches of training patches (default 100)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--data_root", help="the datasets' folder (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unaugmented", action="store_true",
                        help="patches as inference sees tissue, without training's augmentation")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no such checkpoint: {args.checkpoint}")
    stats_file = weights_stats_file(str(args.checkpoint), str(args.bundle / "models" / "channel_stats.json"))
    network = unet_from_checkpoint(args.checkpoint)
    torch.set_grad_enabled(False)
    patches = training_patches(args.bundle, load_stats(stats_file), args.batches, args.batch_size, args.data_root,
                               args.seed, augment=not args.unaugmented)
    recalibrate(network, patches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(network.state_dict(), partial)
    partial.replace(args.out)  # never a half-written checkpoint under the final name
    if Path(stats_file).resolve() != (args.out.parent / "channel_stats.json").resolve():
        shutil.copy(stats_file, args.out.parent / "channel_stats.json")
    print(f"{args.out}: batch-norm statistics of {args.batches} batches of {args.batch_size} training patches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
