"""Tile and whole-slide inference: regions with margins, sliding-window network, seam-exact stitching, streaming.

A slide is cut into square *cores* of ``region_size`` pixels (at the analysed pyramid level) that partition it.
Each core is read with ``region_margin`` pixels of context on every side (white beyond the image), the network
runs over that window with MONAI's gaussian-blended ``SlidingWindowInferer``, and ``postprocess.
instances_from_probs`` turns the softmax into instances. Which window's instances are kept is decided by the
stitching rule below; kept nuclei are written whole into a band of label tiles, finished tile rows are streamed to
the BigTIFF writer, so memory is bounded by region size x slide width, never by slide area. With ``prefetch`` the
network already runs on the next region (in a second thread) while this one is post-processed and written.

Stitching rule (exact and order-independent for consistent predictions):
  * anchor of an instance = integer floor of its centroid, computed with integer sums of global coordinates, so
    the same pixel set gives the same anchor in every window (no float rounding near a seam). Cores partition the
    image, so exactly one core contains each anchor: that region keeps the nucleus, whole, even where it extends
    into neighbouring cores; every other window that sees it drops it.
  * with ``region_margin`` larger than the largest nucleus radius plus the network's border effects, each
    window sees the nuclei it keeps whole and with full context, so they match a whole-image run.
  * safety nets for predictions that differ slightly between overlapping windows (real networks near seams):
    a candidate of which at least half the pixels are already owned by written nuclei is a duplicate and is
    dropped; a candidate whose anchor fell into a core already processed (or skipped as empty), within
    ``RESCUE_PX`` of this core, that nobody wrote and that is not cut by the window, is kept (its owner's
    version had its anchor on this side of the seam). Pixels claimed twice stay with the nucleus written first
    (raster order of regions), so each nucleus's final pixel set is known when it is written and its
    measurements are exact for the label map on disk.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from tqdm.auto import tqdm

from .data import load_stats
from .networks import MixedPrecision, load_weights
from .outputs import OUTPUT_SUFFIXES, Overlay, SlideOutputs, outputs_complete
from .postprocess import instances_from_probs
from .wsi import IMAGE_SUFFIXES, SlideReader, TissueMask, open_image, tissue_mask

logger = logging.getLogger(__name__)

# A nucleus whose anchor is this close to the core but on an already processed side may be rescued (see above).
RESCUE_PX = 8
# A candidate overlapping written nuclei on at least this share of its pixels is the same nucleus again.
DUPLICATE_FRACTION = 0.5


@dataclass
class SlideResult:
    """What one image produced."""

    path: str
    name: str
    nuclei: int
    seconds: float
    shape: tuple[int, int]
    level: int
    mpp: float | None
    regions: int
    regions_processed: int
    truncated: int
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Results of ``SlidePredictor.run``: finished, skipped (outputs already complete) and failed images."""

    done: list[SlideResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"done": [asdict(r) for r in self.done], "skipped": self.skipped,
                "failed": [{"path": p, "error": e} for p, e in self.failed]}


