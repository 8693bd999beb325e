"""Hard examples: the error map of a prediction against its truth (hand-built label maps), the maps written per
training tile, and training patches centred where the maps mark."""

import numpy as np
import pytest
import tifffile
import torch
from monai.utils import set_determinism
from PIL import Image

import nucleiseg_monai.transforms as T
from nucleiseg_monai.hard_examples import error_map, error_map_path, main, write_error_maps
from nucleiseg_monai.synthetic import make_tile

IDENTITY = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


@pytest.fixture(autouse=True)
def _free_global_seed():
    yield
    set_determinism(None)


def _truth_and_prediction() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A found exactly, B missed, C drawn a third as large. Prediction: A, a third of C, and D where no
    nucleus is annotated."""
    true = np.zeros((40, 60), np.int32)
    true[2:10, 2:10] = 1  # A
    true[20:30, 2:12] = 2  # B
    true[2:14, 30:42] = 3  # C
    pred = np.zeros_like(true)
    pred[2:10, 2:10] = 7  # A, exactly
    pred[2:14, 30:34] = 8  # a third of C: IoU 1/3
    pred[25:35, 45:55] = 9  # D
    return true, pred


def test_error_map_marks_unmatched_truth_and_predictions():
    true, pred = _truth_and_prediction()
    expected = (true == 2) | (true == 3) | (pred == 8) | (pred == 9)
    np.testing.assert_array_equal(error_map(pred, true), expected)


def test_sparse_tiles_do_not_mark_predictions_on_unannotated_tissue():
    true, pred = _truth_and_prediction()
    expected = (true == 2) | (true == 3) | (pred == 8)  # D may be a nucleus the annotators left out
    np.testing.assert_array_equal(error_map(pred, true, sparse=True), expected)


def test_a_perfect_prediction_marks_nothing():
    true, _ = _truth_and_prediction()
    assert not error_map(true * 5, true).any()


def _records(tmp_path, sparse=False):
    true, pred = _truth_and_prediction()
    labels = tmp_path / "data" / "t1.tif"
    labels.parent.mkdir()
    tifffile.imwrite(labels, true)
    (tmp_path / "eval" / "src").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "eval" / "src" / "t1.tif", pred)
    return [{"source": "src", "name": "t1", "label": str(labels), "label_kind": "instance", "sparse": sparse}]


def test_maps_are_written_per_tile_on_the_files_grid(tmp_path):
    records = _records(tmp_path)
    summary = write_error_maps(records, tmp_path / "eval", tmp_path / "maps")
    written = np.asarray(Image.open(error_map_path(tmp_path / "maps", records[0])))
    true, pred = _truth_and_prediction()
    np.testing.assert_array_equal(written > 0, error_map(pred, true))
    assert set(np.unique(written)) == {0, 255}
    assert summary == {"src": {"tiles": 1, "marked": round(float((written > 0).mean()), 4)}}


def test_a_missing_prediction_names_the_command_that_makes_it(tmp_path):
    records = _records(tmp_path)
    (tmp_path / "eval" / "src" / "t1.tif").unlink()
    with pytest.raises(FileNotFoundError, match="--split training"):
        write_error_maps(records, tmp_path / "eval", tmp_path / "maps")


def test_the_command_writes_a_bundles_training_maps(tmp_path, monkeypatch):
    records = [{**r, "part": "training"} for r in _records(tmp_path)]
    monkeypatch.setattr("nucleiseg_monai.sources.bundle_records", lambda *a, **k: (records, 0.25))
    assert main(["--bundle", "B", "--predictions", str(tmp_path / "eval"), "--output", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "src" / "t1.png").is_file()


# --- patches centred on errors ----------------------------------------------------------------------------------

def _coordinates(h: int, w: int) -> dict:
    """An image whose first channel holds each pixel's row and the second its column."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    return {"image": torch.from_numpy(np.stack([rows, cols, np.zeros_like(rows)])),
            "label": torch.zeros((1, h, w), dtype=torch.int32)}


@pytest.mark.parametrize("marked, centre", [((30, 40), (30, 40)), ((2, 77), (10, 70))])
def test_crops_are_centred_on_a_marked_pixel_and_shifted_inside_near_the_edge(marked, centre):
    item = _coordinates(60, 80)
    item["errors"] = torch.zeros((1, 60, 80), dtype=torch.uint8)
    item["errors"][0, marked[0], marked[1]] = 1
    crop = T.RandErrorCropd(["image", "label"], roi_size=(20, 20), prob=1.0)
    crop.set_random_state(0)
    for _ in range(5):
        out = crop(dict(item))
        assert "errors" not in out and tuple(out["image"].shape) == (3, 20, 20)
        assert (out["image"][0, 10, 10].item(), out["image"][1, 10, 10].item()) == centre
        assert (out["image"][0] == marked[0]).any() and (out["image"][1] == marked[1]).any()


