import csv
import io
import json
import math
import os
import time
import uuid

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from nucleiseg_monai import outputs
from nucleiseg_monai.atomic import TEMPORARY_NAME, host_name
from nucleiseg_monai.measurements import measure_nuclei
from nucleiseg_monai.outputs import (
    PREDICTION_COLOUR,
    CSV_COLUMNS,
    CSVStream,
    GeoJSONStream,
    ImageBusy,
    ImageLock,
    Overlay,
    SlideOutputs,
    ceil_div,
    iter_tiles,
    label_levels,
    output_paths,
    outputs_complete,
    write_label_tiff,
)
from nucleiseg_monai.synthetic import make_tile
from conftest import hand_built_labels, inside_polygons, rings_and_pieces_labels

RNG = np.random.default_rng(1)


def _labels() -> np.ndarray:
    return hand_built_labels()


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


def _pixel_ids(shape) -> np.ndarray:
    """Each pixel's id names it: id - 1 = row * width + column, so a reduced level's pixel says where it came from."""
    return (np.arange(shape[0] * shape[1], dtype=np.uint32) + 1).reshape(shape)


def test_ceil_div_rounds_up_exactly_for_any_side():
    assert [ceil_div(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert ceil_div(np.int64(2049), 512) == 5  # sides come from numpy shapes too
    huge = 2**60 + 1  # past float's 53 bits, where math.ceil(huge / 2) gives 2**59
    assert ceil_div(huge, 2) == 2**59 + 1


def test_label_levels_are_added_while_a_level_is_longer_than_a_tile():
    assert label_levels((1000, 1000), 512) == []  # 250 px at factor 4: fits a tile
    assert label_levels((2048, 2048), 512) == []  # 512 px at factor 4: exactly one tile
    assert label_levels((2049, 10), 512) == [4]
    assert label_levels((2100, 3300), 256) == [4]  # 825, then 207 px
    assert label_levels((2100, 3300), 128) == [4, 16]  # 825, 207, then 52 px
    assert label_levels((100_000, 100_000), 512) == [4, 16, 64]  # 25000, 6250, 1563, then 391 px


@pytest.mark.parametrize("tile, shapes", [(256, [(525, 825)]), (128, [(525, 825), (132, 207)])])
@pytest.mark.parametrize("buffer", ["memory", "file"])
def test_label_tiff_pyramid_levels_are_level_0_pixels(tmp_path, monkeypatch, tile, shapes, buffer):
    if buffer == "file":
        monkeypatch.setattr(outputs, "LEVEL_BUFFER_IN_MEMORY", 0)
    labels = _pixel_ids((2100, 3300))
    path = write_label_tiff(tmp_path / "x.labels.tif", iter_tiles(labels, tile), shape=labels.shape, tile=tile,
                            mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1 and tif.is_ome  # the levels are SubIFDs of the level-0 page, not pages
        [series] = tif.series
        assert [level.shape for level in series.levels] == [labels.shape, *shapes]
        np.testing.assert_array_equal(series.levels[0].asarray(), labels)
        for k, level in enumerate(series.levels[1:], 1):
            factor = 4**k
            page = level.keyframe
            assert page.subfiletype == tifffile.FILETYPE.REDUCEDIMAGE
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (tile, tile)
            assert page.dtype == np.uint32 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.resolution == pytest.approx((2e4 / factor, 2e4 / factor))
            reduced = level.asarray()
            # pixel (i, j) holds the id of level-0 pixel (f i, f j): nearest neighbour, aligned at the origin
            source = np.divmod(reduced.astype(np.int64) - 1, labels.shape[1])
            np.testing.assert_array_equal(source, np.indices(reduced.shape) * factor)
            np.testing.assert_array_equal(reduced, labels[::factor, ::factor])
        assert 'PhysicalSizeX="0.5"' in tif.pages[0].description  # what Bio-Formats reads the pixel size from
    np.testing.assert_array_equal(tifffile.imread(path), labels)  # level 0 alone, as before
    first = path.read_bytes()
    write_label_tiff(path, labels, tile=tile, mpp=0.5)
    assert path.read_bytes() == first  # an image resumed from kept regions gets the bytes of one run whole
    assert _leftovers(tmp_path) == []


def test_a_label_map_that_fits_a_few_tiles_gets_no_levels(tmp_path):
    labels = RNG.integers(0, 70_000, (1000, 700)).astype(np.uint32)
    path = write_label_tiff(tmp_path / "x.labels.tif", labels, tile=512, mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1 and tif.pages[0].subifds is None and not tif.is_ome
        assert tif.pages[0].description == ""  # as before the pyramid: no metadata at all
        np.testing.assert_array_equal(tif.pages[0].asarray(), labels)


@pytest.mark.parametrize("writer, error", [("write_label_tiff", RuntimeError), ("SlideOutputs", KeyboardInterrupt)])
def test_a_pyramid_stopped_mid_stream_leaves_no_temporary_files(tmp_path, monkeypatch, writer, error):
    monkeypatch.setattr(outputs, "LEVEL_BUFFER_IN_MEMORY", 0)  # the level goes to a file beside the output
    labels = _pixel_ids((2100, 3300))
    seen = []

    def broken():
        yield from iter_tiles(labels[:1024], 256)
        seen.extend(_leftovers(tmp_path))
        raise error("stopped")

    (tmp_path / "x.labels.tif").write_bytes(b"previous complete file")
    with pytest.raises(error, match="stopped"):
        if writer == "write_label_tiff":
            write_label_tiff(tmp_path / "x.labels.tif", broken(), shape=labels.shape, tile=256)
        else:
            with SlideOutputs(tmp_path, "x", labels.shape, label_tile=256) as out:
                out.write_labels(broken())
    # the level's buffer was there, named as every temporary file here is, so remove_stale would find a killed run's
    [buffer] = [name for name in seen if ".levels." in name]
    assert buffer.startswith(".x.labels.tif.levels.pid") and TEMPORARY_NAME.match(buffer)
    assert _leftovers(tmp_path) == []
    if writer == "write_label_tiff":
        assert (tmp_path / "x.labels.tif").read_bytes() == b"previous complete file"


def _streamed(batches, image_name: str = "") -> tuple[str, str]:
    """The GeoJSON and CSV texts the streams write for ``batches`` of nuclei."""
    geo, table = io.StringIO(), io.StringIO()
    features, rows = GeoJSONStream(geo, image_name), CSVStream(table)
    for batch in batches:
        features.write(batch)
        rows.write(batch)
    features.close()
    return geo.getvalue(), table.getvalue()


def test_geojson_and_csv_streams():
    labels = _labels()
    rgb = RNG.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    geo, table = _streamed([measure_nuclei(labels, rgb)], image_name="n")
    data = json.loads(geo)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    feature = data["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"] == {"name": "Nucleus"}
    assert feature["properties"]["measurements"]["nucleus_id"] == 3
    assert "area_um2" not in feature["properties"]["measurements"]  # unknown mpp: left out, not NaN
    assert len({f["id"] for f in data["features"]}) == 4
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [int(r["id"]) for r in rows] == [3, 7, 10, 12]
    assert [int(r["area_px"]) for r in rows] == [int(np.bincount(labels.ravel())[i]) for i in (3, 7, 10, 12)]
    assert rows[0]["area_um2"] == ""
    assert list(rows[0]) == ["id", "centroid_x_px", "centroid_y_px", "area_px", "area_um2", "perimeter_px",
                             "eccentricity", "solidity", "mean_haematoxylin_od"]  # units in the header


def _reference_feature(nuclei, i, image_name):
    """The Feature the per-nucleus writer built and gave to json.dumps, from the same measurements; a nucleus with
    a hole or in pieces (as a window's edge may cut one) with all its rings."""
    measurements = {
        "nucleus_id": int(nuclei.id[i]), "area_px": int(nuclei.area_px[i]),
        "perimeter_px": round(float(nuclei.perimeter_px[i]), 2),
        "eccentricity": round(float(nuclei.eccentricity[i]), 4),
        "solidity": round(float(nuclei.solidity[i]), 4),
        "mean_haematoxylin_od": round(float(nuclei.mean_haematoxylin[i]), 5),
    }
    if nuclei.area_um2 is not None:
        measurements["area_um2"] = round(float(nuclei.area_um2[i]), 3)
    geometry = {"type": "Polygon", "coordinates": [nuclei.polygon(i).round(3).tolist()]}
    if (polygons := nuclei.shapes.get(int(nuclei.id[i]))) is not None:
        coordinates = [[ring.round(3).tolist() for ring in rings] for rings in polygons]
        geometry = ({"type": "Polygon", "coordinates": coordinates[0]} if len(coordinates) == 1
                    else {"type": "MultiPolygon", "coordinates": coordinates})
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.UUID("9a4e2a63-0a5c-4c1e-9d7e-2f4b8f0c6d11"), f"{image_name}/{nuclei.id[i]}")),
        "geometry": geometry,
        "properties": {"objectType": "detection", "classification": {"name": "Nucleus"},
                       "measurements": {k: v for k, v in measurements.items() if math.isfinite(v)}},
    }


@pytest.mark.parametrize("mpp", [0.25, None])
def test_geojson_text_equals_json_dumps_and_csv_equals_formatted_rows(mpp):
    rgb, labels = make_tile(256, seed=5)
    batches = [measure_nuclei(labels[:128], rgb[:128], (0, 0), 2.0, mpp),
               measure_nuclei(labels[128:], rgb[128:], (128, 0), 2.0, mpp)]
    text, table = _streamed(batches, image_name="t")
    features = [_reference_feature(b, i, "t") for b in batches for i in range(len(b))]
    expected = ",\n".join(json.dumps(f, separators=(",", ":")) for f in features)  # byte for byte
    assert text == '{"type": "FeatureCollection", "features": [\n' + expected + "\n]}\n"
    assert len(json.loads(text)["features"]) == sum(len(b) for b in batches)
    rows = table.splitlines()
    assert rows[0] == ",".join(CSV_COLUMNS)
    expected_rows = [
        [str(b.id[i]), f"{b.centroid_x[i]:.2f}", f"{b.centroid_y[i]:.2f}", str(b.area_px[i]),
         "" if mpp is None else f"{b.area_um2[i]:.3f}", f"{b.perimeter_px[i]:.2f}", f"{b.eccentricity[i]:.4f}",
         f"{b.solidity[i]:.4f}", f"{b.mean_haematoxylin[i]:.5f}"]
        for b in batches for i in range(len(b))
    ]
    assert [r.split(",") for r in rows[1:]] == expected_rows


@pytest.mark.parametrize("offset, downsample", [((0, 0), 1.0), ((3, 5), 2.0)])
def test_geojson_draws_holes_and_pieces_and_its_polygons_cover_exactly_each_nucleus(offset, downsample):
    labels = rings_and_pieces_labels()
    nuclei = measure_nuclei(labels, np.zeros((*labels.shape, 3), np.uint8), offset, downsample)
    text, _ = _streamed([nuclei], image_name="r")
    features = json.loads(text)["features"]
    assert [f["properties"]["measurements"]["nucleus_id"] for f in features] == [2, 3, 4, 5, 6, 8, 9]
    geometries = {f["properties"]["measurements"]["nucleus_id"]: f["geometry"] for f in features}
    # Polygon rings (exterior, holes) per piece: the ring with its hole, two pieces the second holed, a gap open
    # at a corner (no hole), two pieces meeting at a corner
    kinds = {k: (g["type"], [len(p) for p in (g["coordinates"] if g["type"] == "MultiPolygon"
                                                  else [g["coordinates"]])]) for k, g in geometries.items()}
    assert kinds == {2: ("Polygon", [1]), 3: ("Polygon", [1]), 4: ("Polygon", [2]), 5: ("Polygon", [1]),
                     6: ("MultiPolygon", [1, 2]), 8: ("Polygon", [1]), 9: ("MultiPolygon", [1, 1])}
    oy, ox = offset
    rows, cols = np.mgrid[:labels.shape[0], :labels.shape[1]]
    x, y = (cols + ox + 0.5) * downsample, (rows + oy + 0.5) * downsample  # pixel centres, level 0
    for k, geometry in geometries.items():
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        for exterior, *holes in polygons:
            assert all(ring[0] == ring[-1] and len(ring) >= 5 for ring in [exterior, *holes])  # closed
            assert _signed_area(exterior) > 0 and all(_signed_area(h) < 0 for h in holes)  # RFC 7946 orientation
        assert np.array_equal(inside_polygons(polygons, x, y), labels == k), k
    expected = ",\n".join(json.dumps(_reference_feature(nuclei, i, "r"), separators=(",", ":"))
                          for i in range(len(nuclei)))
    assert text == '{"type": "FeatureCollection", "features": [\n' + expected + "\n]}\n"  # byte for byte


def _signed_area(ring) -> float:
    """Shoelace area of a closed ring of (x, y) vertices; positive when counter-clockwise (with y down)."""
    x, y = np.asarray(ring, np.float64).T
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1])


