"""nucleiseg_monai.transforms: the 3-class target on hand-built maps, image/label alignment through the random
train pipeline, determinism, per-worker randomness, the HED stain jitter, and the deterministic eval pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Randomizable
from monai.utils import set_determinism
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.io import imread
from skimage.measure import label as connected_components

from nucleiseg_monai import transforms as T
from nucleiseg_monai.data import discover, read_image, read_instance_labels
from nucleiseg_monai.synthetic import make_tile, write_dataset

torch.set_num_threads(1)

IDENTITY = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # mean, std: z-scoring that changes nothing
INTENSITY_TRANSFORMS = (T.RandHEDJitterd, T.RandAdjustContrastd, T.RandScaleIntensityd, T.RandShiftIntensityd)


@pytest.fixture(autouse=True)
def _free_global_seed():
    yield
    set_determinism(None)


def _as_item(image_hwc: np.ndarray, labels: np.ndarray) -> dict:
    """What LoadTiled produces: float32 (3, H, W) on the 0-255 scale and int32 (1, H, W) ids."""
    return {"image": torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)).astype(np.float32)),
            "label": torch.from_numpy(labels.astype(np.int32)[None])}


def _sparse_tile(size: int = 96, n_nuclei: int = 20, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic tile whose ids are far apart (k -> 977 k + 50), so an interpolated id cannot pass for a real one."""
    image, labels = make_tile(size, n_nuclei=n_nuclei, seed=seed)
    return image, np.where(labels > 0, labels.astype(np.int64) * 977 + 50, 0).astype(np.int32)


# --- the 3-class target ------------------------------------------------------------------------------------------

def test_encode_two_touching_squares():
    labels = np.zeros((8, 11), np.int32)
    labels[2:6, 1:5] = 3
    labels[2:6, 5:9] = 8  # shares the column 4 / column 5 edge with nucleus 3
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0],
        [0, 2, 1, 1, 2, 2, 1, 1, 2, 0, 0],
        [0, 2, 1, 1, 2, 2, 1, 1, 2, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], np.uint8)
    classes = T.encode_three_class(labels)
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, expected)


def test_encode_unequal_touching_nuclei_counts():
    labels = np.zeros((9, 13), np.int64)
    labels[1:6, 1:7] = 40  # 5 x 6: interior 3 x 4 = 12, rim 30 - 12 = 18
    labels[2:6, 7:11] = 2  # 4 x 4 touching it: interior 2 x 2 = 4, rim 12
    classes = T.encode_three_class(labels)
    assert (classes == 1).sum() == 16 and (classes == 2).sum() == 30
    assert np.all(classes[labels == 0] == 0)
    assert np.all(classes[2:6, 6] == 2) and np.all(classes[2:6, 7] == 2)  # both sides of the contact
    assert np.all(classes[2:5, 2:6] == 1) and np.all(classes[3:5, 8:10] == 1)


def test_encode_image_edge_and_single_pixel():
    labels = np.zeros((8, 8), np.int32)
    labels[0:4, 0:4] = 1  # at the image corner: the image edge is not a rim, only the sides facing background
    labels[6, 6] = 5  # one pixel: all rim
    labels[5:8, 2:5] = 9  # 3 x 3 on the bottom edge
    classes = T.encode_three_class(labels)
    expected_corner = np.array([[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 1, 2], [2, 2, 2, 2]], np.uint8)
    np.testing.assert_array_equal(classes[0:4, 0:4], expected_corner)
    assert classes[6, 6] == 2
    # the 3 x 3 piece touching the bottom edge: rim on top/left/right, the bottom row centre stays interior
    np.testing.assert_array_equal(classes[5:8, 2:5], [[2, 2, 2], [2, 1, 2], [2, 1, 2]])


def test_encode_one_id_in_two_pieces():
    labels = np.zeros((7, 12), np.int32)
    labels[1:6, 1:5] = 4
    labels[1:6, 7:11] = 4  # same id, separate piece: both get rims and interiors
    classes = T.encode_three_class(labels)
    for piece in (classes[1:6, 1:5], classes[1:6, 7:11]):
        assert (piece == 2).sum() == 14 and (piece == 1).sum() == 6


