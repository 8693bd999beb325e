"""A region of interest (ROI): the areas of an image a pathologist drew in QuPath, where nuclei are wanted.

Read from GeoJSON as QuPath exports it (File > Export objects as GeoJSON): a FeatureCollection, one Feature, or a
bare list of Features, whose Polygon and MultiPolygon geometries (holes included) are the ROI; coordinates are the
image's level-0 pixels, x then y, in QuPath's convention (pixel (r, c) covers [c, c+1) x [r, r+1)). Other geometries
(points, lines) are left out with a warning. A file of detections, such as this package's own nuclei GeoJSON, is
refused: taken as an ROI it would keep the nuclei found before and nothing else.

The predictor uses an ROI twice (``inference``): a low-resolution mask that errs on the side of inside chooses the
regions to analyse, and the exact polygons decide, by its centroid, which nucleus is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation
from skimage.draw import line
from skimage.measure import points_in_poly

logger = logging.getLogger(__name__)

POLYGON_TYPES = ("Polygon", "MultiPolygon")
# QuPath's object types of what it found itself, not what a person drew: this package writes its nuclei as detections
DETECTION_TYPES = ("detection", "cell", "tile")
# QuPath 0.2 named an object's kind in its feature's id instead of an objectType property
LEGACY_IDS = {"PathDetectionObject": "detection", "PathCellObject": "cell", "PathTileObject": "tile"}
EXPORT_HINT = "draw the region in QuPath and export it with File > Export objects as GeoJSON, annotations only"


class RoiError(ValueError):
    """An ROI file that cannot be used; the message names the file and the fix."""


class Roi:
    """Polygons in an image's level-0 pixels: each an exterior ring then its holes, rings (n, 2) float arrays of
    x, y. ``path``: the file they came from; ``sha256``: a digest of the geometry alone, as written (its polygons,
    rings and vertices in their order), so the same file gives the same digest whatever it is called or which
    properties it carries; the same areas exported otherwise may not."""

    def __init__(self, polygons: list[list[np.ndarray]], path: str | os.PathLike = "<roi>"):
        self.polygons = [[np.asarray(ring, np.float64) for ring in rings] for rings in polygons]
        self._boxes = [(rings[0].min(axis=0), rings[0].max(axis=0)) for rings in self.polygons]
        self.path = str(path)
        geometry = json.dumps([[ring.tolist() for ring in rings] for rings in self.polygons])
        self.sha256 = hashlib.sha256(geometry.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.polygons)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which level-0 points (x, y) lie inside the ROI: inside an exterior ring and in none of its holes."""
        points = np.column_stack([np.ravel(x), np.ravel(y)]).astype(np.float64)
        inside = np.zeros(len(points), bool)
        # a slide's annotations are often many, each of thousands of vertices: only points in its box are tested
        for (exterior, *holes), (low, high) in zip(self.polygons, self._boxes):
            near = np.flatnonzero(~inside & (points >= low).all(axis=1) & (points <= high).all(axis=1))
            if near.size == 0:
                continue
            here = points_in_poly(points[near], exterior)
            for hole in holes:
                here &= ~points_in_poly(points[near], hole)
            inside[near] = here
        return inside

    def mask(self, shape: tuple[int, int], per_pixel: tuple[float, float], touched: bool = False) -> np.ndarray:
        """The ROI rasterised on a (height, width) grid of ``per_pixel`` (y, x) level-0 pixels per mask pixel: the
        mask pixels whose centres lie inside, or with ``touched`` also every pixel its outlines pass through, and
        their neighbours (a generous mask, for choosing regions: a thin ROI between pixel centres still counts)."""
        out = np.zeros(shape, bool)
        sy, sx = per_pixel
        for exterior, *holes in self.polygons:
            # PIL's scan-line fill: skimage's costs vertices x box pixels, minutes for a brush annotation's outline
            area = Image.new("1", (shape[1], shape[0]))
            draw = ImageDraw.Draw(area)
            for k, ring in enumerate([exterior, *holes]):
                draw.polygon(list(zip(ring[:, 0] / sx - 0.5, ring[:, 1] / sy - 0.5)), fill=int(k == 0))
            out |= np.asarray(area, bool)
        if not touched:
            return out
        for rings in self.polygons:
            for ring in rings:
                out |= _outline(ring[:, 1] / sy - 0.5, ring[:, 0] / sx - 0.5, shape)
        return binary_dilation(out, np.ones((3, 3), bool))

    def keeps(self, downsample: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The stitcher's ``where`` on a level ``downsample`` times coarser than level 0: which centroids (y, x) in
        that level's pixel indices lie inside, tested at their level-0 position (index i covers [i, i + 1))."""
        return lambda y, x: self.contains((x + 0.5) * downsample, (y + 0.5) * downsample)

    def describe(self) -> str:
        count = len(self)
        return f"{count} polygon{'s' if count != 1 else ''} from {self.path}"


def _outline(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of ``shape`` a closed ring (in pixel-centre coordinates) passes through, in straight steps."""
    out = np.zeros(shape, bool)
    r, c = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
    for k in range(len(r)):
        rr, cc = line(r[k - 1], c[k - 1], r[k], c[k])
        ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        out[rr[ok], cc[ok]] = True
    return out


def read_roi(path: str | os.PathLike) -> Roi:
    """The ROI of a GeoJSON file as QuPath exports it (module docstring); RoiError naming the file and the fix for
    a file that is not JSON, holds no polygon, holds detections, or holds malformed polygons."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise RoiError(f"ROI file {path} not found; give the GeoJSON file exported from QuPath") from None
    except OSError as err:  # a folder, a file this user cannot read
        raise RoiError(f"cannot read the ROI file {path} ({err.strerror or err}); give the GeoJSON file exported "
                       "from QuPath") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise RoiError(f"{path} is not a GeoJSON file ({err}); {EXPORT_HINT}") from None
    features = _features(data, path)
    detections = sum(_object_type(f) in DETECTION_TYPES for f in features)
    if detections:
        raise RoiError(f"{path} holds {detections} detection{'s' if detections != 1 else ''} (objects QuPath or "
                       "nucleiseg found, such as nuclei: this package's own <name>.geojson), not drawn regions; an "
                       f"ROI is made of annotations: {EXPORT_HINT}")
    polygons, others = [], Counter()
    for index, feature in enumerate(features):
        for geometry in _geometries(feature.get("geometry")):
            kind = geometry.get("type") if isinstance(geometry, dict) else None
            if kind not in POLYGON_TYPES:
                others["feature without geometry" if geometry is None else str(kind)] += 1
                continue
            parts = geometry.get("coordinates")
            where = f"{path}, feature {index}"
            parts = [parts] if kind == "Polygon" else parts
            if not isinstance(parts, list) or not parts:
                raise RoiError(f"{where}: a {kind} without coordinates; {EXPORT_HINT}")
            polygons += [_rings(rings, where) for rings in parts]
    if others:
        listed = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
        if not polygons:
            raise RoiError(f"{path} holds no Polygon or MultiPolygon (found {listed}); an ROI is an area: {EXPORT_HINT}"
                           " (brush, polygon, rectangle or ellipse tool)")
        logger.warning("%s: %s left out; only polygons make the ROI", path, listed)
    if not polygons:
        raise RoiError(f"{path} holds no Polygon or MultiPolygon; {EXPORT_HINT}")
    return Roi(polygons, path)


def _geometries(geometry: object) -> list:
    """A feature's geometry, or the members of a GeometryCollection (an annotation of mixed kinds), nested or not."""
    if isinstance(geometry, dict) and geometry.get("type") == "GeometryCollection":
        members = geometry.get("geometries")
        return [g for member in (members if isinstance(members, list) else []) for g in _geometries(member)]
    return [geometry]


def _features(data: object, path: Path) -> list[dict]:
    """The Features of a FeatureCollection, of one Feature, of a list of Features, or a bare geometry as one."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") in POLYGON_TYPES:
        data = [{"type": "Feature", "geometry": data}]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in data):
        raise RoiError(f"{path} is JSON but not GeoJSON Features (a FeatureCollection, a Feature or a list of "
                       f"Features); {EXPORT_HINT}")
    return data


def _object_type(feature: dict) -> str | None:
    properties = feature.get("properties")
    kind = properties.get("objectType") if isinstance(properties, dict) else None
    if isinstance(kind, str):
        return kind.lower()
    return LEGACY_IDS.get(feature.get("id")) if isinstance(feature.get("id"), str) else None


def _rings(rings: object, where: str) -> list[np.ndarray]:
    """A polygon's rings as (n, 2) arrays of x, y (a third coordinate dropped); RoiError where one is malformed."""
    if not isinstance(rings, list) or not rings:
        raise RoiError(f"{where}: a polygon must be a list of rings (lists of [x, y]); {EXPORT_HINT}")
    out = []
    for ring in rings:
        try:
            xy = np.array([point[:2] for point in ring], np.float64)
        except (TypeError, ValueError, IndexError):
            raise RoiError(f"{where}: a ring is not a list of [x, y] numbers; {EXPORT_HINT}") from None
        if xy.ndim != 2 or xy.shape[1] != 2 or len(np.unique(xy, axis=0)) < 3 or not np.isfinite(xy).all():
            raise RoiError(f"{where}: a ring needs at least 3 distinct finite [x, y] points; {EXPORT_HINT}")
        out.append(xy)
    return out
