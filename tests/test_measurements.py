"""Per-nucleus measurements: known answers on hand-built maps, and the same results as the per-nucleus code they
replaced (kept below as the reference) on hand-built, random and synthetic label maps."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from skimage.color import rgb2hed
from skimage.measure import regionprops

from nucleiseg_monai.measurements import haematoxylin, measure_nuclei, outline, outline_polygons, trace_outlines
from nucleiseg_monai.synthetic import make_tile
from conftest import hand_built_labels, inside_polygons, rings_and_pieces_labels

RNG = np.random.default_rng(1)
COLUMNS = ("centroid_x", "centroid_y", "area_px", "area_um2", "perimeter_px", "eccentricity", "solidity",
           "mean_haematoxylin")


def _labels() -> np.ndarray:
    return hand_built_labels()


def _awkward_labels(seed: int) -> np.ndarray:
    """Random touching blobs: ids in pieces, with holes, meeting only at corners, cut by the window border."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 800, (120, 120)).astype(np.uint32) * (rng.random((120, 120)) < 0.5)
    return (ndi.maximum_filter(ids, 3) * (rng.random((120, 120)) < 0.8)).astype(np.uint32)


# ---------------------------------------------------------------------------------------------- the reference:
# the per-nucleus implementation that measure_nuclei replaced, verbatim but for its return type (a list of dicts)


def _reference_hull_area(ring):
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    convex = ring[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] >= 0]
    if len(convex) < 3:
        return 0.0
    pts = convex[np.lexsort((convex[:, 1], convex[:, 0]))].tolist()

    def half(points):
        chain = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.asarray(half(pts) + half(pts[::-1]), dtype=np.float64)
    return abs(_signed_area(hull)) if len(hull) >= 3 else 0.0