def test_three_class_targetd_keeps_ids():
    labels = np.zeros((1, 8, 11), np.float32)  # ids arrive as float after a nearest-neighbour resampling
    labels[0, 2:6, 1:5] = 3
    labels[0, 2:6, 5:9] = 70000
    out = T.ThreeClassTargetd("label")({"label": torch.from_numpy(labels)})
    assert out["label_inst"].dtype == torch.int32
    np.testing.assert_array_equal(np.asarray(out["label_inst"]), labels.astype(np.int32))
    assert out["label"].dtype == torch.int64 and tuple(out["label"].shape) == (1, 8, 11)
    np.testing.assert_array_equal(np.asarray(out["label"])[0], T.encode_three_class(labels[0].astype(np.int32)))


# --- the random train pipeline -----------------------------------------------------------------------------------

def _colour_of(rank: np.ndarray) -> np.ndarray:
    """(3, ...) colour that identifies a nucleus rank (0 = background) exactly."""
    rank = rank.astype(np.float64)
    return np.stack([10.0 * rank, 255.0 - 10.0 * rank, np.full_like(rank, 128.0)])


def _misaligned_pixels(image: np.ndarray, label_inst: np.ndarray) -> tuple[int, int]:
    """(checked, wrong): pixels whose 5 x 5 neighbourhood holds one id (away from the patch edge), and how many
    of them do not show that id's colour. Nearer a contour bilinear image sampling legitimately mixes colours."""
    rank = np.where(label_inst > 0, (label_inst - 50) // 977, 0)
    hi = ndimage.maximum_filter(label_inst, 5, mode="constant", cval=-1)
    lo = ndimage.minimum_filter(label_inst, 5, mode="constant", cval=-1)
    inside = hi == lo
    wrong = np.abs(image - _colour_of(rank)).max(0) > 1e-3
    return int(inside.sum()), int((inside & wrong).sum())


def test_image_and_labels_stay_aligned_through_spatial_augmentation():
    """The image colour encodes the nucleus id; after every random spatial step each pixel inside a nucleus must
    still show its own id's colour. The stain/intensity steps are switched off (prob 0) so colour is preserved."""
    _, labels = _sparse_tile()
    rank = np.where(labels > 0, (labels - 50) // 977, 0)
    item = _as_item(_colour_of(rank).transpose(1, 2, 0), labels)
    outputs = []
    for seed in range(8):
        set_determinism(seed)
        pipeline = T.train_transforms(*IDENTITY, patch_size=(64, 64), load=False)
        for t in pipeline.transforms:
            if isinstance(t, INTENSITY_TRANSFORMS):
                t.prob = 0.0
        out = pipeline(item)
        image, label_inst = out["image"].numpy(), out["label_inst"][0].numpy()
        checked, wrong = _misaligned_pixels(image, label_inst)
        assert checked > 1500 and wrong == 0, (seed, checked, wrong)
        assert (np.unique(label_inst) > 0).sum() >= 3
        outputs.append(label_inst)
        # the check is sensitive: the same output with the image turned by 90 degrees fails it
        assert _misaligned_pixels(np.rot90(image, 1, (1, 2)).copy(), label_inst)[1] > 100
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(outputs, 2))  # really random


def test_ids_after_augmentation_are_original_and_target_matches():
    image, labels = _sparse_tile()
    original_ids = set(np.unique(labels).tolist())
    item = _as_item(image, labels)
    set_determinism(11)
    pipeline = T.train_transforms(*IDENTITY, patch_size=(64, 64), load=False)
    for _ in range(8):
        out = pipeline(item)
        assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == (3, 64, 64)
        assert out["label"].dtype == torch.int64 and tuple(out["label"].shape) == (1, 64, 64)
        assert out["label_inst"].dtype == torch.int32 and tuple(out["label_inst"].shape) == (1, 64, 64)
        assert torch.isfinite(out["image"]).all()
        inst = out["label_inst"][0].numpy()
        assert set(np.unique(inst).tolist()) <= original_ids  # carried, never interpolated
        np.testing.assert_array_equal(out["label"][0].numpy(), T.encode_three_class(inst))


@pytest.mark.parametrize("patch", [(64, 48), (40, 56)])
def test_non_square_patch_shape(patch):
    image, labels = _sparse_tile(size=80, n_nuclei=8)
    set_determinism(0)
    pipeline = T.train_transforms(*IDENTITY, patch_size=patch, load=False)
    for _ in range(10):  # enough for odd 90-degree turns to occur
        out = pipeline(_as_item(image, labels))
        assert tuple(out["image"].shape[1:]) == patch and tuple(out["label_inst"].shape[1:]) == patch


def test_train_pipeline_loads_from_disk(tmp_path):
    write_dataset(tmp_path, n_tiles=1, size=96, organs=("Skin",), n_nuclei=12)
    [sample] = discover(tmp_path)
    file_ids = set(np.unique(read_instance_labels(sample.label)).tolist())
    set_determinism(2)
    out = T.train_transforms([180.0, 140.0, 190.0], [40.0, 45.0, 30.0], patch_size=(64, 64))(sample.record())
    assert tuple(out["image"].shape) == (3, 64, 64)
    assert set(np.unique(out["label_inst"].numpy()).tolist()) <= file_ids


def test_set_determinism_reproduces_outputs():
    image, labels = _sparse_tile()
    item = _as_item(image, labels)

    def run(seed):
        set_determinism(seed)
        pipeline = T.train_transforms([150.0, 120.0, 160.0], [50.0, 50.0, 40.0], patch_size=(64, 64), load=False)
        return [pipeline(item) for _ in range(3)]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again):
        for key in ("image", "label", "label_inst"):
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(first[0]["image"], first[1]["image"])  # successive calls differ
    assert not torch.equal(first[0]["image"], other[0]["image"])  # the seed matters


