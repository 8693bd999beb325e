"""Segmenting within a region of interest: the nuclei kept are exactly those of the whole run whose centroid lies
inside, in every output, across region seams; regions the ROI misses are not analysed; finished outputs of another
ROI are refused; QuPath's GeoJSON forms are read and what is not an ROI is refused."""

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from nucleiseg_monai import cli, cohort, wsi
from nucleiseg_monai.cohort import for_slide, read_slide_list
from nucleiseg_monai.inference import SlidePredictor
from nucleiseg_monai.roi import Roi, RoiError, read_roi
from nucleiseg_monai.synthetic import make_slide, make_tile
from nucleiseg_monai.wsi import ImageError
from test_inference import _oracle_image, _predictor, _write_tif

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "nuclei_unet_small"
# corners off the pixel grid and off its centres: no centroid lies on an outline
HALF = [[-5.0, -5.0], [128.37, -5.0], [128.37, 261.2], [-5.0, 261.2], [-5.0, -5.0]]
CORNER = [[0.0, 0.0], [300.37, 0.0], [300.37, 200.61], [0.0, 200.61], [0.0, 0.0]]
FRAME = [[-1.0, -1.0], [257.0, -1.0], [257.0, 257.0], [-1.0, 257.0], [-1.0, -1.0]]
HOLE = [[80.3, 80.3], [170.7, 80.3], [170.7, 170.7], [80.3, 170.7], [80.3, 80.3]]


def _feature(*rings, kind="Polygon", **properties):
    """A QuPath annotation: a Polygon of these rings (the first the exterior), or a MultiPolygon of one each."""
    coordinates = [[ring] for ring in rings] if kind == "MultiPolygon" else list(rings)
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}, **properties}}


