"""Lazy readers for tiles and whole-slide images, and a low-resolution tissue mask.

TIFF / BigTIFF (tiled, pyramidal or not) is read through tifffile's zarr store, which decodes only the chunks a
region touches; MONAI's TiffFileWSIReader decodes the whole pyramid level for every patch, so one patch of a large
slide costs seconds and gigabytes. Vendor formats (.svs, .ndpi, .mrxs, ...) and DICOM whole-slide images (a series
of .dcm files: ``dicom``) go through OpenSlide, an optional extra. PNG / JPEG / BMP / WebP tiles are small and are
loaded whole.

All readers return RGB uint8 at one chosen pyramid level; pixels outside the image read as white (255), which is
background in H&E, so context padding never invents dark tissue. What a reader had to convert to get there (16-bit
samples scaled to 8 bit, CMYK converted to RGB, grey repeated into three channels) is stated by its ``conversion``,
so callers can say so.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
import zarr
from PIL import Image
from skimage import io as skio
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label as connected_components
from skimage.morphology import dilation as grey_dilation, disk

from .dicom import DICOM_SUFFIXES, not_a_slide

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif"} | DICOM_SUFFIXES
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
OPEN_IMAGE_SUFFIXES = TIFF_SUFFIXES | OPENSLIDE_SUFFIXES | PLAIN_SUFFIXES  # what open_image reads

# A level-0 pixel size outside this range is a placeholder (72 dpi, "1 pixel per unit"), not a microscope's.
PLAUSIBLE_MPP = (0.02, 20.0)
# Bright-field H&E is scanned at 0.1 um/px (100x oil) to 2 um/px (5x overviews): a stated size outside it, though
# within PLAUSIBLE_MPP, is likelier a print resolution (2400 dpi is 10.6 um/px) than a scan.
SCAN_MPP = (0.1, 2.0)
# A stated size this many times finer or coarser than the model's is doubted too: beyond it the resampling either
# smears nuclei to a few pixels (a 10x scan brought to 40x) or multiplies the work by its square, so a wrong size
# costs hours for nonsense, and a right one deserves a look before that.
DOUBTFUL_SCALE = 4.0
MPP_HINT = ("it takes microns per pixel, not a magnification: 40x is about 0.25 um/px, 20x about 0.5 um/px (nor "
            "pixels per micron: 4 px/um is 0.25 um/px; nor nanometres or millimetres: 250 nm and 0.00025 mm are "
            "0.25 um)")
# A level may be at most this much coarser than the requested mpp (scanners' 0.25 vs 0.2525 um/px etc.).
COARSER_TOLERANCE = 1.2
WHITE = 255
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An image that cannot be used as it is; the message names the file and the fix."""


