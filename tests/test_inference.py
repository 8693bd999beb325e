import csv
import json
import os

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio
from skimage.measure import label as connected_components

from nucleiseg_monai.inference import SlidePredictor, find_images, raise_on_failure
from nucleiseg_monai.networks import UNet
from nucleiseg_monai.synthetic import make_slide, make_tile
from nucleiseg_monai.transforms import encode_three_class

torch.set_num_threads(1)

# Class colours of the oracle images: background, nucleus interior, nucleus boundary.
PALETTE = np.array([[240, 230, 235], [60, 30, 120], [200, 60, 60]], np.uint8)
MEAN, STD = [200.0, 150.0, 180.0], [40.0, 50.0, 45.0]


class Oracle(torch.nn.Module):
    """Receptive field of one pixel: un-z-scores the input and scores each class by colour distance.

    Every window then sees exactly the same logits at a pixel, so any difference between a region-wise and a
    whole-image run comes from the stitching (or from post-processing ties), not from the network.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("palette", torch.tensor(PALETTE, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        raw = x * self.std + self.mean
        return -((raw[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2) / 100.0


def _predictor(**kw) -> SlidePredictor:
    args = dict(channel_mean=MEAN, channel_std=STD, roi_size=128, overlap=0.25, sw_batch_size=4,
                region_size=256, region_margin=48, tissue_threshold=None, label_tile=128, progress=False)
    args.update(kw)
    return SlidePredictor(Oracle(), **args)


def _oracle_image(labels: np.ndarray) -> np.ndarray:
    return PALETTE[encode_three_class(labels)]


def _match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each id of a (1..max): the id of b it overlaps most, and the IoU with it."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    na, nb = a.max() + 1, b.max() + 1
    table = np.bincount((a * nb + b).ravel(), minlength=na * nb).reshape(na, nb)
    best = table[1:, 1:].argmax(1) + 1
    inter = table[np.arange(1, na), best]
    iou = inter / (table[1:].sum(1) + table[:, best].sum(0) - inter)
    return best, iou


@pytest.fixture(scope="module")
def seam_slide(tmp_path_factory):
    """1024 x 1536 px oracle slide, ~1400 nuclei (radius 4-14 px, half in touching clusters), mpp 0.25."""
    folder = tmp_path_factory.mktemp("seams")
    _, truth = make_slide((1024, 1536), seed=3).render()
    path = folder / "slide.tif"
    tifffile.imwrite(path, _oracle_image(truth), tile=(128, 128), photometric="rgb", compression="zlib",
                     bigtiff=True, resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    regions = _predictor().predict_slide(path, folder / "regions")
    whole = _predictor(region_size=4096).predict_slide(path, folder / "whole")
    return folder, truth, regions, whole


def test_regions_stitch_like_one_whole_region(seam_slide):
    folder, truth, regions, whole = seam_slide
    assert regions.regions == 24 and regions.regions_processed == 24 and whole.regions == 1
    assert regions.truncated == 0 and whole.truncated == 0
    stitched = tifffile.imread(folder / "regions" / "slide.labels.tif")
    single = tifffile.imread(folder / "whole" / "slide.labels.tif")

    # the seams are really crossed: every seam line cuts through many true nuclei
    ys, xs = np.nonzero(truth)
    ids = truth[ys, xs].astype(np.int64)
    y0, x0 = np.full(truth.max() + 1, 10**9), np.full(truth.max() + 1, 10**9)
    y1, x1 = np.zeros(truth.max() + 1, int), np.zeros(truth.max() + 1, int)
    for lo, hi, v in ((y0, y1, ys), (x0, x1, xs)):
        np.minimum.at(lo, ids, v)
        np.maximum.at(hi, ids, v)
    across = [(y0 < s) & (y1 >= s) for s in range(256, 1024, 256)]
    across += [(x0 < s) & (x1 >= s) for s in range(256, 1536, 256)]
    assert min(a.sum() for a in across) >= 10
    crossing = np.flatnonzero(np.any(across, axis=0))

    # same nuclei: ids 1..N without gaps or duplicates, one-to-one with the single-region run at IoU > 0.9
    assert regions.nuclei == whole.nuclei == stitched.max() == single.max()
    assert np.array_equal(np.unique(stitched), np.arange(stitched.max() + 1))
    best, iou = _match(stitched, single)
    assert len(np.unique(best)) == len(best) and iou.min() > 0.9
    assert np.median(iou) == 1.0  # differences are single contested pixels between touching nuclei

    # no nucleus cut at a seam: every id is one connected piece, and each seam-crossing true nucleus is
    # covered by one predicted id
    assert connected_components(stitched, connectivity=1, background=0).max() == stitched.max()
    true_best, true_iou = _match(truth, stitched)
    assert np.mean(true_iou[crossing - 1] > 0.8) > 0.97
    assert abs(int(stitched.max()) - int(truth.max())) <= 0.01 * truth.max()


class Jittery(SlidePredictor):
    """Windows disagree: each region's instances move by one pixel, in opposite directions in neighbouring
    regions, so near a seam one window puts a nucleus's anchor on one side and the next window on the other
    (white-box: the region index is taken from ``_stitch_region``, which calls ``instances``)."""

    def _stitch_region(self, band, out, done, ij, *args):
        self.shift = (1 if ij[0] % 2 == 0 else -1, 1 if ij[1] % 2 == 0 else -1)
        self.shifted = getattr(self, "shifted", 0) + 1
        return super()._stitch_region(band, out, done, ij, *args)

    def instances(self, probs):
        labels = super().instances(probs)
        moved = np.zeros_like(labels)
        (dy, dx), (h, w) = self.shift, labels.shape
        moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            labels[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return moved


def test_a_vendor_slide_through_openslide_gives_the_same_labels(seam_slide):
    """The same pixels as an .svs (read by OpenSlide, region by region) and as a .tif (tifffile's zarr store)."""
    pytest.importorskip("openslide", exc_type=ImportError)
    folder, _, regions, _ = seam_slide
    svs = folder / "vendor" / "slide.svs"
    svs.parent.mkdir()
    svs.write_bytes((folder / "slide.tif").read_bytes())
    result = _predictor().predict_slide(svs, folder / "vendor_out")
    assert result.mpp == pytest.approx(0.25) and result.nuclei == regions.nuclei
    np.testing.assert_array_equal(tifffile.imread(folder / "vendor_out" / "slide.labels.tif"),
                                  tifffile.imread(folder / "regions" / "slide.labels.tif"))


def test_inconsistent_windows_still_give_each_nucleus_once(seam_slide):
    folder, _, _, whole = seam_slide
    args = dict(channel_mean=MEAN, channel_std=STD, roi_size=128, region_size=256, region_margin=48,
                tissue_threshold=None, label_tile=128, progress=False)
    jittery = Jittery(Oracle(), **args)
    result = jittery.predict_slide(folder / "slide.tif", folder / "jittery")
    assert jittery.shifted == result.regions_processed == 24
    stitched = tifffile.imread(folder / "jittery" / "slide.labels.tif")
    single = tifffile.imread(folder / "whole" / "slide.labels.tif")
    assert result.nuclei == stitched.max() == whole.nuclei
    best, iou = _match(single, stitched)
    assert len(np.unique(best)) == len(best) and iou.min() > 0.4  # a 1 px shift costs small nuclei some IoU
    back, _ = _match(stitched, single)
    assert len(np.unique(back)) == len(back)  # and nothing was found twice


def test_outputs_are_readable_and_consistent(seam_slide):
    folder, _, result, _ = seam_slide
    out = folder / "regions"
    with tifffile.TiffFile(out / "slide.labels.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and page.tilewidth == 128 and page.dtype == np.uint32
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER and page.resolution == pytest.approx((4e4, 4e4))
        labels = page.asarray()
    n = result.nuclei
    area = np.bincount(labels.ravel())

    rows = list(csv.DictReader((out / "slide.nuclei.csv").open()))
    assert len(rows) == n
    assert sorted(int(r["id"]) for r in rows) == list(range(1, n + 1))
    assert all(int(r["area_px"]) == area[int(r["id"])] for r in rows)
    assert all(float(r["area_um2"]) == pytest.approx(area[int(r["id"])] * 0.0625, abs=1e-3) for r in rows)

    features = json.loads((out / "slide.geojson").read_text())["features"]
    assert len(features) == n
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    bbox = np.zeros((n + 1, 4), int)
    bbox[:, 0], bbox[:, 1] = 10**9, 10**9
    np.minimum.at(bbox[:, 0], ids, ys)
    np.minimum.at(bbox[:, 1], ids, xs)
    np.maximum.at(bbox[:, 2], ids, ys + 1)
    np.maximum.at(bbox[:, 3], ids, xs + 1)
    for f in features:
        assert f["properties"]["objectType"] == "detection"
        k = f["properties"]["measurements"]["nucleus_id"]
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        assert bbox[k, 1] <= ring[:, 0].min() and ring[:, 0].max() <= bbox[k, 3]
        assert bbox[k, 0] <= ring[:, 1].min() and ring[:, 1].max() <= bbox[k, 2]

    assert skio.imread(out / "slide.overlay.png").shape == (1024, 1536, 3)
    manifest = json.loads((out / "slide.done.json").read_text())
    assert manifest["nuclei"] == n and set(manifest["files"]) == {"labels", "geojson", "csv", "overlay"}


def _write_tiles(folder, n=3, size=96):
    folder.mkdir()
    for i in range(n):
        _, labels = make_tile(size, seed=i)
        skio.imsave(folder / f"tile{i}.png", _oracle_image(labels), check_contrast=False)


def test_folder_with_a_corrupt_file_rerun_and_overwrite(tmp_path):
    _write_tiles(tmp_path / "in")
    (tmp_path / "in" / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    out = tmp_path / "out"
    first = _predictor().run(tmp_path / "in", out)
    assert [r.name for r in first.done] == ["tile0", "tile1", "tile2"]
    assert not first.ok and len(first.failed) == 1
    path, error = first.failed[0]
    assert path.endswith("broken.tif") and "broken.tif" in error
    assert all(r.nuclei > 0 for r in first.done)
    stamp = os.stat(out / "tile1.labels.tif").st_mtime_ns
    with pytest.raises(RuntimeError, match=r"(?s)1 image\(s\) failed \(3 done.*broken\.tif"):
        raise_on_failure(first)

    again = _predictor().run(tmp_path / "in", out)
    assert again.done == [] and len(again.skipped) == 3 and len(again.failed) == 1
    assert os.stat(out / "tile1.labels.tif").st_mtime_ns == stamp

    (out / "tile1.geojson").unlink()  # an incomplete output set is redone
    partial = _predictor().run(str(tmp_path / "in" / "tile*.png"), out)
    assert [r.name for r in partial.done] == ["tile1"] and partial.ok
    assert raise_on_failure(partial) is partial
    assert [r.name for r in _predictor(overwrite=True).run(tmp_path / "in" / "tile0.png", out).done] == ["tile0"]
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []


def test_find_images_skips_outputs_and_reports_nothing_found(tmp_path):
    _write_tiles(tmp_path / "in", n=1)
    _predictor().run(tmp_path / "in", tmp_path / "in")  # outputs written beside the inputs
    assert [p.name for p in find_images(tmp_path / "in")] == ["tile0.png"]
    with pytest.raises(FileNotFoundError, match="no images found"):
        find_images(tmp_path / "in" / "*.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")


def test_regions_without_tissue_are_skipped(tmp_path):
    _, labels = make_tile((256, 256), seed=5)
    image = np.full((512, 768, 3), 245, np.uint8)
    image[128:384, 64:320] = _oracle_image(labels)
    skio.imsave(tmp_path / "half.png", image, check_contrast=False)
    result = _predictor(tissue_threshold=0.0, region_size=128).predict_slide(tmp_path / "half.png", tmp_path / "o")
    assert result.regions == 24 and 4 <= result.regions_processed <= 12
    found = tifffile.imread(tmp_path / "o" / "half.labels.tif")
    assert not found[:, 400:].any()
    best, iou = _match(labels, found[128:384, 64:320])
    assert np.mean(iou > 0.8) > 0.95
    preview = _predictor(tissue_threshold=0.0, region_size=128, max_regions=2).predict_slide(
        tmp_path / "half.png", tmp_path / "p")
    assert preview.regions_processed == 2 and preview.shape == (512, 768)
    assert tifffile.imread(tmp_path / "p" / "half.labels.tif").shape == (512, 768)


def test_pyramid_level_outputs_in_level0_coordinates(tmp_path):
    _, labels = make_tile((256, 384), seed=7, density=120)
    big = _oracle_image(np.kron(labels, np.ones((2, 2), labels.dtype)))  # level 0: every pixel doubled
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(big, tile=(64, 64), subifds=1, photometric="rgb", resolution=(4e4, 4e4),
                 resolutionunit="CENTIMETER")
        tw.write(big[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    result = _predictor(mpp=0.5).predict_slide(path, tmp_path / "o")
    assert result.level == 1 and result.mpp == pytest.approx(0.5) and result.shape == (256, 384)
    found = tifffile.imread(tmp_path / "o" / "pyr.labels.tif")
    assert found.shape == (256, 384)
    rows = {int(r["id"]): r for r in csv.DictReader((tmp_path / "o" / "pyr.nuclei.csv").open())}
    features = json.loads((tmp_path / "o" / "pyr.geojson").read_text())["features"]
    for f in features:
        k = f["properties"]["measurements"]["nucleus_id"]
        ring = np.asarray(f["geometry"]["coordinates"][0])
        ys, xs = np.nonzero(found == k)
        # level-0 pixel edges are twice the level-1 ones
        assert 2 * xs.min() <= ring[:, 0].min() and ring[:, 0].max() <= 2 * (xs.max() + 1)
        assert 2 * ys.min() <= ring[:, 1].min() and ring[:, 1].max() <= 2 * (ys.max() + 1)
        assert float(rows[k]["centroid_x"]) == pytest.approx(2 * xs.mean() + 0.5, abs=0.006)
        assert float(rows[k]["area_um2"]) == pytest.approx(len(ys) * 0.25, abs=1e-3)


def test_unet_checkpoint_stats_file_amp_channels_last(tmp_path):
    torch.manual_seed(0)
    net = UNet(features=(4, 8))
    torch.save({"network": net.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))
    _write_tiles(tmp_path / "in", n=1, size=64)
    fresh = UNet(features=(4, 8))
    predictor = SlidePredictor(fresh, channel_stats=tmp_path / "stats.json", checkpoint=tmp_path / "model.pt",
                               roi_size=64, region_size=64, region_margin=16, amp=True, channels_last=True,
                               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    summary = predictor.run(tmp_path / "in", tmp_path / "out")
    assert summary.ok and summary.done[0].shape == (64, 64)
    probs = predictor.predict_probs(np.full((64, 64, 3), 200, np.uint8))
    assert probs.shape == (3, 64, 64) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="channel statistics"):
        SlidePredictor(UNet(features=(4, 8)), channel_stats=tmp_path / "model.pt")


def test_frozen_network_predicts_as_the_eager_one(tmp_path):
    torch.manual_seed(0)
    net = UNet(features=(4, 8, 16)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, which freezing folds into the convolutions
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    common = dict(channel_mean=MEAN, channel_std=STD, roi_size=64, sw_batch_size=1, progress=False)
    eager = SlidePredictor(net, amp=False, **common).predict_probs(rgb)
    frozen_predictor = SlidePredictor(net, amp=False, jit=True, **common)
    assert isinstance(frozen_predictor.network, torch.jit.ScriptModule)
    np.testing.assert_allclose(frozen_predictor.predict_probs(rgb), eager, atol=1e-4)
    fast = SlidePredictor(net, amp=True, channels_last=True, jit=True, **common).predict_probs(rgb)
    np.testing.assert_allclose(fast, eager, atol=0.05)  # bf16 rounding, within the same network


def test_prefetching_the_next_region_changes_nothing(seam_slide):
    folder, _, regions, _ = seam_slide
    serial = _predictor(prefetch=False).predict_slide(folder / "slide.tif", folder / "serial")
    assert serial.nuclei == regions.nuclei
    for suffix in (".labels.tif", ".nuclei.csv", ".geojson"):
        a, b = folder / "regions" / f"slide{suffix}", folder / "serial" / f"slide{suffix}"
        if suffix == ".labels.tif":
            assert np.array_equal(tifffile.imread(a), tifffile.imread(b))
        else:
            assert a.read_text() == b.read_text(), suffix


def test_lookahead_keeps_order_raises_in_place_and_stops_early():
    import threading
    import time
    from contextlib import closing

    from nucleiseg_monai.inference import lookahead

    threads, calls = set(), []

    def square(x):
        threads.add(threading.current_thread().name)
        calls.append(x)
        if x == 3:
            raise ValueError("item 3")
        return x * x

    assert list(lookahead(square, range(3))) == [0, 1, 4]
    assert all(name.startswith("nucleiseg-lookahead") for name in threads)
    assert list(lookahead(square, range(3), enabled=False)) == [0, 1, 4]

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for value in lookahead(square, range(6)):
            got.append(value)
    assert got == [0, 1, 4]  # the error surfaces at its own item, after the results before it

    calls.clear()
    with closing(lookahead(lambda x: (time.sleep(0.01), calls.append(x), x)[2], range(100))) as results:
        assert next(results) == 0
    assert calls in ([0], [0, 1])  # at most the one queued when the caller left ran
