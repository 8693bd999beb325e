"""The multi-source data layer: registry, per-source splits, pixel sizes, sampling weights, and the transforms that
bring every source to one working pixel size (resampling, ignored far background, the masked loss)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio
from skimage.io import imsave
import torch
from monai.losses import DiceCELoss

from nucleiseg_monai import sources as S
from nucleiseg_monai.data import DataError
from nucleiseg_monai.losses import MaskedDiceCELoss
from nucleiseg_monai.metrics import InstanceMetric
from nucleiseg_monai.synthetic import make_tile, write_dataset
from nucleiseg_monai.transforms import (
    IGNORE,
    LoadTiled,
    ResampleLabelsd,
    ThreeClassTargetd,
    far_background,
    resample_labels,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def write_generic(root: Path, stems: list[str], size: int = 64, mpp: float | None = None, organs_csv: dict | None = None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, stem in enumerate(stems):
        image, labels = make_tile(size, 6, seed=i)
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
        tifffile.imwrite(root / "images" / f"{stem}.tif", image, photometric="rgb", **kwargs)
        tifffile.imwrite(root / "labels" / f"{stem}.tif", labels.astype(np.uint16))
    if organs_csv:
        lines = ["stem,organ_group,nuclei"] + [f"{s},{o},1" for s, o in organs_csv.items()]
        (root / "organs.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory) -> Path:
    """Three small sources and their registry (roots relative to it), written once per module."""
    folder = tmp_path_factory.mktemp("registry")
    data = folder / "data"
    write_dataset(data / "kaggle", n_tiles=9, size=64, organs=("Skin", "Thymus", "Lung"), seed=0)
    tcga = ["TCGA-A7-0001", "TCGA-AR-0002", "TCGA-B0-0003", "TCGA-HE-0004", "TCGA-HE-0005"]
    write_generic(data / "tcga", tcga, mpp=0.5)
    groups = {f"mouse_heart_{i}": "mouse_heart" for i in range(3)} | {f"human_liver_{i}": "human_liver" for i in range(3)}
    groups |= {f"human_brain_{i}": "human_brain" for i in range(2)}
    write_generic(data / "groups", list(groups), organs_csv=groups)
    entries = {
        "kaggle": {"root": "kaggle", "layout": "kaggle", "mpp": 0.25, "organs": "name",
                   "split": {"kind": "organ_stratified", "val_fraction": 0.15, "test_fraction": 0.3, "seed": 0},
                   "license": "CC BY-NC-SA 4.0", "commercial_use": False},
        "tcga": {"root": "tcga", "layout": "generic", "mpp": "file", "organs": "tcga",
                 "split": {"kind": "per_organ", "validation_per_organ": 1, "seed": 0}},
        "groups": {"root": "groups", "layout": "generic", "mpp": 0.125, "organs": "organs.csv", "sparse_labels": True,
                   "split": {"kind": "groups", "validation": ["human_brain"], "test": ["mouse_heart"]}},
    }
    (folder / "sources.json").write_text(json.dumps(entries))
    return folder


@pytest.fixture
def registry(registry_template, tmp_path) -> tuple[Path, Path]:
    """A copy of the template per test, which may add files beside it or change it."""
    shutil.copytree(registry_template, tmp_path, dirs_exist_ok=True)
    return tmp_path / "sources.json", tmp_path / "data"


def test_the_shipped_registry_describes_every_source_once():
    sources = S.load_sources()
    assert list(sources) == ["cryonuseg", "monuseg2018_train", "nuinsseg"]
    for s in sources.values():
        assert s.license and s.citation and s.mpp_note
    assert not sources["cryonuseg"].commercial_use and sources["nuinsseg"].commercial_use
    assert sources["nuinsseg"].sparse_labels and not sources["monuseg2018_train"].sparse_labels


def test_each_source_is_split_its_own_way(registry):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    by_part = {p: Counter(r["source"] for r in datalist[p]) for p in ("training", "validation", "test")}
    # kaggle: the organ-stratified split (1 test tile per organ of 3); tcga: one validation tile per organ, no test
    assert by_part["test"]["kaggle"] == 3 and by_part["test"]["tcga"] == 0
    assert by_part["validation"]["tcga"] == 2  # breast and kidney: two organs
    organs = {r["organ"] for r in datalist["validation"] if r["source"] == "tcga"}
    assert organs == {"breast", "kidney"}
    # groups: whole organ groups held out, so no group has tiles on both sides
    held = {p: {r["organ"] for r in datalist[p] if r["source"] == "groups"} for p in ("training", "validation", "test")}
    assert held == {"training": {"human_liver"}, "validation": {"human_brain"}, "test": {"mouse_heart"}}
    # pixel sizes: stated, read from the TIFF tags, and the sparse flag of the source
    mpps = {r["source"]: r["mpp"] for p in ("training", "validation") for r in datalist[p]}
    assert mpps == {"kaggle": 0.25, "tcga": 0.5, "groups": 0.125}
    assert all(r["sparse"] == (r["source"] == "groups") for r in datalist["training"])


def test_prepare_reads_back_the_split_and_refuses_a_changed_registry(registry, tmp_path):
    path, data = registry
    sources = S.load_sources(path)
    first = S.prepare(data, tmp_path / "datalist.json", sources)
    assert S.prepare(data, tmp_path / "datalist.json", sources) == first
    changed = json.loads(path.read_text())
    changed["groups"]["split"]["test"] = ["human_liver"]
    path.write_text(json.dumps(changed))
    with pytest.raises(DataError, match="pass --datalist_file with a new file.s name"):
        S.prepare(data, tmp_path / "datalist.json", S.load_sources(path))


def test_a_pixel_size_stated_later_in_the_registry_wins_over_the_cached_datalist(registry, tmp_path, caplog):
    path, data = registry
    first = S.prepare(data, tmp_path / "datalist.json", S.load_sources(path))
    changed = json.loads(path.read_text())
    changed["groups"]["mpp"] = 0.2
    changed["groups"]["sparse_labels"] = False
    path.write_text(json.dumps(changed))
    again = S.prepare(data, tmp_path / "datalist.json", S.load_sources(path))
    for part in ("training", "validation", "test"):
        assert [r["name"] for r in again[part]] == [r["name"] for r in first[part]]  # the same split
        for r in again[part]:
            expected = {"kaggle": 0.25, "groups": 0.2}.get(r["source"], r["mpp"])
            assert r["mpp"] == expected and r["sparse"] is False
    scales = {r["source"]: r["scale"] for r in S.resolve(again, data, "training", 0.25)}
    assert scales["groups"] == 0.8 and scales["tcga"] == 2.0  # "file" sources keep the tags' value
    assert "'groups' now has mpp 0.125 -> 0.2, sparse True -> False" in caplog.text


def test_resolve_gives_absolute_paths_and_the_scale_to_the_working_pixel_size(registry):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    records = S.resolve(datalist, data, "training", working_mpp=0.25)
    scales = {r["source"]: r["scale"] for r in records}
    assert scales == {"kaggle": 1.0, "tcga": 2.0, "groups": 0.5}
    assert all(Path(r["image"]).is_file() and Path(r["label"]).is_file() for r in records)


def test_sampling_weights_give_each_source_its_share(registry):
    path, data = registry
    records = S.resolve(S.make_datalist(S.load_sources(path), data), data, "training", 0.25)
    weights = S.sampling_weights(records)
    share = Counter()
    for r, w in zip(records, weights):
        share[r["source"]] += w
    assert all(v == pytest.approx(1 / 3) for v in share.values())
    weights = S.sampling_weights(records, {"kaggle": 2, "tcga": 1, "groups": 1})
    assert sum(w for r, w in zip(records, weights) if r["source"] == "kaggle") == pytest.approx(0.5)


def test_bundle_records_are_the_held_out_tiles_its_evaluation_reports(registry, tmp_path):
    path, data = registry
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"microns_per_pixel": 0.25}))
    datalist = S.make_datalist(S.load_sources(path), data)
    (bundle / "models" / "datalist.json").write_text(json.dumps(datalist))
    records, working = S.bundle_records(bundle, data, rescans={"kaggle": 0.5})
    assert working == 0.25
    assert records == S.evaluation_records(datalist, data, "test", 0.25, {"kaggle": 0.5})
    assert {r["source"]: r["part"] for r in records} == {
        "kaggle": "test", "tcga": "validation", "groups": "test", "kaggle@0.5um": "test"}


def test_unknown_source_and_missing_folder_name_the_fix(registry, tmp_path):
    path, data = registry
    with pytest.raises(DataError, match="not in"):
        S.load_sources(path, ["nope"])
    with pytest.raises(DataError, match="NUCLEISEG_DATA"):
        S.make_datalist(S.load_sources(path), tmp_path / "elsewhere")
    # a datalist made elsewhere, used with a data root that lacks its sources (evaluation, a resumed run)
    datalist = S.make_datalist(S.load_sources(path), data)
    with pytest.raises(DataError, match=f"folder {tmp_path / 'elsewhere'}/.* does not exist; set NUCLEISEG_DATA"):
        S.resolve(datalist, tmp_path / "elsewhere", "validation", 0.25)


def test_evaluation_records_add_a_rescanned_copy_and_use_validation_where_a_source_has_no_test(registry):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    records = S.evaluation_records(datalist, data, "test", 0.25, {"kaggle": 0.5})
    parts = {r["source"]: r["part"] for r in records}
    assert parts["tcga"] == "validation" and parts["kaggle"] == "test" and parts["groups"] == "test"
    copies = [r for r in records if r["source"] == "kaggle@0.5um"]
    assert len(copies) == 3 and all(r["rescan_scale"] == 0.5 and r["scale"] == 2.0 for r in copies)


@pytest.mark.parametrize("split, rescans, said", [
    ("tset", {}, "split 'tset' is none of training, validation, test"),  # python -m monai.bundle takes any text
    ("test", {"kaggle": "0.5"}, "rescans gives 'kaggle' the pixel size '0.5'"),
    ("test", {"kaggle": 0}, "takes microns per pixel as a positive number"),
])
def test_evaluation_refuses_a_split_or_rescan_it_cannot_score_as_named(registry, split, rescans, said):
    """A rescan of a source the datalist lacks is only warned about (the bundles' default names CryoNuSeg)."""
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    with pytest.raises(DataError, match=re.escape(said)):
        S.evaluation_records(datalist, data, split, 0.25, rescans)


def test_a_rescan_of_a_source_the_datalist_lacks_is_named_in_a_warning(registry, caplog):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.sources"):
        records = S.evaluation_records(datalist, data, "test", 0.25, {"kagle": 0.5})
    assert not any("@" in r["source"] for r in records) and "did you mean 'kaggle'?" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.sources"):  # the default's CryoNuSeg, on other data
        S.evaluation_records(datalist, data, "test", 0.25, {"cryonuseg": 0.5})
    [said] = [r for r in caplog.records if "rescans names 'cryonuseg'" in r.getMessage()]
    assert said.levelno == logging.INFO


def test_an_evaluation_refuses_tiles_whose_image_and_labels_differ_in_size_before_it_starts(registry):
    """Found from the files' headers before the evaluation replaces its earlier report, all of them at once."""
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    records = S.evaluation_records(datalist, data, "test", 0.25)
    wrong = records[:2]
    for r in wrong:  # edited since the split was made: a crop of the label map
        label = Path(r["label"])
        if label.suffix.lower() in (".tif", ".tiff"):
            tifffile.imwrite(label, tifffile.imread(label)[:-3])
        else:
            imsave(label, skio.imread(label)[:-3], check_contrast=False)
    with pytest.raises(DataError, match=r"size mismatch in 2 tile\(s\): .* is \d+x\d+ but .* is \d+x\d+; .*same tile"):
        S.evaluation_records(datalist, data, "test", 0.25)


def test_load_resamples_to_the_working_scale_and_keeps_the_native_labels(registry):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    record = S.resolve(datalist, data, "training", 0.25, ["tcga"])[0]
    item = LoadTiled(keep_native=True)(record)
    assert item["image"].shape == (3, 128, 128) and item["label"].shape == (1, 128, 128)
    assert item["label_native"].shape == (1, 64, 64)
    # nearest resampling carries ids: the same set of nuclei, none blended into a new id
    assert set(np.unique(item["label"])) == set(np.unique(item["label_native"]))
    back = ResampleLabelsd("pred", like="label_native")({"pred": item["label"], "label_native": item["label_native"]})
    assert torch.equal(back["pred"], item["label_native"])


def test_a_rescanned_copy_is_what_the_model_sees_and_is_scored_against(registry):
    path, data = registry
    datalist = S.make_datalist(S.load_sources(path), data)
    record = S.evaluation_records(datalist, data, "test", 0.25, {"kaggle": 0.5})[-1]
    item = LoadTiled(keep_native=True)(record)
    assert item["label_native"].shape == (1, 32, 32)  # the 0.5 um/px copy's own grid
    assert item["image"].shape == (3, 64, 64)  # back at the working 0.25 um/px


def test_sparse_tiles_ignore_background_far_from_every_nucleus():
    labels = np.zeros((1, 64, 64), np.int32)
    labels[0, 10:16, 10:16] = 1
    d = ThreeClassTargetd("label", ignore_beyond=8)({"label": torch.from_numpy(labels), "sparse": True})
    target = d["label"][0].numpy()
    assert target[12, 12] == 1 and target[20, 12] == 0  # near background is still background
    assert target[60, 60] == IGNORE
    dense = ThreeClassTargetd("label", ignore_beyond=8)({"label": torch.from_numpy(labels), "sparse": False})
    assert not (dense["label"] == IGNORE).any()
    assert far_background(np.zeros((4, 4), bool), 3).all()


def test_masked_loss_equals_dice_ce_without_ignored_pixels_and_ignores_them_otherwise():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 1, 16, 16))
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert MaskedDiceCELoss()(logits, target) == pytest.approx(expected.item(), abs=1e-6)
    ignored = target.clone()
    ignored[..., 8:] = IGNORE
    changed = logits.clone()
    changed[..., 8:] = torch.randn(2, 3, 16, 8) * 10  # what the network says there must not matter
    assert MaskedDiceCELoss()(logits, ignored) == pytest.approx(MaskedDiceCELoss()(changed, ignored).item(), abs=1e-5)