def find_images(source: str | os.PathLike) -> list[Path]:
    """One image path, a folder (its images, not recursive) or a glob -> sorted image paths.

    Files that are outputs of this module (``*.labels.tif``, ``*.overlay.png``) are left out, so an output folder
    inside the input folder is not segmented on the next run.
    """
    text = str(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = [p for p in path.iterdir() if p.is_file()]
    elif any(c in text for c in "*?["):
        candidates = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"{text} does not exist; give an image file, a folder of images or a glob")
    images = sorted(
        p for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        and not any(p.name.endswith(s) for s in OUTPUT_SUFFIXES.values())
    )
    if not images:
        raise FileNotFoundError(
            f"no images found at {text}; expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return images


class _TileBand:
    """The label map's rows still open for writing, as a sparse dict of (tile, tile) uint32 blocks.

    Only tiles that received a nucleus are allocated, so empty background costs nothing; finished tile rows are
    popped in order for the TIFF writer.
    """

    def __init__(self, shape: tuple[int, int], tile: int):
        self.height, self.width = shape
        self.tile = tile
        self.n_cols = math.ceil(self.width / tile)
        self.tiles: dict[tuple[int, int], np.ndarray] = {}
        self.flushed_rows = 0  # tile rows already handed to the writer
        self._zeros = np.zeros((tile, tile), np.uint32)
        self._zeros.flags.writeable = False

    def _blocks(self, y: int, x: int, h: int, w: int) -> Iterator[tuple[tuple[int, int], tuple[slice, slice],
                                                                        tuple[slice, slice]]]:
        t = self.tile
        y0, y1, x0, x1 = max(y, 0), min(y + h, self.height), max(x, 0), min(x + w, self.width)
        for tr in range(y0 // t, (y1 - 1) // t + 1 if y1 > y0 else 0):
            for tc in range(x0 // t, (x1 - 1) // t + 1 if x1 > x0 else 0):
                ya, yb = max(y0, tr * t), min(y1, (tr + 1) * t)
                xa, xb = max(x0, tc * t), min(x1, (tc + 1) * t)
                yield ((tr, tc), (slice(ya - tr * t, yb - tr * t), slice(xa - tc * t, xb - tc * t)),
                       (slice(ya - y, yb - y), slice(xa - x, xb - x)))

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.zeros((h, w), np.uint32)
        for key, in_tile, in_window in self._blocks(y, x, h, w):
            block = self.tiles.get(key)
            if block is not None:
                out[in_window] = block[in_tile]
        return out

    def write(self, y: int, x: int, values: np.ndarray) -> None:
        """Copy the non-zero pixels of ``values`` (a window at (y, x)) into the band."""
        if y < self.flushed_rows * self.tile and values[: self.flushed_rows * self.tile - y].any():
            raise RuntimeError("internal error: a nucleus reaches label rows already written to disk")
        for key, in_tile, in_window in self._blocks(y, x, *values.shape):
            part = values[in_window]
            if part.any():
                block = self.tiles.setdefault(key, np.zeros((self.tile, self.tile), np.uint32))
                np.copyto(block[in_tile], part, where=part > 0)

    def flush(self, final_rows: int) -> Iterator[np.ndarray]:
        """Yield, row-major, every tile of the tile rows lying entirely above ``final_rows`` not yet flushed."""
        while self.flushed_rows * self.tile < self.height and (
            (self.flushed_rows + 1) * self.tile <= final_rows or final_rows >= self.height
        ):
            for tc in range(self.n_cols):
                yield self.tiles.pop((self.flushed_rows, tc), self._zeros)
            self.flushed_rows += 1


def lookahead(fn: Callable, items: Iterable, enabled: bool = True) -> Iterator:
    """``map(fn, items)``, computing the next result in a background thread while the caller uses this one.

    For the network on region k + 1 while region k is post-processed and written: the network's operators release
    the GIL and use every core, the post-processing mostly one, so the two overlap. One result is held ahead, and
    an exception from ``fn`` is raised in the caller at the item it belongs to. Close the generator (``closing``)
    to stop early; a running call is waited for, queued ones are cancelled.
    """
    if not enabled:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="nucleiseg-lookahead")
    try:
        pending: Future | None = None
        for item in items:
            future = pool.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def freeze(network: torch.nn.Module, shape: Sequence[int], device: torch.device) -> torch.nn.Module:
    """TorchScript trace + freeze: batch norm folded into the convolutions, casts and layouts fixed in the graph.

    Measured +27% megapixels per second for the small bundle's network under bf16 autocast on 2 CPU cores
    (benchmarks/speed.py, lever table). The trace records the autocast casts, so it runs in bf16 by itself.
    """
    example = torch.zeros(*shape, device=device)
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(network.eval(), example, check_trace=False))


class SlidePredictor:
    """Segment nuclei in tiles and whole slides and write labels, GeoJSON, CSV and an overlay per image.

    A MONAI bundle config can build it with ``_target_`` and call ``run``::

        "predictor": {"_target_": "nucleiseg_monai.inference.SlidePredictor", "network": "@network",
                      "channel_stats": "$@bundle_root + '/models/channel_stats.json'", "mpp": 0.25},
        "run": "$@predictor.run(@input, @output_dir)"

    Args:
        network: torch module, z-scored float (N, 3, H, W) -> (N, 3, H, W) logits (background, interior,
            boundary); put in eval mode here.
        channel_mean, channel_std: per-channel statistics on the 0-255 scale; or ``channel_stats``, a JSON file.
        checkpoint: optional state-dict file to load into ``network`` (raw, or under "network"/"model"/...).
        roi_size, overlap, sw_batch_size, padding_mode: the ``SlidingWindowInferer`` inside each region
            (gaussian blending). ``roi_size`` must suit the network (multiple of 2**depth for the U-Net).
        region_size: core side in pixels; memory grows with region_size**2 and with region_size x slide width.
        region_margin: context on each side of a core; must exceed the largest nucleus radius plus the width
            over which the network's output depends on the window border.
        postprocess_params: keyword arguments of ``postprocess.instances_from_probs``.
        device: torch device; CUDA when available by default.
        amp: bf16 autocast (CPU or CUDA); channels_last: channels-last memory layout.
        tissue_threshold: regions whose core has at most this tissue share (low-resolution saturation mask) are
            skipped; None processes every region. Images that fit in one region are never skipped.
        level, mpp, slide_mpp: pyramid level, or target microns per pixel, and the level-0 pixel size when the
            file lacks it (see ``wsi.open_image``).
        label_tile: tile side of the label BigTIFF; overlay_max_side: longer side of the overlay PNG.
        max_regions: process at most this many tissue regions per image (previews, benchmarks); the outputs
            still cover the whole image.
        overwrite: redo images whose outputs are complete; progress: a tqdm bar over regions per image.
        jit: run a traced, frozen copy of the network (see ``freeze``).
        prefetch: run the network on the next region in a background thread while this one is post-processed
            and written (see ``lookahead``); holds one more region's probabilities in memory.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        channel_mean: Sequence[float] | None = None,
        channel_std: Sequence[float] | None = None,
        channel_stats: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        roi_size: int = 512,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        padding_mode: str = "constant",
        region_size: int = 2048,
        region_margin: int = 128,
        postprocess_params: dict | None = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        tissue_threshold: float | None = 0.0,
        level: int | None = None,
        mpp: float | None = None,
        slide_mpp: float | None = None,
        label_tile: int = 512,
        overlay_max_side: int = 2048,
        compression: str = "zlib",
        max_regions: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
        jit: bool = False,
        prefetch: bool = True,
    ):
        if channel_stats is not None:
            stats = load_stats(channel_stats)
            channel_mean, channel_std = stats["mean"], stats["std"]
        if channel_mean is None or channel_std is None:
            raise ValueError("SlidePredictor needs channel_mean and channel_std, or channel_stats (a JSON file)")
        if len(channel_mean) != 3 or len(channel_std) != 3 or min(channel_std) <= 0:
            raise ValueError(f"channel stats must be 3 means and 3 positive stds, got {channel_mean}, {channel_std}")
        if region_size < 1 or region_margin < 0:
            raise ValueError(f"region_size must be >= 1 and region_margin >= 0, got {region_size}, {region_margin}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if checkpoint is not None:
            load_weights(network, checkpoint)
        network = network.to(self.device).eval()
        self.network = MixedPrecision(network, torch.bfloat16 if amp else None, channels_last) \
            if (amp or channels_last) else network
        if jit:
            self.network = freeze(self.network, (sw_batch_size, 3, roi_size, roi_size), self.device)
        self.mean = torch.as_tensor(channel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(channel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.inferer = SlidingWindowInferer(
            roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
            padding_mode=padding_mode, sw_device=self.device, device=self.device, progress=False,
        )
        self.region_size, self.region_margin = int(region_size), int(region_margin)
        self.postprocess_params = dict(postprocess_params or {})
        self.tissue_threshold = tissue_threshold
        self.level, self.mpp, self.slide_mpp = level, mpp, slide_mpp
        self.label_tile, self.overlay_max_side, self.compression = label_tile, overlay_max_side, compression
        self.max_regions, self.overwrite, self.progress = max_regions, overwrite, progress
        self.prefetch = prefetch

    # ------------------------------------------------------------------------------------------ one window

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).float()

    def predict_probs(self, rgb: np.ndarray) -> np.ndarray:
        """Softmax probabilities (3, h, w) float32 for an RGB uint8 window (h, w, 3)."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
            x = (x - self.mean) / self.std
            probs = torch.softmax(self.inferer(x, self._forward).float(), dim=1)[0]
            return probs.cpu().numpy()

    def instances(self, probs: np.ndarray) -> np.ndarray:
        """Instance labels (h, w) uint32, ids 1..N, from one window's probabilities."""
        return np.asarray(instances_from_probs(probs, **self.postprocess_params), dtype=np.uint32)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Instance labels (h, w) uint32, ids 1..N, of one window, with no stitching."""
        return self.instances(self.predict_probs(rgb))

    # ------------------------------------------------------------------------------------------ one image

    def predict_slide(self, path: str | os.PathLike, output_dir: str | os.PathLike, name: str | None = None
                      ) -> SlideResult:
        """Segment one image and write its outputs under ``output_dir`` (named after the file stem)."""
        path = Path(path)
        name = name or path.stem
        start = time.perf_counter()
        with open_image(path, level=self.level, mpp=self.mpp, slide_mpp=self.slide_mpp) as reader:
            thumb = reader.thumbnail(self.overlay_max_side)
            height, width = reader.shape
            overlay = Overlay(thumb, (thumb.shape[0] / height, thumb.shape[1] / width))
            grid = self._plan(reader, thumb)
            logger.info("%s: %dx%d px at level %d (%s um/px), %d of %d regions to process", path, height, width,
                        reader.level, f"{reader.mpp:.4g}" if reader.mpp else "unknown", int(grid.sum()), grid.size)
            stats = {"truncated": 0}
            with SlideOutputs(output_dir, name, reader.shape, reader.mpp, reader.downsample, overlay,
                              self.label_tile, self.compression) as out:
                out.write_labels(self._label_tiles(reader, grid, out, stats, name))
                info = {
                    "source": str(path), "level": reader.level, "mpp": reader.mpp, "shape": [height, width],
                    "downsample": reader.downsample, "regions": int(grid.size),
                    "regions_processed": int(grid.sum()), "truncated": stats["truncated"],
                    "region_size": self.region_size, "region_margin": self.region_margin,
                }
                paths = out.commit(info)
            if stats["truncated"]:
                logger.warning("%s: %d nuclei were cut by a region window; increase region_margin (now %d)",
                               path, stats["truncated"], self.region_margin)
            return SlideResult(
                str(path), name, out.count, round(time.perf_counter() - start, 3), (height, width), reader.level,
                reader.mpp, int(grid.size), int(grid.sum()), stats["truncated"],
                {k: str(p) for k, p in paths.items()},
            )

    def _plan(self, reader: SlideReader, thumb: np.ndarray) -> np.ndarray:
        """Bool grid of the regions to process: tissue present (for multi-region images), at most max_regions."""
        height, width = reader.shape
        size = self.region_size
        grid = np.ones((math.ceil(height / size), math.ceil(width / size)), bool)
        if self.tissue_threshold is not None and grid.size > 1:
            mask: TissueMask = tissue_mask(reader, thumbnail=thumb)
            for i, j in np.ndindex(*grid.shape):
                grid[i, j] = mask.fraction(i * size, j * size, size, size) > self.tissue_threshold
        if self.max_regions is not None:
            keep = np.flatnonzero(grid.ravel())[: self.max_regions]
            grid = np.zeros_like(grid)
            grid.ravel()[keep] = True
        return grid

    def _label_tiles(self, reader: SlideReader, grid: np.ndarray, out: SlideOutputs, stats: dict, name: str
                     ) -> Iterator[np.ndarray]:
        """Process regions row by row and yield the label map's tiles as soon as their rows are final."""
        height, width = reader.shape
        size, margin = self.region_size, self.region_margin
        band = _TileBand((height, width), self.label_tile)
        done = ~grid  # skipped regions count as done: nothing of theirs will ever be written
        next_id = 1
        todo = [ij for ij in np.ndindex(*grid.shape) if grid[ij]]
        predicted = lookahead(functools.partial(self._predict_region, reader), todo, self.prefetch)
        with closing(predicted), \
                tqdm(total=len(todo), desc=name, unit="region", disable=not self.progress, leave=False) as bar:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if grid[i, j]:
                        next_id = self._stitch_region(band, out, done, (i, j), *next(predicted), next_id, stats)
                        done[i, j] = True
                        bar.update(1)
                # the next row of windows starts `margin` above its cores; everything above is final
                yield from band.flush((i + 1) * size - margin)
        yield from band.flush(height)

    def _window(self, ij: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y, x, h, w) of region ij's core with its margin, cut at the image border: there is no context beyond
        it, and a tile-sized image would otherwise cost the network (512 + 2 * margin)^2 pixels for 512^2."""
        height, width = shape
        size, margin = self.region_size, self.region_margin
        cy0, cx0 = ij[0] * size, ij[1] * size
        wy, wx = max(cy0 - margin, 0), max(cx0 - margin, 0)
        return wy, wx, min(cy0 + size + margin, height) - wy, min(cx0 + size + margin, width) - wx

    def _predict_region(self, reader: SlideReader, ij: tuple[int, int]
                        ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
        """Read region ij's window and run the network on it: (window, rgb, probabilities)."""
        window = self._window(ij, reader.shape)
        rgb = reader.read_region(*window)
        return window, rgb, self.predict_probs(rgb)

    def _stitch_region(self, band: _TileBand, out: SlideOutputs, done: np.ndarray, ij: tuple[int, int],
                       window: tuple[int, int, int, int], rgb: np.ndarray, probs: np.ndarray, next_id: int,
                       stats: dict) -> int:
        """Instances of one region's probabilities; keep those it owns (module docstring), write and measure them."""
        height, width = band.height, band.width
        size = self.region_size
        i, j = ij
        cy0, cx0 = i * size, j * size
        cy1, cx1 = min(cy0 + size, height), min(cx0 + size, width)
        wy, wx, wh, ww = window
        labels = self.instances(probs)
        n = int(labels.max())
        if n == 0:
            return next_id

        flat = labels.ravel()
        fg = np.flatnonzero(flat)
        ids = flat[fg]
        count = np.bincount(ids, minlength=n + 1).astype(np.int64)
        present = count > 0
        safe = np.maximum(count, 1)
        # integer sums of global coordinates: the anchor is the same pixel in every window that sees the nucleus
        sum_y = np.bincount(ids, weights=fg // ww, minlength=n + 1).astype(np.int64) + count * wy
        sum_x = np.bincount(ids, weights=fg % ww, minlength=n + 1).astype(np.int64) + count * wx
        ay, ax = sum_y // safe, sum_x // safe

        existing = band.read(wy, wx, wh, ww)
        owned = np.bincount(ids, weights=existing.ravel()[fg] > 0, minlength=n + 1)
        # a nucleus touching a window side inside the image may be cut there; the image's own border cuts nothing
        edge = np.zeros(n + 1, bool)
        sides = [labels[0] if wy > 0 else None, labels[-1] if wy + wh < height else None,
                 labels[:, 0] if wx > 0 else None, labels[:, -1] if wx + ww < width else None]
        cut = [side for side in sides if side is not None]
        if cut:
            edge[np.concatenate(cut)] = True

        own = present & (ay >= cy0) & (ay < cy1) & (ax >= cx0) & (ax < cx1)
        gap = np.maximum(np.maximum(cy0 - ay, ay - (cy1 - 1)), np.maximum(cx0 - ax, ax - (cx1 - 1)))
        anchor_done = done[np.clip(ay // size, 0, done.shape[0] - 1), np.clip(ax // size, 0, done.shape[1] - 1)]
        rescue = present & ~own & anchor_done & (gap <= RESCUE_PX) & ~edge
        keep = (own | rescue) & (owned < DUPLICATE_FRACTION * count)
        keep[0] = False
        kept = int(keep.sum())
        if kept == 0:
            return next_id
        stats["truncated"] += int((keep & edge).sum())

        global_id = np.zeros(n + 1, np.uint32)
        global_id[keep] = np.arange(next_id, next_id + kept, dtype=np.uint32)
        final = global_id[labels]
        final[existing > 0] = 0  # first written keeps contested pixels
        band.write(wy, wx, final)
        out.add_nuclei(final, rgb, (wy, wx))
        return next_id + kept

    # ------------------------------------------------------------------------------------------ many images

    def run(self, input: str | os.PathLike, output_dir: str | os.PathLike) -> RunSummary:
        """Segment every image of ``input`` (a file, folder or glob) into ``output_dir``.

        Images whose outputs are complete are skipped (unless ``overwrite``); an image that fails is logged with
        its path and error and the others go on. ``summary.failed`` lists failures, so a caller can exit non-zero.
        """
        output_dir = Path(output_dir)
        summary = RunSummary()
        seen: dict[str, Path] = {}
        for path in find_images(input):
            name = path.stem
            if name in seen:
                message = f"same output name {name!r} as {seen[name]}; rename one of them"
                logger.error("failed on %s: %s", path, message)
                summary.failed.append((str(path), message))
                continue
            seen[name] = path
            if not self.overwrite and outputs_complete(output_dir, name):
                logger.info("%s: outputs complete in %s, skipped", path, output_dir)
                summary.skipped.append(str(path))
                continue
            try:
                result = self.predict_slide(path, output_dir, name)
            except Exception as err:  # one bad image must not stop a folder; the error is reported with its path
                logger.error("failed on %s: %s: %s", path, type(err).__name__, err,
                             exc_info=logger.isEnabledFor(logging.DEBUG))
                summary.failed.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            logger.info("%s: %d nuclei in %.1f s", path, result.nuclei, result.seconds)
            summary.done.append(result)
        return summary


def raise_on_failure(summary: RunSummary) -> RunSummary:
    """The summary unchanged when every image succeeded, else a RuntimeError listing the failures.

    For bundle configs, whose ``run`` must fail (non-zero exit) when any image failed, after all were tried.
    """
    if summary.failed:
        lines = "\n".join(f"  {path}: {error}" for path, error in summary.failed)
        raise RuntimeError(f"{len(summary.failed)} image(s) failed ({len(summary.done)} done, "
                           f"{len(summary.skipped)} already complete):\n{lines}")
    return summary
