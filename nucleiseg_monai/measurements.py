"""Per-nucleus measurements and outlines of a label window, computed for all nuclei at once.

Area, centroid, eccentricity (of the second moments, as ``skimage.measure.regionprops``) and mean haematoxylin
come from one pass of bincounts over the window. Outlines are traced for every nucleus in one pass over the label
map's pixel edges (``trace_outlines``), and perimeter, polygon area and convex hull area are computed from those
rings with array operations, so nothing is done per nucleus in Python except for the rare nucleus with a hole or
in several pieces, whose rings come from ``skimage.measure.find_contours``: all of them for its GeoJSON geometry
(``Nuclei.shapes``), and its longest exterior ring for its outline and the figures measured on it.

Units: centroids, outlines, areas and perimeters are in level-0 pixels (``downsample`` maps the analysed level's
to them: an area is the label map's pixel count times ``downsample`` squared, rounded), so a row's figures and its
polygon share one grid, the one QuPath shows; ``area_um2`` uses the analysed level's microns per pixel.
Outlines use QuPath's convention (pixel (r, c) covers [c, c+1) x [r, r+1)), centroids the array-index convention
of regionprops (pixel centres at integers). Mean haematoxylin is an optical density (``skimage.color.rgb2hed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from monai.utils import convert_to_numpy
from scipy.ndimage import find_objects, label
from skimage.color import hed_from_rgb
from skimage.measure import find_contours

from .metrics import as_label_map
from .wsi import check_mpp

__all__ = ["COLUMNS", "Nuclei", "haematoxylin", "measure_nuclei", "outline", "outline_polygons", "trace_outlines"]

# The per-nucleus columns, with their units in the names: centroids, areas and perimeters in level-0 px (as the
# outlines, whatever level was read); eccentricity and solidity have none; haematoxylin is an optical density
# (skimage.color.rgb2hed's channel 0).
COLUMNS = ("id", "centroid_x_px", "centroid_y_px", "area_px", "area_um2", "perimeter_px", "eccentricity", "solidity",
           "mean_haematoxylin_od")

# A pixel side s (0 top, 1 right, 2 bottom, 3 left): the step to the neighbour across it, the direction a walk
# along it goes (clockwise around the pixel on screen, which is counter-clockwise in (x, y) with y down: the
# orientation RFC 7946 asks of exterior rings) and its midpoint relative to the pixel's top-left corner.
_ACROSS = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])
_ALONG = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])
_MID_Y = np.array([0.0, 0.5, 1.0, 0.5])
_MID_X = np.array([0.5, 1.0, 0.5, 0.0])
# 4-connected pieces: the outlines never cross a corner to a diagonal neighbour of the same id
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Channel 0 of ``skimage.color.rgb2hed`` (haematoxylin optical density), in float32 and nothing else.

    rgb2hed would compute all three stains in float64; a slide region needs only this one.
    """
    rgb = np.maximum(rgb.astype(np.float32) / 255.0, 1e-6)
    log_adjust = np.float32(np.log(1e-6))
    od = np.log(rgb) / log_adjust
    return np.maximum(od @ hed_from_rgb[:, 0].astype(np.float32), 0.0)