def test_grouped_instance_metric_is_the_mean_of_the_sources_means():
    truth = np.zeros((1, 8, 8), np.int32)
    truth[0, 2:6, 2:6] = 1
    empty = np.zeros_like(truth)
    metric = InstanceMetric("aji", groups=["a", "b"])
    metric.reset()
    # source a: three perfect tiles (AJI 1); source b: one tile with nothing found (AJI 0)
    metric.update(([truth, truth, truth], [truth, truth, truth], ["a", "a", "a"]))
    metric.update(([empty], [truth], ["b"]))
    assert metric.compute() == pytest.approx(0.5)  # not 0.75, the mean over tiles


def test_resample_labels_is_nearest():
    labels = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.int32)
    up = resample_labels(labels, (4, 4))
    assert up.dtype == torch.int32 and torch.equal(up[0, ::2, ::2], labels[0])


@pytest.mark.skipif(not (SHARED / "nuinsseg").is_dir(), reason="shared datasets absent")
def test_real_sources_keep_cryonuseg_test_split_and_hold_out_nuinsseg_groups():
    sources = S.load_sources()
    datalist = json.loads((REPO / "bundles" / "nuclei_unet_small" / "models" / "datalist.json").read_text())
    assert datalist["sources"] == {s.name: {"root": s.root, "split": s.split} for s in sources.values()}
    cryo_test = sorted(r["name"] for r in datalist["test"] if r["source"] == "cryonuseg")
    assert len(cryo_test) == 10 and cryo_test[:2] == ["Human_AdrenalGland_03", "Human_Larynx_02"]
    train_groups = {r["organ"] for r in datalist["training"] if r["source"] == "nuinsseg"}
    held = set(sources["nuinsseg"].split["validation"]) | set(sources["nuinsseg"].split["test"])
    assert not train_groups & held