class SlideReader:
    """One image at one chosen pyramid level: shape, mpp, levels, ``read_region`` and ``thumbnail``.

    Subclasses implement ``_read_level(level, y0, y1, x0, x1)`` for boxes inside the level, returning RGB uint8.
    Use as a context manager (or call ``close``) to release the file.

    ``base_mpp`` is the level-0 pixel size in use, ``stated_mpp`` the one the file itself states (None when it
    states none; ``open_image`` may then fill ``base_mpp`` in, or replace it when forced) and ``mpp_origin`` where in
    the file it is stated ("the resolution tags, 2400 pixels per inch"). ``source_dtype`` and ``source_channels``
    describe the stored samples before conversion to 8-bit RGB; ``source_cmyk`` says they were CMYK.
    """

    path: Path
    level_shapes: list[tuple[int, int]]
    base_mpp: float | None

    def __init__(self, path: Path, level_shapes: list[tuple[int, int]], base_mpp: float | None,
                 level_downsamples: list[float] | None = None, source_dtype: np.dtype = np.dtype(np.uint8),
                 source_channels: int = 3):
        self.path = path
        self.level_shapes = level_shapes
        h0, w0 = level_shapes[0]
        self.level_downsamples = level_downsamples or [(h0 / h + w0 / w) / 2 for h, w in level_shapes]
        self.base_mpp = self.stated_mpp = base_mpp
        self.mpp_origin: str | None = None
        self.source_dtype, self.source_channels = np.dtype(source_dtype), source_channels
        self.source_cmyk = False
        self._sample_max: int | None = None
        self.level = 0

    @property
    def bounds(self) -> tuple[int, int, int, int] | None:
        """The scanned area (x, y, width, height in level-0 pixels) where the file states one smaller than level 0:
        QuPath shows such a slide cropped to it, so its coordinates are offset from this reader's. None elsewhere."""
        return None

    @property
    def greyscale(self) -> bool:
        """The file stores one grey channel (with or without alpha), repeated into RGB on reading."""
        return self.source_channels in (1, 2)

    @property
    def sample_max(self) -> int:
        """The stored value that reads as white: for 16-bit samples the TIFF's MaxSampleValue or the data's maximum
        (alpha aside), found once on first need; 255 for 8-bit ones.

        Cameras store 10- or 12-bit samples in 16-bit containers; scaled as full-range 16-bit they read nearly
        black, and the networks then invent nuclei. Bright-field H&E always has near-white background, so the
        data's maximum is the top of the range it was recorded in.
        """
        if self._sample_max is None:
            self._sample_max = self._find_sample_max() if self.source_dtype == np.uint16 else WHITE
        return self._sample_max

    @property
    def significant_bits(self) -> int:
        """Bits of the stored range (at least 8); reading keeps the top 8 of them."""
        return _significant_bits(self.sample_max)

    def _find_sample_max(self) -> int:
        return int(np.iinfo(self.source_dtype).max)

    @property
    def conversion(self) -> str | None:
        """What reading does to the stored samples to give RGB uint8, in words; None when nothing."""
        steps = []
        if self.source_dtype != np.uint8:
            steps.append(self._scaling())
        if self.source_cmyk:
            steps.append("CMYK converted to RGB")
        if self.greyscale:
            steps.append("greyscale repeated into three channels")
        return ", ".join(steps) or None

    def _scaling(self) -> str:
        container, bits = 8 * self.source_dtype.itemsize, self.significant_bits
        how = f"scaled to 8 bit (value / {2 ** (bits - 8)})" if bits > 8 else "read as 8 bit"
        if bits == container:
            return f"{container}-bit samples {how}"
        article = "an" if bits in (8, 11) else "a"
        return f"{container}-bit samples of {article} {bits}-bit range (maximum {self.sample_max}) {how}"

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at the chosen level."""
        return self.level_shapes[self.level]

    @property
    def downsample(self) -> float:
        """Level-0 pixels per pixel of the chosen level."""
        return self.level_downsamples[self.level]

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at the chosen level; None when the file does not record it."""
        return None if self.base_mpp is None else self.base_mpp * self.downsample

    def level_mpps(self) -> list[float | None]:
        return [None if self.base_mpp is None else self.base_mpp * d for d in self.level_downsamples]

    def read_region(self, y: int, x: int, h: int, w: int, level: int | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) whose top-left is (y, x) in the level's pixels; outside the image reads white."""
        level = self.level if level is None else level
        height, width = self.level_shapes[level]
        out = np.full((h, w, 3), WHITE, np.uint8)
        y0, y1, x0, x1 = max(y, 0), min(y + h, height), max(x, 0), min(x + w, width)
        if y0 < y1 and x0 < x1:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_level(level, y0, y1, x0, x1)
        return out

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image, block-averaged so its longer side is at most ``max_side``.

        Starts from the smallest pyramid level still at least ``max_side`` long and reads it in bands of rows, so a
        slide without a pyramid costs a sequential scan, never a full-resolution copy in memory.
        """
        big_enough = [lv for lv, s in enumerate(self.level_shapes) if max(s) >= max_side]
        level = max(big_enough) if big_enough else 0
        height, width = self.level_shapes[level]
        factor = max(1, math.ceil(max(height, width) / max_side))
        if factor == 1:
            return self._read_level(level, 0, height, 0, width)
        band = factor * max(1, (16 << 20) // (width * 3 * factor))  # about 16 MB of pixels per band
        parts = [_block_mean(self._read_level(level, y0, min(y0 + band, height), 0, width), factor)
                 for y0 in range(0, height, band)]
        return np.concatenate(parts, axis=0)

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, level={self.level}, shape={self.shape}, "
                f"mpp={self.mpp}, levels={self.n_levels})")


def _block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks; partial blocks at the edges are completed with white."""
    h, w = rgb.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=WHITE)
    blocks = rgb.reshape(rgb.shape[0] // factor, factor, rgb.shape[1] // factor, factor, 3)
    return blocks.mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)