def _epoch(seed: int, item: dict, n: int = 8) -> list[torch.Tensor]:
    set_determinism(seed)
    dataset = Dataset([item] * n, transform=T.train_transforms(*IDENTITY, patch_size=(48, 48), load=False))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, shuffle=False)
    return [torch.cat([batch["image"][0], batch["label_inst"][0].float()]) for batch in loader]


def test_dataloader_workers_draw_different_augmentations_reproducibly():
    """Identical items through 2 workers: every item gets its own augmentation (forked workers must not share one
    random state), and the same seed gives the same epoch."""
    image, labels = _sparse_tile(size=64, n_nuclei=10)
    item = _as_item(image, labels)
    first = _epoch(21, item)
    assert len(first) == 8
    for (i, a), (j, b) in itertools.combinations(enumerate(first), 2):
        assert not torch.equal(a, b), f"items {i} and {j} got the same augmentation"
    second = _epoch(21, item)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- stain jitter ------------------------------------------------------------------------------------------------

def test_hed_jitter_scales_haematoxylin_as_drawn():
    """On a flat purple image the stain concentrations that skimage's rgb2hed reads back follow c * alpha + beta.
    The transform works in log10 optical density, rgb2hed in ln(OD) / ln(1e6) = log10(OD) / 6: alpha carries over,
    beta is divided by 6."""
    flat = np.zeros((3, 6, 6), np.float32)
    flat[:] = np.array([150.0, 90.0, 170.0], np.float32)[:, None, None]
    before = rgb2hed(flat.transpose(1, 2, 0) / 255.0)[0, 0]
    for seed in range(4):
        jitter = T.RandHEDJitterd("image", prob=1.0, sigma=0.3, bias=0.1)
        jitter.set_random_state(seed)
        out = jitter({"image": torch.from_numpy(flat)})["image"]
        assert out.dtype == torch.float32 and tuple(out.shape) == flat.shape
        assert torch.all(out == out[:, :1, :1])  # one draw per image: a flat image stays flat
        after = rgb2hed(out.numpy().transpose(1, 2, 0) / 255.0)[0, 0]
        predicted = jitter.alpha * before + jitter.beta / 6.0
        assert abs(predicted[0] - before[0]) > 2e-3  # the draw changes the haematoxylin noticeably
        np.testing.assert_allclose(after[:2], predicted[:2], rtol=0, atol=5e-4)  # H and E