@pytest.mark.parametrize("bundle", ["nuclei_unet_small", "nuclei_unet_full"])
def test_licenses_travel_with_the_weights(bundle):
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    license_text = (REPO / "bundles" / bundle / "LICENSE").read_text()
    for source in S.load_sources().values():
        assert source.license in meta["data_license"] and source.license in license_text
        assert source.citation.split(",")[0] in license_text or source.citation.split(" et al")[0] in license_text
    if any(not s.commercial_use for s in S.load_sources().values()):
        assert "NON-COMMERCIAL" in license_text and "non-commercial" in meta["data_license"]


def test_a_source_without_pixel_size_gets_one_from_its_nuclei(tmp_path, capsys):
    from skimage.transform import rescale

    data = tmp_path / "data"
    write_generic(data / "ref", [f"TCGA-A7-{i:04d}" for i in range(4)], size=96, mpp=0.25)
    # the same kind of tiles scanned at twice the resolution: nuclei twice as large in linear size
    (data / "big" / "images").mkdir(parents=True)
    (data / "big" / "labels").mkdir()
    for i in range(4):
        image, labels = make_tile(96, 6, seed=i)
        tifffile.imwrite(data / "big" / "images" / f"t{i}.tif", (rescale(image, 2, channel_axis=-1) * 255).astype(np.uint8))
        tifffile.imwrite(data / "big" / "labels" / f"t{i}.tif", np.kron(labels, np.ones((2, 2), labels.dtype)).astype(np.uint16))
    (data / "big" / "organs.csv").write_text("stem,organ\n" + "".join(f"t{i},x\n" for i in range(4)))
    registry = tmp_path / "sources.json"
    registry.write_text(json.dumps({
        "ref": {"root": "ref", "layout": "generic", "mpp": "file", "organs": "tcga", "split": {"kind": "per_organ"}},
        "big": {"root": "big", "layout": "generic", "mpp": 0.1, "organs": "organs.csv", "split": {"kind": "per_organ"}},
    }))
    S.main(["--estimate_mpp", "big", "--data_root", str(data), "--sources_file", str(registry)])
    said = capsys.readouterr().out
    estimate = float(said.split(":")[1].split()[0])
    assert estimate == pytest.approx(0.125, abs=0.01)
    assert "in its 4 tiles; reference: ['ref']" in said and "few nuclei" in said

    # a third source whose pixel size was itself estimated: the references disagree until chosen
    registry.write_text(json.dumps({**json.loads(registry.read_text()),
                                    "est": {"root": "big", "layout": "generic", "mpp": 0.125, "organs": "organs.csv",
                                            "split": {"kind": "per_organ"}}}))
    with pytest.raises(SystemExit, match=r"state different pixel sizes \[0.125, 0.25\] .*--reference NAME"):
        S.main(["--estimate_mpp", "big", "--data_root", str(data), "--sources_file", str(registry)])
    S.main(["--estimate_mpp", "big", "--data_root", str(data), "--sources_file", str(registry), "--reference", "ref"])
    assert float(capsys.readouterr().out.split(":")[1].split()[0]) == pytest.approx(estimate)