@dataclass
class Nuclei:
    """Measurements of n nuclei as columns, and their outlines as one ragged array of vertices.

    Outline i is ``vertices[starts[i]:starts[i + 1]]``: an open counter-clockwise ring of (x, y) level-0 pixel
    coordinates (``polygon(i)`` closes it). ``area_um2`` is None when the pixel size is unknown. A nucleus with a
    hole or in several pieces has its longest exterior ring there, and all its rings in ``shapes``: id -> one
    polygon per 4-connected piece, each a list of closed rings, the exterior (counter-clockwise) and then its holes
    (clockwise), as GeoJSON writes them; nuclei of one ring (nearly all) are not in it.
    """

    id: np.ndarray
    centroid_x: np.ndarray
    centroid_y: np.ndarray
    area_px: np.ndarray
    area_um2: np.ndarray | None
    perimeter_px: np.ndarray
    eccentricity: np.ndarray
    solidity: np.ndarray
    mean_haematoxylin: np.ndarray
    vertices: np.ndarray
    starts: np.ndarray
    shapes: dict[int, list[list[np.ndarray]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.id)

    def columns(self) -> dict[str, np.ndarray]:
        """The figures per nucleus as named columns, those of the predictor's CSV (``COLUMNS``), for a table:
        ``pandas.DataFrame(nuclei.columns())``; without ``area_um2`` when the pixel size is unknown."""
        values = dict(zip(COLUMNS, (self.id, self.centroid_x, self.centroid_y, self.area_px, self.area_um2,
                                    self.perimeter_px, self.eccentricity, self.solidity, self.mean_haematoxylin)))
        return {name: column for name, column in values.items() if column is not None}

    def polygon(self, i: int) -> np.ndarray:
        ring = self.vertices[self.starts[i]:self.starts[i + 1]]
        return np.concatenate([ring, ring[:1]])


def outline(mask: np.ndarray, top: int, left: int, downsample: float = 1.0) -> np.ndarray:
    """Closed (x, y) ring around a binary crop whose top-left pixel is (top, left) at the analysed level.

    The ring runs through the edge midpoints of the boundary pixels (find_contours at 0.5 on the padded crop),
    with collinear vertices removed (a lossless simplification), counter-clockwise, in level-0 pixels with pixel
    (r, c) covering [c, c+1) x [r, r+1). A nucleus with holes or in several pieces keeps only its longest exterior
    ring (``outline_polygons`` gives them all). ``trace_outlines`` gives the same rings for a whole label map at
    once; this serves the nuclei it cannot.
    """
    return _crop_rings(mask, top, left, downsample, polygons=False)[0]


def outline_polygons(mask: np.ndarray, top: int, left: int, downsample: float = 1.0) -> list[list[np.ndarray]]:
    """Every ring of a binary crop, as ``outline`` draws its longest: one polygon per 4-connected piece (in raster
    order of their first pixels), each a list of closed (x, y) rings, its exterior (counter-clockwise) and then
    its holes (clockwise, as RFC 7946 asks). A hole is a background component enclosed by the piece, 8-connected
    since the background connects across a corner: a gap that meets the outside only at a corner is no hole, the
    exterior ring goes into it. A piece inside another's hole is a polygon of its own, and the hole stays whole.
    """
    return _crop_rings(mask, top, left, downsample, polygons=True)[1]


def _crop_rings(mask: np.ndarray, top: int, left: int, downsample: float,
                polygons: bool) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """``outline`` and, where asked, ``outline_polygons`` (else []) of a binary crop, from one find_contours."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.float32)
    padded[1:-1, 1:-1] = mask
    rings = [c[:-1] for c in find_contours(padded, 0.5)]
    # find_contours keeps the background on a ring's left: counter-clockwise in (x, y) around a piece, clockwise
    # around a hole
    exterior = [_signed_area(r[:, ::-1]) > 0 for r in rings]
    longest = _ring_xy(max((r for r, e in zip(rings, exterior) if e), key=len), top, left, downsample, False)
    if not polygons:
        return longest, []
    pieces, count = label(padded, _CROSS)
    shapes: list[list[np.ndarray]] = [[] for _ in range(count)]
    for ring, outer in zip(rings, exterior):
        # a vertex is the midpoint between a pixel of the piece it bounds and a background one (label 0)
        low, high = np.floor(ring[0]).astype(int), np.ceil(ring[0]).astype(int)
        piece = shapes[max(pieces[low[0], low[1]], pieces[high[0], high[1]]) - 1]
        xy = _ring_xy(ring, top, left, downsample, clockwise=not outer)
        if outer:
            piece.insert(0, xy)
        else:
            piece.append(xy)
    return longest, shapes


def _ring_xy(ring: np.ndarray, top: int, left: int, downsample: float, clockwise: bool) -> np.ndarray:
    """A find_contours ring of a padded crop as a closed (x, y) ring, collinear vertices removed, in level 0."""
    step = np.diff(ring, axis=0, append=ring[:1])
    before = np.concatenate([step[-1:], step[:-1]])
    turns = (before[:, 0] * step[:, 1] - before[:, 1] * step[:, 0] != 0) | ((before * step).sum(1) <= 0)
    if turns.sum() >= 3:
        ring = ring[turns]
    # padded index -> crop index (-1) -> image index (+top/left) -> pixel-edge coordinates (+0.5) -> level 0
    xy = np.stack([(ring[:, 1] - 0.5 + left) * downsample, (ring[:, 0] - 0.5 + top) * downsample], axis=1)
    if (_signed_area(xy) < 0) != clockwise:  # counter-clockwise exteriors and clockwise holes, as RFC 7946 asks
        xy = xy[::-1]
    return np.concatenate([xy, xy[:1]])


def _signed_area(xy: np.ndarray) -> float:
    """Shoelace area of an open ring of (x, y) vertices; positive when counter-clockwise."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def trace_outlines(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outline of every id of a label map in one pass: (ids, y, x, starts).

    Ring i belongs to ``ids[i]`` and has vertices ``(y, x)[starts[i]:starts[i + 1]]`` in pixel-edge coordinates of
    the map (pixel (r, c) covers [r, r+1) x [c, c+1)), counter-clockwise in (x, y), collinear vertices removed,
    starting at the first vertex at or after the middle of the top side of its first boundary pixel in raster
    order. They are the rings that ``outline`` finds one nucleus at a time (up to where they start): the walk
    goes along the sides of an id's pixels that face another id or the background, from side midpoint to side
    midpoint, and turns around a pixel rather than cross a corner to a diagonal neighbour (find_contours'
    default: the background is connected there). Ids with more than one ring (a hole, or pieces) are left out.
    """
    padded = np.pad(np.asarray(labels), 1)
    width = padded.shape[1]
    flat = padded.ravel()
    across, along = _ACROSS @ (width, 1), _ALONG @ (width, 1)
    inner = padded[1:-1, 1:-1]
    faces = []  # every side of a labelled pixel that faces a different id
    on_boundary = np.zeros(padded.shape, bool)
    for dy, dx in _ACROSS:
        facing = np.zeros(padded.shape, bool)
        facing[1:-1, 1:-1] = (inner != padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:width - 1 + dx]) & (inner != 0)
        faces.append(np.flatnonzero(facing))
        on_boundary |= facing
    pixel = np.concatenate(faces)
    side = np.repeat(np.arange(4), [f.size for f in faces])
    if pixel.size == 0:
        return np.zeros(0, np.asarray(labels).dtype), np.zeros(0), np.zeros(0), np.zeros(1, np.int64)
    own = flat[pixel]
    # the next side of the walk: around this pixel's corner, straight on, or around the diagonal neighbour's
    ahead = pixel + along[side]
    turn_in = flat[ahead] != own
    straight = ~turn_in & (flat[ahead + across[side]] != own)
    next_pixel = np.where(turn_in, pixel, np.where(straight, ahead, ahead + across[side]))
    next_side = np.where(turn_in, (side + 1) % 4, np.where(straight, side, (side + 3) % 4))
    # index of each (pixel, side) in the lists above, through a table of the boundary pixels
    boundary = np.flatnonzero(on_boundary)
    row = np.zeros(flat.size, np.int32)
    row[boundary] = np.arange(boundary.size)
    table = np.zeros((boundary.size, 4), np.int64)
    table[row[pixel], side] = np.arange(pixel.size)
    succ = table[row[next_pixel], next_side]

    first, rank = _cycles(succ)
    heads = np.flatnonzero(first == np.arange(first.size))
    ring_of = np.zeros(first.size, np.int64)
    ring_of[heads] = np.arange(heads.size)
    ring_of = ring_of[first]
    length = np.bincount(ring_of)
    ring_ids = own[heads]
    _, id_of_ring, rings_per_id = np.unique(ring_ids, return_inverse=True, return_counts=True)
    single = rings_per_id[id_of_ring] == 1
    # vertices in walking order, ring after ring; doubled coordinates keep the collinearity test exact
    order = np.empty_like(succ)
    order[(np.cumsum(length) - length)[ring_of] + rank] = np.arange(succ.size)
    y2 = 2 * (pixel // width - 1) + (2 * _MID_Y[side]).astype(np.int64)
    x2 = 2 * (pixel % width - 1) + (2 * _MID_X[side]).astype(np.int64)
    pred = np.empty_like(succ)
    pred[succ] = np.arange(succ.size)
    by, bx, ay, ax = y2 - y2[pred], x2 - x2[pred], y2[succ] - y2, x2[succ] - x2
    # the rule of ``outline``: a vertex stays where the walk turns
    turns = (by * ax - bx * ay != 0) | (by * ay + bx * ax <= 0)
    kept = order[turns[order] & single[ring_of[order]]]
    counts = np.bincount(ring_of[kept], minlength=heads.size)[single]
    return ring_ids[single], y2[kept] / 2, x2[kept] / 2, np.concatenate([[0], np.cumsum(counts)])


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycles of a permutation given as successor indices, by pointer doubling (log2 of the longest cycle passes):
    each element's cycle, named by its smallest element, and its number of steps from that element."""
    index = np.arange(succ.size)
    first, jump = index.copy(), succ.copy()
    while True:  # a pass that changes nothing means every window already spans its whole cycle
        lower = np.minimum(first, first[jump])
        if np.array_equal(lower, first):
            break
        first, jump = lower, jump[jump]
    # cut each cycle before its smallest element, then count the steps to the cut from everywhere
    nxt = np.where(succ == first, index, succ)
    steps = (nxt != index).astype(np.int64)
    while not np.array_equal(nxt[nxt], nxt):
        steps += steps[nxt]
        nxt = nxt[nxt]
    return first, steps[first] - steps


def _shape_measures(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Perimeter, area and convex hull area of open counter-clockwise rings given as one ragged array."""
    n = starts.size - 1
    ring = np.repeat(np.arange(n), np.diff(starts))
    nxt = np.arange(x.size) + 1
    nxt[starts[1:] - 1] = starts[:-1]  # each ring's last vertex joins its first
    perimeter = np.bincount(ring, np.hypot(x[nxt] - x, y[nxt] - y), n)
    area = 0.5 * np.bincount(ring, x * y[nxt] - x[nxt] * y, n)
    # reflex vertices of a simple polygon are never on its hull: about half of an outline's vertices
    prv = np.empty_like(nxt)
    prv[nxt] = np.arange(x.size)
    convex = (x - x[prv]) * (y[nxt] - y) - (y - y[prv]) * (x[nxt] - x) >= 0
    return perimeter, area, _hull_areas(x[convex], y[convex], ring[convex], n)


def _hull_areas(x: np.ndarray, y: np.ndarray, ring: np.ndarray, n: int) -> np.ndarray:
    """Convex hull area of each group of points, by Andrew's monotone chain run on all groups in step.

    The lower chain over a group's points sorted by (x, y) and the upper chain over the reverse order together
    close its hull, so the hull's area is half the sum of both chains' shoelace terms. Collinear points are
    dropped (cross <= 0), so fewer than three non-collinear points give 0.
    """
    order = np.lexsort((y, x, ring))
    x, y, ring = x[order], y[order], ring[order]
    counts = np.bincount(ring, minlength=n)
    slot = np.arange(x.size) - (np.cumsum(counts) - counts)[ring]
    # 2n chains (lower ones, then upper ones over the same points reversed), longest first, so the chains still
    # taking points at step i are a leading block; chain j's points and stack share flat[off[j]:off[j] + size[j]]
    chain = np.argsort(-np.concatenate([counts, counts]), kind="stable")
    place = np.empty_like(chain)
    place[chain] = np.arange(2 * n)
    size = np.concatenate([counts, counts])[chain]
    off = np.cumsum(size) - size
    px, py = np.empty(2 * x.size), np.empty(2 * x.size)
    lower, upper = off[place[ring]] + slot, off[place[n + ring]] + counts[ring] - 1 - slot
    px[lower], py[lower], px[upper], py[upper] = x, y, x, y
    sx, sy = np.empty_like(px), np.empty_like(py)
    top = np.zeros(2 * n, np.int64)
    taking = np.searchsorted(-size, -np.arange(int(size.max(initial=0))), side="left")  # chains with > i points
    for i, m in enumerate(taking):
        qx, qy = px[off[:m] + i], py[off[:m] + i]
        check = np.flatnonzero(top[:m] >= 2)
        while check.size:  # pop while the last two stacked points and this one do not turn left
            a, b = off[check] + top[check] - 2, off[check] + top[check] - 1
            keep_popping = ((sx[b] - sx[a]) * (qy[check] - sy[a]) - (sy[b] - sy[a]) * (qx[check] - sx[a])) <= 0
            check = check[keep_popping]
            top[check] -= 1
            check = check[top[check] >= 2]
        sx[off[:m] + top[:m]], sy[off[:m] + top[:m]] = qx, qy
        top[:m] += 1
    owner = np.repeat(np.arange(2 * n), size)
    k = np.flatnonzero(np.arange(px.size) - off[owner] < top[owner] - 1)  # stacked points with a successor
    terms = sx[k] * sy[k + 1] - sx[k + 1] * sy[k]
    return 0.5 * np.abs(np.bincount(chain[owner[k]] % n, terms, n))


def measure_nuclei(
    labels: np.ndarray,
    rgb: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    downsample: float = 1.0,
    mpp: float | None = None,
) -> Nuclei:
    """Measure every id of a label window whose top-left sits at ``offset`` (y, x) in the analysed level.

    Perimeter and solidity are those of the outline polygon (its length; its area over its convex hull's, as
    QuPath measures them), for a nucleus with a hole or in pieces those of its longest exterior ring. Rows come
    in increasing id order. See the module docstring for units. ``labels``: as the metrics take label maps
    (``metrics.as_label_map``: numpy or torch, (H, W) or (1, H, W), whole ids in floats); ``rgb``: the same pixels
    as 8-bit RGB, (height, width, 3) uint8, which haematoxylin's optical density is measured on; ``mpp``: the
    analysed level's microns per pixel, for ``area_um2``.
    """
    labels, rgb = as_label_map(labels, "measure_nuclei: labels"), convert_to_numpy(rgb)
    if rgb.dtype != np.uint8 or rgb.shape != (*labels.shape, 3):
        raise ValueError(f"measure_nuclei: rgb must be the labels' pixels as 8-bit RGB, uint8 of shape "
                         f"{(*labels.shape, 3)}, got {rgb.dtype} of shape {rgb.shape}: convert floats with "
                         "skimage.util.img_as_ubyte; for 16-bit, nucleiseg_monai.wsi.ArrayReader(Path('tile'), "
                         "rgb).pixels is the 8-bit RGB the predictor analysed; drop alpha (rgb[..., :3])")
    if mpp is not None:
        mpp = check_mpp(mpp, "measure_nuclei: mpp")
    oy, ox = offset
    fg = np.flatnonzero(labels)
    if fg.size == 0:
        return _empty(mpp)
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

    k, ring_x, ring_y, starts, shapes = _outlines(local, np.flatnonzero(count[1:]) + 1)
    perimeter, area_poly, hull = _shape_measures(ring_x, ring_y, starts)
    area = count[k]
    area_px = area if downsample == 1 else np.rint(area * downsample * downsample).astype(np.int64)
    vertices = np.stack([(ring_x + ox) * downsample, (ring_y + oy) * downsample], axis=1)
    return Nuclei(
        id=k + first - 1,
        centroid_x=(cx[k] + ox + 0.5) * downsample - 0.5,
        centroid_y=(cy[k] + oy + 0.5) * downsample - 0.5,
        area_px=area_px,
        area_um2=None if mpp is None else area * mpp * mpp,
        perimeter_px=perimeter * downsample,
        eccentricity=eccentricity[k],
        solidity=np.where(hull > 0, area_poly / np.where(hull > 0, hull, 1.0), 1.0),
        mean_haematoxylin=hema[k],
        vertices=vertices,
        starts=starts,
        shapes={j + first - 1: [[(ring + (ox, oy)) * downsample for ring in rings] for rings in polygons]
                for j, polygons in shapes.items()},
    )


def _outlines(local: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """One ring per id of ``present`` (in that order) as (ids, x, y, starts), pixel-edge coordinates of ``local``,
    and the polygons (``outline_polygons``) of the ids with more than one ring."""
    ring_ids, ring_y, ring_x, starts = trace_outlines(local)
    traced = np.zeros(int(present[-1]) + 1, bool)
    traced[ring_ids] = True
    others = present[~traced[present]]
    shapes = {}
    if others.size:  # a hole or several pieces: all rings, and the longest exterior one as the outline
        boxes = find_objects(local)
        extra = []
        for k in others.tolist():
            box = boxes[k - 1]
            ring, shapes[k] = _crop_rings(local[box] == k, box[0].start, box[1].start, 1.0, polygons=True)
            extra.append(ring[:-1])
        ring_x = np.concatenate([ring_x] + [r[:, 0] for r in extra])
        ring_y = np.concatenate([ring_y] + [r[:, 1] for r in extra])
        starts = np.concatenate([starts, starts[-1] + np.cumsum([len(r) for r in extra])])
        ring_ids = np.concatenate([ring_ids, others])
    # reorder the ragged array by id: ring order[j] becomes ring j
    order = np.argsort(ring_ids, kind="stable")
    lengths = np.diff(starts)[order]
    new_starts = np.concatenate([[0], np.cumsum(lengths)])
    pick = np.repeat(starts[:-1][order] - new_starts[:-1], lengths) + np.arange(ring_x.size)
    return ring_ids[order], ring_x[pick], ring_y[pick], new_starts, shapes


def _empty(mpp: float | None) -> Nuclei:
    none = np.zeros(0)
    return Nuclei(np.zeros(0, np.int64), none, none, np.zeros(0, np.int64), None if mpp is None else none, none,
                  none, none, none, np.zeros((0, 2)), np.zeros(1, np.int64))