def test_overlay_draws_outlines(tmp_path):
    labels = _labels()
    image = np.full((*labels.shape, 3), 230, np.uint8)
    full = Overlay(image)
    full.draw(labels)
    yellow = (full.image == PREDICTION_COLOUR).all(-1)  # predictions are yellow in every overlay
    assert yellow[5, 10] and yellow[14, 29] and not yellow[10, 20] and not yellow[0, 0]
    half = Overlay(image[::2, ::2], scale=(0.5, 0.5))
    half.draw(labels[20:], offset=(20, 0))
    assert (half.image == PREDICTION_COLOUR).all(-1)[15, 3]  # pixel (30, 6) of the L, halved
    full.write_png(tmp_path / "o.png")
    written = skio.imread(tmp_path / "o.png")
    # the drawing, then a legend strip below it whose swatch has the outline colour
    np.testing.assert_array_equal(written[: labels.shape[0]], full.image)
    legend = written[labels.shape[0]:]
    assert legend.shape[0] >= 10 and (legend == PREDICTION_COLOUR).all(-1).sum() >= 50


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


def test_a_redo_that_fails_leaves_none_of_the_previous_runs_outputs_under_their_final_names(tmp_path):
    labels = _labels()
    rgb = np.full((*labels.shape, 3), 200, np.uint8)
    with SlideOutputs(tmp_path, "s", labels.shape, overlay=Overlay(rgb), label_tile=32) as out:
        out.add_nuclei(labels, rgb, (0, 0))
        out.write_labels(iter_tiles(labels, 32))
        out.commit()
    (tmp_path / "other.geojson").write_text("{}")  # another image's outputs are not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other.geojson", "s.done.json", "s.geojson", "s.labels.tif", "s.nuclei.csv", "s.overlay.png"]
    with pytest.raises(KeyboardInterrupt):
        with SlideOutputs(tmp_path, "s", labels.shape, overlay=None, label_tile=32):
            raise KeyboardInterrupt  # the redo is stopped before it wrote anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.geojson"]