def test_restain_scales_one_stain_and_leaves_the_others():
    """A fixed shift, as benchmarks/stain_shift.py applies it: haematoxylin at 0.7x on a flat purple image reads
    back (skimage's rgb2hed) as 0.7 of its haematoxylin with its eosin unchanged; alpha 1, beta 0 is the round trip."""
    flat = np.zeros((3, 4, 4), np.float32)
    flat[:] = np.array([150.0, 90.0, 170.0], np.float32)[:, None, None]
    before = rgb2hed(flat.transpose(1, 2, 0) / 255.0)[0, 0]
    after = rgb2hed(T.restain(flat, (0.7, 1.0, 1.0)).numpy().transpose(1, 2, 0) / 255.0)[0, 0]
    np.testing.assert_allclose(after[:2], [0.7 * before[0], before[1]], rtol=0, atol=5e-4)
    np.testing.assert_allclose(T.restain(flat, (1.0, 1.0, 1.0)).numpy(), flat, atol=0.05)


def test_pale_nuclei_lighten_the_chosen_nuclei_only():
    """Every nucleus chosen (share 1) at factor 0.5: each nucleus pixel is the image restained with haematoxylin at
    0.5x (``restain``, checked against skimage above), every background pixel and the labels stay as they were.
    Share 0 changes nothing; factors drawn from a range stay in it, one per nucleus."""
    image, labels = _sparse_tile(size=96)
    item = _as_item(image, labels)
    inside, outside = labels > 0, labels == 0
    out = T.RandPaleNucleid(prob=1.0, share=1.0, factor=(0.5, 0.5))(dict(item))
    np.testing.assert_array_equal(out["label"].numpy(), item["label"].numpy())
    pale = T.restain(item["image"], (0.5, 1.0, 1.0)).numpy()
    np.testing.assert_allclose(out["image"].numpy()[:, inside], pale[:, inside], atol=1e-3)
    np.testing.assert_allclose(out["image"].numpy()[:, outside], item["image"].numpy()[:, outside], atol=0.05)
    assert (out["image"].numpy()[:, inside].sum(0) > item["image"].numpy()[:, inside].sum(0) + 1).mean() > 0.9
    before = rgb2hed(item["image"].numpy().transpose(1, 2, 0) / 255.0)

    none = T.RandPaleNucleid(prob=1.0, share=0.0)
    assert none(dict(item))["image"] is item["image"]

    drawn = T.RandPaleNucleid(prob=1.0, share=1.0, factor=(0.4, 0.8))
    drawn.set_random_state(3)
    ratio = rgb2hed(drawn(dict(item))["image"].numpy().transpose(1, 2, 0) / 255.0)[..., 0] / before[..., 0]
    per_nucleus = [np.median(ratio[labels == k]) for k in np.unique(labels[inside])]
    assert all(0.39 < r < 0.81 for r in per_nucleus) and np.ptp(per_nucleus) > 0.1
    for k in np.unique(labels[inside]):  # one factor per nucleus
        assert np.ptp(ratio[(labels == k) & (before[..., 0] > 0.05)]) < 0.02


def test_pale_nuclei_with_soft_edges_blend_into_their_surroundings():
    """With ``edge``, a lightened nucleus's centre is as without it, and the lightening fades out across its outline:
    background just outside is a little paler, background far from every nucleus untouched."""
    image, labels = _sparse_tile(size=96)
    item = _as_item(image, labels)
    sharp = T.RandPaleNucleid(prob=1.0, share=1.0, factor=(0.5, 0.5))(dict(item))["image"].numpy()
    soft = T.RandPaleNucleid(prob=1.0, share=1.0, factor=(0.5, 0.5), edge=1.5)(dict(item))["image"].numpy()
    dist_in = ndimage.distance_transform_edt(labels > 0)
    dist_out = ndimage.distance_transform_edt(labels == 0)
    centre, rim_out, far = dist_in >= 6, (dist_out > 0) & (dist_out <= 1), dist_out >= 8
    assert centre.any() and rim_out.any() and far.any()
    np.testing.assert_allclose(soft[:, centre], sharp[:, centre], atol=0.5)
    original = item["image"].numpy()
    assert np.abs(sharp[:, rim_out] - original[:, rim_out]).max() < 0.05
    h = lambda im: rgb2hed(im.transpose(1, 2, 0) / 255.0)[..., 0]
    assert (h(soft)[rim_out] < h(original)[rim_out] - 1e-3).mean() > 0.9
    np.testing.assert_allclose(soft[:, far], original[:, far], atol=0.05)


