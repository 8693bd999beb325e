"""The images the end-to-end benchmark reads: a synthetic tile with known nuclei everywhere (``synthetic``'s
writer, as the tests and demos use) and, where ``shared/datasets/cryonuseg`` exists, a tile of real tissue built
from CryoNuSeg's 512 px tiles."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .common import sig

CRYONUSEG_MPP = 0.25  # the registry's pixel size for CryoNuSeg (sources.json)
REPO = Path(__file__).resolve().parents[2]
PYRAMID_TILE = 256


@dataclass
class Image:
    name: str
    path: Path
    shape: tuple[int, int]


def synthetic_image(size: int, seed: int, workdir: Path) -> tuple[Image, dict]:
    from nucleiseg_monai import synthetic

    t0 = time.perf_counter()
    slide = synthetic.make_slide((size, size), seed=seed)
    path = synthetic.write_slide(slide, workdir / "synthetic_slide.tif")
    return Image("synthetic", path, (size, size)), {
        "shape": [size, size], "nuclei": slide.n_nuclei, "tissue": "everywhere", "mpp": synthetic.MPP,
        "seconds": sig(time.perf_counter() - t0)}


def cryonuseg_image(folder: Path, size: int, workdir: Path) -> tuple[Image, dict]:
    """A ``size`` px square of real tissue: CryoNuSeg's tiles side by side in name order, each repeated tile
    mirrored (left-right on its second use, up-down on its third, both on its fourth) so no two neighbours are
    the same pixels, written as a tiled, JPEG-compressed pyramidal BigTIFF at CryoNuSeg's pixel size, as a
    scanner writes a slide."""
    from nucleiseg_monai.data import IMAGE_DIR, read_image

    t0 = time.perf_counter()
    paths = sorted((folder / IMAGE_DIR).glob("*.tif"))
    if not paths:
        raise FileNotFoundError(f"{folder / IMAGE_DIR} holds no .tif tiles; CryoNuSeg's layout is expected")
    tiles = [read_image(p) for p in paths]
    side = min(min(t.shape[:2]) for t in tiles)
    n = math.ceil(size / side)
    mosaic = np.empty((n * side, n * side, 3), np.uint8)
    for k in range(n * n):
        tile = tiles[k % len(tiles)][:side, :side]
        use = k // len(tiles)
        tile = tile[:, ::-1] if use % 2 else tile
        tile = tile[::-1] if use // 2 % 2 else tile
        i, j = divmod(k, n)
        mosaic[i * side:(i + 1) * side, j * side:(j + 1) * side] = tile
    mosaic = mosaic[:size, :size]
    path = write_pyramid(mosaic, workdir / "cryonuseg_mosaic.tif", CRYONUSEG_MPP)
    return Image("cryonuseg", path, (size, size)), {
        "shape": [size, size], "tiles": len(paths), "tile": side, "grid": [n, n], "mpp": CRYONUSEG_MPP,
        "source": str(folder), "seconds": sig(time.perf_counter() - t0)}


def write_pyramid(rgb: np.ndarray, path: Path, mpp: float) -> Path:
    """Level 0 and its halvings (2 x 2 means) down to under 1024 px as SubIFDs, tiled, JPEG, resolution tags."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= 1024:
        a = levels[-1].astype(np.float32)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        levels.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, level in enumerate(levels):
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER",
                     **({"subifds": len(levels) - 1} if len(levels) > 1 else {})} if k == 0 else {"subfiletype": 1}
            tw.write(level, tile=(PYRAMID_TILE, PYRAMID_TILE), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, **extra)
    return path


def add_mosaic_arguments(parser) -> None:
    """The options of a benchmark that runs a bundle's predictor on the real-tissue mosaic (``cryonuseg_image``)."""
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--size", type=int, default=4096, help="side of the mosaic in px (default 4096)")
    parser.add_argument("--cryonuseg", default=str(REPO.parent / "shared" / "datasets" / "cryonuseg"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="JSON file for the figures")