def test_an_image_lock_refuses_a_live_run_takes_over_a_dead_one_and_removes_only_its_own(tmp_path):
    lock_file = tmp_path / ".slide.lock"
    with ImageLock(tmp_path, "slide"):
        holder = lock_file.read_text().split()
        assert holder[:2] == [str(os.getpid()), host_name()]
        with pytest.raises(ImageBusy, match=rf"process {os.getpid()} on {host_name()} since .*delete {lock_file}"):
            with ImageLock(tmp_path, "slide"):
                pass
        assert lock_file.read_text().split() == holder  # the refused run left the holder's lock alone
    assert not lock_file.exists()

    lock_file.write_text(f"999999999 {host_name()} 0\n")  # a killed run's: its process is gone from this host
    with ImageLock(tmp_path, "slide"):
        assert lock_file.read_text().split()[0] == str(os.getpid())
    lock_file.write_text(f"{os.getppid()} another_host 0\n")  # another machine's: cannot be asked, so respected
    with pytest.raises(ImageBusy, match="on another_host"):
        with ImageLock(tmp_path, "slide"):
            pass
    assert lock_file.read_text() == f"{os.getppid()} another_host 0\n"

    lock_file.unlink()
    with ImageLock(tmp_path, "slide"):
        lock_file.write_text("1 elsewhere 0\n")  # replaced under it: not this run's to remove
    assert lock_file.exists()