def _pairs_registry(tmp_path: Path, organs: str = "organs.csv", stems: list[str] | None = None) -> Path:
    """One generic source 'mine' of 8 tiles, 2 per organ of 4 (or ``stems`` named by organ rule 'name')."""
    pairs = {f"t{i}": organ for i, organ in enumerate("aabbccdd")}
    write_generic(tmp_path / "data" / "mine", stems or list(pairs), organs_csv=None if stems else pairs)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"mine": {"root": "mine", "layout": "generic", "mpp": 0.25, "organs": organs,
                                         "split": {"kind": "organ_stratified"}}}))
    return path


def test_a_split_without_validation_tiles_is_refused_before_training(tmp_path):
    path = _pairs_registry(tmp_path)
    with pytest.raises(DataError) as info:
        S.prepare(tmp_path / "data", tmp_path / "datalist.json", S.load_sources(path))
    message = str(info.value)
    # 2 tiles per organ: test takes one of each, validation may not take an organ's last training tile
    assert "source 'mine' (8 tiles of 4 organ(s)" in message and "training 4, validation 0, test 4" in message
    assert "{'kind': 'organ_stratified'}" in message and "more tiles per organ" in message
    assert not (tmp_path / "datalist.json").exists()


def test_stems_outside_the_naming_convention_are_told_to_use_an_organs_file(tmp_path):
    path = _pairs_registry(tmp_path, organs="name", stems=[f"case{i:02d}" for i in range(1, 9)])
    with pytest.raises(DataError, match=r"training 8, validation 0, test 0.*each their own organ \(\['mine'\]\)"):
        S.make_datalist(S.load_sources(path), tmp_path / "data")


