"""Per-image outputs, each written atomically: label BigTIFF, QuPath GeoJSON, CSV table, overlay PNG, manifest.

What goes into the GeoJSON and the CSV is measured by ``measurements.measure_nuclei``; this module only writes.

Every file is written to a hidden temporary file in its destination folder, fsynced and moved into place with
``os.replace``, so a crash or an exception never leaves a partial file under the final name. A ``<name>.done.json``
manifest is written last; ``outputs_complete`` trusts only images whose manifest lists files that are all present.

Coordinates: the label map is in pixels of the analysed pyramid level. GeoJSON polygons and CSV centroids are in
level-0 pixels: GeoJSON uses QuPath's convention (pixel (r, c) covers [c, c+1) x [r, r+1)), CSV centroids the
array-index convention of ``skimage.measure.regionprops`` (pixel centres at integers). A nucleus is a GeoJSON
Polygon, with its holes as further rings, or a MultiPolygon where it is in several pieces.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile
from PIL import Image
from skimage.segmentation import find_boundaries

from .atomic import AtomicFile, atomic_path, fsync_dir, host_name, process_alive, write_json_atomic
from .measurements import COLUMNS, Nuclei, measure_nuclei

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = {
    "labels": ".labels.tif",
    "geojson": ".geojson",
    "csv": ".nuclei.csv",
    "overlay": ".overlay.png",
}
MANIFEST_SUFFIX = ".done.json"
CSV_COLUMNS = COLUMNS  # the measurements' own names, units in them
# one meaning everywhere (inference overlays, evaluation overlays, TensorBoard): prediction yellow, truth green
PREDICTION_COLOUR = (255, 230, 0)
TRUTH_COLOUR = (0, 200, 0)
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


# A label BigTIFF's factor-4 level is buffered in memory up to this size (tiles, regions of interest: no file to
# write and remove), beyond it in a temporary file: that level of a 100k x 100k px slide is 2.5 GB of uint32
LEVEL_BUFFER_IN_MEMORY = 64 << 20


def level_buffer(labels: Path) -> Path:
    """Where ``_ReducedLevel`` buffers a level of label BigTIFF ``labels`` too large for memory: only ever under its
    temporary name, removed once the BigTIFF is written."""
    return labels.with_name(f"{labels.name}.levels")


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, in integers: exact for any size, where ``math.ceil(a / b)`` goes through a float."""
    return -(-a // b)


def label_levels(shape: tuple[int, int], tile: int) -> list[int]:
    """Downsampling factors of the label BigTIFF's reduced levels: 4, 16, 64, ... while a level's longer side is more
    than a tile (a map that fits in a few tiles at level 0 gets none)."""
    factors, factor = [], 4
    while max(ceil_div(shape[0], factor), ceil_div(shape[1], factor)) > tile:
        factors.append(factor)
        factor *= 4
    return factors


class _ReducedLevel:
    """``level0[::4, ::4]`` of a label map, collected from its level-0 tiles as they stream past (``subsample``);
    every coarser level is read back from it by stride (``level0[::16, ::16] == level0[::4, ::4][::4, ::4]``).

    Level 0 is written first and cannot be read back while the file is open, so the level is buffered until level 0
    is done. Each row of level-0 tiles completes a band of rows of it, appended to the buffer: in memory up to
    ``LEVEL_BUFFER_IN_MEMORY``, else in a hidden temporary file beside the output (named as ``AtomicFile`` names
    them, so ``remove_stale`` deletes one a killed run left), written and read in whole rows, so the process holds
    a band, never the level. Leaving the ``with`` block removes the file, however it is left.
    """

    def __init__(self, final: Path, shape: tuple[int, int]):
        self.level0 = tuple(shape)
        self.shape = (ceil_div(shape[0], 4), ceil_div(shape[1], 4))
        self._file: AtomicFile | None = None
        if self.shape[0] * self.shape[1] * 4 <= LEVEL_BUFFER_IN_MEMORY:
            self.buffer: IO[bytes] = io.BytesIO()
            return
        self._file = AtomicFile(level_buffer(final))
        try:
            self.buffer = open(self._file.tmp, "w+b")
        except BaseException:
            self._file.discard()
            raise

    def __enter__(self) -> _ReducedLevel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.buffer.close()
        if self._file is not None:
            self._file.discard()

    def subsample(self, tiles: Iterable[np.ndarray], tile: int) -> Iterator[np.ndarray]:
        """``tiles`` (row-major, (tile, tile)) passed on unchanged, each one's every 4th pixel kept."""
        height, width = self.shape
        side, columns = tile // 4, ceil_div(self.level0[1], tile)
        band = np.zeros((side, width), np.uint32)
        for index, block in enumerate(tiles):
            row, column = divmod(index, columns)
            x = column * side
            band[:, x:x + side] = block[::4, ::4][:, :width - x]
            if column == columns - 1:
                self.buffer.write(band[:min(side, height - row * side)])
            yield block

    def tiles(self, factor: int, tile: int) -> Iterator[np.ndarray]:
        """Row-major (tile, tile) blocks of ``level0[::factor, ::factor]`` (factor 4, 16, 64, ...)."""
        step = factor // 4
        height = ceil_div(self.shape[0], step)
        for y in range(0, height, tile):
            yield from iter_tiles(self._rows(range(y * step, min(y + tile, height) * step, step))[:, ::step], tile)

    def _rows(self, rows: range) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), np.uint32)
        for first, into in [(rows.start, out)] if rows.step == 1 else zip(rows, out):
            self.buffer.seek(first * out.shape[1] * 4)
            if self.buffer.readinto(into) != into.nbytes:
                raise EOFError("the label tiles ended before the label map did")
        return out