def rgb_uint8(pixels: np.ndarray, path: Path, training: bool = False, bits: int = 16) -> np.ndarray:
    """The one reader policy: (h, w) or (h, w, 1|2|3|4) pixels of uint8 or uint16 as (h, w, 3) uint8.

    Inference (the readers here) takes images as scanners and viewers write them and states each conversion in
    ``SlideReader.conversion`` for its log: 16-bit samples keep the top 8 of their ``bits`` significant bits (the
    reader's ``significant_bits``: a 12-bit camera's 0-4095 maps onto 0-255 as value / 16, the full 0-65535 range
    as value / 256 as skimage's img_as_ubyte does; values above the range read white), grey (with or without
    alpha) is repeated into three channels so that the predictor can refuse it by name (``SlideReader.greyscale``:
    the networks need H&E colour), and fully transparent pixels (no data, often stored black, which would read as
    dense tissue) are made white before alpha is dropped; partly transparent ones keep their colour.
    Training (``data.read_image``, ``training=True``) refuses 16-bit, grey and RGBA with any transparent pixel
    instead, and drops only an alpha that is opaque everywhere: a tile read wrong would silently teach the network
    and shift the channel statistics, and a training set can be converted once by hand where a cohort cannot.
    """
    _check_dtype(pixels.dtype, path)
    if training and pixels.dtype != np.uint8:
        raise ImageError(f"{path} is {pixels.dtype}, not 8-bit; scaling is ambiguous, so convert it to 8-bit RGB "
                         "(e.g. in QuPath or with skimage.util.img_as_ubyte) before training on it")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{path} has shape {pixels.shape}; expected a grey, RGB or RGBA image (height, width[, "
                         "channels])")
    channels = pixels.shape[-1]
    if training and channels < 3:
        raise ImageError(f"{path} is greyscale; the models need H&E colour: supply the RGB image")
    if training and channels == 4 and not np.all(pixels[..., 3] == 255):
        raise ImageError(f"{path} is RGBA with transparent pixels; flatten it onto white and save it as RGB")
    if pixels.dtype == np.uint16:
        pixels = np.minimum(pixels >> (bits - 8), WHITE).astype(np.uint8)
    colour = pixels[..., :1] if channels < 3 else pixels[..., :3]
    if channels in (2, 4):
        empty = pixels[..., -1] == 0
        if empty.any():
            colour = np.where(empty[..., None], np.uint8(WHITE), colour)
    if channels < 3:
        return np.repeat(colour, 3, axis=-1)
    return np.ascontiguousarray(colour)


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if np.dtype(dtype) not in (np.uint8, np.uint16):
        raise ImageError(
            f"{path} holds {np.dtype(dtype)} pixels; only 8- or 16-bit unsigned RGB / grey images are supported. "
            "Convert it to 8-bit RGB (e.g. with QuPath, bfconvert or skimage.util.img_as_ubyte) and retry."
        )


def _significant_bits(maximum: int) -> int:
    return max(8, int(maximum).bit_length())


def _colour_max(pixels: np.ndarray) -> int:
    """The largest sample of (h, w[, channels]) pixels, alpha (the last of 2 or 4 channels) aside: an opaque alpha
    is stored at the container's maximum whatever range the colours use."""
    if pixels.ndim == 3 and pixels.shape[-1] in (2, 4):
        pixels = pixels[..., :-1]
    return int(pixels.max()) if pixels.size else 0


def _channels(shape: tuple[int, ...], axes: str) -> int:
    """Samples per pixel of an array with the given axes (1 when it has no sample axis)."""
    return math.prod(n for a, n in zip(axes, shape) if a in "SC")


class ArrayReader(SlideReader):
    """A small image held in memory (PNG, JPEG, BMP, WebP): one level. ``cmyk``: the pixels were converted from CMYK."""

    def __init__(self, path: Path, pixels: np.ndarray, base_mpp: float | None = None, cmyk: bool = False,
                 bits: int | None = None):
        """``bits``: the significant bits of 16-bit samples (12 for a 12-bit camera, 16 for the full range);
        default: those of the range the data reach."""
        if bits is not None and not (isinstance(bits, int) and 8 <= bits <= 16):
            raise ValueError(f"bits must be a whole number from 8 to 16 (the significant bits of 16-bit samples), "
                             f"got {bits!r}")
        maximum = None
        if pixels.dtype == np.uint16:
            maximum = (1 << bits) - 1 if bits is not None else _colour_max(pixels)
        self.pixels = rgb_uint8(pixels, path, bits=_significant_bits(maximum) if maximum is not None else 16)
        super().__init__(path, [self.pixels.shape[:2]], base_mpp, source_dtype=pixels.dtype,
                         source_channels=1 if pixels.ndim == 2 else pixels.shape[-1])
        self._sample_max, self.source_cmyk = maximum, cmyk

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.pixels[y0:y1, x0:x1]


@contextmanager
def _tifffile_log_held(path: Path) -> Iterator[None]:
    """tifffile's own log records of opening ``path`` held back: a file that cannot be opened gets one error naming
    it, and a damaged one that opens anyway (a copy cut short: tifffile logs "... series raised TiffFileError",
    naming the file without its folder) one warning that says what it means; other records pass on as they were."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addFilter(hold)
    try:
        yield
    finally:
        tifffile_logger.removeFilter(hold)
    damage = [r for r in held if "raised TiffFileError" in r.getMessage()]
    if damage:
        cause = damage[0].getMessage().split(" raised ", 1)[1]
        warnings.warn(f"{path}: part of its TIFF structure cannot be read ({cause}): the file is damaged or a copy "
                      "cut short in transfer (compare its size with the original's); reading what can be read",
                      stacklevel=5)
    for record in held:
        if record not in damage:
            tifffile_logger.handle(record)


class TiffReader(SlideReader):
    """TIFF / BigTIFF read lazily through tifffile's zarr store, one zarr array per pyramid level.

    Levels come from the first series' own pyramid (SubIFDs, OME, SVS-style) or, for plain multi-page files, from
    the following series when each is a reduced copy of the first.
    """

    def __init__(self, path: Path):
        with _tifffile_log_held(path):
            self._tif = tifffile.TiffFile(path)
            try:
                self._levels = self._find_levels(path)
                self._arrays: dict[int, Any] = {}
                base = self._level(0)
                _check_dtype(base.dtype, path)
                _check_not_cmyk(base.keyframe, path)
                shapes = [self._yx_shape(self._level(k), path) for k in range(len(self._levels))]
                mpp, origin = tiff_mpp_and_origin(self._tif, path)
                super().__init__(path, shapes, mpp, source_dtype=base.dtype,
                                 source_channels=_channels(base.shape, base.axes))
                self.mpp_origin = origin if mpp is not None else None
            except BaseException:
                self._tif.close()
                raise

    def _find_levels(self, path: Path) -> list[tuple[Any, int]]:
        """(series, level index within it) for each pyramid level, finest first."""
        series = self._tif.series
        if not series:
            raise ImageError(f"{path} contains no image data")
        first = series[0]
        if len(first.levels) > 1:
            return [(first, k) for k in range(len(first.levels))]
        levels = [first]
        for candidate in series[1:]:
            prev_h, prev_w = self._yx_shape(levels[-1], path)
            if candidate.axes != first.axes or candidate.dtype != first.dtype:
                break
            h, w = self._yx_shape(candidate, path)
            ratio_h, ratio_w = prev_h / h, prev_w / w
            # a reduced level keeps the aspect ratio up to rounding; thumbnails, labels and macros do not
            if not (ratio_h > 1.0 and abs(ratio_h - ratio_w) <= 0.02 * ratio_h + 2.0 / min(h, w)):
                break
            levels.append(candidate)
        return [(s, 0) for s in levels]

    @staticmethod
    def _yx_shape(level: Any, path: Path) -> tuple[int, int]:
        axes, shape = level.axes, level.shape
        if "Y" not in axes or "X" not in axes:
            raise ImageError(f"{path} has axes {axes!r}; expected a 2-D image with Y and X axes")
        extra = [n for a, n in zip(axes, shape) if a not in "YXSC" and n > 1]
        if extra:
            raise ImageError(
                f"{path} is a stack (axes {axes!r}, shape {shape}); expected a single 2-D RGB image per level. "
                "Save one plane per file."
            )
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])

    def _level(self, level: int) -> Any:
        series, k = self._levels[level]
        return series.levels[k]

    def _array(self, level: int) -> Any:
        if level not in self._arrays:
            series, k = self._levels[level]
            self._arrays[level] = zarr.open(series.aszarr(level=k), mode="r")
        return self._arrays[level]

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return rgb_uint8(self._read_stored(level, y0, y1, x0, x1), self.path, bits=self.significant_bits)

    def _read_stored(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The stored samples of a box as (h, w[, samples]), before conversion to RGB uint8."""
        axes = self._level(level).axes
        index = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a in "SC" else 0
                      for a in axes)
        kept = [a for a in axes if a in "YXSC"]
        try:
            pixels = np.asarray(self._array(level)[index])
        except DECODE_ERRORS as err:
            _settle_zarr_reads()
            raise ImageError(
                f"{self.path} is damaged at level {level}: the region at y={y0}, x={x0} of {y1 - y0}x{x1 - x0} px "
                f"cannot be decoded ({type(err).__name__}: {err}). Re-export or re-scan the file; a copy cut short "
                "in transfer fails the same way (compare its size with the original's)") from err
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
        return pixels.transpose(order)

    def _find_sample_max(self) -> int:
        """MaxSampleValue when the file states a plausible one, else the maximum of the smallest pyramid level,
        read in bands of rows so that a file without a pyramid costs a sequential scan, never a full copy."""
        stated = _max_sample_value(self._level(0).keyframe)
        if stated is not None:
            return stated
        level = self.n_levels - 1
        height, width = self.level_shapes[level]
        band = max(1, (16 << 20) // (width * self.source_channels * self.source_dtype.itemsize))  # about 16 MB
        return max(_colour_max(self._read_stored(level, y0, min(y0 + band, height), 0, width))
                   for y0 in range(0, height, band))

    def close(self) -> None:
        self._arrays.clear()
        self._tif.close()


# what decoding a damaged tile raises (imagecodecs' codec errors are RuntimeErrors, tifffile's and reshapes are
# ValueErrors); MemoryError and OSError (a network share gone) are not the file's fault and pass through
DECODE_ERRORS = (ValueError, RuntimeError, EOFError)


def _settle_zarr_reads(timeout: float = 30.0) -> None:
    """Waits until zarr's event loop has no reads in flight.

    zarr reads a region's chunks as concurrent tasks on its own loop, and when one chunk fails to decode it raises
    at once while the others go on; a process that then exits (one damaged slide, the run ends) stops that loop under
    them, and asyncio logs dozens of "Task was destroyed but it is pending!" lines. Nothing is cancelled here, so
    reads of other threads finish as they would.
    """
    import asyncio

    async def others_done() -> None:
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:
        from zarr.core.sync import sync  # zarr 3; zarr 2 reads chunks without a loop

        sync(others_done())
    except Exception:  # only the log's tidiness depends on it; the read's own error is what matters
        pass


def _check_not_cmyk(page: Any, path: Path) -> None:
    # read as it is, C, M and Y would pass for R, G and B: inverted colours the networks would segment regardless
    if page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
        raise ImageError(f"{path} is CMYK (photometric SEPARATED); the models need RGB. Convert it to RGB (e.g. in "
                         "QuPath, or with ImageMagick: magick in.tif -colorspace sRGB out.tif) and retry.")


def _max_sample_value(page: Any) -> int | None:
    """The MaxSampleValue tag of a 16-bit page when it marks a range wider than 8 bits; None otherwise.

    Writers that convert from 8 bit may copy its 255 along, which would read every 16-bit sample as white, so a
    value of 255 or less is taken as absent and the data decide.
    """
    value = page.tags.valueof(281)  # MaxSampleValue, one per sample or one for all
    if value is None:
        return None
    stated = max(value) if isinstance(value, (tuple, list)) else int(value)
    return int(stated) if np.iinfo(np.uint8).max < stated <= np.iinfo(np.uint16).max else None


def _plausible(mpp: float | None, path: Path, source: str) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        warnings.warn(f"{path}: ignoring implausible pixel size {mpp:.4g} um/px from {source}", stacklevel=3)
        return None
    return mpp


def _tiff_mpp(tif: tifffile.TiffFile, path: Path) -> float | None:
    """Level-0 microns per pixel from SVS, OME or ImageJ metadata, else the resolution tags."""
    return tiff_mpp_and_origin(tif, path)[0]


def tiff_mpp_and_origin(tif: tifffile.TiffFile, path: Path) -> tuple[float | None, str | None]:
    """``_tiff_mpp`` and where in the file it is stated, in words (None, None where the file states none)."""
    page = tif.series[0].levels[0].keyframe
    if tif.is_svs:
        meta = tifffile.tifffile.svs_description_metadata(page.description)
        if "MPP" in meta:
            return _plausible(float(meta["MPP"]), path, "the SVS description"), "the SVS description"
    described = _description_mpp(page.description) if not tif.is_svs else None
    if described is not None:  # "Scanner X|AppMag = 40|MPP = 0.2527": Aperio's fields without its name first
        return _plausible(described, path, "the image description's MPP field"), "the image description's MPP field"
    if tif.is_ome and tif.ome_metadata:
        try:
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
            size = pixels.get("PhysicalSizeX")
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit)
            if size is not None and scale is not None:
                return _plausible(float(size) * scale, path, "the OME metadata"), "the OME metadata"
        except (ET.ParseError, StopIteration, ValueError):
            pass
    x_res = page.resolution[0] if page.resolution else 0.0
    if not x_res:
        return None, None
    unit = page.resolutionunit
    microns = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0,
               tifffile.RESUNIT.MILLIMETER: 1e3, tifffile.RESUNIT.MICROMETER: 1.0}.get(unit)
    if microns is not None:
        origin = f"the resolution tags, {x_res:g} pixels per {unit.name.lower()}"
        return _plausible(microns / x_res, path, origin), origin
    if tif.is_imagej:
        # ImageJ stores pixels per ``unit`` with no TIFF unit; µ may arrive escaped as \u00B5
        unit_name = str((tif.imagej_metadata or {}).get("unit", "")).replace("\\u00B5", "µ")
        if unit_name in ("µm", "um", "micron", "microns"):
            return _plausible(1.0 / x_res, path, "the ImageJ metadata"), "the ImageJ metadata"
    return None, None