def _signed_area(xy):
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def reference_measure(labels, rgb, offset=(0, 0), downsample=1.0, mpp=None):
    oy, ox = offset
    fg = np.flatnonzero(labels)
    ids = labels.ravel()[fg].astype(np.int64)
    first = int(ids.min())
    ids -= first - 1
    n = int(ids.max()) + 1
    width = labels.shape[1]
    y, x = (fg // width).astype(np.float64), (fg % width).astype(np.float64)
    count = np.bincount(ids, minlength=n)
    safe = np.maximum(count, 1)
    cy, cx = np.bincount(ids, y, n) / safe, np.bincount(ids, x, n) / safe
    dy, dx = y - cy[ids], x - cx[ids]
    vy, vx, cov = (np.bincount(ids, dy * dy, n) / safe, np.bincount(ids, dx * dx, n) / safe,
                   np.bincount(ids, dy * dx, n) / safe)
    half_trace, root = (vy + vx) / 2, np.sqrt(((vy - vx) / 2) ** 2 + cov * cov)
    major, minor = half_trace + root, np.maximum(half_trace - root, 0.0)
    eccentricity = np.sqrt(np.clip(1.0 - minor / np.where(major > 0, major, 1.0), 0.0, 1.0))
    eccentricity[major <= 0] = 0.0
    hema = np.bincount(ids, haematoxylin(rgb.reshape(-1, 3)[fg]), n) / safe
    local = np.zeros(labels.shape, np.int32)
    local.ravel()[fg] = ids
    nuclei = []
    for k, box in enumerate(ndi.find_objects(local), start=1):
        if box is None:
            continue
        ring = outline(local[box] == k, box[0].start + oy, box[1].start + ox, downsample)
        px = ring / downsample
        area_poly = _signed_area(px[:-1])
        hull = _reference_hull_area(px[:-1])
        area = int(count[k])
        nuclei.append(dict(
            id=k + first - 1,
            centroid_x=(cx[k] + ox + 0.5) * downsample - 0.5,
            centroid_y=(cy[k] + oy + 0.5) * downsample - 0.5,
            area_px=round(area * downsample ** 2),
            area_um2=None if mpp is None else area * mpp * mpp,
            perimeter_px=float(np.hypot(*np.diff(ring, axis=0).T).sum()),
            eccentricity=float(eccentricity[k]),
            solidity=area_poly / hull if hull > 0 else 1.0,
            mean_haematoxylin=float(hema[k]),
            polygon=ring,
        ))
    return nuclei


def same_ring(a: np.ndarray, b: np.ndarray) -> bool:
    """Two closed rings with the same vertices in the same order and direction (wherever each starts)."""
    a, b = a[:-1], b[:-1]
    if a.shape != b.shape:
        return False
    start = np.flatnonzero((b == a[0]).all(axis=1))
    return start.size == 1 and np.array_equal(np.roll(b, -start[0], axis=0), a)


def assert_same_as_reference(labels, rgb, offset=(0, 0), downsample=1.0, mpp=None):
    expected = reference_measure(labels, rgb, offset, downsample, mpp)
    got = measure_nuclei(labels, rgb, offset, downsample, mpp)
    assert got.id.tolist() == [n["id"] for n in expected]
    for i, ref in enumerate(expected):
        assert same_ring(got.polygon(i), ref["polygon"]), ref["id"]
        for column in COLUMNS:
            value = getattr(got, column)
            if ref[column] is None:
                assert value is None
            else:
                assert value[i] == pytest.approx(ref[column], rel=1e-9, abs=1e-9), (ref["id"], column)
    return got


# ---------------------------------------------------------------------------------------------- known answers


def test_haematoxylin_equals_rgb2hed_channel0():
    rgb = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(haematoxylin(rgb), rgb2hed(rgb)[..., 0], rtol=1e-4, atol=1e-5)


def test_measurements_match_regionprops_and_hand_computed_shapes():
    labels = _labels()
    rgb = RNG.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    hed = rgb2hed(rgb)[..., 0]
    nuclei = measure_nuclei(labels, rgb, offset=(100, 200), downsample=1.0, mpp=0.5)
    assert nuclei.id.tolist() == [3, 7, 10, 12]
    for i, prop in enumerate(regionprops(labels.astype(np.int64), intensity_image=hed)):
        assert nuclei.area_px[i] == prop.area == np.bincount(labels.ravel())[prop.label]
        assert nuclei.area_um2[i] == pytest.approx(prop.area * 0.25)
        assert nuclei.centroid_y[i] == pytest.approx(prop.centroid[0] + 100)
        assert nuclei.centroid_x[i] == pytest.approx(prop.centroid[1] + 200)
        assert nuclei.eccentricity[i] == pytest.approx(prop.eccentricity, abs=1e-9)
        assert nuclei.mean_haematoxylin[i] == pytest.approx(prop.intensity_mean, rel=1e-4)
        ring = nuclei.polygon(i)  # inside the pixel-edge bounding box, in level-0 coordinates, closed
        r0, c0, r1, c1 = prop.bbox
        assert ring[:, 0].min() >= c0 + 200 and ring[:, 0].max() <= c1 + 200
        assert ring[:, 1].min() >= r0 + 100 and ring[:, 1].max() <= r1 + 100
        assert (ring[0] == ring[-1]).all() and len(ring) >= 4
    rect, ell = 0, 1
    assert nuclei.solidity[rect] == pytest.approx(1.0)
    assert nuclei.solidity[ell] < 0.75  # an L is far from convex
    assert nuclei.perimeter_px[rect] == pytest.approx(2 * (10 + 20) - 4 * (1 - np.sqrt(0.5)))  # corners cut at 45 deg
    assert nuclei.polygon(rect).shape == (9, 2)  # collinear points removed: 4 sides + 4 cut corners, closed
    # the rectangle's ring: corners cut through the midpoints of the corner pixels' sides
    assert {tuple(p) for p in nuclei.polygon(rect)[:-1].tolist()} == {
        (210.5, 105.0), (229.5, 105.0), (230.0, 105.5), (230.0, 114.5),
        (229.5, 115.0), (210.5, 115.0), (210.0, 114.5), (210.0, 105.5)}
    # read at a pyramid level of downsample 2: the row's area and perimeter on its polygon's level-0 grid
    coarse = measure_nuclei(labels, rgb, offset=(100, 200), downsample=2.0, mpp=1.0)
    assert coarse.area_px[rect] == 4 * nuclei.area_px[rect] == 4 * 200
    assert coarse.perimeter_px[rect] == pytest.approx(2 * nuclei.perimeter_px[rect])
    assert coarse.area_um2[rect] == pytest.approx(nuclei.area_um2[rect] * 4)  # 1 um/px there, 0.5 at level 0
    ring = coarse.polygon(rect)
    assert coarse.area_px[rect] == pytest.approx(abs(_signed_area(ring[:-1])), rel=0.01)  # the polygon QuPath shows


def test_outline_of_one_pixel_and_downsample():
    mask = np.ones((1, 1), bool)
    ring = outline(mask, top=4, left=6)
    # the diamond through the pixel's edge midpoints; pixel (4, 6) covers [6, 7) x [4, 5)
    assert {tuple(p) for p in ring[:-1].tolist()} == {(6.5, 4.0), (7.0, 4.5), (6.5, 5.0), (6.0, 4.5)}
    assert len(ring) == 5 and (ring[0] == ring[-1]).all()
    assert _signed_area(ring[:-1]) > 0  # counter-clockwise (x, y)
    # at a level with downsample 4, pixel (4, 6) covers level-0 [24, 28) x [16, 20)
    ring4 = outline(mask, top=4, left=6, downsample=4.0)
    assert ring4[:, 0].min() >= 24 and ring4[:, 0].max() <= 28 and ring4[:, 1].min() >= 16 and ring4[:, 1].max() <= 20


def test_trace_outlines_of_hand_built_map():
    labels = np.zeros((8, 9), np.int32)
    labels[1, 1] = 5  # one pixel: the diamond through its side midpoints
    labels[3:6, 2:7] = 2
    labels[4, 4] = 0  # a hole: two rings, left to outline
    labels[1, 6:8] = 9
    labels[2, 8] = 9  # touches the rest of id 9 only at a corner: two pieces
    ids, y, x, starts = trace_outlines(labels)
    assert ids.tolist() == [5]
    ring = np.stack([x, y], axis=1)
    assert ring.tolist() == [[1.5, 1.0], [2.0, 1.5], [1.5, 2.0], [1.0, 1.5]]  # starts on the top side
    assert _signed_area(ring) > 0 and starts.tolist() == [0, 4]
    assert trace_outlines(np.zeros((3, 3), np.int32))[0].size == 0


def _octagon(x0, y0, x1, y1):
    """The vertices of the ring through the side midpoints of the pixels lining a box [x0, x1] x [y0, y1]."""
    return {(x0 + 0.5, y0), (x1 - 0.5, y0), (x1, y0 + 0.5), (x1, y1 - 0.5), (x1 - 0.5, y1), (x0 + 0.5, y1),
            (x0, y1 - 0.5), (x0, y0 + 0.5)}


@pytest.mark.parametrize("offset, downsample", [((0, 0), 1.0), ((100, 200), 2.0)])
def test_holes_and_pieces_keep_every_ring(offset, downsample):
    labels = rings_and_pieces_labels()
    nuclei = measure_nuclei(labels, np.zeros((*labels.shape, 3), np.uint8), offset, downsample)
    assert nuclei.id.tolist() == [2, 3, 4, 5, 6, 8, 9]
    assert nuclei.area_px.tolist() == [n * downsample ** 2 for n in (18, 9, 24, 1, 33, 14, 8)]
    assert sorted(nuclei.shapes) == [4, 6, 9]  # one ring each for the others: no per-nucleus geometry
    oy, ox = offset

    def level0(points):
        return {((x + ox) * downsample, (y + oy) * downsample) for x, y in points}

    def vertex_set(ring):
        return {tuple(p) for p in ring[:-1].tolist()}

    # the ring: exterior and hole through the side midpoints of its pixels, the hole clockwise
    (ring,) = nuclei.shapes[4]
    assert len(ring) == 2 and vertex_set(ring[0]) == level0(_octagon(1, 1, 8, 8))
    assert vertex_set(ring[1]) == level0(_octagon(2, 2, 7, 7))
    assert _signed_area(ring[0][:-1]) == 48.5 * downsample ** 2  # 7 x 7 px less 4 corners of 1/8
    assert _signed_area(ring[1][:-1]) == -24.5 * downsample ** 2
    # two pieces in raster order of their first pixels, the second with its one-pixel hole
    small, large = nuclei.shapes[6]
    assert len(small) == 1 and vertex_set(small[0]) == level0(_octagon(10, 1, 13, 4))
    assert len(large) == 2 and vertex_set(large[0]) == level0(_octagon(10, 5, 15, 10))
    assert vertex_set(large[1]) == level0({(12.5, 7), (13, 7.5), (12.5, 8), (12, 7.5)})
    assert _signed_area(large[1][:-1]) < 0 < _signed_area(large[0][:-1])
    # pieces meeting at a corner are two: the outlines never cross a corner (4-connected pieces)
    assert [vertex_set(p[0]) for p in nuclei.shapes[9]] == [level0(_octagon(1, 11, 3, 13)),
                                                            level0(_octagon(3, 13, 5, 15))]
    for polygons in nuclei.shapes.values():
        for rings in polygons:
            assert all((r[0] == r[-1]).all() and len(r) >= 5 for r in rings)
    # the outline and its figures: the longest exterior ring, holes and smaller pieces aside
    i = {k: i for i, k in enumerate(nuclei.id.tolist())}
    assert same_ring(nuclei.polygon(i[4]), ring[0]) and same_ring(nuclei.polygon(i[6]), large[0])
    assert nuclei.perimeter_px[i[4]] == pytest.approx((2 * (7 + 7) - 4 * (1 - np.sqrt(0.5))) * downsample)
    assert nuclei.perimeter_px[i[6]] == pytest.approx((2 * (5 + 5) - 4 * (1 - np.sqrt(0.5))) * downsample)
    assert nuclei.solidity[i[4]] == nuclei.solidity[i[6]] == 1.0
    # every nucleus, of one ring or several, covers exactly its pixels' centres
    rows, cols = np.mgrid[:labels.shape[0], :labels.shape[1]]
    x, y = (cols + ox + 0.5) * downsample, (rows + oy + 0.5) * downsample
    for j, k in enumerate(nuclei.id.tolist()):
        assert np.array_equal(inside_polygons(nuclei.shapes.get(k, [[nuclei.polygon(j)]]), x, y), labels == k), k


def test_a_gap_that_meets_the_outside_at_a_corner_is_no_hole():
    """The background connects across corners (find_contours' default, as ``trace_outlines`` walks), so a gap whose
    only way out is a corner is part of the outside: one ring, which goes into the gap and turns back before the
    corner, and the whole-map tracer draws it as any other."""
    labels = rings_and_pieces_labels()
    ids, y, x, starts = trace_outlines(labels)
    assert sorted(ids.tolist()) == [2, 3, 5, 8]
    j = ids.tolist().index(8)
    ring = np.stack([x, y], axis=1)[starts[j]:starts[j + 1]]
    assert {(19.5, 3.0), (19.0, 3.5), (20.5, 4.0), (20.0, 4.5)} <= {tuple(p) for p in ring.tolist()}
    closed = np.concatenate([ring, ring[:1]])
    assert not inside_polygons([[closed]], np.array(19.5), np.array(3.5))  # the gap pixel (3, 19) is outside
    assert _signed_area(ring) == 14 - 7 / 8 + 3 / 8  # 5 outer corners and 2 at the saddle cut, 3 inner ones added
    (piece,) = outline_polygons(labels[1:5, 17:21] == 8, top=1, left=17)
    assert len(piece) == 1 and same_ring(piece[0], closed)


def test_the_outline_is_the_longest_exterior_ring_even_where_a_hole_has_a_longer_one():
    """A frame with teeth reaching into its hole: the hole's ring (58 pixel sides) is longer than the exterior's
    (36), and a longest ring taken whatever it bounds would draw and measure the nucleus as its hole."""
    labels = np.zeros((11, 11), np.int32)
    labels[1:10, 1:10] = 1
    labels[2:9, 2:9] = 0
    labels[2:7, [3, 5, 7]] = 1
    nuclei = measure_nuclei(labels, np.zeros((*labels.shape, 3), np.uint8))
    (exterior, hole), = nuclei.shapes[1]
    assert {tuple(p) for p in nuclei.polygon(0)[:-1].tolist()} == _octagon(1, 1, 10, 10)
    assert same_ring(nuclei.polygon(0), exterior) and same_ring(outline(labels == 1, 0, 0), exterior)
    assert nuclei.perimeter_px[0] == pytest.approx(2 * (9 + 9) - 4 * (1 - np.sqrt(0.5)))
    assert len(hole) - 1 > len(exterior) - 1 and _signed_area(hole[:-1]) < 0


@pytest.mark.parametrize("seed", range(2))
def test_every_nucleus_of_an_awkward_map_covers_exactly_its_pixels(seed):
    labels = _awkward_labels(seed)[:60, :60]  # a quarter: each nucleus is checked on its whole bounding box
    nuclei = measure_nuclei(labels, np.zeros((*labels.shape, 3), np.uint8), (3, 5), 2.0)
    assert any(len(rings) > 1 for polygons in nuclei.shapes.values() for rings in polygons)  # holes
    assert sum(len(polygons) > 1 for polygons in nuclei.shapes.values()) > 20  # and pieces
    boxes = ndi.find_objects(labels)
    for j, k in enumerate(nuclei.id.tolist()):
        rows, cols = np.mgrid[boxes[k - 1]]
        polygons = nuclei.shapes.get(k, [[nuclei.polygon(j)]])
        assert np.array_equal(inside_polygons(polygons, (cols + 5.5) * 2, (rows + 3.5) * 2), labels[rows, cols] == k), k
        for exterior, *holes in polygons:
            assert _signed_area(exterior[:-1]) > 0 and all(_signed_area(h[:-1]) < 0 for h in holes)


def test_hull_areas_equal_scipy_convex_hull():
    labels = make_tile(256, seed=2)[1]
    nuclei = measure_nuclei(labels, np.zeros((*labels.shape, 3), np.uint8))
    for i in range(len(nuclei)):
        ring = nuclei.polygon(i)[:-1]
        area = _signed_area(ring)
        assert nuclei.solidity[i] == pytest.approx(area / ConvexHull(ring).volume, rel=1e-9)


# ---------------------------------------------------------------------------------------------- same as before


def test_same_as_reference_on_hand_built_map_with_offset_and_downsample():
    labels = _labels()
    rgb = RNG.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    assert_same_as_reference(labels, rgb, (100, 200), 1.0, 0.5)
    assert_same_as_reference(labels, rgb, (7, 3), 4.0, None)
    assert_same_as_reference(labels + 70_000 * (labels > 0), rgb, (0, 0), 2.0, 0.25)  # global ids, far from 1


@pytest.mark.parametrize("seed", range(4))
def test_same_as_reference_on_holes_pieces_and_corner_contacts(seed):
    labels = _awkward_labels(seed)
    rgb = np.random.default_rng(seed).integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    traced = trace_outlines(labels)[0]
    assert 0 < traced.size < len(np.unique(labels)) - 1  # both the whole-map tracer and outline are exercised
    assert_same_as_reference(labels, rgb, (3, 5), 2.0, 0.5)


def test_same_as_reference_on_a_synthetic_tile():
    rgb, labels = make_tile(512, seed=4)
    got = assert_same_as_reference(labels, rgb, (512, 1024), 1.0, 0.25)
    assert len(got) == labels.max()


def test_empty_window():
    nuclei = measure_nuclei(np.zeros((5, 5), np.uint32), np.zeros((5, 5, 3), np.uint8), mpp=0.5)
    assert len(nuclei) == 0 and nuclei.area_um2.size == 0 and nuclei.vertices.shape == (0, 2)


def test_inputs_a_notebook_may_hand_over_are_taken_or_refused_by_name():
    """Haematoxylin is an optical density of 8-bit RGB: a float or 16-bit image would give another number without
    a word, so it is refused with the conversion; torch labels and a pixel size typed as text are taken."""
    import torch

    labels = hand_built_labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    rgb[labels > 0] = (80, 40, 140)
    expected = measure_nuclei(labels, rgb, mpp=0.25)
    same = measure_nuclei(torch.from_numpy(labels.astype(np.int32)), rgb, mpp="0.25")
    assert np.array_equal(same.area_um2, expected.area_um2) and np.array_equal(same.id, expected.id)
    for wrong, match in ((rgb / 255.0, "float64"), (rgb.astype(np.uint16) * 257, "uint16"),
                         (np.dstack([rgb, np.full(labels.shape, 255, np.uint8)]), r"\(.*, 4\)"),
                         (rgb[:-1], "shape")):
        with pytest.raises(ValueError, match=match):
            measure_nuclei(labels, wrong)
    with pytest.raises(ValueError, match="nearest neighbour"):
        measure_nuclei(labels * 0.5, rgb)
    with pytest.raises(ValueError, match="outside the plausible pixel sizes"):
        measure_nuclei(labels, rgb, mpp=0)


def test_columns_are_the_csv_figures_by_name_for_a_table():
    from nucleiseg_monai.outputs import CSV_COLUMNS

    labels = hand_built_labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    nuclei = measure_nuclei(labels, rgb, mpp=0.5)
    columns = nuclei.columns()
    assert tuple(columns) == CSV_COLUMNS and all(len(c) == len(nuclei) for c in columns.values())
    assert np.array_equal(columns["area_um2"], nuclei.area_px * 0.25)
    assert "area_um2" not in measure_nuclei(labels, rgb).columns()


def test_label_maps_are_taken_as_the_metrics_take_them():
    labels = hand_built_labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    expected = measure_nuclei(labels, rgb, mpp=0.25)
    as_monai = measure_nuclei(labels[None].astype(np.float32), rgb, mpp=0.25)  # (1, H, W) whole ids in floats
    assert np.array_equal(as_monai.area_um2, expected.area_um2)
    with pytest.raises(ValueError, match="pixel size"):
        measure_nuclei(labels, rgb, mpp=True)
