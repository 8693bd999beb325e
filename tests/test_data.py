"""nucleiseg_monai.data: discovery in both Kaggle layouts, validated reading, splits, channel statistics, a Kaggle
source through the datalist of nucleiseg_monai.sources, and the error raised for every kind of bad input (each must
name the offending file)."""

from __future__ import annotations

import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from nucleiseg_monai import data
from nucleiseg_monai import sources as S
from nucleiseg_monai.data import DataError, Sample
from nucleiseg_monai.synthetic import write_dataset

ORGANS4 = ("AdrenalGland", "Larynx", "Skin", "ThyroidGland")



def kaggle_datalist(folder: Path) -> dict:
    """The datalist of one Kaggle-layout source at ``folder``, split as CryoNuSeg is (these few tiles test
    discovery and reading, so a split without validation tiles is let through)."""
    source = S.Source(name="t", root=folder.name, layout="kaggle", mpp=0.25, organs="name",
                      split={"kind": "organ_stratified", "val_fraction": 0.15, "test_fraction": 0.3, "seed": 0})
    return S.make_datalist({"t": source}, folder.parent, require_validation=False)

def _samples(counts: dict[str, int]) -> list[Sample]:
    """Sample records without files: ``counts[organ]`` tiles per organ, named as in CryoNuSeg."""
    out = []
    for organ, n in counts.items():
        for i in range(1, n + 1):
            name = f"Human_{organ}_{i:02d}"
            image, label = Path(f"/img/{name}.tif"), Path(f"/lab/{name}.tif")
            out.append(Sample(name, data.organ_of(name), image, label, "instance"))
    return out


def _names(samples) -> list[str]:
    return [s.name for s in samples]


def _write_tile(root: Path, name: str, image: np.ndarray, labels: np.ndarray | None = None) -> None:
    """One tile in the flat Kaggle layout (image TIFF, optional uint16 instance TIFF)."""
    (root / data.IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / data.IMAGE_DIR / f"{name}.tif", image, photometric="rgb" if image.ndim == 3 else None)
    if labels is not None:
        (root / data.INSTANCE_DIR).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / data.INSTANCE_DIR / f"{name}.tif", labels)


def _raises_naming(path: Path, func, *args, match: str | None = None) -> str:
    """Calls func, expects a DataError (a ValueError) whose message names ``path``; returns the message."""
    with pytest.raises(DataError) as info:
        func(*args)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message, message
    if match is not None:
        assert match in message, message
    return message


# --- discovery ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, organ",
    [
        ("Human_AdrenalGland_01", "AdrenalGland"),
        ("Human_ThyroidGland_10", "ThyroidGland"),
        ("Human_Lymph-Nodes_3", "Lymph-Nodes"),
        ("Mouse_Kidney_02", "Kidney"),
        ("slide7_crop", "slide7_crop"),  # outside the convention: its own organ
    ],
)
def test_organ_of(name, organ):
    assert data.organ_of(name) == organ


def test_discover_flat_layout(tmp_path):
    write_dataset(tmp_path, n_tiles=4, size=32, organs=("Larynx", "Skin"))
    samples = data.discover(tmp_path)
    assert data.dataset_root(tmp_path) == tmp_path
    assert _names(samples) == ["Human_Larynx_01", "Human_Larynx_02", "Human_Skin_01", "Human_Skin_02"]
    assert [s.organ for s in samples] == ["Larynx", "Larynx", "Skin", "Skin"]
    for s in samples:
        assert s.image == tmp_path / "tissue images" / f"{s.name}.tif"
        assert s.label == tmp_path / "label masks modify" / f"{s.name}.tif"
        assert s.label_kind == "instance"