def test_without_marked_pixels_or_at_probability_0_crops_fall_anywhere():
    for prob, errors in ((1.0, torch.zeros((1, 60, 80), dtype=torch.uint8)),
                         (0.0, torch.ones((1, 60, 80), dtype=torch.uint8))):
        crop = T.RandErrorCropd(["image", "label"], roi_size=(20, 20), prob=prob)
        crop.set_random_state(1)
        corners = set()
        for _ in range(20):
            image = crop({**_coordinates(60, 80), "errors": errors})["image"]
            corners.add((image[0, 0, 0].item(), image[1, 0, 0].item()))
        assert len(corners) > 10


def _central_nucleus(labels: np.ndarray) -> int:
    """The nucleus nearest the tile's centre: a crop around it needs no shift away from an edge."""
    rows, cols = np.nonzero(labels)
    centre = np.array(labels.shape) / 2
    return int(labels[rows, cols][np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)])


def _centred(pipeline, item: dict, target: int, draws: int = 20) -> int:
    """How many of ``draws`` patches hold ``target`` within 2 px of their centre: the drawn pixel may lie on the
    nucleus's rim, and the elastic step moves pixels by a pixel or two."""
    return sum(int((pipeline(dict(item))["label_inst"][0, 30:35, 30:35] == target).any()) for _ in range(draws))


def test_training_patches_centre_on_the_nucleus_the_map_marks():
    """Through the whole training pipeline (turns, elastic, affine about the centre): every patch's centre lies in
    the one marked nucleus of a synthetic tile."""
    image, labels = make_tile(192, n_nuclei=25, seed=3)
    target = _central_nucleus(labels)
    item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)),
            "label": torch.from_numpy(labels.astype(np.int32)[None]),
            "errors": torch.from_numpy((labels == target).astype(np.uint8)[None])}
    set_determinism(0)
    pipeline = T.train_transforms(*IDENTITY, patch_size=(64, 64), load=False, hard_examples=1.0)
    assert _centred(pipeline, item, target) >= 18
    set_determinism(0)
    uniform = T.train_transforms(*IDENTITY, patch_size=(64, 64), load=False)
    assert _centred(uniform, {k: v for k, v in item.items() if k != "errors"}, target) <= 4


def test_hard_examples_from_disk_and_a_missing_folder_refused(tmp_path):
    from nucleiseg_monai.data import discover
    from nucleiseg_monai.synthetic import write_dataset

    write_dataset(tmp_path / "data", n_tiles=1, size=128, organs=("Skin",), n_nuclei=12)
    [sample] = discover(tmp_path / "data")
    record = {**sample.record(), "source": "src", "name": "tile"}
    labels = np.asarray(tifffile.imread(record["label"]))
    target = _central_nucleus(labels)
    path = error_map_path(tmp_path / "maps", record)
    path.parent.mkdir(parents=True)
    Image.fromarray((labels == target).astype(np.uint8) * 255).save(path)
    set_determinism(0)
    maps = tmp_path / "maps"
    pipeline = T.train_transforms(*IDENTITY, patch_size=(64, 64), hard_examples=1.0, hard_examples_dir=maps)
    assert _centred(pipeline, record, target, draws=10) >= 9
    (tmp_path / "other" / "src").mkdir(parents=True)
    (tmp_path / "other" / "src" / "tile.tif").touch()
    for folder in (tmp_path / "nowhere", tmp_path / "other"):  # absent, or holding no maps
        with pytest.raises(FileNotFoundError, match="hard_examples_dir"):
            T.train_transforms(*IDENTITY, hard_examples=0.5, hard_examples_dir=folder)
    with pytest.raises(ValueError, match="from 0 to 1"):
        T.train_transforms(*IDENTITY, hard_examples=1.5, hard_examples_dir=maps)


def test_maps_follow_the_labels_to_the_working_scale_and_are_zero_where_missing(tmp_path, caplog):
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 30:50] = 4
    record = {"source": "src", "name": "t", "label": torch.zeros((1, 20, 30), dtype=torch.int32)}  # scale 0.5
    path = error_map_path(tmp_path, record)
    path.parent.mkdir()
    Image.fromarray((labels == 4).astype(np.uint8) * 255).save(path)
    out = T.LoadErrorMapd(tmp_path)(record)["errors"]
    expected = np.zeros((1, 20, 30), np.uint8)
    expected[0, 5:10, 15:25] = 1
    np.testing.assert_array_equal(out.numpy(), expected)
    missing = T.LoadErrorMapd(tmp_path)
    for name in ("u", "v"):
        assert not missing({**record, "name": name})["errors"].any()
    assert sum("no error map" in r.message for r in caplog.records) == 1  # said once, not per tile


def test_without_hard_examples_the_recipe_is_unchanged():
    steps = [type(t) for t in T.train_transforms(*IDENTITY, hard_examples=0, hard_examples_dir="ignored").transforms]
    assert T.RandErrorCropd not in steps and T.LoadErrorMapd not in steps
    assert steps[:3] == [T.LoadTiled, T.SpatialPadd, T.RandSpatialCropd]