def _write_label_tiff(target: Path, tiles: Iterable[np.ndarray], shape: tuple[int, int], tile: int,
                      mpp: float | None, compression: str, final: Path) -> None:
    """Writes ``target``, the temporary file that becomes ``final``; ``final`` names the level buffer's temporary
    file and the OME-XML's UUID."""
    if tile % 16:
        raise ValueError(f"TIFF tiles must be a multiple of 16 pixels, got {tile}")

    def resolution(factor: int) -> dict[str, Any]:
        if not mpp:
            return {}
        pixels_per_cm = 1e4 / mpp / factor
        return {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}

    # maxworkers=1: with more, tifffile pulls up to 512 MB of tiles ahead of the writer to compress in threads,
    # which would drag the whole inference that far ahead and hold those tiles in memory (and, for the reduced
    # levels, hold that much of them read back from their buffer)
    options: dict[str, Any] = dict(dtype=np.uint32, tile=(tile, tile), photometric="minisblack",
                                   compression=compression, predictor=True, maxworkers=1)
    factors = label_levels(shape, tile)
    if not factors:
        tifffile.imwrite(target, iter(tiles), shape=tuple(shape), bigtiff=True, metadata=None, **options,
                         **resolution(1))
        return
    # OME-TIFF, not plain TIFF: Bio-Formats (and so QuPath) takes SubIFDs for sub-resolutions only in its OME-TIFF
    # reader, chosen by the OME-XML in the first page's ImageDescription, whatever the file's suffix; its plain TIFF
    # reader lists the main IFDs alone, so it would show level 0 only. Bio-Formats takes the pixel size from the
    # OME-XML, the resolution tags serve the other readers. The levels sit in SubIFDs of the level-0 page, outside
    # the chain of main pages, so tifffile.imread and any reader of the first page still get level 0 alone.
    #
    # The UUID is made from the file's name, not at random as tifffile would: an image resumed from its kept
    # regions must get the same bytes as one run whole.
    metadata: dict[str, Any] = {"axes": "YX", "UUID": str(uuid.uuid5(_UUID_NAMESPACE, f"labels/{final.name}"))}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    with _ReducedLevel(final, shape) as level, tifffile.TiffWriter(target, bigtiff=True, ome=True) as tif:
        tif.write(level.subsample(tiles, tile), shape=tuple(shape), subifds=len(factors), metadata=metadata,
                  **options, **resolution(1))
        for factor in factors:
            tif.write(level.tiles(factor, tile), shape=(ceil_div(shape[0], factor), ceil_div(shape[1], factor)),
                      subfiletype=1, metadata=None, **options, **resolution(factor))


