"""DICOM whole-slide images: written here as a scanner's archive gives them (one series of .dcm files per slide,
one file per pyramid level, and a label image), then found, named, opened and segmented."""

import copy
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("openslide", exc_type=ImportError)  # the C library may be missing even with the package
pytest.importorskip("wsidicom")

import pydicom  # noqa: E402  (wsidicom depends on it)
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from wsidicom import WsiDicom  # noqa: E402
from wsidicom.codec import Encoder  # noqa: E402
from wsidicom.geometry import Size, SizeMm  # noqa: E402
from wsidicom.instance import ImageData, WsiDataset, WsiInstance  # noqa: E402
from wsidicom.metadata import (Equipment, Image, ImageType, Label, OpticalPath, Patient, Pyramid, Series,  # noqa: E402
                               Slide, SlideSample, Study, WsiMetadata)
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema  # noqa: E402
from wsidicom.source import Source  # noqa: E402

from nucleiseg_monai.cohort import read_cohort  # noqa: E402
from nucleiseg_monai.earlier_outputs import refusals  # noqa: E402
from nucleiseg_monai.inputs import find_images, image_name, image_names  # noqa: E402
from nucleiseg_monai.outputs import manifest_path, source_fingerprint  # noqa: E402
from nucleiseg_monai.synthetic import make_slide  # noqa: E402
from nucleiseg_monai.wsi import ImageError, open_image  # noqa: E402
from test_inference import _oracle_image, _predictor, _write_tif  # noqa: E402

SHAPE = (300, 420)


class _Pixels(ImageData):
    """An RGB array as uncompressed tiles (so that it reads back exactly), of ``mpp`` microns per pixel."""

    transfer_syntax = ExplicitVRLittleEndian
    samples_per_pixel, bits, photometric_interpretation = 3, 8, "RGB"
    imaged_size = image_coordinate_system = lossy_compression = transcoder = None
    thread_safe = True

    def __init__(self, rgb: np.ndarray, mpp: float, tile: int = 128):
        self._rgb, self._mpp, self._tile = rgb, mpp, tile
        super().__init__(Encoder.create(self.transfer_syntax, self.bits, self.photometric_interpretation))

    @property
    def image_size(self):
        return Size(self._rgb.shape[1], self._rgb.shape[0])

    @property
    def tile_size(self):
        return Size(self._tile, self._tile)

    @property
    def pixel_spacing(self):
        return SizeMm(self._mpp / 1000, self._mpp / 1000)

    def get_decoded_tile(self, tile_point, z, path, cache=True):
        t = self._tile
        tile = np.full((t, t, 3), 255, np.uint8)
        part = self._rgb[tile_point.y * t:(tile_point.y + 1) * t, tile_point.x * t:(tile_point.x + 1) * t]
        tile[:part.shape[0], :part.shape[1]] = part
        return tile

    def get_encoded_tile(self, tile, z, path):
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class _Scan(Source):
    """A slide of levels ``rgb``, ``rgb[::2, ::2]``, ... (each but the first marked RESAMPLED) and a grey label."""

    def __init__(self, rgb: np.ndarray, mpp: float, levels: int, slide_id: str | None):
        super().__init__()
        metadata = WsiMetadata(
            study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
            equipment=Equipment(),
            slide=Slide(identifier=slide_id, samples=[SlideSample(identifier="tissue", uid=generate_uid())]),
            pyramid=Pyramid(image=Image(), optical_paths=[OpticalPath(identifier="0")], uid=generate_uid()),
            label=Label(), frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])
        self._base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)
        # each instance gets its own copy: making one writes its image type and UID into the dataset given
        self._levels = [WsiInstance.create_instance(_Pixels(rgb[::2**i, ::2**i], mpp * 2**i),
                                                    copy.deepcopy(self._base), ImageType.VOLUME, i)
                        for i in range(levels)]
        grey = np.full((60, 80, 3), 200, np.uint8)
        self._labels = [WsiInstance.create_instance(_Pixels(grey, mpp * 10, 80), copy.deepcopy(self._base),
                                                    ImageType.LABEL)]

    base_dataset = property(lambda self: WsiDataset(self._base))
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: self._labels)
    overview_instances = thumbnail_instances = annotation_instances = property(lambda self: [])

    def close(self):
        pass


def write_slide(folder: Path, rgb: np.ndarray, mpp: float = 0.25, levels: int = 3, slide_id: str | None = "S1",
                label_only: bool = False) -> dict[str, Path]:
    """``rgb`` as one DICOM series in ``folder`` (which may hold others): its files by kind, "level0", "level1",
    ... and "label"; ``label_only``: only the label's file, as a series of its own."""
    scratch = folder / f"writing-{generate_uid()}"  # the writer wants a folder of its own
    with WsiDicom(_Scan(rgb, mpp, levels, slide_id)) as wsi:
        written = wsi.save(scratch, include_levels=[] if label_only else None)
    files = {}
    for file in written:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        downsample = rgb.shape[1] / header.TotalPixelMatrixColumns
        kind = "label" if header.ImageType[2] == "LABEL" else f"level{round(np.log2(downsample))}"
        files[kind] = Path(shutil.move(file, folder / Path(file).name))
    scratch.rmdir()
    return files


