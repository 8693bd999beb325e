"""Synthetic H&E-like images with known nucleus instances, so every code path runs without real data.

Geometry first, pixels second: a `SyntheticSlide` holds the analytic shape of every nucleus (centre, ellipse
axes, angle, low-order radial harmonics) and of the tissue; `read_region` rasterises any window of it. Every
pixel is a pure function of its global coordinates (noise comes from a coordinate hash, not a stream RNG) and the
blur is computed with a halo, so a large image rendered block by block equals the same image rendered in one
piece, and memory stays bounded by the window plus the nucleus list.

Truth is unambiguous: nuclei are painted in id order and a later nucleus overwrites an earlier one. Placement
rejects any nucleus that would cut an earlier one into pieces or leave it less than half visible, so every id is
a single 4-connected region of plausible area (also where the image border crops it).

Colours follow the Beer-Lambert stain model in skimage.color's HED convention (`rgb_from_hed`, the same units
`skimage.color.rgb2hed` returns): optical density = h * H + e * E + d * D, with dense textured haematoxylin in
nuclei, textured eosin in a fibrous stroma, and white gaps; then gaussian blur and pixel noise. The small third
(DAB-vector) term in the stroma stands for the residual that real eosin leaves in that channel (CryoNuSeg's
background reads d ~ 0.01-0.05 under rgb2hed); without it Ruifrok's eosin vector renders magenta, not pink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.color import rgb_from_hed

from .data import BINARY_DIR, IMAGE_DIR, INSTANCE_DIR

ORGANS: tuple[str, ...] = (
    "AdrenalGland", "Larynx", "LymphNodes", "Mediastinum", "Pancreas",
    "Pleura", "Skin", "Testes", "Thymus", "ThyroidGland",
)  # spelled as in the CryoNuSeg file names (Human_<Organ>_<NN>.tif)
MPP = 0.25  # um per pixel: CryoNuSeg's 40x scans, which the nucleus sizes here imitate

DEFAULT_DENSITY = 240.0  # nuclei per 512x512 px of tissue (CryoNuSeg averages ~250)
_HARMONICS = 4  # radial harmonics k = 2..5 make ellipses irregular
_NUCLEUS_DTYPE = np.dtype([
    ("cy", "f8"), ("cx", "f8"), ("a", "f8"), ("b", "f8"), ("angle", "f8"),
    ("amp", "f8", (_HARMONICS,)), ("phase", "f8", (_HARMONICS,)), ("stain", "f8"),
])
_KEEP_FRACTION = 0.5  # an earlier nucleus must keep at least this share of its in-image pixels
_MIN_AREA = 12  # px; smallest visible piece accepted (a nucleus of radius ~2)
_GAP_LEVEL = 0.17  # value-noise level below which tissue opens into white gaps
_HED_MIX = np.asarray(rgb_from_hed, dtype=np.float64)
_LOG_ADJUST = -math.log(1e-6)  # skimage's scale between its HED units and natural-log optical density
_GLASS = (0.95, 0.94, 0.96)  # transmitted light through empty glass, slightly blue like a scan


@dataclass(frozen=True)
class SyntheticSlide:
    """An H&E-like image of any size defined analytically; read it in windows of bounded memory.

    Attributes: `shape` (H, W); `seed` (drives texture noise); `nuclei` (structured array, id i+1 is row i);
    `tissue` ((cy, cx, radius, amp, phase) of an irregular tissue blob, or None for tissue everywhere);
    `blur` (gaussian sigma, px); `noise` (pixel noise amplitude on the 0..255 scale).
    """

    shape: tuple[int, int]
    seed: int
    nuclei: np.ndarray
    tissue: tuple[float, float, float, np.ndarray, np.ndarray] | None = None
    blur: float = 1.0
    noise: float = 3.0

    @property
    def n_nuclei(self) -> int:
        return int(len(self.nuclei))

    @property
    def centroids(self) -> np.ndarray:
        """(N, 2) float (y, x) centre of nucleus id i+1 in row i (the centre of its full, uncropped shape)."""
        return np.stack([self.nuclei["cy"], self.nuclei["cx"]], axis=1)

    def read_region(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Render the window [y, y+h) x [x, x+w): (RGB uint8 h x w x 3, instance labels uint32 h x w)."""
        H, W = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > H or x + w > W:
            raise ValueError(f"window y={y} x={x} h={h} w={w} is not inside the {H}x{W} synthetic slide")
        halo = int(4 * self.blur + 0.5) + 1 if self.blur > 0 else 0
        ys = np.arange(y - halo, y + h + halo)
        xs = np.arange(x - halo, x + w + halo)
        labels, rnorm = _paint_nuclei(self.nuclei, ys[0], xs[0], len(ys), len(xs))
        rgb = self._colour(ys[:, None], xs[None, :], labels, rnorm)
        if self.blur > 0:
            for c in range(3):
                rgb[..., c] = ndimage.gaussian_filter(rgb[..., c], self.blur, mode="nearest")
        core = (slice(halo, halo + h), slice(halo, halo + w))
        rgb = rgb[core]
        if self.noise > 0:
            rgb += (_pixel_noise(self.seed, ys[halo:halo + h, None], xs[None, halo:halo + w]) - 0.5) * (
                2 * self.noise / 255.0)
        image = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        return image, labels[core].astype(np.uint32)

    def render(self, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """The whole image, rendered in blocks to bound the temporaries (identical to one read_region)."""
        H, W = self.shape
        image = np.empty((H, W, 3), dtype=np.uint8)
        labels = np.empty((H, W), dtype=np.uint32)
        for y in range(0, H, block):
            for x in range(0, W, block):
                h, w = min(block, H - y), min(block, W - x)
                image[y:y + h, x:x + w], labels[y:y + h, x:x + w] = self.read_region(y, x, h, w)
        return image, labels

    def labels(self) -> np.ndarray:
        """The whole instance label map alone (uint32), as ``render`` gives it, without colouring the image."""
        return _paint_nuclei(self.nuclei, 0, 0, *self.shape)[0].astype(np.uint32)

    def tissue_mask(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> np.ndarray:
        """Bool mask of the tissue blob over a window (all True without a blob); white gaps inside count as tissue."""
        h = self.shape[0] - y if h is None else h
        w = self.shape[1] - x if w is None else w
        ys = np.arange(y, y + h, dtype=np.float64)[:, None]
        xs = np.arange(x, x + w, dtype=np.float64)[None, :]
        if self.tissue is None:
            return np.ones((h, w), dtype=bool)
        return _tissue_margin(self.tissue, ys, xs) >= 0

    def _colour(self, yy: np.ndarray, xx: np.ndarray, labels: np.ndarray, rnorm: np.ndarray) -> np.ndarray:
        """Float RGB in [0, 1] before blur and noise, from stain densities through Beer-Lambert."""
        s = self.seed
        shape = labels.shape
        density = np.clip((_fbm(s, 10, yy, xx, 48.0, 2) - _GAP_LEVEL) / 0.1, 0.0, 1.0)
        if self.tissue is not None:
            density = density * np.clip(_tissue_margin(self.tissue, yy, xx) / 4.0 + 0.5, 0.0, 1.0)
        fibre = _fibres(s, yy, xx)
        mottle = _fbm(s, 20, yy, xx, 12.0, 2)
        cellular = np.clip((_fbm(s, 30, yy, xx, 64.0, 2) - 0.35) / 0.3, 0.0, 1.0)  # purple cytoplasm vs pink stroma
        e = density * (0.018 + 0.03 * fibre) * (0.8 + 0.4 * mottle) * (1.0 - 0.3 * cellular)
        h = density * (0.004 + 0.04 * cellular * mottle)
        d = density * 0.026 * (1.0 - 0.5 * cellular)
        inside = labels > 0
        if inside.any():
            stain = np.zeros(shape)
            stain[inside] = self.nuclei["stain"][labels[inside] - 1]
            chromatin = _fbm(s, 40, yy, xx, 2.5, 2)
            rim = 1.0 + 0.25 * np.clip((rnorm - 0.7) / 0.3, 0.0, 1.0)
            h = np.where(inside, stain * (0.6 + 0.8 * chromatin) * rim, h)
            e = np.where(inside, 0.025 + 0.3 * e, e)
            d = np.where(inside, 0.005, d)
        od = np.stack([h * _HED_MIX[0, c] + e * _HED_MIX[1, c] + d * _HED_MIX[2, c] for c in range(3)], axis=-1)
        return np.exp(-_LOG_ADJUST * od) * np.asarray(_GLASS)


def make_slide(
    size: int | tuple[int, int] = (2048, 2048),
    seed: int = 0,
    *,
    n_nuclei: int | None = None,
    density: float = DEFAULT_DENSITY,
    tissue: bool = False,
    touching: float = 0.5,
    blur: float = 1.0,
    noise: float = 3.0,
) -> SyntheticSlide:
    """Lay out a synthetic slide (geometry only; cheap) to render with `read_region` or `write_slide`.

    n_nuclei: exact count (ValueError if they cannot be placed); default `density` per 512x512 px of tissue.
    tissue: True puts the nuclei in one irregular tissue blob on plain white glass (for tissue-detection tests).
    touching: share of nuclei placed against an existing one (clusters, touching or slightly overlapping).
    """
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if H < 16 or W < 16:
        raise ValueError(f"synthetic image size {H}x{W} is too small; use at least 16x16")
    rng = np.random.default_rng([seed, 1])
    blob = _make_blob(rng, H, W) if tissue else None
    if n_nuclei is None:
        area = H * W if blob is None else _blob_area(blob)
        n_nuclei = int(round(density * area / 512.0**2))
    nuclei = _place_nuclei(rng, H, W, n_nuclei, seed, blob, touching)
    return SyntheticSlide((H, W), int(seed), nuclei, blob, float(blur), float(noise))


def make_tile(
    size: int | tuple[int, int] = 512,
    n_nuclei: int | None = None,
    seed: int = 0,
    *,
    density: float = DEFAULT_DENSITY,
    touching: float = 0.5,
    blur: float = 1.0,
    noise: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One H&E-like tile with known nuclei: (RGB uint8 HxWx3, labels uint32 HxW with ids exactly 1..n_nuclei).

    Deterministic per seed. Nuclei have equivalent radius ~4-14 px (40x, ~0.25 um/px), elliptic or irregular,
    many touching; each id is one 4-connected region of at least 12 px. n_nuclei defaults to `density` per
    512x512 px; ValueError if the requested count does not fit.
    """
    slide = make_slide(size, seed, n_nuclei=n_nuclei, density=density, touching=touching, blur=blur, noise=noise)
    return slide.render()


def write_slide(
    slide: SyntheticSlide,
    path: str | Path,
    *,
    labels_path: str | Path | None = None,
    tile: int = 256,
) -> Path:
    """Write the slide as a tiled BigTIFF (RGB uint8, resolution MPP um/px) rendered tile by tile.

    labels_path also writes the instance labels (uint32, same tiling). Memory stays at one tile.
    """
    H, W = slide.shape
    resolution = (1e4 / MPP, 1e4 / MPP)  # pixels per centimetre

    def tiles(which: int):
        for ty in range(0, H, tile):
            for tx in range(0, W, tile):
                h, w = min(tile, H - ty), min(tile, W - tx)
                block = slide.read_region(ty, tx, h, w)[which]
                pad = [(0, tile - h), (0, tile - w)] + [(0, 0)] * (block.ndim - 2)
                yield np.pad(block, pad)

    path = Path(path)
    tifffile.imwrite(path, tiles(0), shape=(H, W, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     bigtiff=True, resolution=resolution, resolutionunit="CENTIMETER")
    if labels_path is not None:
        tifffile.imwrite(labels_path, tiles(1), shape=(H, W), dtype=np.uint32, tile=(tile, tile),
                         photometric="minisblack", bigtiff=True, resolution=resolution, resolutionunit="CENTIMETER")
    return path


def write_dataset(
    root: str | Path,
    n_tiles: int = 6,
    size: int | tuple[int, int] = 256,
    organs: tuple[str, ...] = ORGANS,
    seed: int = 0,
    with_instances: bool = True,
    n_nuclei: int | None = None,
) -> Path:
    """Write synthetic tiles in the CryoNuSeg/Kaggle layout under root and return root.

    `tissue images/Human_<Organ>_<NN>.tif` (RGB uint8), `label masks modify/...tif` (uint16 instance labels,
    omitted when with_instances is False) and `mask binary/...png` (uint8 0/255, exactly labels > 0). Tile i
    goes to organs[i % len(organs)] with NN counting from 01 per organ, as in the real file names.
    """
    from skimage.io import imsave  # deferred: skimage.io pulls in imageio, which only this writer needs

    if n_tiles < 1 or not organs:
        raise ValueError(f"write_dataset needs n_tiles >= 1 and at least one organ (got {n_tiles}, {organs})")
    root = Path(root)
    dirs = [root / IMAGE_DIR, root / BINARY_DIR] + ([root / INSTANCE_DIR] if with_instances else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    tile_seeds = np.random.SeedSequence(seed).generate_state(n_tiles)
    for i in range(n_tiles):
        name = f"Human_{organs[i % len(organs)]}_{i // len(organs) + 1:02d}"
        image, labels = make_tile(size, n_nuclei, int(tile_seeds[i]))
        tifffile.imwrite(root / IMAGE_DIR / f"{name}.tif", image, photometric="rgb")
        if with_instances:
            tifffile.imwrite(root / INSTANCE_DIR / f"{name}.tif", labels.astype(np.uint16), photometric="minisblack")
        imsave(root / BINARY_DIR / f"{name}.png", np.where(labels > 0, 255, 0).astype(np.uint8),
               check_contrast=False)
    return root


# --- geometry -------------------------------------------------------------------------------------------------

def _radius_bound(n: np.void) -> float:
    return float(max(n["a"], n["b"]) * (1.0 + np.abs(n["amp"]).sum()))


def _bbox(n: np.void) -> tuple[int, int, int, int]:
    """Half-open pixel box (y0, y1, x0, x1) that contains the nucleus shape."""
    r = _radius_bound(n) + 1.0
    return (math.floor(n["cy"] - r), math.ceil(n["cy"] + r) + 1, math.floor(n["cx"] - r), math.ceil(n["cx"] + r) + 1)


def _raster(n: np.void) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Pixel centres inside the nucleus over its own box: (y0, x0, mask, radius / boundary radius).

    Always evaluated over the nucleus' own box, so placement and every window see bit-identical masks.
    """
    y0, y1, x0, x1 = _bbox(n)
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - n["cy"]
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - n["cx"]
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    t = theta - n["angle"]
    a, b = n["a"], n["b"]
    boundary = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    wobble = 1.0 + sum(n["amp"][k] * np.cos((k + 2) * theta + n["phase"][k]) for k in range(_HARMONICS))
    rnorm = rho / (boundary * wobble)
    return y0, x0, rnorm <= 1.0, rnorm


def _paint_nuclei(nuclei: np.ndarray, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Label map (int64, ids = row + 1) and normalised radius over a window; later ids overwrite earlier ones."""
    labels = np.zeros((h, w), dtype=np.int64)
    rnorm = np.zeros((h, w), dtype=np.float64)
    if len(nuclei) == 0:
        return labels, rnorm
    r = np.maximum(nuclei["a"], nuclei["b"]) * (1.0 + np.abs(nuclei["amp"]).sum(axis=1)) + 2.0
    hit = np.flatnonzero((nuclei["cy"] + r >= y0) & (nuclei["cy"] - r < y0 + h)
                         & (nuclei["cx"] + r >= x0) & (nuclei["cx"] - r < x0 + w))
    for i in hit:
        ny0, nx0, mask, rn = _raster(nuclei[i])
        sy = slice(max(ny0, y0), min(ny0 + mask.shape[0], y0 + h))
        sx = slice(max(nx0, x0), min(nx0 + mask.shape[1], x0 + w))
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        local = (slice(sy.start - ny0, sy.stop - ny0), slice(sx.start - nx0, sx.stop - nx0))
        window = (slice(sy.start - y0, sy.stop - y0), slice(sx.start - x0, sx.stop - x0))
        m = mask[local]
        labels[window][m] = i + 1
        rnorm[window][m] = rn[local][m]
    return labels, rnorm


def _random_nucleus(rng: np.random.Generator, cy: float, cx: float, radius: float) -> np.ndarray:
    n = np.zeros((), dtype=_NUCLEUS_DTYPE)
    elong = min(1.0 + rng.exponential(0.35), 2.6)  # mostly round-oval, a few spindle-shaped
    n["cy"], n["cx"] = cy, cx
    n["a"], n["b"] = radius * math.sqrt(elong), radius / math.sqrt(elong)
    n["angle"] = rng.uniform(0.0, math.pi)
    irregular = 0.09 if rng.random() < 0.3 else 0.035
    n["amp"] = rng.uniform(0.0, irregular, _HARMONICS) / np.arange(1, _HARMONICS + 1)
    n["phase"] = rng.uniform(0.0, 2 * math.pi, _HARMONICS)
    # small nuclei (lymphocyte-like) are dense, large ones paler and vesicular
    n["stain"] = float(np.clip(rng.normal(0.15 - 0.006 * (radius - 9.0), 0.025), 0.08, 0.24))
    return n


class _Grid:
    """Bucket index of nucleus boxes, so placement checks only nearby nuclei."""

    def __init__(self, cell: int = 64):
        self.cell = cell
        self.buckets: dict[tuple[int, int], list[int]] = {}

    def _cells(self, box: tuple[int, int, int, int]):
        c = self.cell
        for gy in range(box[0] // c, (box[1] - 1) // c + 1):
            for gx in range(box[2] // c, (box[3] - 1) // c + 1):
                yield gy, gx

    def add(self, i: int, box: tuple[int, int, int, int]) -> None:
        for key in self._cells(box):
            self.buckets.setdefault(key, []).append(i)

    def query(self, box: tuple[int, int, int, int], boxes: list) -> list[int]:
        found = {i for key in self._cells(box) for i in self.buckets.get(key, ())}
        return sorted(i for i in found if _overlap(boxes[i], box))


def _overlap(p: tuple[int, int, int, int], q: tuple[int, int, int, int]) -> bool:
    return p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]


def _place_nuclei(rng: np.random.Generator, H: int, W: int, n_target: int, seed: int,
                  blob: tuple | None, touching: float) -> np.ndarray:
    """Rejection-sample nuclei so that every id stays one 4-connected piece with >= half its in-image area."""
    placed: list[np.ndarray] = []
    rasters: list[tuple[int, int, np.ndarray]] = []  # (y0, x0, mask clipped to the image) per placed nucleus
    full_area: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    grid = _Grid()
    attempts, max_attempts = 0, 40 * n_target + 200
    while len(placed) < n_target and attempts < max_attempts:
        attempts += 1
        radius = float(np.clip(rng.lognormal(math.log(9.0), 0.25), 4.0, 14.0))
        if placed and rng.random() < touching:
            j = int(rng.integers(len(placed)))
            anchor = placed[j]
            r_anchor = math.sqrt(anchor["a"] * anchor["b"])
            phi = rng.uniform(0.0, 2 * math.pi)
            d = (r_anchor + radius) * rng.uniform(0.78, 1.0)
            cy, cx = anchor["cy"] + d * math.sin(phi), anchor["cx"] + d * math.cos(phi)
        else:
            cy, cx = rng.uniform(0.0, H), rng.uniform(0.0, W)
        nuc = _random_nucleus(rng, cy, cx, radius)
        if not (0.0 <= cy < H and 0.0 <= cx < W):
            continue
        if blob is not None and _tissue_margin(blob, np.float64(cy), np.float64(cx)) < _radius_bound(nuc) + 2:
            continue
        if _fbm(seed, 10, np.float64(cy), np.float64(cx), 48.0, 2) < _GAP_LEVEL + 0.05:
            continue  # no nuclei floating in the white gaps
        y0, x0, mask, _ = _raster(nuc)
        clipped = _clip_to_box(y0, x0, mask, H, W)
        area = int(mask.sum())
        if clipped is None or clipped[2].sum() < max(_MIN_AREA, _KEEP_FRACTION * area) or not _one_piece(clipped[2]):
            continue
        box = _bbox(nuc)
        near = grid.query(box, boxes)
        if near and not _keeps_neighbours_whole(clipped, near, rasters, full_area, boxes, grid):
            continue
        i = len(placed)
        placed.append(nuc)
        rasters.append(clipped)
        full_area.append(area)
        boxes.append(box)
        grid.add(i, box)
    if len(placed) < n_target:
        raise ValueError(f"could only place {len(placed)} of {n_target} synthetic nuclei in a {H}x{W} image; "
                         "ask for fewer nuclei or a larger image")
    return np.array(placed, dtype=_NUCLEUS_DTYPE).reshape(-1)


def _clip_to_box(y0: int, x0: int, mask: np.ndarray, H: int, W: int) -> tuple[int, int, np.ndarray] | None:
    """The part of a mask placed at (y0, x0) that lies in [0, H) x [0, W), with its new origin; None if empty."""
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + mask.shape[0], H), min(x0 + mask.shape[1], W)
    if cy0 >= cy1 or cx0 >= cx1:
        return None
    return cy0, cx0, mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _one_piece(mask: np.ndarray) -> bool:
    return ndimage.label(mask)[1] == 1  # default structure: 4-connectivity


def _keeps_neighbours_whole(cand: tuple[int, int, np.ndarray], near: list[int], rasters: list,
                            full_area: list[int], boxes: list, grid: _Grid) -> bool:
    """Would painting the candidate last cut a nearby nucleus in two or leave it under half visible?"""
    cy0, cx0, cmask = cand
    boxes_near = [boxes[j] for j in near]
    uy0 = min([cy0] + [b[0] for b in boxes_near])
    uy1 = max([cy0 + cmask.shape[0]] + [b[1] for b in boxes_near])
    ux0 = min([cx0] + [b[2] for b in boxes_near])
    ux1 = max([cx0 + cmask.shape[1]] + [b[3] for b in boxes_near])
    # every nucleus that can touch a neighbour's box lies in this union box; paint them in order
    canvas = np.zeros((uy1 - uy0, ux1 - ux0), dtype=np.int64)
    for j in grid.query((uy0, uy1, ux0, ux1), boxes):
        y0, x0, m = rasters[j]
        piece = _clip_to_box(y0 - uy0, x0 - ux0, m, canvas.shape[0], canvas.shape[1])
        if piece is not None:
            py, px, pm = piece
            canvas[py:py + pm.shape[0], px:px + pm.shape[1]][pm] = j + 1
    under = canvas[cy0 - uy0:cy0 - uy0 + cmask.shape[0], cx0 - ux0:cx0 - ux0 + cmask.shape[1]]
    hit = np.unique(under[cmask])
    hit = hit[hit > 0]
    if hit.size == 0:
        return True
    under[cmask] = -1
    for label in hit:
        remaining = canvas == label
        if remaining.sum() < max(_MIN_AREA, _KEEP_FRACTION * full_area[label - 1]) or not _one_piece(remaining):
            return False
    return True


def _make_blob(rng: np.random.Generator, H: int, W: int) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """An irregular star-shaped tissue piece around the image centre, covering roughly a third of it."""
    k = np.arange(2, 7)
    amp = rng.uniform(0.02, 0.09, k.size) / np.sqrt(k - 1)
    phase = rng.uniform(0.0, 2 * math.pi, k.size)
    return (H / 2.0, W / 2.0, 0.36 * min(H, W), amp, phase)


def _tissue_margin(blob: tuple, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Signed distance-like margin (px) inside the tissue blob: > 0 inside, < 0 outside."""
    cy, cx, radius, amp, phase = blob
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    edge = radius * (1.0 + sum(amp[i] * np.cos((i + 2) * theta + phase[i]) for i in range(len(amp))))
    return edge - np.hypot(dy, dx)


def _blob_area(blob: tuple) -> float:
    theta = np.linspace(0.0, 2 * math.pi, 720, endpoint=False)
    cy, cx, radius, amp, phase = blob
    edge = radius * (1.0 + sum(amp[i] * np.cos((i + 2) * theta + phase[i]) for i in range(len(amp))))
    return float(0.5 * np.mean(edge**2) * 2 * math.pi)


# --- coordinate-hash noise (seam-free: a pixel's value depends only on its global coordinates) ----------------

_M64 = (1 << 64) - 1


def _hash64(seed: int, key: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """splitmix64-style mix of (seed, key, a, b) to uniform 64-bit integers (a, b integer arrays)."""
    salt = np.uint64(((seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15 + key * 0xD6E8FEB86659FD93) & _M64)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point; 0-d inputs would warn
        z = (np.asarray(a).astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ (
            np.asarray(b).astype(np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9)) ^ salt
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _pixel_noise(seed: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) noise per pixel and channel (h, w, 3) from one hash per pixel."""
    z = _hash64(seed, 99, yy, xx)
    bits = np.uint64((1 << 21) - 1)
    return np.stack([((z >> np.uint64(21 * c)) & bits).astype(np.float64) / float(1 << 21) for c in range(3)],
                    axis=-1)


def _value_noise(seed: int, key: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] on the unit lattice at float coordinates (u, v) (broadcastable arrays)."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3.0 - 2.0 * fu), fv * fv * (3.0 - 2.0 * fv)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    if iu.ndim == 2 and iu.shape[1] == 1 and iv.shape[0] == 1:
        # a column times a row: hash the few lattice points once, then gather (same values, far cheaper)
        lu, lv = np.arange(iu.min(), iu.max() + 2), np.arange(iv.min(), iv.max() + 2)
        table = _lattice(seed, key, lu[:, None], lv[None, :])
        ru, rv = iu - lu[0], iv - lv[0]

        def corner(du: int, dv: int) -> np.ndarray:
            return table[ru + du, rv + dv]
    else:
        def corner(du: int, dv: int) -> np.ndarray:
            return _lattice(seed, key, iu + du, iv + dv)

    top = corner(0, 0) * (1.0 - fv) + corner(0, 1) * fv
    bottom = corner(1, 0) * (1.0 - fv) + corner(1, 1) * fv
    return top * (1.0 - fu) + bottom * fu


def _lattice(seed: int, key: int, iu: np.ndarray, iv: np.ndarray) -> np.ndarray:
    return (_hash64(seed, key, iu, iv) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _fbm(seed: int, key: int, yy: np.ndarray, xx: np.ndarray, scale: float, octaves: int) -> np.ndarray:
    """Sum of value-noise octaves (largest feature ~scale px), normalised to [0, 1]."""
    total, weight, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        s = scale / 2.0**o
        total = total + weight * _value_noise(seed, key + o, yy / s, xx / s)
        norm += weight
        weight *= 0.5
    return total / norm


def _fibres(seed: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Streaky eosin texture: noise stretched along one direction per seed, its streaks bent by a slow warp."""
    alpha = (seed * 0.618034) % 1.0 * math.pi
    u = xx * math.cos(alpha) + yy * math.sin(alpha)
    v = -xx * math.sin(alpha) + yy * math.cos(alpha) + 70.0 * _fbm(seed, 50, yy, xx, 160.0, 2)
    return 0.6 * _value_noise(seed, 51, u / 30.0, v / 4.0) + 0.4 * _value_noise(seed, 52, u / 12.0, v / 2.0)