def test_a_datalist_file_without_validation_tiles_is_refused_when_read_back(tmp_path):
    path = _pairs_registry(tmp_path)
    sources = S.load_sources(path)
    old = S.make_datalist(sources, tmp_path / "data", require_validation=False)  # as written before the check
    assert len(old["validation"]) == 0
    (tmp_path / "datalist.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match="no validation tiles"):
        S.prepare(tmp_path / "data", tmp_path / "datalist.json", sources)


def test_an_evaluation_split_may_hold_no_validation_tiles_which_training_then_refuses(tmp_path):
    """One's own tiles held out for testing alone: evaluate.json's require_validation false (as the command line
    gives it, a word) writes the datalist; training reading the same file refuses it, and an evaluation of the
    validation part names the empty split instead of scoring nothing."""
    path = _pairs_registry(tmp_path)
    sources, datalist_file = S.load_sources(path), tmp_path / "datalist.json"
    datalist = S.prepare(tmp_path / "data", datalist_file, sources, require_validation="false")
    assert [len(datalist[p]) for p in S.PARTS] == [4, 0, 4] and datalist_file.is_file()
    records = S.evaluation_records(datalist, tmp_path / "data", "test", 0.25)
    assert sorted(Path(r["image"]).name for r in records) == sorted(Path(r["image"]).name for r in datalist["test"])
    assert {r["part"] for r in records} == {"test"}
    with pytest.raises(DataError, match=r"no tiles to evaluate: the datalist holds no validation tiles "
                                        r"\(mine: training 4, validation 0, test 4\)"):
        S.evaluation_records(datalist, tmp_path / "data", "validation", 0.25)
    with pytest.raises(DataError, match="no validation tiles, so training could select no model"):
        S.prepare(tmp_path / "data", datalist_file, sources)


def test_a_source_without_validation_tiles_beside_others_is_warned_about(registry, tmp_path, caplog):
    path, data = registry
    mine = _pairs_registry(tmp_path / "mine")
    shutil.move(tmp_path / "mine" / "data" / "mine", data / "mine")
    entries = json.loads(path.read_text()) | json.loads(mine.read_text())
    path.write_text(json.dumps(entries))
    datalist = S.make_datalist(S.load_sources(path), data)
    assert Counter(r["source"] for r in datalist["validation"])["mine"] == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1, lines  # 'mine' only: tcga's split holds no test tiles by design
    assert lines[0].startswith("source 'mine' (8 tiles") and "other sources have validation tiles" in lines[0]


def test_binary_masks_in_a_generic_source_become_connected_components_with_one_warning(tmp_path, caplog):
    from skimage.io import imsave

    root = write_generic(tmp_path / "data" / "mine", [f"t{i}" for i in range(6)])
    mask = np.zeros((64, 64), np.uint8)
    mask[4:12, 4:12] = mask[4:12, 12:20] = 255  # two touching nuclei: one component
    mask[40:50, 40:50] = 255
    for stem, scale in (("t0", 1), ("t1", 1 / 255)):  # 0/255 PNG and 0/1 TIFF
        (root / "labels" / f"{stem}.tif").unlink()
        if scale == 1:
            imsave(root / "labels" / f"{stem}.png", mask, check_contrast=False)
        else:
            tifffile.imwrite(root / "labels" / f"{stem}.tif", (mask * scale).astype(np.uint8))
    single = np.zeros((64, 64), np.uint16)
    single[20:30, 20:30] = 1  # one nucleus with id 1 reads the same either way: an instance map
    tifffile.imwrite(root / "labels" / "t2.tif", single)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"mine": {"root": "mine", "layout": "generic", "mpp": 0.25, "organs": "name",
                                         "split": {"kind": "organ_stratified"}}}))
    datalist = S.make_datalist(S.load_sources(path), tmp_path / "data", require_validation=False)
    kinds = {r["name"]: r["label_kind"] for p in S.PARTS for r in datalist[p]}
    assert kinds == {"t0": "binary", "t1": "binary", "t2": "instance", "t3": "instance", "t4": "instance",
                     "t5": "instance"}
    record = next(r for p in S.PARTS for r in S.resolve(datalist, tmp_path / "data", p, 0.25) if r["name"] == "t0")
    labels = LoadTiled()(record)["label"][0].numpy()
    assert len(np.unique(labels)) == 3  # background and two components, not one nucleus per tile
    binary = [r.getMessage() for r in caplog.records if "connected components" in r.getMessage()]
    assert len(binary) == 1
    assert "source 'mine': 2 of 6 label maps" in binary[0] and "t0.png, t1.tif" in binary[0]
    assert "touching nuclei count as one" in binary[0]