def _write_roi(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A one-region tile (256 px) and a 512 x 768 slide in 2 x 3 regions of 256 px, each run whole without ROI."""
    folder = tmp_path_factory.mktemp("roi")
    _, tile = make_tile(256, seed=5)
    _write_tif(folder / "tile.tif", _oracle_image(tile), 0.25)
    _write_tif(folder / "slide.tif", _oracle_image(make_slide((512, 768), seed=3).labels()), 0.25)
    for name in ("tile", "slide"):
        _predictor().predict_slide(folder / f"{name}.tif", folder / "whole")
    return folder


# ---------------------------------------------------------------------------------------------- reading the file


@pytest.mark.parametrize("form", ["collection", "feature", "list"])
def test_qupath_geojson_forms_are_read(tmp_path, form):
    features = [_feature(FRAME, HOLE), _feature(HALF, CORNER, kind="MultiPolygon")]
    data = {"collection": {"type": "FeatureCollection", "features": features}, "feature": features[0],
            "list": features}[form]
    roi = read_roi(_write_roi(tmp_path / "roi.geojson", data))
    assert len(roi) == (1 if form == "feature" else 3)
    assert [len(rings) for rings in roi.polygons][:1] == [2]  # the exterior and its hole
    assert roi.contains([10.0, 120.0], [10.0, 120.0]).tolist() == [True, form != "feature"]


def test_points_and_lines_are_left_out_with_a_warning(tmp_path, caplog):
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": {}}
    path = _write_roi(tmp_path / "mixed.geojson", [_feature(HALF), point, point])
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.roi"):
        assert len(read_roi(path)) == 1
    assert "2 Point left out" in caplog.text and "mixed.geojson" in caplog.text


def test_a_file_without_polygons_is_refused_naming_it(tmp_path):
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}}
    path = _write_roi(tmp_path / "lines.geojson", {"type": "FeatureCollection", "features": [line]})
    with pytest.raises(RoiError, match=r"lines\.geojson holds no Polygon or MultiPolygon \(found 1 LineString\)"):
        read_roi(path)


def test_the_packages_own_nuclei_are_not_an_roi(images, tmp_path):
    with pytest.raises(RoiError, match=r"tile\.geojson holds \d+ detections .*annotations"):
        read_roi(images / "whole" / "tile.geojson")
    cells = {"type": "Feature", "id": "PathCellObject", "geometry": _feature(HALF)["geometry"]}  # QuPath 0.2's
    with pytest.raises(RoiError, match=r"holds 1 detection \(objects"):
        read_roi(_write_roi(tmp_path / "cells.geojson", [_feature(CORNER), cells]))


@pytest.mark.parametrize("text, said", [("{not json", "is not a GeoJSON file"),
                                        ('{"type": "Topology"}', "not GeoJSON Features"),
                                        (json.dumps(_feature([[0, 0], [1, 1], [0, 0]])), "at least 3 distinct")])
def test_malformed_files_are_refused_naming_them(tmp_path, text, said):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(RoiError, match=f"bad.geojson.*{said}.*Export objects as GeoJSON"):
        read_roi(path)



# ------------------------------------------------------------------------------------------- segmenting within it


def _outputs(folder, name):
    labels = tifffile.imread(folder / f"{name}.labels.tif")
    rows = list(csv.DictReader((folder / f"{name}.nuclei.csv").open()))
    features = json.loads((folder / f"{name}.geojson").read_text())["features"]
    return labels, rows, features


def _whole_filtered(folder, name, roi):
    """The whole run's label map with the nuclei whose centroid lies outside ``roi`` removed and the others
    numbered on in their order, and how many were kept and left out. CSV centroids are level-0 pixel indices;
    the ROI's coordinates put pixel i on [i, i + 1)."""
    labels, rows, _ = _outputs(folder / "whole", name)
    ids = np.array([int(r["id"]) for r in rows])
    inside = roi.contains(np.array([float(r["centroid_x_px"]) for r in rows]) + 0.5,
                          np.array([float(r["centroid_y_px"]) for r in rows]) + 0.5)
    renumber = np.zeros(labels.max() + 1, np.uint32)
    renumber[ids[inside]] = np.arange(1, inside.sum() + 1)
    return renumber[labels], int(inside.sum()), int((~inside).sum())


def _check_same_nuclei(images, name, roi, out):
    expected, kept, left_out = _whole_filtered(images, name, roi)
    labels, rows, features = _outputs(out, name)
    np.testing.assert_array_equal(labels, expected)
    assert len(rows) == len(features) == kept == json.loads((out / f"{name}.done.json").read_text())["nuclei"]
    assert kept > 10 and left_out > 5
    return labels


def test_a_polygon_over_half_a_tile_keeps_exactly_the_nuclei_centred_inside(images):
    roi = Roi([[np.array(HALF)]], "half.geojson")
    predictor = _predictor()
    predictor.roi = roi
    result = predictor.predict_slide(images / "tile.tif", images / "half")
    _check_same_nuclei(images, "tile", roi, images / "half")
    assert result.regions == result.regions_processed == 1
    record = json.loads((images / "half" / "tile.done.json").read_text())
    assert record["roi"] == {"file": "half.geojson", "sha256": roi.sha256, "polygons": 1,
                             "fraction": pytest.approx(128.37 / 256, abs=0.01),
                             "tissue_fraction": pytest.approx(record["tissue_fraction"] / 2, abs=0.05)}
    assert record["settings"]["roi"] == roi.sha256


def test_a_hole_leaves_its_nuclei_out(images):
    roi = Roi([[np.array(FRAME), np.array(HOLE)]], "frame.geojson")
    predictor = _predictor()
    predictor.roi = roi
    predictor.predict_slide(images / "tile.tif", images / "frame")
    labels = _check_same_nuclei(images, "tile", roi, images / "frame")
    assert not labels[100:150, 100:150].any()  # well inside the hole, whatever nucleus reaches in from its edge


def test_only_the_regions_an_roi_touches_are_analysed_and_seams_stay_exact(images, caplog):
    roi = Roi([[np.array(CORNER)]], "corner.geojson")
    predictor = _predictor()
    predictor.roi = roi
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.inference"):
        result = predictor.predict_slide(images / "slide.tif", images / "corner")
    assert result.regions == 6 and result.regions_processed == 2  # cores (0, 0) and (0, 1): x to 300, y to 200
    labels = _check_same_nuclei(images, "slide", roi, images / "corner")
    # some nucleus kept lies across the seam between the two regions, at x = 256
    assert np.intersect1d(np.unique(labels[:, 250:256]), np.unique(labels[:, 256:262])).size > 1
    assert any("ROI of 1 polygon from corner.geojson, 15.3% of the image" in r.getMessage() for r in caplog.records)


def test_an_roi_in_level_0_pixels_applies_to_the_pyramid_level_read(images, tmp_path):
    """Level 0 at 0.125 um/px, every pixel of the slide doubled; level 1 the slide itself, read for the model's
    0.25 um/px: the ROI drawn on level 0 keeps the nuclei the corner keeps on the slide."""
    rgb = tifffile.imread(images / "slide.tif")
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(np.kron(rgb, np.ones((2, 2, 1), np.uint8)), tile=(128, 128), subifds=1, photometric="rgb",
                 resolution=(8e4, 8e4), resolutionunit="CENTIMETER")
        tw.write(rgb, tile=(128, 128), subfiletype=1, photometric="rgb")
    predictor = _predictor()
    predictor.roi = Roi([[2 * np.array(CORNER)]])
    result = predictor.predict_slide(path, tmp_path / "out")
    assert result.level == 1 and result.regions_processed == 2
    expected, kept, _ = _whole_filtered(images, "slide", Roi([[np.array(CORNER)]]))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "slide.labels.tif"), expected)
    assert result.nuclei == kept