def test_train_pipeline_pales_nuclei_only_when_asked():
    steps = lambda share, edge=0.0: [t for t in T.train_transforms(*IDENTITY, load=False, pale_nuclei=share,
                                                                   pale_nuclei_edge=edge).transforms
                                     if isinstance(t, T.RandPaleNucleid)]
    assert steps(0.0) == []
    assert [(t.prob, t.edge) for t in steps(0.5)] == [(0.5, 0.0)]
    assert [(t.prob, t.edge) for t in steps(0.5, 1.5)] == [(0.5, 1.5)]


def test_hed_jitter_range_identity_and_prob():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 16, 16)).astype(np.float32)
    image[:, 0, 0], image[:, 0, 1] = 0.0, 255.0
    item = {"image": torch.from_numpy(image)}
    strong = T.RandHEDJitterd("image", prob=1.0, sigma=0.9, bias=0.5)
    for seed in range(5):
        strong.set_random_state(seed)
        out = strong(item)["image"]
        assert tuple(out.shape) == image.shape and 0.0 <= float(out.min()) and float(out.max()) <= 255.0
    neutral = T.RandHEDJitterd("image", prob=1.0, sigma=0.0, bias=0.0)  # alpha 1, beta 0: the stain round trip
    np.testing.assert_allclose(neutral(item)["image"].numpy(), image, atol=0.05)
    never = T.RandHEDJitterd("image", prob=0.0, sigma=0.5, bias=0.5)
    assert torch.equal(never(item)["image"], item["image"])


# --- the eval pipeline -------------------------------------------------------------------------------------------

def test_eval_transforms_are_deterministic_and_keep_file_labels(tmp_path):
    write_dataset(tmp_path, n_tiles=2, size=48, organs=("Skin",), n_nuclei=8)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    pipeline = T.eval_transforms(mean, std)
    assert not any(isinstance(t, Randomizable) for t in pipeline.transforms)
    for sample in discover(tmp_path):
        record = sample.record()
        out, again = pipeline(record), pipeline(record)
        for key in ("image", "label", "label_inst"):
            assert torch.equal(out[key], again[key])
        rgb = read_image(sample.image).astype(np.float64)
        expected = (rgb - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(out["image"].numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-4)
        on_disk = read_instance_labels(sample.label)
        assert out["label_inst"].dtype == torch.int32
        np.testing.assert_array_equal(out["label_inst"][0].numpy(), on_disk)
        np.testing.assert_array_equal(out["label"][0].numpy(), T.encode_three_class(on_disk))
        unlabelled = T.eval_transforms(mean, std, with_label=False)({"image": record["image"]})
        assert "label" not in unlabelled and "label_inst" not in unlabelled
        assert torch.equal(unlabelled["image"], out["image"])
        assert out["image_path"] == unlabelled["image_path"] == str(sample.image)


def test_eval_transforms_binary_labels_and_size_mismatch(tmp_path):
    write_dataset(tmp_path / "bin", n_tiles=1, size=48, organs=("Skin",), n_nuclei=8, with_instances=False)
    [sample] = discover(tmp_path / "bin")
    assert sample.label_kind == "binary"
    out = T.eval_transforms(*IDENTITY)(sample.record())
    mask = imread(sample.label) > 0
    np.testing.assert_array_equal(out["label_inst"][0].numpy(), connected_components(mask, connectivity=1))

    mismatch = {"image": str(sample.image), "label": str(tmp_path / "small.tif"), "label_kind": "instance"}
    tifffile.imwrite(mismatch["label"], np.zeros((40, 48), np.uint16))
    with pytest.raises(ValueError, match="size mismatch") as info:
        T.LoadTiled()(mismatch)
    assert mismatch["label"] in str(info.value) and mismatch["image"] in str(info.value)


def test_train_pipeline_takes_its_stain_jitter_from_the_config():
    default = [t for t in T.train_transforms(*IDENTITY, load=False).transforms if isinstance(t, T.RandHEDJitterd)]
    strong = [t for t in T.train_transforms(*IDENTITY, load=False, stain_jitter=[0.15, 0.05]).transforms
              if isinstance(t, T.RandHEDJitterd)]
    assert [(t.sigma, t.bias) for t in default] == [(0.05, 0.02)]
    assert [(t.sigma, t.bias) for t in strong] == [(0.15, 0.05)]


def test_blur_softens_the_image_only_and_only_when_asked():
    image, labels = _sparse_tile(size=96)
    item = _as_item(image, labels)
    steps = lambda blur: [t for t in T.train_transforms(*IDENTITY, load=False, blur=blur).transforms
                          if isinstance(t, T.RandGaussianSmoothd)]
    assert steps(0.0) == []
    (blur,) = steps(1.0)
    blur.set_random_state(0)
    out = blur(dict(item))
    before, after = np.asarray(item["image"], np.float64), np.asarray(out["image"], np.float64)
    # high frequencies (differences between neighbours) drop; the mean colour and the labels stay
    assert (blur.rand_smooth.sigma_x, blur.rand_smooth.sigma_y) == (T.BLUR_SIGMA, T.BLUR_SIGMA)
    assert np.abs(np.diff(after, axis=-1)).mean() < 0.9 * np.abs(np.diff(before, axis=-1)).mean()
    np.testing.assert_allclose(after.mean(axis=(1, 2)), before.mean(axis=(1, 2)), rtol=0.02)
    np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(item["label"]))