def test_discover_nested_layout(tmp_path):
    nested = tmp_path / "Annotator 1 (biologist)"
    write_dataset(nested, n_tiles=3, size=32, organs=("Pancreas",))
    assert data.dataset_root(tmp_path) == nested
    samples = data.discover(tmp_path)
    assert samples == data.discover(nested)
    assert _names(samples) == ["Human_Pancreas_01", "Human_Pancreas_02", "Human_Pancreas_03"]
    assert all(s.image.parent == nested / "tissue images" for s in samples)
    assert all(s.label.parent == nested / "label masks modify" for s in samples)
    # records are relative to the nested root, and resolve from the outer folder finds them again
    datalist = kaggle_datalist(tmp_path)
    parts = ("training", "validation", "test")
    records = sorted((r for k in parts for r in datalist[k]), key=lambda r: r["name"])
    assert [r["image"] for r in records] == [f"Annotator 1 (biologist)/tissue images/{s.name}.tif" for s in samples]
    resolved = sorted((r for k in parts for r in S.resolve(datalist, tmp_path.parent, k, 0.25)),
                      key=lambda r: r["name"])
    assert [Path(r["image"]) for r in resolved] == [s.image for s in samples]
    assert [Path(r["label"]) for r in resolved] == [s.label for s in samples]


def test_pairing_by_name_not_by_listing_order(tmp_path, monkeypatch):
    """Tile k has image value 10k and label id k; a mixed suffix (.png image) must still pair by name."""
    names = ["Human_Skin_03", "Human_Larynx_01", "Human_Skin_01", "Human_Larynx_02"]
    for k, name in enumerate(names, start=1):
        _write_tile(tmp_path, name, np.full((8, 8, 3), 10 * k, np.uint8), np.full((8, 8), k, np.uint16))
    # one image as PNG instead of TIFF
    png_name = names[2]
    (tmp_path / "tissue images" / f"{png_name}.tif").unlink()
    imsave(tmp_path / "tissue images" / f"{png_name}.png", np.full((8, 8, 3), 30, np.uint8), check_contrast=False)

    def check(samples):
        assert _names(samples) == sorted(names)
        for s in samples:
            assert data.read_image(s.image)[0, 0, 0] == 10 * data.read_instance_labels(s.label)[0, 0]
        assert next(s for s in samples if s.name == png_name).image.suffix == ".png"

    forward = data.discover(tmp_path)
    check(forward)
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=True)))
    backward = data.discover(tmp_path)
    check(backward)
    assert backward == forward


def _binary_dataset(root: Path) -> np.ndarray:
    """One tile with only a binary mask: squares A and B touch along an edge (one component), C and D only at a
    corner (two components under 4-connectivity), E stands alone. Returns the mask."""
    mask = np.zeros((32, 32), np.uint8)
    mask[2:8, 2:8] = 255  # A
    mask[2:8, 8:13] = 255  # B, touching A
    mask[18:23, 18:23] = 255  # C
    mask[23:27, 23:27] = 255  # D, diagonal neighbour of C
    mask[26:30, 2:6] = 255  # E
    _write_tile(root, "Human_Skin_01", np.full((32, 32, 3), 200, np.uint8))
    (root / data.BINARY_DIR).mkdir()
    imsave(root / data.BINARY_DIR / "Human_Skin_01.png", mask, check_contrast=False)
    return mask