def test_an_roi_applies_on_the_files_grid_when_the_network_works_at_another_scale(images, tmp_path):
    """The slide scanned at 0.5 um/px, resampled x2 for the model's 0.25: centroids are tested on the file's
    grid, where the ROI is drawn, never on the network's."""
    path = tmp_path / "coarse.tif"
    _write_tif(path, tifffile.imread(images / "slide.tif")[::2, ::2], 0.5)
    _predictor().predict_slide(path, tmp_path / "whole")
    roi = Roi([[np.array(CORNER) / 2]])
    predictor = _predictor()
    predictor.roi = roi
    result = predictor.predict_slide(path, tmp_path / "corner")
    assert result.scale == 2 and result.regions == 6 and result.regions_processed == 2
    _check_same_nuclei(tmp_path, "coarse", roi, tmp_path / "corner")


def test_an_roi_outside_the_image_is_refused(images):
    predictor = _predictor()
    predictor.roi = Roi([[np.array([[5000.0, 5000.0], [6000.0, 5000.0], [6000.0, 6000.0]])]], "elsewhere.geojson")
    with pytest.raises(ImageError, match="lies outside the image .*level-0 pixels"):
        predictor.predict_slide(images / "tile.tif", images / "elsewhere")


def test_finished_outputs_of_another_roi_are_refused_and_of_the_same_kept(images, tmp_path):
    half = _write_roi(tmp_path / "half.geojson", {"type": "FeatureCollection", "features": [_feature(HALF)]})
    renamed = _write_roi(tmp_path / "same.geojson", [_feature(HALF, name="renamed")])
    corner = _write_roi(tmp_path / "corner.geojson", _feature(CORNER))
    out = tmp_path / "out"

    def run(roi, folder=out):
        predictor = _predictor()
        predictor.roi = roi
        return predictor.run(images / "tile.tif", folder)

    assert len(run(half).done) == 1
    assert run(renamed).skipped == [str(images / "tile.tif")]  # the same areas, whatever the file
    for other in (corner, None):
        with pytest.raises(FileExistsError, match="differing: roi"):
            run(other)
    # outputs made without an ROI still count as finished without one
    assert "roi" not in _predictor().settings()
    assert run(None, images / "whole").skipped == [str(images / "tile.tif")]


def test_the_region_journal_key_changes_with_the_roi(images):
    predictor = _predictor()
    with predictor.planned(images / "slide.tif") as (plan, _):
        without = predictor.journal_key(plan, "fingerprint")
    predictor.roi = Roi([[np.array(CORNER)]])
    with predictor.planned(images / "slide.tif") as (plan, _):
        within = predictor.journal_key(plan, "fingerprint")
    assert within["settings"]["roi"] == predictor.roi.sha256 and "roi" not in without["settings"]
    assert within["regions"] != without["regions"]


def test_run_refuses_an_roi_for_many_images(images):
    predictor = _predictor()
    predictor.roi = Roi([[np.array(HALF)]])
    with pytest.raises(ValueError, match="roi column of a slide list"):
        predictor.run(images / "*.tif", images / "many")


# ---------------------------------------------------------------------------------------------- how users give it


def test_the_cli_segments_one_image_within_its_roi(images, tmp_path, monkeypatch):
    roi = _write_roi(tmp_path / "half.geojson", _feature(HALF))
    monkeypatch.setattr(cli, "_check_bundle", lambda bundle: None)
    monkeypatch.setattr(SlidePredictor, "from_bundle", classmethod(lambda cls, bundle, **settings: _predictor()))
    assert cli.main(["predict", "--bundle", str(BUNDLE), "--input", str(images / "tile.tif"), "--output_dir",
                     str(tmp_path / "out"), "--roi", str(roi)]) == 0
    record = json.loads((tmp_path / "out" / "tile.done.json").read_text())
    assert record["roi"]["file"] == str(roi) and record["nuclei"] == _whole_filtered(images, "tile", read_roi(roi))[1]