def _description_mpp(description: str) -> float | None:
    """The number of an ``MPP = x`` field of a pipe-separated image description; None where there is none."""
    if "|" not in (description or ""):
        return None
    for field in description.split("|"):
        name, equals, value = field.partition("=")
        if equals and name.strip().upper() == "MPP":
            try:
                return float(value.strip())
            except ValueError:
                return None
    return None


def doubtful_mpp(stated: float, working: float | None) -> str | None:
    """Why a pixel size a file states is likely wrong, in words; None when it looks like a scan's (``SCAN_MPP``,
    and within ``DOUBTFUL_SCALE`` of the model's ``working`` size where that is known)."""
    if not SCAN_MPP[0] <= stated <= SCAN_MPP[1]:
        return (f"outside the {SCAN_MPP[0]:g}-{SCAN_MPP[1]:g} um/px of H&E scans (a print or screen resolution, not a "
                "microscope's?)")
    if working is not None and max(stated / working, working / stated) > DOUBTFUL_SCALE:
        return f"{max(stated / working, working / stated):.3g}x away from the model's {working:g} um/px"
    return None


class OpenSlideReader(SlideReader):
    """Vendor formats (.svs, .ndpi, .mrxs, ...) and DICOM slides through OpenSlide (``pip install
    nucleiseg-monai[openslide]``)."""

    def __init__(self, path: Path):
        openslide = _import_openslide(path)
        self._slide = openslide.OpenSlide(str(path))
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        super().__init__(
            path,
            [(int(h), int(w)) for w, h in self._slide.level_dimensions],
            _plausible(float(mpp), path, "the OpenSlide properties") if mpp else None,
            [float(d) for d in self._slide.level_downsamples],
        )
        self.mpp_origin = "the OpenSlide properties" if self.base_mpp is not None else None
        if self.base_mpp is None and _sniff(path) == "tiff":
            # OpenSlide's generic TIFF driver reads no pixel size from SVS-like descriptions or inch resolution tags
            self._tiff_mpp_fallback(path)

    def _tiff_mpp_fallback(self, path: Path) -> None:
        try:
            with tifffile.TiffFile(path) as tif:
                mpp, origin = tiff_mpp_and_origin(tif, path)
        except Exception:  # OpenSlide reads the file; a metadata parse that fails leaves the size unknown
            return
        if mpp is not None:
            self.base_mpp = self.stated_mpp = mpp
            self.mpp_origin = origin

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        rgba = np.asarray(self._slide.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0)))
        # OpenSlide marks pixels outside the scanned area transparent; composite them onto white
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return (rgba[..., :3] * alpha + WHITE * (1.0 - alpha)).round().astype(np.uint8)

    @property
    def properties(self) -> Any:
        """OpenSlide's properties of the slide (``openslide.*`` and the format's own, e.g. ``dicom.*``)."""
        return self._slide.properties

    @property
    def bounds(self) -> tuple[int, int, int, int] | None:
        # MIRAX and some other formats state the scanned area within a larger level 0 (openslide.bounds-*)
        names = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")
        try:
            x, y, width, height = (int(self.properties[name]) for name in names)
        except (KeyError, ValueError):
            return None
        return None if (x, y, height, width) == (0, 0, *self.level_shapes[0]) else (x, y, width, height)

    def close(self) -> None:
        self._slide.close()


