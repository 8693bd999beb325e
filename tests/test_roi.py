"""Segmenting within a region of interest: the nuclei kept are exactly those of the whole run whose centroid lies
inside, in every output, across region seams; regions the ROI misses are not analysed; finished outputs of another
ROI are refused; QuPath's GeoJSON forms are read and what is not an ROI is refused."""

import json
import logging

import pytest

from nucleiseg_monai.roi import RoiError, read_roi
from nucleiseg_monai.synthetic import make_slide, make_tile
from test_inference import _oracle_image, _predictor, _write_tif

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


def test_the_packages_own_nuclei_are_not_an_roi(images):
    with pytest.raises(RoiError, match=r"tile\.geojson holds \d+ detections .*annotations"):
        read_roi(images / "whole" / "tile.geojson")


@pytest.mark.parametrize("text, said", [("{not json", "is not a GeoJSON file"),
                                        ('{"type": "Topology"}', "not GeoJSON Features"),
                                        (json.dumps(_feature([[0, 0], [1, 1], [0, 0]])), "at least 3 distinct")])
def test_malformed_files_are_refused_naming_them(tmp_path, text, said):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(RoiError, match=f"bad.geojson.*{said}.*Export objects as GeoJSON"):
        read_roi(path)
