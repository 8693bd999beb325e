"""Regions to one label map, exact at seams: which window keeps each nucleus, and a band of label tiles to write.

An image is cut into square *cores* that partition it (``RegionGrid``); each core is analysed with a margin of
context on every side (its *window*, cut at the image border). ``RegionStitcher`` takes each window's instance labels
(ids 1..n, as the instance step gives them) in raster order of the regions and keeps each nucleus once, whole, with a
global id; kept nuclei are written into a band of label tiles, and the tile rows no later window can reach are handed
out in order, so memory is bounded by region size x image width, never by image area. Nothing here knows about a
network, a file or a pixel size: windows in, label tiles out.

Stitching rule (exact and order-independent for consistent windows):
  * anchor of an instance = integer floor of its centroid, computed with integer sums of global coordinates, so
    the same pixel set gives the same anchor in every window (no float rounding near a seam). Cores partition the
    image, so exactly one core contains each anchor: that region keeps the nucleus, whole, even where it extends
    into neighbouring cores; every other window that sees it drops it.
  * with a margin larger than the largest nucleus plus the width over which the instance step depends on the window
    border, each window sees the nuclei it keeps whole and with full context, so they match a whole-image run.
  * safety nets for windows that disagree slightly (real networks near seams): a candidate of which at least half
    the pixels are already owned by written nuclei is a duplicate and is dropped; a candidate whose anchor fell into
    a core already processed (or skipped), within ``RESCUE_PX`` of this core, that nobody wrote and that is not cut
    by the window, is kept (its owner's version had its anchor on this side of the seam). Pixels claimed twice stay
    with the nucleus written first (raster order of regions), so each nucleus's final pixel set is known when it is
    written and its measurements are exact for the label map on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# A nucleus whose anchor is this close to the core but on an already processed side may be rescued (see above).
RESCUE_PX = 8
# A candidate overlapping written nuclei on at least this share of its pixels is the same nucleus again.
DUPLICATE_FRACTION = 0.5


@dataclass(frozen=True)
class RegionGrid:
    """Square cores of side ``size`` partitioning an image of ``shape`` (height, width), each read with ``margin``
    pixels of context on every side."""

    shape: tuple[int, int]
    size: int
    margin: int

    def __post_init__(self):
        if self.size < 1 or self.margin < 0:
            raise ValueError(f"region size must be >= 1 and margin >= 0, got {self.size}, {self.margin}")

    @property
    def rows_cols(self) -> tuple[int, int]:
        return math.ceil(self.shape[0] / self.size), math.ceil(self.shape[1] / self.size)

    def core(self, ij: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of region ij's core, cut at the image border."""
        y0, x0 = ij[0] * self.size, ij[1] * self.size
        return y0, x0, min(y0 + self.size, self.shape[0]), min(x0 + self.size, self.shape[1])

    def window(self, ij: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y, x, h, w) of region ij's core with its margin, cut at the image border: there is no context beyond
        it, and a tile-sized image would otherwise cost the network (512 + 2 * margin)^2 pixels for 512^2."""
        y0, x0, y1, x1 = self.core(ij)
        wy, wx = max(y0 - self.margin, 0), max(x0 - self.margin, 0)
        return wy, wx, min(y1 + self.margin, self.shape[0]) - wy, min(x1 + self.margin, self.shape[1]) - wx


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
        self.flushed_rows = 0  # tile rows already handed out
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
            raise RuntimeError("internal error: a nucleus reaches label rows already handed out")
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


class RegionStitcher:
    """Stitches the windows of ``grid`` into one label map of (tile, tile) uint32 tiles, row-major.

    ``todo``: bool array of ``grid.rows_cols``, the regions that will be added (others, e.g. without tissue, count as
    done with nothing in them). Add them in raster order with ``add``; ``tiles`` yields the tiles no later window can
    change, and every remaining one once all regions are added. ``nuclei``: nuclei kept so far (ids 1..nuclei);
    ``truncated``: kept nuclei that touch a window side inside the image (the margin may be too small).

    ``where``: optional test of the nuclei a region would keep, given their centroids (y, x) in the image's pixels
    (pixel centres at integers) -> bool; those it fails are dropped, their pixels left to the nuclei after them
    (an ROI: ``roi.Roi``). The centroids come from the same integer sums as the anchors, so every window that sees
    a nucleus tests the same point and the answer does not depend on which region keeps it.
    """

    def __init__(self, grid: RegionGrid, todo: np.ndarray | None = None, tile: int = 512,
                 where: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        todo = np.ones(grid.rows_cols, bool) if todo is None else np.asarray(todo, bool)
        if todo.shape != grid.rows_cols:
            raise ValueError(f"todo has shape {todo.shape}, the region grid {grid.rows_cols}")
        self.grid = grid
        self.where = where
        self.band = _TileBand(grid.shape, tile)
        self.done = ~todo
        self.nuclei = 0
        self.truncated = 0

    def add(self, ij: tuple[int, int], labels: np.ndarray) -> np.ndarray | None:
        """Keep the nuclei region ij owns (module docstring) of its window's instance labels (``grid.window(ij)``
        shaped, ids 1..n): their pixels with global ids in a window-shaped array (0 elsewhere, and where an earlier
        nucleus holds the pixel), or None when it keeps none."""
        if self.done[ij]:
            raise ValueError(f"region {ij} was already added or is not to be processed")
        try:
            return self._keep(ij, labels)
        finally:
            self.done[ij] = True

    def _keep(self, ij: tuple[int, int], labels: np.ndarray) -> np.ndarray | None:
        height, width = self.grid.shape
        size = self.grid.size
        wy, wx, wh, ww = self.grid.window(ij)
        if labels.shape != (wh, ww):
            raise ValueError(f"labels of region {ij} have shape {labels.shape}, its window {(wh, ww)}")
        cy0, cx0, cy1, cx1 = self.grid.core(ij)
        n = int(labels.max())
        if n == 0:
            return None

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

        existing = self.band.read(wy, wx, wh, ww)
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
        done = self.done
        anchor_done = done[np.clip(ay // size, 0, done.shape[0] - 1), np.clip(ax // size, 0, done.shape[1] - 1)]
        rescue = present & ~own & anchor_done & (gap <= RESCUE_PX) & ~edge
        keep = (own | rescue) & (owned < DUPLICATE_FRACTION * count)
        keep[0] = False
        if self.where is not None and keep.any():
            candidates = np.flatnonzero(keep)
            keep[candidates] = self.where(sum_y[candidates] / count[candidates], sum_x[candidates] / count[candidates])
        kept = int(keep.sum())
        if kept == 0:
            return None
        self.truncated += int((keep & edge).sum())

        global_id = np.zeros(n + 1, np.uint32)
        global_id[keep] = np.arange(self.nuclei + 1, self.nuclei + 1 + kept, dtype=np.uint32)
        final = global_id[labels]
        final[existing > 0] = 0  # first written keeps contested pixels
        self.band.write(wy, wx, final)
        self.nuclei += kept
        return final

    def tiles(self) -> Iterator[np.ndarray]:
        """The label tiles, row-major, that no region still to be added can reach: above the window of the first
        region row with a region left (all of them once every region is added)."""
        pending = np.flatnonzero(~self.done.all(axis=1))
        final_rows = self.grid.shape[0] if pending.size == 0 else pending[0] * self.grid.size - self.grid.margin
        yield from self.band.flush(int(final_rows))