def test_binary_only_dataset_gives_connected_components_and_warns_once(tmp_path, caplog):
    mask = _binary_dataset(tmp_path)
    caplog.set_level(logging.WARNING, logger="nucleiseg_monai.data")
    [sample] = data.discover(tmp_path)
    assert sample.label_kind == "binary"
    assert sample.label == tmp_path / "mask binary" / "Human_Skin_01.png"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "connected components" in warnings[0].getMessage() and str(tmp_path) in warnings[0].getMessage()

    labels = data.read_instance_labels(sample.label, sample.label_kind)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    assert np.array_equal(labels > 0, mask > 0)
    a, c, d, e = labels[2, 2], labels[18, 18], labels[26, 26], labels[28, 3]
    assert labels[2, 12] == a  # B merged with A: binary masks cannot separate touching nuclei
    assert len({a, c, d, e}) == 4 and 0 not in {a, c, d, e}
    assert len(np.unique(labels)) == 5  # background + 4 components

    # a whole datalist (discover + checks + split + stats) still warns exactly once
    caplog.clear()
    datalist = kaggle_datalist(tmp_path)
    assert [r["label_kind"] for r in datalist["training"]] == ["binary"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_instance_folder_preferred_over_binary(tmp_path, caplog):
    write_dataset(tmp_path, n_tiles=2, size=48, organs=("Testes",), n_nuclei=6)
    assert (tmp_path / "mask binary").is_dir()  # both kinds are on disk
    caplog.set_level(logging.WARNING, logger="nucleiseg_monai.data")
    samples = data.discover(tmp_path)
    assert not caplog.records
    for s in samples:
        assert s.label_kind == "instance" and s.label.parent.name == "label masks modify"
        on_disk = tifffile.imread(s.label)
        labels = data.read_instance_labels(s.label, s.label_kind)
        assert labels.dtype == np.int32 and np.array_equal(labels, on_disk)
        assert set(np.unique(labels)) == set(range(7))  # the 6 nuclei, not merged components


def test_instance_ids_kept_as_they_are(tmp_path):
    labels = np.zeros((16, 16), np.uint16)
    labels[1:5, 1:5] = 7
    labels[1:5, 5:9] = 300  # touching 7; ids not contiguous
    labels[10:14, 10:14] = 65535
    tifffile.imwrite(tmp_path / "l.tif", labels)
    out = data.read_instance_labels(tmp_path / "l.tif")
    assert out.dtype == np.int32 and np.array_equal(out, labels.astype(np.int32))


# --- splits ------------------------------------------------------------------------------------------------------

def _assert_partition(parts: dict, samples) -> None:
    names = [n for part in parts.values() for n in _names(part)]
    assert len(names) == len(set(names)), "parts overlap"
    assert sorted(names) == sorted(_names(samples)), "parts do not cover all samples"


def test_split_three_tiles_per_organ():
    samples = _samples({o: 3 for o in ORGANS4})
    parts = data.split(samples)  # val 0.15, test 0.3
    _assert_partition(parts, samples)
    # test: round(3 * 0.3) = 1 per organ; validation: round(12 * 0.15) = 2 tiles from 2 different organs
    assert [len(parts[k]) for k in ("training", "validation", "test")] == [6, 2, 4]
    assert Counter(s.organ for s in parts["test"]) == {o: 1 for o in ORGANS4}
    assert len({s.organ for s in parts["validation"]}) == 2
    assert Counter(s.organ for s in parts["training"]) == Counter(
        {o: 3 - 1 - sum(v.organ == o for v in parts["validation"]) for o in ORGANS4}
    )
    assert all(_names(p) == sorted(_names(p)) for p in parts.values())


def test_split_deterministic_and_independent_of_input_order():
    samples = _samples({"Skin": 3, "Larynx": 3, "Pleura": 2, "Thymus": 2, "Testes": 1, "Pancreas": 5})
    reference = data.split(samples, seed=0)
    assert data.split(samples, seed=0) == reference
    rng = random.Random(1)
    for _ in range(5):
        shuffled = samples[:]
        rng.shuffle(shuffled)
        assert data.split(shuffled, seed=0) == reference
    assert data.split(samples[::-1], seed=0) == reference
    assert data.split(samples, seed=1) != reference  # the seed matters


@pytest.mark.parametrize("test_fraction", [0.0, 0.3, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("val_fraction", [0.0, 0.15, 0.5])
def test_split_keeps_every_organ_in_training(val_fraction, test_fraction):
    counts = {"Skin": 1, "Larynx": 2, "Pleura": 3, "Thymus": 5}
    samples = _samples(counts)
    parts = data.split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=3)
    _assert_partition(parts, samples)
    assert {s.organ for s in parts["training"]} == set(counts)
    assert len(parts["validation"]) <= round(len(samples) * val_fraction)
    if test_fraction > 0:
        assert Counter(s.organ for s in parts["test"])["Pleura"] >= 1  # 3-tile organs always give one to test
    else:
        assert parts["test"] == []


def test_split_real_cryonuseg(cryonuseg_dir):
    samples = data.discover(cryonuseg_dir)
    assert len(samples) == 30 and Counter(s.organ for s in samples) == {o: 3 for o in {s.organ for s in samples}}
    parts = data.split(samples)
    _assert_partition(parts, samples)
    assert [len(parts[k]) for k in ("training", "validation", "test")] == [16, 4, 10]
    organs = {s.organ for s in samples}
    assert len(organs) == 10
    assert {s.organ for s in parts["training"]} == organs
    assert Counter(s.organ for s in parts["test"]) == {o: 1 for o in organs}


# --- channel statistics -------------------------------------------------------------------------------------------

def test_channel_stats_by_hand(tmp_path):
    # two pixels (0, 0, 0) and (2, 4, 6): mean (1, 2, 3), population std (1, 2, 3)
    tifffile.imwrite(tmp_path / "two.tif", np.array([[[0, 0, 0], [2, 4, 6]]], np.uint8), photometric="rgb")
    assert data.channel_stats([tmp_path / "two.tif"]) == {"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 3.0]}


def test_channel_stats_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((4, 5, 3), (3, 3, 3), (2, 7, 3))]
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"im{i}.{'png' if i == 1 else 'tif'}"
        (imsave(path, image, check_contrast=False) if i == 1 else tifffile.imwrite(path, image, photometric="rgb"))
        paths.append(path)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    stats = data.channel_stats(paths)
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=0, atol=1e-4)
    with pytest.raises(DataError):
        data.channel_stats([])


# --- bad inputs: each error names the file -----------------------------------------------------------------------

def test_missing_dataset_folder(tmp_path):
    _raises_naming(tmp_path / "nope", data.discover, tmp_path / "nope", match="does not exist")


def test_folder_without_tissue_images(tmp_path):
    (tmp_path / "label masks modify").mkdir()
    _raises_naming(tmp_path, data.discover, tmp_path, match="tissue images")


def test_image_without_label(tmp_path):
    write_dataset(tmp_path, n_tiles=3, size=32, organs=("Skin",))
    (tmp_path / "label masks modify" / "Human_Skin_02.tif").unlink()
    _raises_naming(tmp_path / "tissue images" / "Human_Skin_02.tif", data.discover, tmp_path, match="no label")


def test_label_without_image(tmp_path):
    write_dataset(tmp_path, n_tiles=3, size=32, organs=("Skin",))
    (tmp_path / "tissue images" / "Human_Skin_03.tif").unlink()
    _raises_naming(tmp_path / "label masks modify" / "Human_Skin_03.tif", data.discover, tmp_path,
                   match="without an image")


def test_size_mismatch(tmp_path):
    _write_tile(tmp_path, "Human_Skin_01", np.zeros((32, 32, 3), np.uint8), np.zeros((32, 40), np.uint16))
    [sample] = data.discover(tmp_path)
    message = _raises_naming(sample.image, data.check_sample, sample, match="size mismatch")
    assert str(sample.label) in message
    _raises_naming(sample.label, kaggle_datalist, tmp_path)  # checked before any split is made


def test_grayscale_image_refused(tmp_path):
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    _raises_naming(path, data.read_image, path, match="greyscale")


def test_rgba_transparent_refused_opaque_converted(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    opaque = tmp_path / "opaque.png"
    imsave(opaque, rgba, check_contrast=False)
    image = data.read_image(opaque)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and np.array_equal(image, rgba[..., :3])

    rgba[3, 4, 3] = 128
    for path in (tmp_path / "transparent.png", tmp_path / "transparent.tif"):
        (imsave(path, rgba, check_contrast=False) if path.suffix == ".png"
         else tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"]))
        _raises_naming(path, data.read_image, path, match="transparent")


def test_16bit_image_refused(tmp_path):
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint16), photometric="rgb")
    _raises_naming(path, data.read_image, path, match="uint16")


@pytest.mark.parametrize("keep", [0.5, 0.95, "header"])
def test_truncated_tiff(tmp_path, keep):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),
                     photometric="rgb")
    content = path.read_bytes()
    path.write_bytes(content[:8] if keep == "header" else content[: int(len(content) * keep)])
    message = _raises_naming(path, data.read_image, path)
    assert "damaged" in message