@pytest.mark.parametrize("change, message", [
    ({"sparse_label": True}, "unknown key 'sparse_label' (did you mean 'sparse_labels'?); the keys are root, "),
    ({"licence": "CC BY 4.0"}, "unknown key 'licence' (did you mean 'license'?)"),
    ({"split": {"kind": "per_organ", "validation_per_organs": 2}},
     "split kind 'per_organ': unknown key 'validation_per_organs' (did you mean 'validation_per_organ'?)"),
    ({"root": None}, "root must be a string"),
    ({"mpp": "File2"}, "mpp 'File2' is no pixel size; give microns per pixel as a number"),
    ({"mpp": True}, "mpp True is no pixel size"),
    ({"mpp": -0.25}, "mpp -0.25 is no pixel size"),
    ({"mpp": 40}, "mpp 40 is outside the plausible pixel sizes 0.02-20 um/px; it takes microns per pixel, not a "
                  "magnification"),
    ({"sparse_labels": "false"}, "sparse_labels must be true or false (no quotes)"),
    ({"layout": "folders"}, "layout must be one of kaggle, generic, not 'folders'"),
    ({"split": {"kind": "random"}}, "split must be an object whose kind is one of organ_stratified, per_organ"),
])
def test_a_mistake_in_a_registry_entry_is_refused_by_name_when_loaded(registry, change, message):
    path, _ = registry
    entries = json.loads(path.read_text())
    entries["tcga"].update(change)
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError) as info:
        S.load_sources(path)
    assert f"source 'tcga' in {path}" in str(info.value) and message in str(info.value)


def test_a_missing_required_key_is_named(registry):
    path, _ = registry
    entries = json.loads(path.read_text())
    del entries["groups"]["root"], entries["groups"]["organs"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="source 'groups' in .* lacks 'root', 'organs'; every source needs root, "):
        S.load_sources(path)


