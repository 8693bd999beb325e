"""Peak memory and wall time of whole-slide inference on a synthetic pyramidal BigTIFF.

Writes a SIZE x SIZE px tiled, JPEG-compressed, pyramidal BigTIFF (H&E-like texture in an elliptic tissue area
with dark nuclei, white glass elsewhere; generated tile by tile, so writing it needs little memory), then runs
``SlidePredictor`` on it in a subprocess with a narrow random-weight U-Net and reports the child's peak resident
memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time, on the console and as JSON.

The network on a 400 MP slide takes hours on a small CPU, so ``--max-regions`` processes only the first N tissue
regions; reading still goes through the full-size slide and all outputs (label BigTIFF, GeoJSON, CSV, overlay)
are written at full size, so the memory figure covers everything that scales with the slide.

    python benchmarks/wsi_memory.py --size 20000 --max-regions 4 --out /tmp/wsi_bench
    python benchmarks/wsi_memory.py --out /tmp/wsi_bench --bundle bundles/nuclei_unet_small   # as shipped
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

MPP = 0.25
MEAN, STD = [200.0, 150.0, 190.0], [40.0, 50.0, 40.0]
TILE = 512
CELL = 24  # px of level 0 per potential nucleus


def _hash(a: np.ndarray, b: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) per integer pair, stable across tiles and levels."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B1) + b.astype(np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(key * 0xC2B2AE3D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(12)
    return h.astype(np.float64) / 2**32


def render_tile(y0: int, x0: int, h: int, w: int, size: int, downsample: int) -> np.ndarray:
    """RGB uint8 of level pixels [y0, y0+h) x [x0, x0+w) of the synthetic slide at ``downsample``."""
    ys = (np.arange(y0, y0 + h) + 0.5) * downsample  # level-0 coordinates of the pixel centres
    xs = (np.arange(x0, x0 + w) + 0.5) * downsample
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    c = size / 2
    tissue = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.30 * size)) ** 2 < 1
    grain = _hash(yy.astype(np.int64) // 6, xx.astype(np.int64) // 6, 1)
    rgb = np.empty((h, w, 3), np.float64)
    rgb[...] = (244, 242, 246)
    pink = np.stack([225 - 25 * grain, 150 - 30 * grain, 190 - 20 * grain], axis=-1)
    rgb[tissue] = pink[tissue]
    cy, cx = yy.astype(np.int64) // CELL, xx.astype(np.int64) // CELL
    present = _hash(cy, cx, 2) < 0.55
    ny = (cy + 0.25 + 0.5 * _hash(cy, cx, 3)) * CELL
    nx = (cx + 0.25 + 0.5 * _hash(cy, cx, 4)) * CELL
    radius = 3.5 + 3.0 * _hash(cy, cx, 5)
    nucleus = tissue & present & ((yy - ny) ** 2 + (xx - nx) ** 2 < radius**2)
    rgb[nucleus] = (85, 45, 130)
    return rgb.astype(np.uint8)


def write_slide(path: Path, size: int) -> Path:
    """Pyramidal (SubIFDs, halving down to < 1024 px), tiled, JPEG BigTIFF with resolution tags."""
    n_levels = 1 + max(0, math.ceil(math.log2(size / 1024)))

    def tiles(level: int):
        d = 2**level
        n = math.ceil(size / d)
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                yield render_tile(ty, tx, min(TILE, n - ty), min(TILE, n - tx), size, d)

    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level in range(n_levels):
            n = math.ceil(size / 2**level)
            extra = {"subifds": n_levels - 1, "resolution": (1e4 / MPP, 1e4 / MPP),
                     "resolutionunit": "CENTIMETER"} if level == 0 else {"subfiletype": 1}
            tw.write(tiles(level), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, **extra)
    os.replace(tmp, path)
    return path


def child(args: argparse.Namespace) -> None:
    """Runs in the subprocess: build the predictor, segment the slide, print the result as JSON."""
    import torch

    from nucleiseg_monai.inference import InferenceNetwork, RegionPlanner, SlidePredictor
    from nucleiseg_monai.networks import UNet

    class BenchmarkNet(torch.nn.Module):
        """The random-weight U-Net's full cost, with nucleus-like outputs from a colour rule added on top.

        Random weights alone turn the whole slide into one object; here dark pixels get interior logits, so the
        post-processing, measurements and writers handle a realistic number of nuclei.
        """

        def __init__(self, unet: torch.nn.Module):
            super().__init__()
            self.unet = unet
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dark = (130.0 - (x * self.std + self.mean).mean(1, keepdim=True)) / 10.0
            rule = torch.cat([-dark, dark, torch.full_like(dark, -5.0)], dim=1)
            return rule + 0.01 * self.unet(x).float()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.bundle is not None:
        predictor = SlidePredictor.from_bundle(args.bundle, max_regions=args.max_regions, progress=True,
                                               overwrite=True, **json.loads(args.overrides))
    else:
        network = BenchmarkNet(UNet(features=tuple(int(f) for f in args.features.split(","))))
        predictor = SlidePredictor(
            InferenceNetwork(network, MEAN, STD, roi_size=args.roi_size, sw_batch_size=args.sw_batch_size,
                             amp=args.amp, channels_last=args.amp),
            RegionPlanner(args.region_size, args.region_margin, max_regions=args.max_regions),
            progress=True, overwrite=True,
        )
    result = predictor.predict_slide(args.slide, args.out)
    settings = {k: v for k, v in predictor.settings().items() if k not in ("channel_mean", "channel_std")}
    print("RESULT " + json.dumps({"settings": settings, "nuclei": result.nuclei, "regions": result.regions,
                                  "regions_processed": result.regions_processed, "seconds": result.seconds,
                                  "truncated": result.truncated, "timings": result.timings}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000, help="slide side in px (default 20000)")
    parser.add_argument("--region-size", type=int, default=2048)
    parser.add_argument("--region-margin", type=int, default=128)
    parser.add_argument("--max-regions", type=int, default=4, help="tissue regions to run the network on")
    parser.add_argument("--roi-size", type=int, default=512)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--features", default="16,32,64,128", help="U-Net widths (random weights)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast + channels-last")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="run this bundle's own predictor with its trained weights and inference settings instead "
                             "(the region, window and precision options above are then the bundle's)")
    parser.add_argument("--overrides", default="{}",
                        help="with --bundle: keywords of the predictor or its parts as JSON, "
                             "e.g. '{\"roi_size\": 256, \"int8\": false}'")
    parser.add_argument("--out", type=Path, default=None, help="folder for the slide and outputs (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the figures (default: OUT)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="wsi_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    slide = out / f"synthetic_{args.size}.tif"
    if slide.is_file():
        print(f"reusing {slide}")
        write_s = 0.0
    else:
        start = time.perf_counter()
        write_slide(slide, args.size)
        write_s = time.perf_counter() - start
        print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MB) in {write_s:.1f} s")

    command = [sys.executable, __file__, "--child", "--slide", str(slide), "--out", str(out / "outputs")]
    for name in ("region_size", "region_margin", "max_regions", "roi_size", "sw_batch_size", "features", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.amp:
        command.append("--amp")
    if args.bundle is not None:
        command += ["--bundle", str(args.bundle), "--overrides", args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    if proc.returncode != 0:
        sys.exit(f"inference subprocess failed with exit code {proc.returncode}")
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    figures = {
        "slide": str(slide), "size_px": args.size, "slide_write_s": round(write_s, 1),
        "max_regions": args.max_regions, "threads": args.threads,
        **({"bundle": str(args.bundle), "overrides": json.loads(args.overrides)} if args.bundle else
           {"features": args.features}),
        "peak_rss_mb": round(peak_mb, 1), "wall_s": round(wall, 1), **result,
        "label_tiff_mb": round((out / "outputs" / f"{slide.stem}.labels.tif").stat().st_size / 2**20, 2),
    }
    target = args.json or out / "wsi_memory.json"
    target.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"peak RSS {peak_mb:.0f} MB ({'under' if peak_mb < 2048 else 'OVER'} the 2 GB target), "
          f"wall {wall:.0f} s; figures in {target}")


if __name__ == "__main__":
    main()