def test_a_missing_tile_is_named_as_missing_not_damaged(tmp_path):
    message = _raises_naming(tmp_path / "gone.tif", data.read_image, tmp_path / "gone.tif")
    assert "does not exist" in message and "--data_root" in message and "damaged" not in message


def test_truncated_png_and_label(tmp_path):
    path = tmp_path / "cut.png"
    imsave(path, np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), check_contrast=False)
    path.write_bytes(path.read_bytes()[:200])
    _raises_naming(path, data.read_image, path, match="cannot read")
    label = tmp_path / "cut_label.tif"
    tifffile.imwrite(label, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    label.write_bytes(label.read_bytes()[:4000])
    _raises_naming(label, data.read_instance_labels, label, match="cannot read")


def test_label_map_with_three_dims_refused(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((2, 16, 16), np.uint16))
    _raises_naming(stack, data.read_instance_labels, stack, match="single-channel")
    rgb = tmp_path / "rgb_label.tif"
    coded = np.zeros((16, 16, 3), np.uint8)
    coded[2:6, 2:6] = (255, 0, 0)  # one colour per nucleus
    coded[8:12, 8:12] = (0, 0, 255)
    tifffile.imwrite(rgb, coded, photometric="rgb")
    _raises_naming(rgb, data.read_instance_labels, rgb, "instance", match="if it colour-codes the nuclei (one colour each, black background), turn it into ids with np.unique")


def test_palette_pngs_and_ids_copied_into_three_channels_read_as_ids(tmp_path):
    from PIL import Image

    ids = np.zeros((16, 16), np.uint8)
    ids[2:6, 2:6], ids[8:12, 8:12] = 1, 2
    palette = Image.fromarray(ids, mode="P")  # annotation tools write these; imageio gives the palette's colours
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(data.read_instance_labels(tmp_path / "palette.png"), ids)
    imsave(tmp_path / "grey_rgb.png", np.repeat(ids[..., None], 3, axis=2), check_contrast=False)
    assert np.array_equal(data.read_instance_labels(tmp_path / "grey_rgb.png"), ids)
    # a colour-coded map saved indexed, black at index 2: its indices are no ids (the background would be one)
    palette = Image.fromarray((ids + 1) % 3, mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0] + [0] * 759)
    palette.save(tmp_path / "indexed_colours.png")
    _raises_naming(tmp_path / "indexed_colours.png", data.read_instance_labels, tmp_path / "indexed_colours.png",
                   match="if it colour-codes the nuclei")