def test_a_registry_pixel_size_unlike_a_scans_is_warned_about_once(registry, caplog):
    path, _ = registry
    entries = json.loads(path.read_text())
    entries["tcga"]["mpp"] = 4  # pixels per micron, typed for 0.25 um/px: every tile resampled x16
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.sources"):
        S.load_sources(path)
        S.load_sources(path)
    [said] = [r.getMessage() for r in caplog.records if "mpp 4 is" in r.getMessage()]
    assert said.startswith(f"source 'tcga' in {path}: mpp 4 is outside the 0.1-2 um/px of H&E scans")
    assert "nor pixels per micron: 4 px/um is 0.25 um/px" in said


def test_mpp_file_in_any_case_and_unknown_or_null_are_accepted(registry):
    path, data = registry
    entries = json.loads(path.read_text())
    entries["tcga"]["mpp"], entries["groups"]["mpp"], entries["kaggle"]["mpp"] = "File", None, 1
    path.write_text(json.dumps(entries))
    sources = S.load_sources(path)
    assert (sources["tcga"].mpp, sources["groups"].mpp, sources["kaggle"].mpp) == ("file", "unknown", 1.0)
    datalist = S.make_datalist(sources, data)
    scales = {r["source"]: (r["mpp"], r["scale"]) for r in S.resolve(datalist, data, "training", 0.25)}
    # an unknown pixel size: the tiles are used as read, as if at the working pixel size
    assert scales == {"kaggle": (1.0, 4.0), "tcga": (0.5, 2.0), "groups": (None, 1.0)}


def test_mpp_file_on_tiles_that_state_no_pixel_size_names_the_tile_and_the_fix(registry):
    from skimage.io import imsave

    path, data = registry
    image = data / "tcga" / "images" / "TCGA-A7-0001.tif"
    imsave(image.with_suffix(".png"), tifffile.imread(image), check_contrast=False)
    image.unlink()
    with pytest.raises(DataError) as info:
        S.make_datalist(S.load_sources(path, ["tcga"]), data)
    message = str(info.value)
    assert message.startswith(f"{image.with_suffix('.png')}: source 'tcga' has mpp 'file', but only TIFF files")
    assert "give source 'tcga' its mpp as a number in the sources file" in message


def test_the_datalist_carries_each_sources_license_citation_and_tile_counts(registry, tmp_path, caplog):
    path, data = registry
    caplog.set_level("INFO", logger="nucleiseg_monai.sources")
    datalist = S.prepare(data, tmp_path / "models" / "datalist.json", S.load_sources(path))
    facts = datalist["provenance"]
    assert facts["kaggle"] == {"license": "CC BY-NC-SA 4.0", "commercial_use": False, "citation": "",
                               "tiles": {"training": 5, "validation": 1, "test": 3}}
    assert facts["tcga"]["tiles"] == {"training": 3, "validation": 2, "test": 0}
    assert facts["tcga"]["license"] == "" and facts["tcga"]["commercial_use"] is None  # unknown, not allowed
    assert json.loads((tmp_path / "models" / "datalist.json").read_text())["provenance"] == facts  # written
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source ")]
    assert "source 'kaggle': 5 training, 1 validation, 3 test tiles; license CC BY-NC-SA 4.0, non-commercial" in lines
    assert any(line.startswith("source 'tcga'") and "license not stated" in line for line in lines)
    # the split and the keys every reader uses are as before
    assert set(datalist) == {"description", "sources", "training", "validation", "test", "channel_stats", "provenance"}
    assert datalist["sources"]["tcga"] == {"root": "tcga", "split": {"kind": "per_organ", "validation_per_organ": 1,
                                                                      "seed": 0}}


@pytest.mark.parametrize("license_, commercial", [
    ("CC BY-NC-SA 4.0", False), ("CC-BY-NC 4.0", False), ("non-commercial research only", False),
    ("CC BY 4.0", True), ("Apache-2.0", True), ("", None),
])
def test_commercial_use_follows_the_license_where_the_entry_does_not_say(registry, license_, commercial):
    path, _ = registry
    entries = json.loads(path.read_text())
    entries["tcga"]["license"] = license_
    path.write_text(json.dumps(entries))
    assert S.load_sources(path)["tcga"].commercial_use is commercial


def test_a_datalist_file_older_than_the_provenance_key_gets_it_from_the_registry(registry, tmp_path):
    path, data = registry
    sources = S.load_sources(path)
    old = S.make_datalist(sources, data)
    del old["provenance"]
    (tmp_path / "datalist.json").write_text(json.dumps(old))
    again = S.prepare(data, tmp_path / "datalist.json", sources)
    assert again["provenance"]["kaggle"]["license"] == "CC BY-NC-SA 4.0"
    assert [r["name"] for r in again["test"]] == [r["name"] for r in old["test"]]


