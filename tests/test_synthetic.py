import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.io import imread

from nucleiseg_monai import synthetic
from nucleiseg_monai.synthetic import make_slide, make_tile, write_dataset, write_slide


@pytest.fixture(scope="module")
def tile():
    return make_tile(192, n_nuclei=70, seed=5)


def test_same_seed_same_tile_other_seed_other_tile():
    a_img, a_lab = make_tile(96, n_nuclei=20, seed=3)
    b_img, b_lab = make_tile(96, n_nuclei=20, seed=3)
    c_img, c_lab = make_tile(96, n_nuclei=20, seed=4)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_lab, c_lab)


def test_tile_types_and_ids_are_exactly_one_to_n(tile):
    image, labels = tile
    assert image.shape == (192, 192, 3) and image.dtype == np.uint8
    assert labels.shape == (192, 192) and labels.dtype == np.uint32
    assert np.array_equal(np.unique(labels), np.arange(71))


def test_default_count_follows_density():
    _, labels = make_tile((128, 256), seed=1, density=200)
    assert labels.max() == round(200 * 128 * 256 / 512**2)


def test_every_nucleus_is_one_piece_of_plausible_size(tile):
    _, labels = tile
    areas = np.bincount(labels.ravel())[1:]
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[box] == i)[1] == 1, f"nucleus {i} is in several pieces"
    # radius ~4-14 px; border nuclei keep at least half of their area
    assert areas.min() >= 12 and areas.max() <= np.pi * 16**2 * 1.3
    assert 120 <= np.median(areas) <= 500


def test_some_nuclei_touch(tile):
    _, labels = tile
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        edge = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[edge].tolist(), b[edge].tolist())}
    assert len(pairs) >= 5


def test_nuclei_are_purple_on_pink(tile):
    image, labels = tile
    hed = rgb2hed(image)
    nuc, bg = labels > 0, ndimage.binary_dilation(labels > 0, iterations=3) == 0
    assert hed[nuc, 0].mean() > hed[bg, 0].mean() + 0.07  # haematoxylin
    assert image[nuc].mean() < image[bg].mean() - 60  # darker
    r, g, b = image[nuc].mean(0)
    assert b > r > g  # purple-blue
    r, g, b = image[bg].mean(0)
    assert r > b > g  # pink-magenta stroma
    assert (image[bg].min(axis=1) > 225).mean() > 0.005  # some white gaps


def test_too_many_nuclei_is_a_clear_error():
    with pytest.raises(ValueError, match="could only place"):
        make_tile(24, n_nuclei=8, seed=0)  # a 24 px image holds two or three; fewer asked, fewer tries


def test_slide_rendered_in_blocks_equals_one_piece():
    slide = make_slide((300, 260), seed=7)
    image, labels = slide.read_region(0, 0, 300, 260)
    ids_per_block = []
    for y, h in ((0, 97), (97, 150), (247, 53)):
        for x, w in ((0, 130), (130, 130)):
            im, lab = slide.read_region(y, x, h, w)
            assert np.array_equal(im, image[y:y + h, x:x + w])
            assert np.array_equal(lab, labels[y:y + h, x:x + w])
            ids_per_block.append(set(np.unique(lab)) - {0})
    straddling = [i for i in range(1, slide.n_nuclei + 1) if sum(i in ids for ids in ids_per_block) > 1]
    assert len(straddling) >= 5  # the seams cut through nuclei
    r_image, r_labels = slide.render(block=64)
    assert np.array_equal(r_image, image) and np.array_equal(r_labels, labels)
    assert slide.labels().dtype == np.uint32 and np.array_equal(slide.labels(), labels)  # without the image
    with pytest.raises(ValueError, match="not inside"):
        slide.read_region(250, 0, 100, 10)


def test_slide_centroids_match_labels():
    slide = make_slide(160, seed=2, n_nuclei=30)
    _, labels = slide.render()
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, np.arange(1, 31)))
    inside = np.all((slide.centroids > 20) & (slide.centroids < 140), axis=1)  # uncropped nuclei only
    error = np.hypot(*(centres[inside] - slide.centroids[inside]).T)
    assert np.median(error) < 0.5 and np.quantile(error, 0.9) < 3  # overlaps shift some visible centres


def test_tissue_blob_on_white_glass():
    slide = make_slide(256, seed=3, tissue=True)
    image, labels = slide.render()
    tissue = slide.tissue_mask()
    assert 0.2 < tissue.mean() < 0.6
    assert labels[~tissue].max() == 0 and labels.max() == slide.n_nuclei > 20
    glass = ndimage.binary_erosion(~tissue, iterations=6)
    assert image[glass].min() > 220
    assert np.array_equal(slide.tissue_mask(40, 50, 30, 20), tissue[40:70, 50:70])


def test_write_slide_tiled_tiff_roundtrip(tmp_path):
    slide = make_slide((200, 150), seed=4)
    path = write_slide(slide, tmp_path / "slide.tif", labels_path=tmp_path / "labels.tif", tile=64)
    image, labels = slide.render()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 64
        assert np.array_equal(page.asarray(), image)
    assert np.array_equal(tifffile.imread(tmp_path / "labels.tif"), labels)


def test_write_dataset_layout_and_masks(tmp_path):
    root = write_dataset(tmp_path / "ds", n_tiles=12, size=64, n_nuclei=6, seed=1)
    images = sorted(p.name for p in (root / "tissue images").iterdir())
    assert images[:3] == ["Human_AdrenalGland_01.tif", "Human_AdrenalGland_02.tif", "Human_Larynx_01.tif"]
    assert len(images) == 12 and all(re.fullmatch(r"Human_[A-Za-z]+_\d\d\.tif", n) for n in images)
    for name in images:
        stem = Path(name).stem
        image = tifffile.imread(root / "tissue images" / name)
        labels = tifffile.imread(root / "label masks modify" / name)
        binary = imread(root / "mask binary" / f"{stem}.png")
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert labels.dtype == np.uint16 and labels.max() == 6
        assert binary.dtype == np.uint8 and set(np.unique(binary)) <= {0, 255}
        assert np.array_equal(binary > 0, labels > 0)
    again = write_dataset(tmp_path / "again", n_tiles=2, size=64, n_nuclei=6, seed=1)
    assert np.array_equal(tifffile.imread(again / "tissue images" / images[0]),
                          tifffile.imread(root / "tissue images" / images[0]))


def test_write_dataset_binary_only(tmp_path):
    root = write_dataset(tmp_path, n_tiles=2, size=48, n_nuclei=4, with_instances=False)
    assert sorted(p.name for p in root.iterdir()) == ["mask binary", "tissue images"]


def test_write_dataset_names_match_the_real_dataset(tmp_path, cryonuseg_dir):
    root = write_dataset(tmp_path, n_tiles=30, size=32, n_nuclei=1)
    for folder in ("tissue images", "label masks modify", "mask binary"):
        ours = sorted(p.name for p in (root / folder).iterdir())
        real = sorted(p.name for p in (cryonuseg_dir / folder).iterdir())
        assert ours == real, folder
    with tifffile.TiffFile(cryonuseg_dir / "tissue images" / "Human_Larynx_01.tif") as real, \
            tifffile.TiffFile(root / "tissue images" / "Human_Larynx_01.tif") as mine:
        assert (mine.pages[0].dtype, mine.pages[0].photometric) == (real.pages[0].dtype, real.pages[0].photometric)
    assert synthetic.ORGANS == tuple(sorted({n.split("_")[1] for n in ours}))
