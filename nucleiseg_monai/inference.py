"""Tile and whole-slide inference: regions with margins, sliding-window network, seam-exact stitching, streaming.

A slide is cut into square *cores* that partition the read pyramid level. Each core is read with a margin of
context on every side (white beyond the image), the network runs over that window with MONAI's gaussian-blended
``SlidingWindowInferer``, and ``postprocess.instances_from_probs`` turns the softmax into instances. Which window's
instances are kept is decided by the stitching rule below; kept nuclei are written whole into a band of label
tiles, finished tile rows are streamed to the BigTIFF writer, so memory is bounded by region size x slide width,
never by slide area. With ``prefetch`` the network already runs on the next region (in a second thread) while this
one is post-processed and written.

One physical scale: the network and the watershed work at the model's pixel size (``mpp``, the *working* scale).
The level closest to it is read; when its pixel size differs by more than ``SCALE_TOLERANCE``, each whole window
(core and margin) is resampled to the working scale (bilinear, anti-aliased), analysed there, and its instance
labels are mapped back (nearest: each read pixel takes the working pixel under its centre) before stitching, which
then runs exactly as below on the read level's grid. So the label map, GeoJSON, CSV and overlay are all on the
input's own grid, with its own pixel size. ``region_size`` and ``region_margin`` are working pixels, converted to
read pixels per image, so a region costs the same whatever the file's scale and the margin still covers the
largest nucleus. Seams stay exact: the scale is taken as a fraction p / q (the smallest denominator within
``SCALE_TOLERANCE`` of the true ratio: 1 for 0.245-0.255 um/px, 2 for a 20x level, 6/5 for 0.3 um/px) and cores
and margins are multiples of q read pixels, so every window starts on a whole working pixel and resamples exactly as
the same pixels of the whole image would (``to_working_scale``, ``to_read_grid``).

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
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from tqdm.auto import tqdm

from .data import load_stats
from .networks import MixedPrecision, load_weights
from .outputs import OUTPUT_SUFFIXES, Overlay, SlideOutputs, manifest_path, outputs_complete
from .postprocess import instances_from_probs
from .wsi import IMAGE_SUFFIXES, ImageError, SlideReader, TissueMask, open_image, tissue_mask

logger = logging.getLogger(__name__)

# A nucleus whose anchor is this close to the core but on an already processed side may be rescued (see above).
RESCUE_PX = 8
# A candidate overlapping written nuclei on at least this share of its pixels is the same nucleus again.
DUPLICATE_FRACTION = 0.5
# Resampling scales are fractions within this relative distance of the true ratio (one with a denominator of at
# most 64 is always within 0.8%, so cores and margins grow by less than 64 read pixels). A read level this close to
# the working pixel size is analysed as read: no resampling, so the common 40x case costs nothing extra and gives
# exactly what it gave before resampling existed.
SCALE_TOLERANCE = 0.02


@dataclass
class SlideResult:
    """What one image produced. ``mpp``: microns per pixel of the read level (None when unknown), from
    ``mpp_source`` ("file", "input_mpp", "assumed" or "unknown"); ``scale``: working pixels per read pixel
    (1.0: analysed as read)."""

    path: str
    name: str
    nuclei: int
    seconds: float
    shape: tuple[int, int]
    level: int
    mpp: float | None
    mpp_source: str
    scale: float
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


@dataclass(frozen=True)
class _Scan:
    """One image as the predictor walks it: its reader, working pixels per read pixel (``scale``), and the core
    side and margin in read pixels."""

    reader: SlideReader
    scale: Fraction
    size: int
    margin: int


def lattice_scale(ratio: float) -> Fraction:
    """``ratio`` as the fraction with the smallest denominator within ``SCALE_TOLERANCE`` of it: windows starting at
    multiples of the denominator start on whole working pixels."""
    candidates = [Fraction(max(1, round(ratio * q)), q) for q in range(1, 65)]
    error = [abs(ratio / float(f) - 1.0) for f in candidates]
    return next((f for f, e in zip(candidates, error) if e <= SCALE_TOLERANCE), candidates[int(np.argmin(error))])


def to_working_scale(x: torch.Tensor, scale: Fraction) -> torch.Tensor:
    """(N, C, h, w) float image -> (N, C, floor(h * scale), floor(w * scale)), bilinear, anti-aliased when shrinking.

    The sample lattice is ``scale`` itself, not the ratio of the rounded sizes, so a window whose origin falls on a
    whole working pixel is resampled exactly as the same pixels of the whole image.
    """
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=float(scale), mode="bilinear", antialias=True, align_corners=False,
                         recompute_scale_factor=False)


def to_read_grid(labels: np.ndarray, shape: tuple[int, int], scale: Fraction) -> np.ndarray:
    """Working-scale labels -> labels of ``shape`` read pixels: each read pixel takes the working pixel under its
    centre (nearest; ids are carried, never blended), in integer arithmetic so every window agrees on it."""
    if scale == 1:
        return labels
    p, q = scale.numerator, scale.denominator
    rows, cols = (np.minimum((2 * np.arange(n, dtype=np.int64) + 1) * p // (2 * q), m - 1)
                  for n, m in zip(shape, labels.shape))
    return labels[np.ix_(rows, cols)]


def weights_sha256(network: torch.nn.Module) -> str:
    """SHA-256 over a network's state dict (names, dtypes, shapes, values): names the weights that made outputs,
    however they were loaded."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{values.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _recorded_settings(output_dir: Path, name: str) -> dict | None:
    """The settings in an image's completion record, None when it records none (outputs of an older version)."""
    try:
        settings = json.loads(manifest_path(output_dir, name).read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def _make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {output_dir} ({err.strerror or err}); "
                      "choose another output_dir (nucleiseg predict --output_dir)") from err
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OSError(f"the output folder {output_dir} is not writable; choose another output_dir "
                      "(nucleiseg predict --output_dir) or fix its permissions")


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
        region_size: core side in working pixels; memory grows with region_size**2 and with region_size x slide
            width.
        region_margin: context on each side of a core, in working pixels; must exceed the largest nucleus radius
            plus the width over which the network's output depends on the window border.
        postprocess_params: keyword arguments of ``postprocess.instances_from_probs``.
        device: torch device; CUDA when available by default.
        amp: bf16 autocast (CPU or CUDA); channels_last: channels-last memory layout.
        tissue_threshold: regions whose core has at most this tissue share (low-resolution saturation mask) are
            skipped; None processes every region. Images that fit in one region are never skipped.
        mpp: the working pixel size (microns per pixel; the bundle's ``microns_per_pixel``): the pyramid level
            closest to it is read and each region resampled to it (module docstring). None analyses images as read.
        level: read this pyramid level instead (still resampled to ``mpp``).
        input_mpp: level-0 pixel size of files that state none (``nucleiseg predict --mpp``); without it such
            files are assumed to be at ``mpp``. A size the file states wins. Each image logs which applied.
        label_tile: tile side of the label BigTIFF; overlay_max_side: longer side of the overlay PNG.
        max_regions: process at most this many tissue regions per image (previews, benchmarks); the outputs
            still cover the whole image.
        overwrite: redo images whose outputs are complete. Without it, finished outputs are kept when their
            completion record names these weights and settings (``settings``), and a run whose output folder holds
            finished outputs of other weights or settings is refused before any image is read.
        progress: a tqdm bar over regions per image.
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
        input_mpp: float | None = None,
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
        self.weights_sha256 = weights_sha256(network)
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
        self.roi_size, self.overlap, self.amp = roi_size, overlap, amp
        self.region_size, self.region_margin = int(region_size), int(region_margin)
        self.postprocess_params = dict(postprocess_params or {})
        self.tissue_threshold = tissue_threshold
        self.level = level
        self.mpp = None if mpp is None else float(mpp)
        self.input_mpp = None if input_mpp is None else float(input_mpp)
        self.label_tile, self.overlay_max_side, self.compression = label_tile, overlay_max_side, compression
        self.max_regions, self.overwrite, self.progress = max_regions, overwrite, progress
        self.prefetch = prefetch

    def settings(self) -> dict:
        """What decides an image's outputs besides the image: written into its completion record, and compared
        with the record of finished outputs before they are kept (``run``)."""
        record = {
            "weights_sha256": self.weights_sha256, "channel_mean": self.mean.flatten().tolist(),
            "channel_std": self.std.flatten().tolist(), "postprocess_params": self.postprocess_params,
            "working_mpp": self.mpp, "input_mpp": self.input_mpp, "level": self.level, "roi_size": self.roi_size,
            "overlap": self.overlap, "amp": self.amp, "region_size": self.region_size,
            "region_margin": self.region_margin, "tissue_threshold": self.tissue_threshold,
            "max_regions": self.max_regions,
        }
        return json.loads(json.dumps(record, sort_keys=True, default=str))  # as it reads back from the record

    # ------------------------------------------------------------------------------------------ one window

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).float()

    def predict_probs(self, rgb: np.ndarray, scale: Fraction = Fraction(1)) -> np.ndarray:
        """Softmax probabilities (3, floor(h * scale), floor(w * scale)) float32 of an RGB uint8 window (h, w, 3),
        resampled by ``scale`` first (``to_working_scale``)."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
            x = (to_working_scale(x, scale) - self.mean) / self.std
            probs = torch.softmax(self.inferer(x, self._forward).float(), dim=1)[0]
            return probs.cpu().numpy()

    def instances(self, probs: np.ndarray) -> np.ndarray:
        """Instance labels (h, w) uint32, ids 1..N, from one window's probabilities."""
        return np.asarray(instances_from_probs(probs, **self.postprocess_params), dtype=np.uint32)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Instance labels (h, w) uint32, ids 1..N, of one window at the working scale, with no stitching."""
        return self.instances(self.predict_probs(rgb))

    # ------------------------------------------------------------------------------------------ one image

    def predict_slide(self, path: str | os.PathLike, output_dir: str | os.PathLike, name: str | None = None
                      ) -> SlideResult:
        """Segment one image and write its outputs under ``output_dir`` (named after the file stem)."""
        path = Path(path)
        name = name or path.stem
        start = time.perf_counter()
        fallback_mpp = self.input_mpp if self.input_mpp is not None else self.mpp
        with open_image(path, level=self.level, mpp=self.mpp, input_mpp=fallback_mpp) as reader:
            if reader.greyscale:
                raise ImageError(f"{path} is a greyscale image; the model segments H&E colour (RGB) images. "
                                 "Export the image in colour and retry.")
            if reader.conversion:
                logger.info("%s: %s", path, reader.conversion)
            scan, source = self._scan(reader)
            thumb = reader.thumbnail(self.overlay_max_side)
            height, width = reader.shape
            overlay = Overlay(thumb, (thumb.shape[0] / height, thumb.shape[1] / width))
            grid = self._plan(scan, thumb)
            self._log_scale(path, scan, source, f"{int(grid.sum())} of {grid.size} regions to process")
            stats = {"truncated": 0}
            # an assumed pixel size is not written into the outputs as if it were measured
            out_mpp = reader.mpp if source != "assumed" else None
            with SlideOutputs(output_dir, name, reader.shape, out_mpp, reader.downsample, overlay,
                              self.label_tile, self.compression) as out:
                out.write_labels(self._label_tiles(scan, grid, out, stats, name))
                info = {
                    "source": str(path), "level": reader.level, "mpp": reader.mpp, "mpp_source": source,
                    "working_mpp": self.mpp, "scale": float(scan.scale), "shape": [height, width],
                    "downsample": reader.downsample, "regions": int(grid.size),
                    "regions_processed": int(grid.sum()), "truncated": stats["truncated"],
                    "region_size": self.region_size, "region_margin": self.region_margin,
                    "settings": self.settings(),
                }
                paths = out.commit(info)
            if stats["truncated"]:
                logger.warning("%s: %d nuclei were cut by a region window; increase region_margin (now %d)",
                               path, stats["truncated"], self.region_margin)
            return SlideResult(
                str(path), name, out.count, round(time.perf_counter() - start, 3), (height, width), reader.level,
                reader.mpp, source, float(scan.scale), int(grid.size), int(grid.sum()), stats["truncated"],
                {k: str(p) for k, p in paths.items()},
            )

    def _scan(self, reader: SlideReader) -> tuple[_Scan, str]:
        """The image's scale against the working pixel size and its region grid in read pixels; and where its
        pixel size came from: "file", "input_mpp", "assumed" or "unknown"."""
        if reader.stated_mpp is not None:
            source = "file"
        elif reader.base_mpp is None:
            source = "unknown"
        else:
            source = "input_mpp" if self.input_mpp is not None else "assumed"
        scale = Fraction(1)
        if self.mpp is not None and reader.mpp is not None:
            scale = lattice_scale(reader.mpp / self.mpp)
        # in read pixels, multiples of q: every window starts on a whole working pixel
        p, q = scale.numerator, scale.denominator
        size = q * max(1, round(self.region_size / p))
        return _Scan(reader, scale, size, q * math.ceil(self.region_margin / p)), source

    def _log_scale(self, path: Path, scan: _Scan, source: str, plan: str) -> None:
        """The one line per image that says which pixel size was used, where it came from, and the scale."""
        reader = scan.reader
        head = f"{path}: {reader.shape[0]}x{reader.shape[1]} px at level {reader.level}"
        if source == "unknown":
            logger.info("%s, pixel size unknown, analysed as read; %s", head, plan)
            return
        if source == "assumed":
            logger.warning("%s: the file states no pixel size, so %g um/px (the model's) is assumed; pass --mpp "
                           "(input_mpp) if it differs; %s", head, reader.mpp, plan)
            return
        if scan.scale == 1:
            how = "analysed as read" if self.mpp is None else f"analysed as read (model: {self.mpp:g} um/px)"
        else:
            fraction = f" ({scan.scale})" if scan.scale.denominator > 1 else ""
            how = f"resampled x{float(scan.scale):.4g}{fraction} to the model's {self.mpp:g} um/px"
        origin = "stated in the file" if source == "file" else "from --mpp (input_mpp)"
        if source == "file" and self.input_mpp is not None and \
                abs(reader.stated_mpp / self.input_mpp - 1.0) > SCALE_TOLERANCE:
            origin += f"; --mpp {self.input_mpp:g} applies only to files that state none"
        logger.info("%s, %.4g um/px (%s), %s; %s", head, reader.mpp, origin, how, plan)

    def _plan(self, scan: _Scan, thumb: np.ndarray) -> np.ndarray:
        """Bool grid of the regions to process: tissue present (for multi-region images), at most max_regions."""
        height, width = scan.reader.shape
        size = scan.size
        grid = np.ones((math.ceil(height / size), math.ceil(width / size)), bool)
        if self.tissue_threshold is not None and grid.size > 1:
            mask: TissueMask = tissue_mask(scan.reader, thumbnail=thumb)
            for i, j in np.ndindex(*grid.shape):
                grid[i, j] = mask.fraction(i * size, j * size, size, size) > self.tissue_threshold
        if self.max_regions is not None:
            keep = np.flatnonzero(grid.ravel())[: self.max_regions]
            grid = np.zeros_like(grid)
            grid.ravel()[keep] = True
        return grid

    def _label_tiles(self, scan: _Scan, grid: np.ndarray, out: SlideOutputs, stats: dict, name: str
                     ) -> Iterator[np.ndarray]:
        """Process regions row by row and yield the label map's tiles as soon as their rows are final."""
        height, width = scan.reader.shape
        band = _TileBand((height, width), self.label_tile)
        done = ~grid  # skipped regions count as done: nothing of theirs will ever be written
        next_id = 1
        todo = [ij for ij in np.ndindex(*grid.shape) if grid[ij]]
        predicted = lookahead(functools.partial(self._predict_region, scan), todo, self.prefetch)
        with closing(predicted), \
                tqdm(total=len(todo), desc=name, unit="region", disable=not self.progress, leave=False) as bar:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if grid[i, j]:
                        next_id = self._stitch_region(scan, band, out, done, (i, j), *next(predicted), next_id,
                                                      stats)
                        done[i, j] = True
                        bar.update(1)
                # the next row of windows starts `margin` above its cores; everything above is final
                yield from band.flush((i + 1) * scan.size - scan.margin)
        yield from band.flush(height)

    def _window(self, ij: tuple[int, int], scan: _Scan) -> tuple[int, int, int, int]:
        """(y, x, h, w) of region ij's core with its margin, in read pixels, cut at the image border: there is no
        context beyond it, and a tile-sized image would otherwise cost the network (512 + 2 * margin)^2 pixels
        for 512^2."""
        height, width = scan.reader.shape
        size, margin = scan.size, scan.margin
        cy0, cx0 = ij[0] * size, ij[1] * size
        wy, wx = max(cy0 - margin, 0), max(cx0 - margin, 0)
        return wy, wx, min(cy0 + size + margin, height) - wy, min(cx0 + size + margin, width) - wx

    def _predict_region(self, scan: _Scan, ij: tuple[int, int]
                        ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
        """Read region ij's window and run the network on it at the working scale: (window, rgb, probabilities)."""
        window = self._window(ij, scan)
        rgb = scan.reader.read_region(*window)
        return window, rgb, self.predict_probs(rgb, scan.scale)

    def _stitch_region(self, scan: _Scan, band: _TileBand, out: SlideOutputs, done: np.ndarray,
                       ij: tuple[int, int], window: tuple[int, int, int, int], rgb: np.ndarray, probs: np.ndarray,
                       next_id: int, stats: dict) -> int:
        """Instances of one region's probabilities, mapped back to the read grid; keep those it owns (module
        docstring), write and measure them."""
        height, width = band.height, band.width
        size = scan.size
        i, j = ij
        cy0, cx0 = i * size, j * size
        cy1, cx1 = min(cy0 + size, height), min(cx0 + size, width)
        wy, wx, wh, ww = window
        labels = to_read_grid(self.instances(probs), (wh, ww), scan.scale)
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

        Before any image is read, the output folder is created (or the run refused, once) and finished outputs
        there are checked against this predictor's ``settings``: outputs of other weights or settings refuse the
        run unless ``overwrite``. Images whose outputs are complete are then skipped (unless ``overwrite``); an
        image that fails is logged with its path and error and the others go on. ``summary.failed`` lists
        failures, so a caller can exit non-zero.
        """
        output_dir = Path(output_dir)
        images = find_images(input)
        _make_output_dir(output_dir)
        if not self.overwrite:
            self._refuse_other_settings(images, output_dir)
        summary = RunSummary()
        seen: dict[str, Path] = {}
        for path in images:
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

    def _refuse_other_settings(self, images: list[Path], output_dir: Path) -> None:
        """FileExistsError naming the images whose finished outputs record other weights or settings."""
        settings = self.settings()
        differing: dict[str, list[str]] = {}
        for path in images:
            if not outputs_complete(output_dir, path.stem):
                continue
            recorded = _recorded_settings(output_dir, path.stem)
            if recorded is None:
                differing[path.stem] = ["not recorded (an older version's outputs)"]
            elif recorded != settings:
                differing[path.stem] = sorted(k for k in settings.keys() | recorded.keys()
                                              if settings.get(k) != recorded.get(k))
        if differing:
            names = list(differing)
            keys = sorted({k for ks in differing.values() for k in ks})
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise FileExistsError(
                f"{output_dir} holds finished outputs of {listed} made with other weights or settings "
                f"(differing: {', '.join(keys)}); pass --overwrite (overwrite=true) to replace them, or choose "
                "another output_dir"
            )


def raise_on_failure(summary: RunSummary) -> RunSummary:
    """The summary unchanged when every image succeeded, else a RuntimeError listing the failures.

    For bundle configs, whose ``run`` must fail (non-zero exit) when any image failed, after all were tried.
    """
    if summary.failed:
        lines = "\n".join(f"  {path}: {error}" for path, error in summary.failed)
        raise RuntimeError(f"{len(summary.failed)} image(s) failed ({len(summary.done)} done, "
                           f"{len(summary.skipped)} already complete):\n{lines}")
    return summary