@pytest.fixture(scope="module")
def oracle() -> np.ndarray:
    """An H&E-like field in the colours the oracle network of ``test_inference`` segments exactly."""
    return _oracle_image(make_slide(SHAPE, seed=5).labels())


def test_a_dicom_slide_is_one_image_named_after_its_slide_identifier_and_read_exactly(tmp_path, oracle):
    folder = tmp_path / "scans"
    folder.mkdir()
    files = write_slide(folder, oracle, mpp=0.2425, slide_id="case-17")
    assert sorted(files) == ["label", "level0", "level1", "level2"]
    assert find_images(folder) == [files["level0"]]
    for file in files.values():  # any file of the series stands for the slide: its finest level's
        assert find_images(file) == [files["level0"]] and image_name(file) == "case-17"
    write_slide(folder, oracle, levels=1, slide_id="case-18")  # another scan exported beside it
    assert image_name(files["level0"]) == "case-17"  # its name, and so its finished outputs, stay
    no_id = write_slide(tmp_path, oracle, levels=1, slide_id=None)["level0"]
    assert image_name(no_id) == pydicom.dcmread(no_id).SeriesInstanceUID
    with open_image(files["level2"]) as reader:  # OpenSlide reads the whole series from any of its files
        assert type(reader).__name__ == "OpenSlideReader"
        assert reader.level_shapes == [(300, 420), (150, 210), (75, 105)]
        assert reader.mpp == pytest.approx(0.2425) and reader.mpp_origin == "the OpenSlide properties"
        for level in range(3):
            np.testing.assert_array_equal(reader.read_region(0, 0, *reader.level_shapes[level], level=level),
                                          oracle[::2**level, ::2**level])
        np.testing.assert_array_equal(reader.read_region(-5, 400, 20, 30)[5:, :20], oracle[:15, 400:])
    with open_image(files["level0"], mpp=0.5) as reader:
        assert reader.level == 1 and reader.mpp == pytest.approx(0.485)


def test_a_dicom_slide_segments_as_the_same_pixels_in_a_tiff(tmp_path, oracle):
    """A run on the slide's folder writes outputs named after it, on the slide's grid, with the labels of the same
    pixels as a TIFF; a later run given another file of the slide finds them finished."""
    folder = tmp_path / "scans"
    folder.mkdir()
    files = write_slide(folder, oracle, slide_id="case-17")
    _write_tif(tmp_path / "case-17.tif", oracle, 0.25)
    summary = _predictor().run(folder, tmp_path / "out")
    assert summary.ok and [r.name for r in summary.done] == ["case-17"]
    result = summary.done[0]
    assert result.path == str(files["level0"]) and result.mpp == pytest.approx(0.25) and result.regions == 4
    made = json.loads(manifest_path(tmp_path / "out", "case-17").read_text())
    assert made["source_fingerprint"] == source_fingerprint(files["level0"])
    labels = tifffile.imread(tmp_path / "out" / "case-17.labels.tif")
    assert labels.shape == SHAPE and result.nuclei == labels.max() > 20
    _predictor().predict_slide(tmp_path / "case-17.tif", tmp_path / "tiff")
    np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "tiff" / "case-17.labels.tif"))

    again = _predictor().run(files["label"], tmp_path / "out")
    assert again.ok and again.skipped == [str(files["level0"])] and not again.done
    # given one of the slide's other files directly, the predictor still opens and records the finest level's
    assert _predictor().predict_slide(files["label"], tmp_path / "api").path == str(files["level0"])
    assert json.loads(manifest_path(tmp_path / "api", "case-17").read_text())["source"] == str(files["level0"])


def test_a_folder_of_several_dicom_slides_gives_one_image_each_and_leaves_other_dicom_out(tmp_path, oracle, caplog):
    folder = tmp_path / "export"
    folder.mkdir()
    first = write_slide(folder, oracle, slide_id="H-22 A/1")
    second = write_slide(folder, oracle[:200, :256], levels=2, slide_id="H-22 B")
    write_slide(folder, oracle, label_only=True)  # a label in a series of its own: no slide
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    with caplog.at_level(logging.WARNING):
        assert find_images(folder) == sorted([first["level0"], second["level0"]])
    assert "2 DICOM file(s)" in caplog.text and "left out" in caplog.text
    # named after each slide's identifier, made a file name
    assert sorted(s.name for s in read_cohort(folder)) == ["H-22_A_1", "H-22_B"]
    assert image_name(second["label"]) == "H-22_B"

    same = tmp_path / "same"  # two scans of one glass slide share its identifier, so the run refuses the second
    same.mkdir()
    for _ in range(2):
        write_slide(same, oracle, levels=1)
    scans = find_images(same)
    refused = refusals(list(zip(image_names(scans), scans)), tmp_path / "out", "name them")
    assert refused == {1: f"same output name 'S1' as {scans[0]}; name them"}