def test_a_finished_images_lock_left_by_a_killed_run_is_removed_a_live_ones_kept(tmp_path):
    """A run killed just after committing an image's outputs leaves its lock; the next run skips the image without
    taking it."""
    lock_file = tmp_path / ".slide.lock"
    lock_file.write_text(f"999999999 {host_name()} 0\n")  # its process is gone from this host
    assert ImageLock(tmp_path, "slide").remove_if_stale() == f"999999999 {host_name()} (process 999999999 is gone)"
    assert not lock_file.exists()
    assert ImageLock(tmp_path, "slide").remove_if_stale() is None  # none: nothing to do
    for live in (f"{os.getpid()} {host_name()} 0\n", f"{os.getppid()} another_host 0\n"):
        lock_file.write_text(live)
        assert ImageLock(tmp_path, "slide").remove_if_stale() is None
        assert lock_file.read_text() == live


def test_a_lock_of_another_machine_is_taken_over_when_idle_or_by_a_later_try_of_its_task(tmp_path, monkeypatch):
    lock_file = tmp_path / ".slide.lock"
    lock_file.write_text(f"{os.getppid()} another_host 0 slide-task-1\n")
    with pytest.raises(ImageBusy, match="a lock untouched for 10 min is taken over"):
        with ImageLock(tmp_path, "slide", "slide-task-2"):
            pass
    with ImageLock(tmp_path, "slide", "slide-task-1"):  # the retry of the task whose worker died, elsewhere
        assert lock_file.read_text().split()[3] == "slide-task-1" and lock_file.read_text().split()[1] == host_name()
    lock_file.write_text(f"{os.getppid()} another_host 0 -\n")
    old = time.time() - ImageLock.STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))  # its run stopped touching it: killed with its machine
    with ImageLock(tmp_path, "slide"):
        assert lock_file.read_text().split()[0] == str(os.getpid())
    assert not lock_file.exists() and not list(tmp_path.glob("*.stale"))

    monkeypatch.setattr(ImageLock, "HEARTBEAT_S", 0.05)
    with ImageLock(tmp_path, "slide"):
        os.utime(lock_file, (old, old))
        time.sleep(0.5)
        assert time.time() - lock_file.stat().st_mtime < 5  # touched while held