def write_label_tiff(
    path: str | os.PathLike,
    labels: np.ndarray | Iterable[np.ndarray],
    shape: tuple[int, int] | None = None,
    tile: int = 512,
    mpp: float | None = None,
    compression: str = "zlib",
) -> Path:
    """Atomically write a tiled, compressed, pyramidal BigTIFF of uint32 instance ids.

    ``labels`` is a whole array, or an iterable of (tile, tile) blocks in row-major order (then ``shape`` is
    required) so a slide-sized map never has to be in memory. ``mpp`` sets X/YResolution in pixels per cm.
    Deflate with a horizontal predictor (long runs of equal ids) is read by libtiff, Bio-Formats and QuPath;
    ``compression="zstd"`` is smaller but less widely readable.

    Reduced levels, for viewers to open and pan a slide's map: factors 4, 16, 64, ... while a level's longer side is
    more than a tile (``label_levels``), each ``labels[::f, ::f]`` (nearest neighbour: every pixel is one of level
    0's ids, never a blend), built while the tiles stream past. They are SubIFDs of the level-0 page of an
    OME-TIFF, as Bio-Formats and QuPath read pyramids, with X/YResolution divided by ``f``; ``tifffile.imread``
    still returns level 0 alone. A map with no reduced level is a plain single-page BigTIFF.
    """
    if isinstance(labels, np.ndarray):
        shape = labels.shape
        labels = iter_tiles(labels, tile)
    if shape is None:
        raise ValueError("shape is required when labels is an iterator of tiles")
    with atomic_path(path) as tmp:
        _write_label_tiff(tmp, labels, shape, tile, mpp, compression, Path(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------- streaming writers


def _features(nuclei: Nuclei, image_name: str) -> list[str]:
    """One GeoJSON Feature text per nucleus, built from the columns with the json module's number format (the
    shortest repr), so encoding costs a few string operations per vertex instead of a dict per nucleus. A nucleus
    of one ring is a Polygon of its outline; one with holes a Polygon of its exterior and holes, one in several
    pieces a MultiPolygon (``Nuclei.shapes``)."""
    coords = list(map(repr, np.round(nuclei.vertices, 3).ravel().tolist()))
    points = ["[%s,%s]" % xy for xy in zip(coords[0::2], coords[1::2])]
    starts = nuclei.starts.tolist()
    fragments = [[f'"{name}":{v!r}' if math.isfinite(v) else "" for v in values]
                 for name, values in _measurement_columns(nuclei)]
    measurements = [",".join(filter(None, parts)) for parts in zip(*fragments)]
    shapes = {k: _geometry(polygons) for k, polygons in nuclei.shapes.items()}
    features = []
    for i, k in enumerate(nuclei.id.tolist()):
        if k in shapes:
            geometry = shapes[k]
        else:
            ring = points[starts[i]:starts[i + 1]]
            geometry = '{"type":"Polygon","coordinates":[[%s,%s]]}' % (",".join(ring), ring[0])
        features.append(
            '{"type":"Feature","id":"%s","geometry":%s,"properties":'
            '{"objectType":"detection","classification":{"name":"Nucleus"},"measurements":{%s}}}'
            % (uuid.uuid5(_UUID_NAMESPACE, f"{image_name}/{k}"), geometry, measurements[i])
        )
    return features


def _geometry(polygons: list[list[np.ndarray]]) -> str:
    """The GeoJSON geometry text of a nucleus's polygons (closed rings), in the number format of ``_features``."""
    texts = ["[%s]" % ",".join("[%s]" % ",".join(f"[{x!r},{y!r}]" for x, y in np.round(ring, 3).tolist())
                               for ring in rings) for rings in polygons]
    if len(texts) == 1:
        return '{"type":"Polygon","coordinates":%s}' % texts[0]
    return '{"type":"MultiPolygon","coordinates":[%s]}' % ",".join(texts)


def _measurement_columns(nuclei: Nuclei) -> list[tuple[str, list]]:
    """(QuPath measurement name, values) of each GeoJSON measurement, rounded; area_um2 when known."""
    columns = [("nucleus_id", nuclei.id, None), ("area_px", nuclei.area_px, None),
               ("perimeter_px", nuclei.perimeter_px, 2), ("eccentricity", nuclei.eccentricity, 4),
               ("solidity", nuclei.solidity, 4), ("mean_haematoxylin_od", nuclei.mean_haematoxylin, 5)]
    if nuclei.area_um2 is not None:
        columns.append(("area_um2", nuclei.area_um2, 3))
    # Python's round, not numpy's: numpy's scales by 10^digits and can land one float away from it
    return [(name, column.tolist() if digits is None else [round(v, digits) for v in column.tolist()])
            for name, column, digits in columns]


def _csv_rows(nuclei: Nuclei) -> str:
    area_um2 = [""] * len(nuclei) if nuclei.area_um2 is None else ["%.3f" % v for v in nuclei.area_um2.tolist()]
    columns = (nuclei.id, nuclei.centroid_x, nuclei.centroid_y, nuclei.area_px, nuclei.perimeter_px,
               nuclei.eccentricity, nuclei.solidity, nuclei.mean_haematoxylin)
    rows = zip(*(c.tolist() for c in columns), area_um2)
    return "".join("%d,%.2f,%.2f,%d,%s,%.2f,%.4f,%.4f,%.5f\n" % (k, x, y, a, um2, p, e, s, h)
                   for k, x, y, a, p, e, s, h, um2 in rows)


class GeoJSONStream:
    """A FeatureCollection written one batch of nuclei at a time, so a million nuclei never sit in memory."""

    def __init__(self, handle: IO[str], image_name: str = ""):
        self.handle, self.image_name, self.count = handle, image_name, 0
        handle.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, nuclei: Nuclei) -> None:
        if not len(nuclei):
            return
        if self.count:
            self.handle.write(",\n")
        self.handle.write(",\n".join(_features(nuclei, self.image_name)))
        self.count += len(nuclei)

    def close(self) -> None:
        self.handle.write("\n]}\n")


class CSVStream:
    """The per-nucleus table, one batch of nuclei at a time; the header states each column's unit."""

    def __init__(self, handle: IO[str]):
        self.handle, self.count = handle, 0
        handle.write(",".join(CSV_COLUMNS) + "\n")

    def write(self, nuclei: Nuclei) -> None:
        self.handle.write(_csv_rows(nuclei))
        self.count += len(nuclei)


# ---------------------------------------------------------------------------------------------- overlay


class Overlay:
    """Nucleus outlines drawn onto a (down-sampled) copy of the image.

    ``image`` covers the whole analysed level at ``scale`` = (overlay rows per level row, columns per column);
    1.0 for a tile shown at full size. Outlines are the inner boundary pixels of each nucleus, mapped to the
    overlay, so at small scales a nucleus shrinks to a dot.
    """

    def __init__(self, image: np.ndarray, scale: tuple[float, float] = (1.0, 1.0), colour=PREDICTION_COLOUR,
                 legend: tuple[tuple[str, tuple[int, int, int]], ...] = (("predicted nuclei", PREDICTION_COLOUR),)):
        self.image = np.array(image, dtype=np.uint8, copy=True)
        self.scale, self.colour = scale, np.asarray(colour, np.uint8)
        self.legend = legend

    def draw(self, labels: np.ndarray, offset: tuple[int, int] = (0, 0), colour=None) -> None:
        """Outlines of ``labels`` (placed at ``offset`` in level pixels) in ``colour``, by default the overlay's."""
        rows, cols = np.nonzero(find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0))
        h, w = self.image.shape[:2]
        y = np.clip(((rows + offset[0] + 0.5) * self.scale[0]).astype(np.int64), 0, h - 1)
        x = np.clip(((cols + offset[1] + 0.5) * self.scale[1]).astype(np.int64), 0, w - 1)
        self.image[y, x] = self.colour if colour is None else np.asarray(colour, np.uint8)

    def with_legend(self) -> Image.Image:
        """The drawing with a legend strip below it: each colour and what it marks."""
        from PIL import ImageDraw

        picture = Image.fromarray(self.image)
        row = 14
        canvas = Image.new("RGB", (picture.width, picture.height + row * len(self.legend) + 4), (255, 255, 255))
        canvas.paste(picture, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, (text, colour) in enumerate(self.legend):
            y = picture.height + 2 + i * row
            draw.rectangle((4, y + 2, 14, y + 11), fill=tuple(colour), outline=(0, 0, 0))
            draw.text((20, y), text, fill=(0, 0, 0))
        return canvas

    def write_png(self, target: Path) -> None:
        # zlib level 1: the overlay is a preview, so writing it several times faster beats Pillow's default 6's
        # slightly smaller file
        self.with_legend().save(target, format="PNG", compress_level=1)


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


def source_fingerprint(path: str | os.PathLike, span: int = 256 << 10) -> str:
    """SHA-256 of an input's size, first and last ``span`` bytes: what tells a completion record's image from
    another file of the same name, or from the same file replaced by a new scan, without reading a whole slide
    again (a copied or moved file keeps it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            digest.update(f.read(span))
    return digest.hexdigest()


class ImageBusy(RuntimeError):
    """Another run is writing this image's outputs (its lock file names it)."""


class ImageLock:
    """``with ImageLock(out_dir, name, token):`` holds ``.<name>.lock`` in ``out_dir`` while one run writes that image.

    Two runs given one output folder would otherwise both compute the image's unfinished regions, each taking the
    other's journal for an interrupted run's. The lock file is made with O_EXCL and names its process, host, start
    and ``token``; a thread touches it every ``HEARTBEAT_S`` while it is held. It is taken over where its holder is
    gone: a process of this host no longer running, the same ``token`` (a cohort's earlier try at this slide, whose
    worker died: the retry may run on another machine), or no heartbeat for ``STALE_AFTER_S`` (a run on another
    machine that was killed). Otherwise the run fails on the image (``ImageBusy``), naming the holder.
    """

    HEARTBEAT_S = 60.0
    STALE_AFTER_S = 600.0

    def __init__(self, out_dir: str | os.PathLike, name: str, token: str | None = None):
        self.path = Path(out_dir) / f".{name}.lock"
        self.token = token or "-"
        self.content = ""
        self._stop = threading.Event()

    def __enter__(self) -> ImageLock:
        self.content = f"{os.getpid()} {host_name()} {time.time():.0f} {self.token}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # again after taking over a lock whose holder is gone
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._take_over():
                    continue
                raise ImageBusy(self._busy()) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(self.content)
            threading.Thread(target=self._heartbeat, name=f"lock {self.path.name}", daemon=True).start()
            return self
        raise ImageBusy(self._busy())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._holder() == self.content.split():  # never another run's lock
            self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand: the run goes on, the next one may start the image
                return

    def _holder(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").split()
        except OSError:
            return []

    def _gone(self, holder: list[str]) -> str | None:
        """Why the holder is gone, or None where it may still run."""
        pid, host, _, token = (holder + ["", "", "", ""])[:4]
        if host == host_name() and pid.isdigit() and not process_alive(int(pid)):
            return f"process {pid} is gone"
        if self.token != "-" and token == self.token:
            return "it is an earlier try of this run"
        try:
            idle = time.time() - self.path.stat().st_mtime
        except OSError:
            return "it was removed"
        return f"it has not been touched for {idle / 60:.0f} min" if idle > self.STALE_AFTER_S else None

    def remove_if_stale(self) -> str | None:
        """Removes the lock file where its holder is gone, and says whose it was and why it went; None where there
        is none or its holder may still run. Renamed aside first, so that of two runs removing one stale lock,
        neither removes the lock the other has just made. A run killed just after committing an image's outputs
        leaves its lock, and a finished image is skipped without taking it: where it is skipped, this removes it."""
        holder = self._holder()
        why = self._gone(holder)
        if why is None:
            return None
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        if aside.read_text(encoding="utf-8").split() != holder:  # replaced meanwhile: that lock is not stale
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return None
        aside.unlink(missing_ok=True)
        return f"{' '.join(holder[:2]) or 'a run'} ({why})"

    def _take_over(self) -> bool:
        """Removes a lock whose holder is gone; False where it may still run."""
        removed = self.remove_if_stale()
        if removed is None:
            return not self.path.exists()  # released meanwhile: try again
        logger.info("%s: taking over the lock of %s", self.path, removed)
        return True

    def _busy(self) -> str:
        holder = self._holder()
        who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another run"
        if len(holder) >= 3 and holder[2].isdigit():
            who += f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(int(holder[2])))}"
        return (f"another run ({who}) is writing this image's outputs in {self.path.parent}; run again when it has "
                f"finished (a lock untouched for {self.STALE_AFTER_S / 60:.0f} min is taken over), or delete "
                f"{self.path} if that run is gone")