def test_a_slide_list_takes_a_dicom_slide_s_folder_or_any_of_its_files(tmp_path, oracle):
    for name in ("a", "b", "two"):
        (tmp_path / name).mkdir()
    a = write_slide(tmp_path / "a", oracle, levels=2, slide_id="A-1")
    b = write_slide(tmp_path / "b", oracle, levels=2)
    listed = tmp_path / "slides.csv"
    listed.write_text(f"path,slide\na,\n{b['label']},bee\n")
    slides = read_cohort(listed)
    assert [(s.path, s.name) for s in slides] == [(str(a["level0"]), "A-1"), (str(b["level0"]), "bee")]

    write_slide(tmp_path / "two", oracle, levels=1, slide_id="X")
    write_slide(tmp_path / "two", oracle, levels=1, slide_id="Y")
    listed.write_text("path\ntwo\n")
    with pytest.raises(ValueError, match=r"slides\.csv, line 2: .*two is a folder holding 2 DICOM slides.*one \.dcm"):
        read_cohort(listed)
    (tmp_path / "none").mkdir()
    listed.write_text("path\nnone\n")
    with pytest.raises(ValueError, match=r"none is a folder holding no DICOM slide.*give the image file itself"):
        read_cohort(listed)


def test_dicom_files_that_are_no_slide_are_refused_by_name_with_the_fix(tmp_path, oracle):
    ct = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), ct)
    with pytest.raises(ImageError, match=r"ct\.dcm is a DICOM CT image \(CT Image Storage\), not a whole-slide image"):
        open_image(ct)
    assert find_images(ct) == [ct]  # given alone, it is opened, to say what it is
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.dcm is not a DICOM file"):
        open_image(text)
    label = write_slide(tmp_path, oracle, label_only=True)["label"]
    with pytest.raises(ImageError, match=r"is the label image of a slide, in a series without pyramid levels"):
        open_image(label)


def test_a_dicom_slide_missing_its_finest_level_is_refused(tmp_path, oracle):
    """OpenSlide would read the slide from its next level, at half the resolution, without a word."""
    files = write_slide(tmp_path, oracle)
    files["level0"].unlink()
    with pytest.raises(ImageError, match=r"finest level of its DICOM series \(210 x 150 px\) is marked RESAMPLED.*"
                                         r"copy or export all of the slide's \.dcm files"):
        open_image(files["level1"])


def test_dicom_without_pydicom_or_openslide_names_the_extra(tmp_path, oracle, monkeypatch):
    (tmp_path / "s").mkdir()
    files = write_slide(tmp_path / "s", oracle, levels=1)
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"\.dcm slide, which needs OpenSlide: pip install 'nucleiseg-monai\[open"):
        open_image(files["level0"])
    monkeypatch.setitem(sys.modules, "pydicom", None)
    (tmp_path / "s" / "copy.dcm").write_bytes(files["level0"].read_bytes())  # a new file: headers read again
    with pytest.raises(ImportError, match=r"needs OpenSlide and pydicom: pip install 'nucleiseg-monai\[openslide\]'"):
        find_images(tmp_path / "s")


def test_a_folder_of_dicom_slide_folders_is_answered_with_the_glob_that_finds_them(tmp_path, oracle):
    for name in ("case-1", "case-2"):
        (tmp_path / "archive" / name).mkdir(parents=True)
        write_slide(tmp_path / "archive" / name, oracle, levels=1, slide_id=name)
    with pytest.raises(FileNotFoundError, match=r"not searched: give a glob such as '.*archive/\*/\*\.dcm'"):
        find_images(tmp_path / "archive")
    assert [image_name(p) for p in find_images(str(tmp_path / "archive" / "*" / "*.dcm"))] == ["case-1", "case-2"]


def test_without_pydicom_dicom_files_beside_other_images_are_left_out_not_fatal(tmp_path, oracle, monkeypatch,
                                                                                caplog):
    """Before DICOM was read, a stray .dcm among tiles was ignored; without the extra it must not stop the run."""
    write_slide(tmp_path, oracle, levels=1)
    tifffile.imwrite(tmp_path / "tile.tif", oracle)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with caplog.at_level(logging.WARNING):
        assert find_images(tmp_path) == [tmp_path / "tile.tif"]
    assert "2 DICOM file(s)" in caplog.text and "pip install 'nucleiseg-monai[openslide]'" in caplog.text