def test_lossy_label_maps_and_negative_ids_are_refused_naming_the_file(tmp_path):
    jpeg = tmp_path / "mask.jpg"
    imsave(jpeg, np.pad(np.full((8, 8), 255, np.uint8), 4), check_contrast=False)
    _raises_naming(jpeg, data.read_instance_labels, jpeg, match="JPEG label map: lossy compression")
    _raises_naming(jpeg, data.is_binary_mask, jpeg, match="save label maps losslessly, as PNG or TIFF")
    negative = tmp_path / "negative.tif"
    tifffile.imwrite(negative, np.array([[0, 1], [-1, 2]], np.int16))
    _raises_naming(negative, data.read_instance_labels, negative, match="negative ids (down to -1)")


def test_float_label_map_refused(tmp_path):
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.float32))
    _raises_naming(path, data.read_instance_labels, path, match="integer")


def test_labels_nested_under_annotator_1_with_images_at_the_top(tmp_path):
    # the newer Kaggle archive: 'tissue images/' at the top, each annotator's labels in its own folder
    dataset = write_dataset(tmp_path / "ds", n_tiles=4, size=32, organs=ORGANS4)
    nested = dataset / data.NESTED_DIR
    nested.mkdir()
    for sub in (data.INSTANCE_DIR, data.BINARY_DIR):
        shutil.move(str(dataset / sub), str(nested / sub))
    samples = data.discover(dataset)
    assert len(samples) == 4 and all(s.label_kind == "instance" for s in samples)
    assert all(s.label.parent == nested / data.INSTANCE_DIR for s in samples)


