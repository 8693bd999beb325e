import csv
import json

import numpy as np
import pytest
import tifffile
from skimage import io as skio
from skimage.color import rgb2hed
from skimage.measure import regionprops

from nucleiseg_monai.outputs import (
    Overlay,
    SlideOutputs,
    haematoxylin,
    iter_tiles,
    measure_nuclei,
    outline,
    output_paths,
    outputs_complete,
    write_csv,
    write_geojson,
    write_label_tiff,
)

RNG = np.random.default_rng(1)


def _labels() -> np.ndarray:
    """Hand-built map: a rectangle (id 3), an L (id 7), a disk (id 10), a single pixel (id 12)."""
    lab = np.zeros((60, 80), np.uint32)
    lab[5:15, 10:30] = 3
    lab[30:50, 5:10] = 7
    lab[45:50, 5:25] = 7
    yy, xx = np.mgrid[:60, :80]
    lab[(yy - 30) ** 2 + (xx - 55) ** 2 <= 64] = 10
    lab[2, 70] = 12
    return lab


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_label_tiff_from_tile_iterator(tmp_path):
    labels = RNG.integers(0, 70_000, (300, 200)).astype(np.uint32)
    path = write_label_tiff(tmp_path / "x.labels.tif", iter_tiles(labels, 64), shape=labels.shape, tile=64, mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.dtype == np.uint32 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.resolution == pytest.approx((2e4, 2e4))  # 0.5 um/px = 20000 px/cm
        np.testing.assert_array_equal(page.asarray(), labels)
    np.testing.assert_array_equal(tifffile.imread(write_label_tiff(tmp_path / "y.tif", labels, tile=64)), labels)
    assert _leftovers(tmp_path) == []


def test_label_tiff_failure_leaves_nothing(tmp_path):
    def broken():
        yield np.zeros((64, 64), np.uint32)
        raise RuntimeError("network died")

    (tmp_path / "old.labels.tif").write_bytes(b"previous complete file")
    with pytest.raises(RuntimeError, match="network died"):
        write_label_tiff(tmp_path / "old.labels.tif", broken(), shape=(128, 128), tile=64)
    assert (tmp_path / "old.labels.tif").read_bytes() == b"previous complete file"
    assert _leftovers(tmp_path) == []


def test_haematoxylin_equals_rgb2hed_channel0():
    rgb = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(haematoxylin(rgb), rgb2hed(rgb)[..., 0], rtol=1e-4, atol=1e-5)


def test_measurements_match_regionprops():
    labels = _labels()
    rgb = RNG.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    hed = rgb2hed(rgb)[..., 0]
    nuclei = {n.id: n for n in measure_nuclei(labels, rgb, offset=(100, 200), downsample=1.0, mpp=0.5)}
    assert sorted(nuclei) == [3, 7, 10, 12]
    for prop in regionprops(labels.astype(np.int64), intensity_image=hed):
        n = nuclei[prop.label]
        assert n.area_px == prop.area == np.bincount(labels.ravel())[prop.label]
        assert n.area_um2 == pytest.approx(prop.area * 0.25)
        assert n.centroid_y == pytest.approx(prop.centroid[0] + 100)
        assert n.centroid_x == pytest.approx(prop.centroid[1] + 200)
        assert n.eccentricity == pytest.approx(prop.eccentricity, abs=1e-9)
        assert n.mean_haematoxylin == pytest.approx(prop.intensity_mean, rel=1e-4)
        # the outline lies inside the pixel-edge bounding box, in level-0 coordinates
        r0, c0, r1, c1 = prop.bbox
        assert n.polygon[:, 0].min() >= c0 + 200 and n.polygon[:, 0].max() <= c1 + 200
        assert n.polygon[:, 1].min() >= r0 + 100 and n.polygon[:, 1].max() <= r1 + 100
        assert (n.polygon[0] == n.polygon[-1]).all() and len(n.polygon) >= 4
    assert nuclei[3].solidity == pytest.approx(1.0)
    assert nuclei[7].solidity < 0.75  # an L is far from convex
    assert nuclei[3].perimeter_px == pytest.approx(2 * (10 + 20) - 4 * (1 - np.sqrt(0.5)))  # corners cut at 45 deg
    assert nuclei[3].polygon.shape == (9, 2)  # collinear points removed: 4 sides + 4 cut corners, closed


def test_outline_of_one_pixel_and_downsample():
    mask = np.ones((1, 1), bool)
    ring = outline(mask, top=4, left=6)
    # the diamond through the pixel's edge midpoints; pixel (4, 6) covers [6, 7) x [4, 5)
    assert {tuple(p) for p in ring[:-1].tolist()} == {(6.5, 4.0), (7.0, 4.5), (6.5, 5.0), (6.0, 4.5)}
    assert len(ring) == 5 and (ring[0] == ring[-1]).all()
    x, y = ring[:-1, 0], ring[:-1, 1]
    assert np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y) > 0  # counter-clockwise (x, y)
    # at a level with downsample 4, pixel (4, 6) covers level-0 [24, 28) x [16, 20)
    ring4 = outline(mask, top=4, left=6, downsample=4.0)
    assert ring4[:, 0].min() >= 24 and ring4[:, 0].max() <= 28 and ring4[:, 1].min() >= 16 and ring4[:, 1].max() <= 20