def _open_with_openslide(path: Path, suffix: str) -> OpenSlideReader:
    try:
        reader = OpenSlideReader(path)
    except ImportError:
        raise
    except Exception as err:  # OpenSlide says "Unsupported or missing image file" for a cut copy too
        if suffix in DICOM_SUFFIXES and (why := not_a_slide(path)):
            raise ImageError(f"{path} {why} (OpenSlide: {err})") from err
        raise ImageError(
            f"cannot read {path} as a {path.suffix} slide (OpenSlide: {type(err).__name__}: {err}): the file is "
            "damaged, a copy cut short in transfer (compare its size with the original's), or not a format "
            "OpenSlide reads (https://openslide.org/formats/)") from err
    if suffix in DICOM_SUFFIXES:
        try:
            _check_finest_level(reader)
        except BaseException:
            reader.close()
            raise
    return reader


def _check_finest_level(reader: OpenSlideReader) -> None:
    """ImageError where a DICOM slide's finest level present is marked as downsampled from a finer one (ImageType
    RESAMPLED): that level's file is missing, and OpenSlide would silently read the slide at a coarser scale."""
    if reader.properties.get("dicom.ImageType[3]") == "RESAMPLED":
        height, width = reader.level_shapes[0]
        raise ImageError(
            f"{reader.path}: the finest level of its DICOM series ({width} x {height} px) is marked RESAMPLED, "
            f"downsampled from a finer level whose file is not in {reader.path.parent}: copy or export all of the "
            "slide's .dcm files into that folder again")


