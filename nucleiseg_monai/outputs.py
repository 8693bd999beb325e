"""Per-image outputs, each written atomically: label BigTIFF, QuPath GeoJSON, CSV table, overlay PNG, manifest.

Every file is written to a hidden temporary file in its destination folder, fsynced and moved into place with
``os.replace``, so a crash or an exception never leaves a partial file under the final name. A ``<name>.done.json``
manifest is written last; ``outputs_complete`` trusts only images whose manifest lists files that are all present.

Coordinates: the label map is in pixels of the analysed pyramid level. GeoJSON polygons and CSV centroids are in
level-0 pixels: GeoJSON uses QuPath's convention (pixel (r, c) covers [c, c+1) x [r, r+1)), CSV centroids the
array-index convention of ``skimage.measure.regionprops`` (pixel centres at integers).
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile
from PIL import Image
from skimage.color import hed_from_rgb
from scipy.ndimage import find_objects
from skimage.measure import find_contours
from skimage.segmentation import find_boundaries

from .atomic import AtomicFile, atomic_path, fsync_dir

OUTPUT_SUFFIXES = {
    "labels": ".labels.tif",
    "geojson": ".geojson",
    "csv": ".nuclei.csv",
    "overlay": ".overlay.png",
}
MANIFEST_SUFFIX = ".done.json"
CSV_COLUMNS = (
    "id", "centroid_x", "centroid_y", "area_px", "area_um2", "perimeter_px", "eccentricity", "solidity",
    "mean_haematoxylin",
)
OVERLAY_COLOUR = (0, 255, 0)
# Namespace for the GeoJSON feature UUIDs QuPath expects: same image name and nucleus id -> same UUID.
_UUID_NAMESPACE = uuid.UUID("9a4e2a63-0a5c-4c1e-9d7e-2f4b8f0c6d11")


def output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where the outputs of image ``name`` go: labels, geojson, csv, overlay."""
    out_dir = Path(out_dir)
    return {kind: out_dir / f"{name}{suffix}" for kind, suffix in OUTPUT_SUFFIXES.items()}


def manifest_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}{MANIFEST_SUFFIX}"


# ---------------------------------------------------------------------------------------------- label BigTIFF