def test_geojson_and_csv_streams(tmp_path):
    labels = _labels()
    rgb = RNG.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    geo = write_geojson(tmp_path / "n.geojson", measure_nuclei(labels, rgb), image_name="n")
    table = write_csv(tmp_path / "n.csv", measure_nuclei(labels, rgb))
    data = json.loads(geo.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    feature = data["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"] == {"name": "Nucleus"}
    assert feature["properties"]["measurements"]["nucleus_id"] == 3
    assert "area_um2" not in feature["properties"]["measurements"]  # unknown mpp: left out, not NaN
    assert len({f["id"] for f in data["features"]}) == 4
    rows = list(csv.DictReader(table.open()))
    assert [int(r["id"]) for r in rows] == [3, 7, 10, 12]
    assert [int(r["area_px"]) for r in rows] == [int(np.bincount(labels.ravel())[i]) for i in (3, 7, 10, 12)]
    assert rows[0]["area_um2"] == ""


def test_overlay_draws_outlines(tmp_path):
    labels = _labels()
    image = np.full((*labels.shape, 3), 230, np.uint8)
    full = Overlay(image)
    full.draw(labels)
    green = (full.image == (0, 255, 0)).all(-1)
    assert green[5, 10] and green[14, 29] and not green[10, 20] and not green[0, 0]
    half = Overlay(image[::2, ::2], scale=(0.5, 0.5))
    half.draw(labels[20:], offset=(20, 0))
    assert (half.image == (0, 255, 0)).all(-1)[15, 3]  # pixel (30, 6) of the L, halved
    path = full.save(tmp_path / "o.png")
    assert skio.imread(path).shape == (60, 80, 3)


def test_slide_outputs_commit_manifest_and_rerun_check(tmp_path):
    labels = _labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    with SlideOutputs(tmp_path, "s", labels.shape, mpp=0.25, overlay=Overlay(rgb), label_tile=32) as out:
        assert out.add_nuclei(labels, rgb, (0, 0)) == 4
        out.write_labels(iter_tiles(labels, 32))
        paths = out.commit({"source": "s.png"})
    assert paths == output_paths(tmp_path, "s")
    assert all(p.is_file() for p in paths.values())
    manifest = json.loads((tmp_path / "s.done.json").read_text())
    assert manifest["nuclei"] == 4 and manifest["source"] == "s.png"
    assert outputs_complete(tmp_path, "s")
    paths["csv"].write_text("truncated")
    assert not outputs_complete(tmp_path, "s")
    assert not outputs_complete(tmp_path, "other")
    assert _leftovers(tmp_path) == []


def test_slide_outputs_failure_leaves_no_partial_files(tmp_path):
    labels = _labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    (tmp_path / "s.done.json").write_text("{}")  # stale manifest from an earlier run
    with pytest.raises(RuntimeError, match="boom"):
        with SlideOutputs(tmp_path, "s", labels.shape, overlay=Overlay(rgb), label_tile=32) as out:
            out.add_nuclei(labels, rgb, (0, 0))

            def tiles():
                yield from iter_tiles(labels[:32], 32)
                raise RuntimeError("boom")

            out.write_labels(tiles())
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_usual_permissions_not_private_ones(tmp_path):
    import os

    from nucleiseg_monai.outputs import atomic_path

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