def _import_openslide(path: Path) -> Any:
    try:
        import openslide
    except ImportError as err:  # also raised when the Python package is present but the C library is not
        raise ImportError(
            f"{path} is a {path.suffix} slide, which needs OpenSlide: pip install 'nucleiseg-monai[openslide]' "
            f"(installs openslide-python and openslide-bin). Import failed with: {err}"
        ) from err
    return openslide


def check_mpp(value: float, what: str = "--mpp") -> float:
    """``value`` as a float when it can be a level-0 pixel size in microns, else ValueError naming ``what``.

    A magnification typed as a pixel size (--mpp 40) would resample every tile x160 for hours, and 0, a negative
    or a huge value fail deep in the planner's logarithms; refusing at once, with the likely mistake named, costs
    nothing.
    """
    if isinstance(value, (bool, np.bool_)):  # float(True) is 1.0: a flag passed where a pixel size belongs
        raise ValueError(f"{what} {value!r} is not a pixel size; {MPP_HINT}")
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} is not a number; {MPP_HINT}") from None
    if not (math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
        raise ValueError(f"{what} {mpp:g} um/px is outside the plausible pixel sizes {PLAUSIBLE_MPP[0]:g}-"
                         f"{PLAUSIBLE_MPP[1]:g} um/px; {MPP_HINT}")
    return mpp


def _read_plain(path: Path, suffix: str | None = None) -> tuple[np.ndarray, bool]:
    """A PNG or JPEG as an array, and whether it was converted from CMYK.

    16-bit PNGs are decoded by imagecodecs because Pillow keeps only the top byte of 16-bit RGB, which would lose
    a 12-bit image; CMYK JPEGs are converted by Pillow, which knows Adobe's inverted CMYK, because read as they are
    their four channels would pass for RGBA. ``suffix``: the format to decode, where the file's own suffix names
    another (imageio picks its plugin by the suffix).
    """
    with open(path, "rb") as file:
        head = file.read(26)
    if head[:8] == PNG_SIGNATURE and head[24] == 16:  # IHDR's bit depth
        return imagecodecs.png_decode(path.read_bytes()), False
    with Image.open(path) as image:
        if image.mode == "CMYK":
            return np.asarray(image.convert("RGB")), True
    if suffix is not None and suffix != path.suffix.lower():
        import imageio.v3 as iio

        return np.asarray(iio.imread(path, extension=suffix)), False
    return np.asarray(skio.imread(path)), False


# the first bytes of each format open_image reads, as its file type names it
MAGIC = {"tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), "png": (PNG_SIGNATURE,),
         "jpeg": (b"\xff\xd8\xff",), "bmp": (b"BM",)}


def _sniff(path: Path) -> str | None:
    """The format the file's first bytes announce ("tiff", "png", "jpeg", "bmp", "webp"); None when unknown."""
    with open(path, "rb") as file:
        head = file.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((kind for kind, starts in MAGIC.items() if head.startswith(starts)), None)


def choose_level(
    level_mpps: list[float | None], level: int | None = None, target_mpp: float | None = None, path: Path | str = ""
) -> int:
    """The pyramid level to read: ``level`` if given, else the one closest to ``target_mpp`` (in log scale) among
    those at most 1.2x coarser than it; level 0 when the pixel size is unknown or all levels are coarser. Inference
    resamples the level read to ``target_mpp``, so a level far from it costs time (reading a finer one) or detail
    (a coarser level 0, as a 20x scan), not correctness.
    """
    if level is not None:
        if not 0 <= level < len(level_mpps):
            raise ImageError(f"{path} has pyramid levels 0..{len(level_mpps) - 1}; level {level} does not exist")
        return level
    if target_mpp is None:
        return 0
    if level_mpps[0] is None:
        warnings.warn(
            f"{path}: pixel size unknown, so target mpp {target_mpp} cannot pick a level; using level 0. "
            "Pass the slide's mpp (input_mpp=..., nucleiseg predict --mpp) if it is known.", stacklevel=2,
        )
        return 0
    fine_enough = [lv for lv, m in enumerate(level_mpps) if m <= target_mpp * COARSER_TOLERANCE]
    if not fine_enough:
        return 0
    return min(fine_enough, key=lambda lv: abs(math.log(level_mpps[lv] / target_mpp)))


def open_image(
    path: str | os.PathLike, level: int | None = None, mpp: float | None = None, input_mpp: float | None = None,
    force_mpp: bool = False,
) -> SlideReader:
    """Open a tile or slide for lazy RGB reads at one pyramid level.

    Args:
        path: PNG / JPEG / BMP / WebP (loaded whole), TIFF / BigTIFF (lazy, via tifffile's zarr store) or an
            OpenSlide format (a DICOM slide: any .dcm file of its series).
        level: explicit pyramid level (0 = full resolution).
        mpp: target microns per pixel; picks the closest level no coarser than 1.2x it (ignored if ``level``).
        input_mpp: level-0 microns per pixel to use when the file states none (a size the file states wins;
            ``reader.stated_mpp`` tells which applied); one outside ``PLAUSIBLE_MPP`` is refused.
        force_mpp: use ``input_mpp`` even where the file states a size (a wrong one: a print resolution);
            ``reader.stated_mpp`` keeps what the file states.
    """
    path = Path(path)
    if force_mpp and input_mpp is None:  # before the file is opened: nothing to force it with
        raise ValueError(f"{path}: force_mpp needs the pixel size to force: pass --mpp X with --force_mpp")
    if input_mpp is not None:
        try:
            input_mpp = check_mpp(input_mpp, f"{path}: input_mpp")
        except ValueError as err:
            raise ImageError(str(err)) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes): a copy or export that never finished; copy or export it again")
    suffix = path.suffix.lower()
    kind = _sniff(path)
    if kind is not None and suffix not in OPENSLIDE_SUFFIXES and (kind == "tiff") != (suffix in TIFF_SUFFIXES):
        # the bytes decide: a PNG saved as .tif is a good image, not a damaged TIFF
        warnings.warn(f"{path} is a {kind.upper()} file despite its {path.suffix} suffix; read as {kind.upper()} "
                      f"(rename it to .{kind} to silence this)", stacklevel=2)
        suffix = ".tif" if kind == "tiff" else f".{kind}"
    if suffix in OPENSLIDE_SUFFIXES:
        reader: SlideReader = _open_with_openslide(path, suffix)
    elif suffix in TIFF_SUFFIXES:
        try:
            reader = TiffReader(path)
        except ImageError:
            raise
        except Exception as err:  # tifffile raises assorted types for damaged files; name the file
            raise ImageError(f"cannot read {path} as TIFF ({type(err).__name__}: {err}); is the file damaged?") from err
    else:
        try:
            pixels, cmyk = _read_plain(path, suffix)
        except Exception as err:  # imagecodecs / imageio / PIL raise assorted types; name the file
            raise ImageError(f"cannot read {path} ({type(err).__name__}: {err}); is the file damaged?") from err
        reader = ArrayReader(path, pixels, cmyk=cmyk)
    if input_mpp is not None and (reader.base_mpp is None or force_mpp):
        reader.base_mpp = input_mpp
    try:
        reader.level = choose_level(reader.level_mpps(), level, mpp, path)
    except BaseException:
        reader.close()
        raise
    return reader