def iter_tiles(labels: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major (tile, tile) blocks of an in-memory label map, zero-padded at the right and bottom edges."""
    height, width = labels.shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.zeros((tile, tile), np.uint32)
            part = labels[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block


def _write_label_tiff(target: Path, tiles: Iterable[np.ndarray], shape: tuple[int, int], tile: int,
                      mpp: float | None, compression: str) -> None:
    if tile % 16:
        raise ValueError(f"TIFF tiles must be a multiple of 16 pixels, got {tile}")
    resolution: dict[str, Any] = {}
    if mpp:
        pixels_per_cm = 1e4 / mpp
        resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
    # maxworkers=1: with more, tifffile pulls up to 512 MB of tiles ahead of the writer to compress in threads,
    # which would drag the whole inference that far ahead and hold those tiles in memory
    tifffile.imwrite(
        target, iter(tiles), shape=tuple(shape), dtype=np.uint32, tile=(tile, tile), bigtiff=True,
        photometric="minisblack", compression=compression, predictor=True, metadata=None, maxworkers=1,
        **resolution,
    )


def write_label_tiff(
    path: str | os.PathLike,
    labels: np.ndarray | Iterable[np.ndarray],
    shape: tuple[int, int] | None = None,
    tile: int = 512,
    mpp: float | None = None,
    compression: str = "zlib",
) -> Path:
    """Atomically write a tiled, compressed BigTIFF of uint32 instance ids.

    ``labels`` is a whole array, or an iterable of (tile, tile) blocks in row-major order (then ``shape`` is
    required) so a slide-sized map never has to be in memory. ``mpp`` sets X/YResolution in pixels per cm.
    Deflate with a horizontal predictor (long runs of equal ids) is read by libtiff, Bio-Formats and QuPath;
    ``compression="zstd"`` is smaller but less widely readable.
    """
    if isinstance(labels, np.ndarray):
        shape = labels.shape
        labels = iter_tiles(labels, tile)
    if shape is None:
        raise ValueError("shape is required when labels is an iterator of tiles")
    with atomic_path(path) as tmp:
        _write_label_tiff(tmp, labels, shape, tile, mpp, compression)
    return Path(path)


# ---------------------------------------------------------------------------------------------- measurements


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Channel 0 of ``skimage.color.rgb2hed`` (haematoxylin optical density), in float32 and nothing else.

    rgb2hed would compute all three stains in float64; a slide region needs only this one.
    """
    rgb = np.maximum(rgb.astype(np.float32) / 255.0, 1e-6)
    log_adjust = np.float32(np.log(1e-6))
    od = np.log(rgb) / log_adjust
    return np.maximum(od @ hed_from_rgb[:, 0].astype(np.float32), 0.0)


@dataclass
class Nucleus:
    """One nucleus: measurements and its outline (level-0 pixels, QuPath convention, closed ring of (x, y))."""

    id: int
    centroid_x: float
    centroid_y: float
    area_px: int
    area_um2: float | None
    perimeter_px: float
    eccentricity: float
    solidity: float
    mean_haematoxylin: float
    polygon: np.ndarray

    def row(self) -> list[str]:
        return [
            str(self.id), f"{self.centroid_x:.2f}", f"{self.centroid_y:.2f}", str(self.area_px),
            "" if self.area_um2 is None else f"{self.area_um2:.3f}", f"{self.perimeter_px:.2f}",
            f"{self.eccentricity:.4f}", f"{self.solidity:.4f}", f"{self.mean_haematoxylin:.5f}",
        ]

    def feature(self, image_name: str = "") -> dict:
        measurements = {
            "nucleus_id": self.id, "area_px": self.area_px, "perimeter_px": round(self.perimeter_px, 2),
            "eccentricity": round(self.eccentricity, 4), "solidity": round(self.solidity, 4),
            "mean_haematoxylin": round(self.mean_haematoxylin, 5),
        }
        if self.area_um2 is not None:
            measurements["area_um2"] = round(self.area_um2, 3)
        return {
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{image_name}/{self.id}")),
            "geometry": {"type": "Polygon", "coordinates": [self.polygon.round(3).tolist()]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "Nucleus"},
                "measurements": {k: v for k, v in measurements.items() if _finite(v)},
            },
        }


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def outline(mask: np.ndarray, top: int, left: int, downsample: float = 1.0) -> np.ndarray:
    """Closed (x, y) ring around a binary crop whose top-left pixel is (top, left) at the analysed level.

    The ring runs through the edge midpoints of the boundary pixels (find_contours at 0.5 on the padded crop),
    with collinear vertices removed (a lossless simplification), counter-clockwise, in level-0 pixels with pixel
    (r, c) covering [c, c+1) x [r, r+1). A nucleus with holes keeps only its outer ring.
    """
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.float32)
    padded[1:-1, 1:-1] = mask
    ring = max(find_contours(padded, 0.5), key=len)[:-1]
    step = np.diff(ring, axis=0, append=ring[:1])
    before = np.concatenate([step[-1:], step[:-1]])
    turns = (before[:, 0] * step[:, 1] - before[:, 1] * step[:, 0] != 0) | ((before * step).sum(1) <= 0)
    if turns.sum() >= 3:
        ring = ring[turns]
    # padded index -> crop index (-1) -> image index (+top/left) -> pixel-edge coordinates (+0.5) -> level 0
    xy = np.stack([(ring[:, 1] - 0.5 + left) * downsample, (ring[:, 0] - 0.5 + top) * downsample], axis=1)
    if _signed_area(xy) < 0:  # counter-clockwise, as RFC 7946 asks of exterior rings
        xy = xy[::-1]
    return np.concatenate([xy, xy[:1]])