def test_a_datalist_for_other_sources_says_to_pass_the_original_sources_file_or_another_datalist(registry,
                                                                                                 tmp_path):
    path, data = registry
    S.prepare(data, tmp_path / "datalist.json", S.load_sources(path))
    with pytest.raises(DataError) as info:  # a resume that forgot --sources_file: the shipped registry
        S.prepare(data, tmp_path / "datalist.json", S.load_sources())
    message = str(info.value)
    assert "pass that file again with --sources_file FILE" in message
    assert "pass --datalist_file with a new file's name" in message and "delete" not in message
    # each source that differs, once, by name: here every one of both files
    assert message.count("in the file,") == 6 and "kaggle: {'root': 'kaggle'" in message
    assert "cryonuseg: None in the file, {'root': 'cryonuseg'" in message


def test_all_zero_label_maps_are_listed_in_one_warning_and_kept(registry, caplog):
    path, data = registry
    empty = [data / "groups" / "labels" / f"human_liver_{i}.tif" for i in (0, 2)]
    for label in empty:
        tifffile.imwrite(label, np.zeros((64, 64), np.uint16))
    datalist = S.make_datalist(S.load_sources(path), data)
    assert sum(r["source"] == "groups" for p in S.PARTS for r in datalist[p]) == 8  # none refused
    lines = [r.getMessage() for r in caplog.records if "hold no nucleus" in r.getMessage()]
    assert lines == [f"source 'groups': 2 label map(s) hold no nucleus (all zero): {empty[0]}, {empty[1]}; if their "
                     "tiles do show nuclei, fix or remove these files"]


def test_generic_discovery_names_misnamed_extra_and_duplicate_files(registry, caplog):
    path, data = registry
    labels = data / "tcga" / "labels"
    sources = S.load_sources(path, ["tcga"])
    shutil.copy(labels / "TCGA-A7-0001.tif", labels / "TCGA-ZZ-9999.tif")  # a label without an image: warned
    S.discover_source(sources["tcga"], data)
    assert [r.getMessage() for r in caplog.records] == [
        f"1 label(s) in {labels} have no image in {data / 'tcga' / 'images'} and are left out: TCGA-ZZ-9999.tif"]
    (labels / "TCGA-A7-0001.tif").rename(labels / "TCGA-A7-0001_mask.tif")  # misnamed: its image has no label
    with pytest.raises(DataError) as info:
        S.discover_source(sources["tcga"], data)
    message = str(info.value)
    assert f"no label in {labels} for 1 image(s): {data / 'tcga' / 'images' / 'TCGA-A7-0001.tif'}" in message
    assert "matching no image, e.g. TCGA-A7-0001_mask.tif, TCGA-ZZ-9999.tif" in message
    assert "a label's file name must be its image's stem with a lossless suffix (.tif, .tiff, .png)" in message
    (labels / "TCGA-A7-0001_mask.tif").rename(labels / "TCGA-A7-0001.tif")
    shutil.copy(labels / "TCGA-AR-0002.tif", labels / "TCGA-AR-0002.png")  # two files, one stem
    with pytest.raises(DataError, match=f"{labels / 'TCGA-AR-0002.png'} and {labels / 'TCGA-AR-0002.tif'} have the "
                                        "same name 'TCGA-AR-0002'"):
        S.discover_source(sources["tcga"], data)


def test_own_tiles_split_for_evaluation_alone_need_no_training_tiles(registry, tmp_path, caplog):
    from nucleiseg_monai import cli
    from nucleiseg_monai.bundle import training_stats

    path, data = registry
    entries = json.loads(path.read_text())
    own = {"groups": entries["groups"] | {"split": {"kind": "groups", "validation": ["human_brain"],
                                                    "test": ["mouse_heart", "human_liver"]}}}
    path.write_text(json.dumps(own))
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.sources"):
        datalist = S.make_datalist(S.load_sources(path), data)
    assert datalist["training"] == [] and len(datalist["validation"]) == 2 and len(datalist["test"]) == 6
    assert datalist["channel_stats"] is None  # the weights evaluated bring the statistics they learnt with
    assert "no training tiles in these sources' splits: the datalist can serve evaluation" in caplog.text
    with pytest.raises(S.DataError, match="the datalist holds no training tiles"):  # nothing to train on
        training_stats(None, tmp_path / "channel_stats.json", None, False)
    args = ["datalist", "--data_root", str(data), "--sources_file", str(path), "--output", str(tmp_path / "dl.json")]
    caplog.clear()
    assert cli.main(args + ["--stats", str(tmp_path / "stats.json")]) == 2
    assert f"--stats {tmp_path / 'stats.json'}: the split leaves no training tiles" in caplog.text
    assert not (tmp_path / "stats.json").exists()
    assert cli.main(args) == 0 and json.loads((tmp_path / "dl.json").read_text())["channel_stats"] is None