@dataclass
class TissueMask:
    """Boolean tissue mask of a whole image at low resolution.

    ``downsample`` is (y, x): pixels of the reader's chosen level per mask pixel.
    """

    mask: np.ndarray
    downsample: tuple[float, float]

    def fraction(self, y: int, x: int, h: int, w: int) -> float:
        """Share of the box (in the reader's level pixels) that is tissue; 0 for a box outside the image."""
        dy, dx = self.downsample
        r0, r1 = max(0, math.floor(y / dy)), min(self.mask.shape[0], math.ceil((y + h) / dy))
        c0, c1 = max(0, math.floor(x / dx)), min(self.mask.shape[1], math.ceil((x + w) / dx))
        if r0 >= r1 or c0 >= c1:
            return 0.0
        return float(self.mask[r0:r1, c0:c1].mean())

    def contains(self, y: int, x: int, h: int, w: int) -> bool:
        return self.fraction(y, x, h, w) > 0.0


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max, in float32: the one channel of ``rgb2hsv`` the mask needs, in a tenth
    of its time (rgb2hsv computes hue and value in float64 too)."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def tissue_mask(
    reader: SlideReader,
    max_side: int = 1024,
    min_threshold: float = 0.04,
    max_threshold: float = 0.15,
    min_area: int = 16,
    dilation: int = 2,
    thumbnail: np.ndarray | None = None,
) -> TissueMask:
    """Tissue = saturated pixels of a thumbnail (white glass and black borders are unsaturated).

    The saturation threshold is Otsu's, clipped to [min_threshold, max_threshold]: the clip keeps an all-white
    image empty and an all-tissue image full, where Otsu alone would split noise or split tissue. Components of
    fewer than ``min_area`` mask pixels are dropped (dust), then the mask is dilated by ``dilation`` pixels so
    nuclei at the tissue edge stay inside.
    """
    thumb = reader.thumbnail(max_side) if thumbnail is None else thumbnail
    factor = math.ceil(max(thumb.shape[:2]) / max_side)
    if factor > 1:  # the overlay's larger thumbnail may be passed in; the blur below makes averaging unneeded
        thumb = thumb[::factor, ::factor]
    saturation = gaussian(_saturation(thumb), sigma=1.0)
    otsu = threshold_otsu(saturation) if np.ptp(saturation) > 0 else max_threshold
    mask = saturation > float(np.clip(otsu, min_threshold, max_threshold))
    components = connected_components(mask, connectivity=2)
    sizes = np.bincount(components.ravel())
    mask = (sizes >= min_area)[components] & mask
    if dilation > 0:
        mask = grey_dilation(mask, disk(dilation))
    height, width = reader.shape
    return TissueMask(mask, (height / mask.shape[0], width / mask.shape[1]))