def _signed_area(xy: np.ndarray) -> float:
    """Shoelace area of an open ring of (x, y) vertices; positive when counter-clockwise."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def _hull_area(ring: np.ndarray) -> float:
    """Area of the convex hull of an open, counter-clockwise simple polygon (Andrew's monotone chain).

    Reflex vertices of a simple polygon are never on its hull, so they are dropped first: about half the
    vertices of a nucleus outline, and this runs once per nucleus.
    """
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    convex = ring[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] >= 0]
    if len(convex) < 3:
        return 0.0
    pts = convex[np.lexsort((convex[:, 1], convex[:, 0]))].tolist()

    def half(points: list) -> list:
        chain: list = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.asarray(half(pts) + half(pts[::-1]), dtype=np.float64)
    return abs(_signed_area(hull)) if len(hull) >= 3 else 0.0


def measure_nuclei(
    labels: np.ndarray,
    rgb: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    downsample: float = 1.0,
    mpp: float | None = None,
) -> Iterator[Nucleus]:
    """Measure every id of a label window whose top-left sits at ``offset`` (y, x) in the analysed level.

    Area (pixel count), centroid, eccentricity (of the second moments, as regionprops) and mean haematoxylin
    come from one pass of bincounts over the window; only the outline is per nucleus. Areas are in pixels of the
    analysed level (the label map's); ``mpp`` is that level's microns per pixel. Perimeter and solidity are
    those of the outline polygon (its length; its area over its convex hull's, as QuPath measures them), in
    analysed-level pixels. Centroids and outlines are mapped to level 0 with ``downsample``.
    """
    oy, ox = offset
    fg = np.flatnonzero(labels)
    if fg.size == 0:
        return
    ids = labels.ravel()[fg].astype(np.int64)
    first = int(ids.min())
    ids -= first - 1  # local ids 1..n, whatever range the global ids live in
    n = int(ids.max()) + 1
    width = labels.shape[1]
    y, x = (fg // width).astype(np.float64), (fg % width).astype(np.float64)
    count = np.bincount(ids, minlength=n)
    safe = np.maximum(count, 1)
    cy, cx = np.bincount(ids, y, n) / safe, np.bincount(ids, x, n) / safe
    dy, dx = y - cy[ids], x - cx[ids]  # two passes: central moments without cancellation
    vy, vx, cov = (np.bincount(ids, dy * dy, n) / safe, np.bincount(ids, dx * dx, n) / safe,
                   np.bincount(ids, dy * dx, n) / safe)
    half_trace, root = (vy + vx) / 2, np.sqrt(((vy - vx) / 2) ** 2 + cov * cov)
    major, minor = half_trace + root, np.maximum(half_trace - root, 0.0)
    eccentricity = np.sqrt(np.clip(1.0 - minor / np.where(major > 0, major, 1.0), 0.0, 1.0))
    eccentricity[major <= 0] = 0.0
    hema = np.bincount(ids, haematoxylin(rgb.reshape(-1, 3)[fg]), n) / safe  # nuclei pixels only
    local = np.zeros(labels.shape, np.int32)
    local.ravel()[fg] = ids
    for k, box in enumerate(find_objects(local), start=1):
        if box is None:
            continue
        ring = outline(local[box] == k, box[0].start + oy, box[1].start + ox, downsample)
        px = ring / downsample  # back to analysed-level pixels for the shape measures
        area_poly = _signed_area(px[:-1])
        hull = _hull_area(px[:-1])
        area = int(count[k])
        yield Nucleus(
            id=k + first - 1,
            centroid_x=(cx[k] + ox + 0.5) * downsample - 0.5,
            centroid_y=(cy[k] + oy + 0.5) * downsample - 0.5,
            area_px=area,
            area_um2=None if mpp is None else area * mpp * mpp,
            perimeter_px=float(np.hypot(*np.diff(px, axis=0).T).sum()),
            eccentricity=float(eccentricity[k]),
            solidity=area_poly / hull if hull > 0 else 1.0,
            mean_haematoxylin=float(hema[k]),
            polygon=ring,
        )


# ---------------------------------------------------------------------------------------------- streaming writers


class GeoJSONStream:
    """A FeatureCollection written one feature at a time, so a million nuclei never sit in a list."""

    def __init__(self, handle: IO[str], image_name: str = ""):
        self.handle, self.image_name, self.count = handle, image_name, 0
        handle.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, nucleus: Nucleus) -> None:
        if self.count:
            self.handle.write(",\n")
        self.handle.write(json.dumps(nucleus.feature(self.image_name), separators=(",", ":")))
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]}\n")


class CSVStream:
    def __init__(self, handle: IO[str]):
        self.writer = csv.writer(handle, lineterminator="\n")
        self.writer.writerow(CSV_COLUMNS)
        self.count = 0

    def write(self, nucleus: Nucleus) -> None:
        self.writer.writerow(nucleus.row())
        self.count += 1


def write_geojson(path: str | os.PathLike, nuclei: Iterable[Nucleus], image_name: str = "") -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        stream = GeoJSONStream(handle, image_name)
        for nucleus in nuclei:
            stream.write(nucleus)
        stream.close()
    return Path(path)


def write_csv(path: str | os.PathLike, nuclei: Iterable[Nucleus]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        stream = CSVStream(handle)
        for nucleus in nuclei:
            stream.write(nucleus)
    return Path(path)


# ---------------------------------------------------------------------------------------------- overlay


class Overlay:
    """Nucleus outlines drawn onto a (down-sampled) copy of the image.

    ``image`` covers the whole analysed level at ``scale`` = (overlay rows per level row, columns per column);
    1.0 for a tile shown at full size. Outlines are the inner boundary pixels of each nucleus, mapped to the
    overlay, so at small scales a nucleus shrinks to a dot.
    """

    def __init__(self, image: np.ndarray, scale: tuple[float, float] = (1.0, 1.0), colour=OVERLAY_COLOUR):
        self.image = np.array(image, dtype=np.uint8, copy=True)
        self.scale, self.colour = scale, np.asarray(colour, np.uint8)

    def draw(self, labels: np.ndarray, offset: tuple[int, int] = (0, 0), colour=None) -> None:
        """Outlines of ``labels`` (placed at ``offset`` in level pixels) in ``colour``, by default the overlay's."""
        rows, cols = np.nonzero(find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0))
        h, w = self.image.shape[:2]
        y = np.clip(((rows + offset[0] + 0.5) * self.scale[0]).astype(np.int64), 0, h - 1)
        x = np.clip(((cols + offset[1] + 0.5) * self.scale[1]).astype(np.int64), 0, w - 1)
        self.image[y, x] = self.colour if colour is None else np.asarray(colour, np.uint8)

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            self._save(tmp)
        return Path(path)

    def _save(self, target: Path) -> None:
        # zlib level 1: a 2048 px overlay in 0.5 s instead of 1.9 s at Pillow's default 6, for files ~10% larger
        Image.fromarray(self.image).save(target, format="PNG", compress_level=1)


# ---------------------------------------------------------------------------------------------- one image's outputs


def outputs_complete(out_dir: str | os.PathLike, name: str) -> bool:
    """True when ``<name>.done.json`` exists and every file it lists is present with the recorded size."""
    path = manifest_path(out_dir, name)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        return bool(files) and all(
            (path.parent / entry["path"]).stat().st_size == entry["bytes"] for entry in files.values()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_manifest(out_dir: str | os.PathLike, name: str, files: dict[str, Path], info: dict | None = None) -> Path:
    manifest = {
        "name": name,
        "files": {kind: {"path": p.name, "bytes": p.stat().st_size} for kind, p in files.items()},
        **(info or {}),
    }
    path = manifest_path(out_dir, name)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


class SlideOutputs:
    """All outputs of one image, finished together: nothing is final until ``commit``.

    Usage: ``with SlideOutputs(...) as out:`` then ``out.add_nuclei(...)`` per window of finished nuclei (they may
    be called from inside the tile iterator given to ``write_labels``), ``out.write_labels(tiles)``, then
    ``out.commit(info)``. Leaving the block without ``commit`` (an exception) deletes every temporary file. A
    stale manifest is removed on entry, so a failed re-run can never look complete.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        shape: tuple[int, int],
        mpp: float | None = None,
        downsample: float = 1.0,
        overlay: Overlay | None = None,
        label_tile: int = 512,
        compression: str = "zlib",
    ):
        self.out_dir, self.name, self.shape = Path(out_dir), name, tuple(shape)
        self.mpp, self.downsample, self.overlay = mpp, downsample, overlay
        self.label_tile, self.compression = label_tile, compression
        self.paths = output_paths(out_dir, name)
        if overlay is None:
            del self.paths["overlay"]
        self.count = 0
        self._files: dict[str, AtomicFile] = {}
        self._handles: list[IO[str]] = []
        self._labels_written = False

    def __enter__(self) -> SlideOutputs:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest_path(self.out_dir, self.name).unlink(missing_ok=True)
        try:
            self._files = {kind: AtomicFile(p) for kind, p in self.paths.items()}
            geo = open(self._files["geojson"].tmp, "w", encoding="utf-8")
            self._handles.append(geo)
            table = open(self._files["csv"].tmp, "w", encoding="utf-8", newline="")
            self._handles.append(table)
        except BaseException:
            self._abort()
            raise
        self._geojson, self._csv = GeoJSONStream(geo, self.name), CSVStream(table)
        return self

    def add_nuclei(self, labels: np.ndarray, rgb: np.ndarray, offset: tuple[int, int]) -> int:
        """Measure and record the final pixels of some nuclei (ids already global) in a window at ``offset``."""
        added = 0
        for nucleus in measure_nuclei(labels, rgb, offset, self.downsample, self.mpp):
            self._geojson.write(nucleus)
            self._csv.write(nucleus)
            added += 1
        if self.overlay is not None and added:
            self.overlay.draw(labels, offset)
        self.count += added
        return added

    def write_labels(self, tiles: Iterable[np.ndarray]) -> None:
        _write_label_tiff(self._files["labels"].tmp, tiles, self.shape, self.label_tile, self.mpp, self.compression)
        self._labels_written = True

    def commit(self, info: dict | None = None) -> dict[str, Path]:
        """Finish every file, move them all into place, then write the manifest; returns the final paths."""
        if not self._labels_written:
            raise RuntimeError("write_labels must run before commit")
        self._geojson.close()
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        if self.overlay is not None:
            self.overlay._save(self._files["overlay"].tmp)
        for file in self._files.values():
            file.sync()
        for file in self._files.values():
            file.replace()
        fsync_dir(self.out_dir)
        self._files.clear()
        write_manifest(self.out_dir, self.name, self.paths, {"nuclei": self.count, **(info or {})})
        return dict(self.paths)

    def _abort(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        for file in self._files.values():
            file.discard()
        self._files.clear()

    def __exit__(self, *exc: object) -> None:
        self._abort()