def test_load_stats_names_a_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="channel_stats.json are missing"):
        data.load_stats(tmp_path / "channel_stats.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": [1, 2, 3]}')
    with pytest.raises(data.DataError, match=r"bad.json.*expected JSON"):
        data.load_stats(bad)
    good = tmp_path / "good.json"
    good.write_text('{"mean": [1, 2, 3], "std": [4, 5, 6]}')
    assert data.load_stats(good) == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}


def _disc_map(n: int, dtype) -> np.ndarray:
    """Nuclei 1..n as discs of radius 3 (29 px) on a 20-wide grid 12 px apart, in raster order, their ids cast to
    ``dtype`` as saving does (uint8 keeps them modulo 256: nucleus 256 becomes background, 257 on reuse ids 1, 2...)."""
    yy, xx = np.mgrid[-6:6, -6:6]
    disc = yy**2 + xx**2 <= 9
    ids = np.zeros((12 * ((n + 19) // 20), 240), np.int64)
    for k in range(1, n + 1):
        row, col = divmod(k - 1, 20)
        ids[12 * row:12 * row + 12, 12 * col:12 * col + 12][disc] = k
    return ids.astype(dtype)


def test_uint8_label_map_whose_ids_wrapped_is_refused(tmp_path):
    wrapped = _disc_map(300, np.uint8)
    assert wrapped.max() == 255 and (wrapped == 1).sum() == 2 * 29  # nuclei 1 and 257
    tifffile.imwrite(tmp_path / "wrapped.tif", wrapped)
    imsave(tmp_path / "wrapped.png", wrapped, check_contrast=False)
    for path in (tmp_path / "wrapped.tif", tmp_path / "wrapped.png"):
        # nuclei 257-300 share ids 1-44 with nuclei 256 places (about 13 grid rows) earlier
        _raises_naming(path, data.read_instance_labels, path,
                       match="ids seem to have wrapped at 255: 44 ids each mark nuclei far apart")
        message = _raises_naming(path, data.is_binary_mask, path)
        assert "ids again as 16-bit" in message and "ids.astype(np.uint16)" in message


def test_uint8_map_of_255_nuclei_and_uint16_map_of_300_pass_the_wrap_check(tmp_path):
    full = _disc_map(255, np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", full)
    assert np.array_equal(data.read_instance_labels(tmp_path / "full.tif"), full)
    # two ids with a far piece each (in the empty end of the last grid row), as a real annotation's quirks may give:
    # fewer than wrapping leaves
    quirks = full.copy()
    quirks[-6:-2, -6:-2], quirks[-6:-2, -18:-14] = 1, 2
    assert data._far_apart_ids(quirks) == 2
    refused = quirks.copy()  # a third such id: as many as a map of 259 nuclei saved as uint8 shares
    refused[-6:-2, -30:-26] = 3
    assert data._far_apart_ids(refused) == data.WRAP_MIN_IDS == 3
    tifffile.imwrite(tmp_path / "refused.tif", refused)
    _raises_naming(tmp_path / "refused.tif", data.read_instance_labels, tmp_path / "refused.tif",
                   match="3 ids each mark nuclei far apart")
    # 257 nuclei saved as uint8: nucleus 256 vanishes and 257 shares id 1, too few shared ids to tell from a quirk
    assert data._far_apart_ids(_disc_map(257, np.uint8)) == 1
    tifffile.imwrite(tmp_path / "quirks.tif", quirks)
    assert np.array_equal(data.read_instance_labels(tmp_path / "quirks.tif"), quirks)
    wide = _disc_map(300, np.uint16)
    tifffile.imwrite(tmp_path / "wide.tif", wide)
    assert np.array_equal(data.read_instance_labels(tmp_path / "wide.tif"), wide)
    # a binary 0/255 mask: one id of many pieces, no wrapping
    mask = np.where(full > 0, 255, 0).astype(np.uint8)
    imsave(tmp_path / "mask.png", mask, check_contrast=False)
    assert data.is_binary_mask(tmp_path / "mask.png")