def remove_temporaries(out_dir: str | os.PathLike, name: str) -> None:
    """Deletes the hidden temporary files of image ``name``'s outputs (``atomic.AtomicFile`` names), whoever wrote
    them, on whatever machine: call it holding the image's ``ImageLock``, under which no run is writing them (a
    killed attempt, or a cohort's try whose worker died elsewhere, left them)."""
    for suffix in (*OUTPUT_SUFFIXES.values(), MANIFEST_SUFFIX):
        for stale in glob.glob(os.path.join(glob.escape(str(out_dir)), glob.escape(f".{name}{suffix}.") + "*.tmp*")):
            Path(stale).unlink(missing_ok=True)


def remove_outputs(out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Deletes image ``name``'s manifest, then its outputs; returns the outputs that were there.

    The manifest goes first: a crash between the two leaves files no manifest vouches for, which the next run
    redoes, never a manifest naming files that are gone or are about to be replaced.
    """
    manifest_path(out_dir, name).unlink(missing_ok=True)
    removed = []
    for path in output_paths(out_dir, name).values():
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def write_manifest(out_dir: str | os.PathLike, name: str, files: dict[str, Path], info: dict | None = None) -> Path:
    manifest = {
        "name": name,
        "files": {kind: {"path": p.name, "bytes": p.stat().st_size} for kind, p in files.items()},
        **(info or {}),
    }
    return write_json_atomic(manifest, manifest_path(out_dir, name))


@dataclass(frozen=True)
class OutputOptions:
    """How a predictor writes each image's outputs: ``label_tile``, the tile side of the label BigTIFF (a multiple
    of 16; its reduced levels go on while one is longer than a tile); ``overlay_max_side``, the longer side of the
    overlay PNG; ``compression``, the label BigTIFF's codec (``write_label_tiff``)."""

    label_tile: int = 512
    overlay_max_side: int = 2048
    compression: str = "zlib"