def test_scale_jitter_sets_the_range_of_nucleus_sizes_in_training_patches():
    # one disc through the elastic+affine step alone, rotation off: the ratio of its heights and widths with and
    # without the jitter (the same seed) spreads as the drawn scale of each axis
    yy, xx = np.mgrid[:160, :160]
    labels = (((yy - 80) ** 2 + (xx - 80) ** 2) < 20 ** 2).astype(np.int32)
    item = _as_item(np.full((160, 160, 3), 200, np.uint8), labels)

    def extents(scale_jitter) -> np.ndarray:
        (step,) = [t for t in T.train_transforms(*IDENTITY, load=False, scale_jitter=scale_jitter).transforms
                   if isinstance(t, T.Rand2DElasticd)]
        step.prob = step.rand_2d_elastic.prob = 1.0
        step.rand_2d_elastic.rand_affine_grid.rotate_range = (0.0,)  # rotation would mix the two axes
        step.set_random_state(0)
        out = []
        for _ in range(60):
            disc = np.asarray(step(dict(item))["label"])[0] > 0
            out.append((disc.any(axis=1).sum(), disc.any(axis=0).sum()))
        return np.array(out, np.float64)

    none = extents(0.0)
    spread = lambda jitter: (extents(jitter) / none).std(axis=0)  # noqa: E731
    rows_only = spread([0.1, 0.0])  # once: each spread is 60 elastic warps, the same every time (seed 0)
    assert rows_only[1] < 0.02 < rows_only[0]  # as trained: the rows only
    both = spread(0.1)
    assert np.all(both > 0.03) and np.all(both < 0.08)  # uniform on +-0.1: sd 0.058
    assert np.all(spread([0.25, 0.25]) > 2 * both)
    with pytest.raises(ValueError, match="scale_jitter"):
        T.train_transforms(*IDENTITY, load=False, scale_jitter=[0.1, 0.1, 0.1])


def test_the_default_scale_jitter_draws_the_random_numbers_the_recipe_was_trained_with():
    # MONAI's grid made (0.1,) of the recipe's bare 0.1: one draw; a second, even of a fixed 0, would shift the stream
    def grid(**kwargs):
        (step,) = [t for t in T.train_transforms(*IDENTITY, load=False, **kwargs).transforms
                   if isinstance(t, T.Rand2DElasticd)]
        return step.rand_2d_elastic.rand_affine_grid

    assert grid().scale_range == grid(scale_jitter=[0.1, 0.0]).scale_range == (0.1,)
    assert grid(scale_jitter=0.1).scale_range == (0.1, 0.1)