def test_the_cli_refuses_roi_with_a_folder_input(images, tmp_path):
    roi = _write_roi(tmp_path / "roi.geojson", _feature(HALF))
    with pytest.raises(SystemExit, match="--roi belongs to one image .*roi column of a slide list"):
        cli.main(["predict", "--bundle", "b", "--input", str(images), "--output_dir", str(tmp_path / "o"),
                  "--roi", str(roi)])


def test_a_slide_lists_roi_column_reaches_each_slide(images, tmp_path, monkeypatch):
    (tmp_path / "rois").mkdir()
    _write_roi(tmp_path / "rois" / "half.geojson", _feature(HALF))
    listed = tmp_path / "slides.csv"
    listed.write_text(f"path,slide,roi\n{images / 'tile.tif'},a,rois/half.geojson\n{images / 'slide.tif'},b,\n")
    first, second = read_slide_list(listed)
    assert first.roi == str(tmp_path / "rois" / "half.geojson") and second.roi is None
    predictor = _predictor()
    assert for_slide(predictor, first).roi.sha256 == Roi([[np.array(HALF)]]).sha256
    assert for_slide(predictor, second).roi is None and predictor.roi is None

    # a worker's slide task: the slide's ROI decides its nuclei, and its tissue area is the ROI's
    worker = SimpleNamespace(address="w1", get_current_task=lambda: "process_slide-a")
    monkeypatch.setattr(cohort, "get_worker", lambda: worker)
    row = cohort.process_slide(_predictor, first, str(tmp_path / "out"), torch_threads=1)
    record = json.loads((tmp_path / "out" / "a.done.json").read_text())
    assert row["status"] == "done" and row["nuclei"] == _whole_filtered(images, "tile", read_roi(first.roi))[1]
    assert record["roi"]["file"] == first.roi
    assert row["tissue_mm2"] == pytest.approx(record["roi"]["tissue_fraction"] * 256 * 256 * 0.25**2 / 1e6)

    listed.write_text(f"path,roi\n{images / 'tile.tif'},rois/missing.geojson\n")
    with pytest.raises(RoiError, match=r"slides\.csv, line 2: ROI file .*missing\.geojson not found"):
        read_slide_list(listed)


def test_polygons_in_a_geometry_collection_count_and_unreadable_files_are_named(tmp_path):
    mixed = {"type": "Feature", "properties": {"objectType": "annotation"},
             "geometry": {"type": "GeometryCollection", "geometries": [
                 {"type": "Polygon", "coordinates": [HALF]}, {"type": "LineString", "coordinates": HALF[:2]}]}}
    roi = read_roi(_write_roi(tmp_path / "mixed.geojson", [mixed, {"type": "Feature", "geometry": None}]))
    assert len(roi) == 1 and roi.sha256 == Roi([[np.array(HALF)]]).sha256
    (tmp_path / "rois").mkdir()
    with pytest.raises(RoiError, match=r"cannot read the ROI file .*rois"):
        read_roi(tmp_path / "rois")


def test_an_roi_on_a_slide_that_qupath_shows_cropped_to_its_scanned_area_is_refused(images, monkeypatch, caplog):
    """MIRAX slides state a scanned area within a larger level 0, and QuPath's coordinates start at its corner."""
    reader = wsi.OpenSlideReader.__new__(wsi.OpenSlideReader)
    reader.level_shapes = [(4000, 3000)]
    reader._slide = SimpleNamespace(properties={"openslide.bounds-x": "100", "openslide.bounds-y": "250",
                                                "openslide.bounds-width": "2000", "openslide.bounds-height": "3000"})
    assert reader.bounds == (100, 250, 2000, 3000)
    reader._slide.properties.update({"openslide.bounds-x": "0", "openslide.bounds-y": "0",
                                     "openslide.bounds-width": "3000", "openslide.bounds-height": "4000"})
    assert reader.bounds is None  # the scanned area is the whole of level 0
    monkeypatch.setattr(wsi.TiffReader, "bounds", property(lambda self: (100, 250, 200, 200)))
    predictor = _predictor()
    predictor.roi = Roi([[np.array(HALF)]])
    with pytest.raises(ImageError, match=r"scanned area of 200 x 200 px at \(100, 250\).*offset by \(100, 250\) px"):
        predictor.predict_slide(images / "tile.tif", images / "cropped")
    with caplog.at_level(logging.WARNING):  # without an ROI it runs, and says where its GeoJSON lands in QuPath
        assert _predictor().predict_slide(images / "tile.tif", images / "cropped_whole").nuclei > 0
    assert "GeoJSON lands (100, 250) px off in QuPath unless shifted by (-100, -250)" in caplog.text