class SlideOutputs:
    """All outputs of one image, finished together: nothing is final until ``commit``.

    Usage: ``with SlideOutputs(...) as out:`` then ``out.add_nuclei(...)`` per window of finished nuclei (they may
    be called from inside the tile iterator given to ``write_labels``), ``out.write_labels(tiles)``, then
    ``out.commit(info)``. Leaving the block without ``commit`` (an exception) deletes every temporary file. The
    image's earlier outputs (manifest first, then every file of ``OUTPUT_SUFFIXES``) are removed on entry, so a
    failed or interrupted re-run can never look complete, nor leave the previous run's files looking current.
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
        remove_outputs(self.out_dir, self.name)
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
        nuclei = measure_nuclei(labels, rgb, offset, self.downsample, self.mpp)
        self._geojson.write(nuclei)
        self._csv.write(nuclei)
        added = len(nuclei)
        if self.overlay is not None and added:
            self.overlay.draw(labels, offset)
        self.count += added
        return added

    def write_labels(self, tiles: Iterable[np.ndarray]) -> None:
        _write_label_tiff(self._files["labels"].tmp, tiles, self.shape, self.label_tile, self.mpp, self.compression,
                          self.paths["labels"])
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
            self.overlay.write_png(self._files["overlay"].tmp)
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
