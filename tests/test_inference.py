import contextlib
import csv
import functools
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import tifffile
import torch
from skimage import io as skio
from skimage.measure import label as connected_components
from skimage.transform import downscale_local_mean, rescale

from nucleiseg_monai import inference, outputs, runtimes, scaling
from nucleiseg_monai.inference import (InferenceNetwork, RegionPlanner, SlidePredictor, config_id, predictor_ids,
                                       raise_on_failure, weights_sha256)
from nucleiseg_monai.inferers import FlipInferer
from nucleiseg_monai.inputs import find_images
from nucleiseg_monai.networks import UNet
from nucleiseg_monai.outputs import OutputOptions
from nucleiseg_monai.path_limit import written_paths
from nucleiseg_monai.synthetic import make_slide, make_tile
from nucleiseg_monai.transforms import encode_three_class
from nucleiseg_monai.wsi import open_image
from conftest import same_up_to_ids

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


def _predictor(network=None, region_size=256, tissue_threshold=None, max_regions=None, mpp=0.25, sw_batch_size=4,
               **kw) -> SlidePredictor:
    """The oracle's predictor (or ``network``'s), in 128 px windows and regions of ``region_size``; ``kw`` are the
    predictor's own keyword arguments."""
    return SlidePredictor(
        InferenceNetwork(Oracle() if network is None else network, MEAN, STD, roi_size=128, overlap=0.25,
                         sw_batch_size=sw_batch_size),
        RegionPlanner(region_size, 48, mpp, tissue_threshold, max_regions), OutputOptions(label_tile=128),
        progress=False, **kw)


def _oracle_image(labels: np.ndarray) -> np.ndarray:
    return PALETTE[encode_three_class(labels)]


def _scan_at(rgb: np.ndarray, truth: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """A field rendered at 0.25 um/px as scanned at ``mpp``: the image integrated over each new pixel (block means
    for whole factors, else skimage's anti-aliased rescale), the truth the id under each new pixel's centre."""
    factor = mpp / 0.25
    if factor == 1:
        return rgb, truth
    if factor.is_integer():
        image = downscale_local_mean(rgb, (int(factor), int(factor), 1))
    else:
        image = rescale(rgb, 1 / factor, anti_aliasing=True, channel_axis=-1, preserve_range=True)
    rows, cols = (np.minimum(((np.arange(n) + 0.5) * factor).astype(int), m - 1)
                  for n, m in zip(image.shape[:2], truth.shape))
    return image.round().astype(np.uint8), truth[np.ix_(rows, cols)]


def _write_tif(path, rgb, mpp, tile=128):
    tifffile.imwrite(path, rgb, tile=(tile, tile), photometric="rgb", compression="zlib", bigtiff=True,
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def _match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each id of a (1..max): the id of b it overlaps most, and the IoU with it."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    na, nb = a.max() + 1, b.max() + 1
    table = np.bincount((a * nb + b).ravel(), minlength=na * nb).reshape(na, nb)
    best = table[1:, 1:].argmax(1) + 1
    inter = table[np.arange(1, na), best]
    iou = inter / (table[1:].sum(1) + table[:, best].sum(0) - inter)
    return best, iou


@pytest.fixture(scope="module", params=[0.25, pytest.param(0.5, marks=pytest.mark.slow),
                                        pytest.param(0.3, marks=pytest.mark.slow)])
def seam_slide(request, tmp_path_factory):
    """Oracle slide with ~700 nuclei (radius 4-14 px at 0.25 um/px, half in touching clusters): 768 x 1024 px at
    0.25 um/px, the model's scale, in 3 x 4 regions, or the same field scanned at 0.5 um/px (384 x 512 px;
    inference resamples it x2, cores of 128 read px) or at 0.3 um/px (640 x 853 px; x6/5, cores of 215).
    ``truth`` is on the file's grid."""
    mpp = request.param
    folder = tmp_path_factory.mktemp(f"seams_{mpp}")
    truth = make_slide((768, 1024), seed=11).labels()
    image, truth = _scan_at(_oracle_image(truth), truth, mpp)
    path = folder / "slide.tif"
    _write_tif(path, image, mpp)
    regions = _predictor().predict_slide(path, folder / "regions")
    whole = _predictor(region_size=4096).predict_slide(path, folder / "whole")
    return folder, truth, regions, whole, mpp


def test_regions_stitch_like_one_whole_region(seam_slide):
    folder, truth, regions, whole, mpp = seam_slide
    assert regions.regions == 12 and regions.regions_processed == 12 and whole.regions == 1
    assert regions.scale == whole.scale == pytest.approx(mpp / 0.25) and regions.mpp_source == "file"
    assert regions.truncated == 0 and whole.truncated == 0
    core = {0.25: 256, 0.5: 128, 0.3: 215}[mpp]  # region_size is in working pixels; 215 = 5 * round(256 / 6)
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
    across = [(y0 < s) & (y1 >= s) for s in range(core, truth.shape[0], core)]
    across += [(x0 < s) & (x1 >= s) for s in range(core, truth.shape[1], core)]
    assert min(a.sum() for a in across) >= 10
    crossing = np.flatnonzero(np.any(across, axis=0))

    # same nuclei, pixel for pixel: ids 1..N without gaps or duplicates, and the single-region run's labels up to
    # a renumbering (the oracle's probabilities are flat, so every contested pixel is a watershed tie)
    assert regions.nuclei == whole.nuclei == stitched.max() == single.max()
    assert np.array_equal(np.unique(stitched), np.arange(stitched.max() + 1))
    assert same_up_to_ids(stitched, single)

    # no nucleus cut at a seam: every id is one connected piece, and each seam-crossing true nucleus is
    # covered by one predicted id
    assert connected_components(stitched, connectivity=1, background=0).max() == stitched.max()
    true_best, true_iou = _match(truth, stitched)
    assert np.mean(true_iou[crossing - 1] > 0.8) > 0.97
    assert abs(int(stitched.max()) - int(truth.max())) <= 0.01 * truth.max()


def test_a_vendor_slide_through_openslide_gives_the_same_labels(seam_slide):
    """The same pixels as an .svs (read by OpenSlide, region by region) and as a .tif (tifffile's zarr store)."""
    pytest.importorskip("openslide", exc_type=ImportError)
    folder, _, regions, _, mpp = seam_slide
    svs = folder / "vendor" / "slide.svs"
    svs.parent.mkdir()
    svs.write_bytes((folder / "slide.tif").read_bytes())
    result = _predictor().predict_slide(svs, folder / "vendor_out")
    assert result.mpp == pytest.approx(mpp) and result.nuclei == regions.nuclei
    np.testing.assert_array_equal(tifffile.imread(folder / "vendor_out" / "slide.labels.tif"),
                                  tifffile.imread(folder / "regions" / "slide.labels.tif"))


def test_outputs_are_readable_and_consistent(seam_slide):
    folder, truth, result, _, mpp = seam_slide
    out = folder / "regions"
    with tifffile.TiffFile(out / "slide.labels.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and page.tilewidth == 128 and page.dtype == np.uint32
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.resolution == pytest.approx((1e4 / mpp, 1e4 / mpp))
        labels = page.asarray()
    assert labels.shape == truth.shape  # the input's own grid, whatever scale the network worked at
    n = result.nuclei
    area = np.bincount(labels.ravel())

    rows = list(csv.DictReader((out / "slide.nuclei.csv").open()))
    assert len(rows) == n
    assert sorted(int(r["id"]) for r in rows) == list(range(1, n + 1))
    assert all(int(r["area_px"]) == area[int(r["id"])] for r in rows)
    assert all(float(r["area_um2"]) == pytest.approx(area[int(r["id"])] * mpp**2, abs=1e-3) for r in rows)

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

    drawn = skio.imread(out / "slide.overlay.png")  # the image, then its legend strip
    assert drawn.shape[1:] == (truth.shape[1], 3) and drawn.shape[0] > truth.shape[0]
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
    with pytest.raises(FileNotFoundError, match="no images found") as none:
        find_images(tmp_path / "in" / "*.jpg")
    assert "subfolders" not in str(none.value)
    (tmp_path / "cases" / "a").mkdir(parents=True)
    (tmp_path / "in" / "tile0.png").rename(tmp_path / "cases" / "a" / "tile0.png")
    with pytest.raises(FileNotFoundError, match=r"subfolders are not searched: give a glob such as '.*cases/\*\*/\*"):
        find_images(tmp_path / "cases")
    assert [p.name for p in find_images(str(tmp_path / "cases" / "**" / "*.png"))] == ["tile0.png"]
    rgb = skio.imread(tmp_path / "cases" / "a" / "tile0.png")
    for suffix in ("bmp", "webp"):  # what viewers export: a folder of them is searched as a single one is read
        Image.fromarray(rgb).save(tmp_path / "cases" / "a" / f"tile0_{suffix}.{suffix}", lossless=True)
    assert [p.name for p in find_images(tmp_path / "cases" / "a")] == ["tile0.png", "tile0_bmp.bmp", "tile0_webp.webp"]
    for path in find_images(tmp_path / "cases" / "a"):
        with open_image(path) as reader:
            np.testing.assert_array_equal(reader.read_region(0, 0, *reader.shape), rgb)
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
    # the whole image's tissue share, from the mask that chose the regions: some of the tile, a sixth of the image
    assert 0.02 < result.tissue_fraction < 0.2 and preview.tissue_fraction == result.tissue_fraction
    assert json.loads((tmp_path / "o" / "half.done.json").read_text())["tissue_fraction"] == result.tissue_fraction


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
        assert float(rows[k]["centroid_x_px"]) == pytest.approx(2 * xs.mean() + 0.5, abs=0.006)
        assert float(rows[k]["area_um2"]) == pytest.approx(len(ys) * 0.25, abs=1e-3)


def test_unet_checkpoint_stats_file_amp_channels_last(tmp_path):
    torch.manual_seed(0)
    net = UNet(features=(4, 8))
    torch.save({"network": net.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))
    _write_tiles(tmp_path / "in", n=1, size=64)
    fresh = UNet(features=(4, 8))
    network = InferenceNetwork(fresh, channel_stats=tmp_path / "stats.json", checkpoint=tmp_path / "model.pt",
                               roi_size=64, amp=True, channels_last=True)
    predictor = SlidePredictor(network, RegionPlanner(region_size=64, region_margin=16), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    summary = predictor.run(tmp_path / "in", tmp_path / "out")
    assert summary.ok and summary.done[0].shape == (64, 64)
    probs = predictor.network.probs(np.full((64, 64, 3), 200, np.uint8))
    assert probs.shape == (3, 64, 64) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="channel statistics"):
        InferenceNetwork(UNet(features=(4, 8)), channel_stats=tmp_path / "model.pt")
    with pytest.raises(ValueError, match="needs channel_mean and channel_std, or channel_stats"):
        InferenceNetwork(UNet(features=(4, 8)), channel_mean=MEAN)


@pytest.mark.parametrize("runtime", ["torch", pytest.param("openvino", marks=pytest.mark.slow)])
def test_fast_runtimes_predict_as_the_eager_network(runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    torch.manual_seed(0)
    net = UNet(features=(4, 8, 16)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, which the fast copies fold into the convolutions
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    common = dict(channel_mean=MEAN, channel_std=STD, roi_size=64, sw_batch_size=1)
    eager = InferenceNetwork(net, amp=False, **common).probs(rgb)
    fast = InferenceNetwork(net, amp=False, runtime=runtime, **common)
    assert not isinstance(fast.network, torch.jit.ScriptModule)
    np.testing.assert_allclose(fast.probs(rgb), eager, atol=1e-4)
    bf16 = InferenceNetwork(net, amp=True, runtime=runtime, **common)
    np.testing.assert_allclose(bf16.probs(rgb), eager, atol=0.05)  # bf16 rounding, same network
    # the prepared copy is shared by a later predictor of the same weights and settings, not built again
    assert InferenceNetwork(net, amp=True, runtime=runtime, **common).network is bf16.network
    # the same outputs' settings
    assert SlidePredictor(bf16, RegionPlanner()).settings() == \
        SlidePredictor(InferenceNetwork(net, amp=True, **common), RegionPlanner()).settings()


def test_an_unknown_runtime_is_refused():
    assert InferenceNetwork(Oracle(), MEAN, STD).runtime == "eager"
    with pytest.raises(ValueError, match="runtime must be one of auto, openvino, torch, eager"):
        InferenceNetwork(Oracle(), MEAN, STD, runtime="jit")


def test_prefetching_the_next_region_changes_nothing(seam_slide):
    folder, _, regions, _, _ = seam_slide
    serial = _predictor(prefetch=False).predict_slide(folder / "slide.tif", folder / "serial")
    assert serial.nuclei == regions.nuclei
    for suffix in (".labels.tif", ".nuclei.csv", ".geojson"):
        a, b = folder / "regions" / f"slide{suffix}", folder / "serial" / f"slide{suffix}"
        if suffix == ".labels.tif":
            assert np.array_equal(tifffile.imread(a), tifffile.imread(b))
        else:
            assert a.read_text() == b.read_text(), suffix


def test_each_slide_records_the_seconds_of_its_phases(seam_slide):
    """Without prefetching the phases follow one another, so they account for the slide's time, and none is
    left out: every phase of a slide with nuclei takes some time (four of its regions make the point)."""
    folder = seam_slide[0]
    predictor = _predictor(prefetch=False, max_regions=4)
    serial = predictor.predict_slide(folder / "slide.tif", folder / "timed")
    assert list(serial.timings) == list(inference.PHASES) and predictor.timings == serial.timings
    assert all(seconds > 0 for seconds in serial.timings.values()), serial.timings
    assert sum(serial.timings.values()) <= serial.seconds


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


# ---------------------------------------------------------------------------------------------- one physical scale


def _rows(path) -> dict[int, dict]:
    return {int(r["id"]): r for r in csv.DictReader(open(path))}


def _microns(row: dict, mpp: float) -> np.ndarray:
    """A CSV centroid (level-0 pixels, pixel centres at integers) as (x, y) microns from the image corner."""
    return (np.array([float(row["centroid_x_px"]), float(row["centroid_y_px"])]) + 0.5) * mpp


def test_a_field_at_two_scales_gives_the_same_nuclei(tmp_path):
    """The same field in a 0.25 um/px file and in a 0.5 um/px (20x) file, as the resolution tags say: the 20x file
    is resampled x2, analysed at the model's scale and mapped back, so the same nuclei come out, on the 20x file's
    own grid. A minimum size of 40 working px tells the scales apart: analysed as read, 20x nuclei have a quarter
    of that area and many are dropped."""
    truth = make_slide((512, 512), seed=11).labels()
    fine = _oracle_image(truth)
    coarse, _ = _scan_at(fine, truth, 0.5)
    _write_tif(tmp_path / "fine.tif", fine, 0.25)
    _write_tif(tmp_path / "coarse.tif", coarse, 0.5)
    params = {"min_size": 40}
    a = _predictor(postprocess_params=params).predict_slide(tmp_path / "fine.tif", tmp_path / "o")
    b = _predictor(postprocess_params=params).predict_slide(tmp_path / "coarse.tif", tmp_path / "o")
    as_read = _predictor(postprocess_params=params, mpp=None).predict_slide(tmp_path / "coarse.tif", tmp_path / "r")
    assert (a.scale, b.scale, as_read.scale) == (1.0, 2.0, 1.0) and b.regions == 4  # cores of 128 read px
    assert abs(a.nuclei - truth.max()) <= 0.02 * truth.max() and abs(b.nuclei - a.nuclei) <= 0.02 * a.nuclei
    assert as_read.nuclei < 0.8 * a.nuclei

    fine_labels = tifffile.imread(tmp_path / "o" / "fine.labels.tif")
    coarse_labels = tifffile.imread(tmp_path / "o" / "coarse.labels.tif")
    assert coarse_labels.shape == coarse.shape[:2] == (256, 256)
    best, iou = _match(coarse_labels, fine_labels[1::2, 1::2])  # each 20x nucleus to the 40x one it overlaps most
    assert np.mean(iou > 0.5) > 0.98
    rows_a, rows_b = _rows(tmp_path / "o" / "fine.nuclei.csv"), _rows(tmp_path / "o" / "coarse.nuclei.csv")
    pairs = [(rows_b[k], rows_a[best[k - 1]]) for k in np.flatnonzero(iou > 0.5) + 1]
    distance = np.array([np.hypot(*(_microns(q, 0.5) - _microns(p, 0.25))) for q, p in pairs])
    assert np.median(distance) < 0.25 and np.percentile(distance, 95) < 0.5  # microns; a 20x pixel is 0.5
    area_ratio = np.array([float(q["area_um2"]) / float(p["area_um2"]) for q, p in pairs])
    assert np.median(area_ratio) == pytest.approx(1.0, abs=0.03)
    assert all(float(q["area_um2"]) == pytest.approx(int(q["area_px"]) * 0.25, abs=1e-3) for q, _ in pairs)


def test_the_pixel_size_used_is_logged_once_per_image_with_where_it_came_from(tmp_path, caplog):
    truth = make_slide((256, 256), seed=12).labels()
    fine = _oracle_image(truth)
    coarse, _ = _scan_at(fine, truth, 0.5)
    skio.imsave(tmp_path / "fine.png", fine, check_contrast=False)  # PNGs state no pixel size
    skio.imsave(tmp_path / "coarse.png", coarse, check_contrast=False)
    _write_tif(tmp_path / "tagged.tif", coarse, 0.5)

    def scale_lines(name):
        return [r for r in caplog.records if name in r.getMessage() and "um/px" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="nucleiseg_monai.inference")
    assumed = _predictor().predict_slide(tmp_path / "fine.png", tmp_path / "a")
    [line] = scale_lines("fine.png")
    assert line.levelname == "WARNING"
    assert "states no usable pixel size, so 0.25 um/px (the model's) is assumed; pass --mpp" in line.getMessage()
    assert "area_um2 in the CSV, the label map's resolution and, in a cohort's run table, mpp, nuclei_per_mm2 and " \
           "median_nucleus_um2 stay empty unless --mpp is given" in line.getMessage()
    assert (assumed.mpp_source, assumed.scale) == ("assumed", 1.0)
    # an assumption is not written into the outputs as a measurement
    assert all(r["area_um2"] == "" for r in _rows(tmp_path / "a" / "fine.nuclei.csv").values())
    with tifffile.TiffFile(tmp_path / "a" / "fine.labels.tif") as tif:
        page = tif.pages[0]  # no physical unit: nothing claims a measured pixel size
        assert page.resolutionunit == tifffile.RESUNIT.NONE and page.resolution == (1.0, 1.0)
    assert json.loads((tmp_path / "a" / "fine.done.json").read_text())["mpp_source"] == "assumed"

    given = _predictor(input_mpp=0.5).predict_slide(tmp_path / "coarse.png", tmp_path / "b")
    [line] = scale_lines("coarse.png")
    assert line.levelname == "INFO" and "0.5 um/px (from --mpp (input_mpp)), resampled x2" in line.getMessage()
    assert (given.mpp_source, given.scale, given.shape) == ("input_mpp", 2.0, (128, 128))
    assert abs(given.nuclei - assumed.nuclei) <= 0.03 * assumed.nuclei
    rows = _rows(tmp_path / "b" / "coarse.nuclei.csv").values()
    assert all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.25, abs=1e-3) for r in rows)

    # a pixel size the file states wins, and the line says where it is stated and that --mpp did not apply
    tagged = _predictor(input_mpp=0.25).predict_slide(tmp_path / "tagged.tif", tmp_path / "c")
    [line] = scale_lines("tagged.tif")
    assert line.levelname == "INFO" and ("0.5 um/px (stated in the resolution tags, 20000 pixels per centimeter; "
                                         "--mpp (input_mpp) gives 0.25 um/px only to files that state none "
                                         "(--force_mpp: to every file))") in line.getMessage()
    assert (tagged.mpp_source, tagged.scale, tagged.nuclei) == ("file", 2.0, given.nuclei)

    # a given size far from the model's (5 typed for 0.5) is said at once, before hours of resampling
    caplog.clear()
    _predictor(input_mpp=0.5, max_regions=1).predict_slide(tmp_path / "coarse.png", tmp_path / "d")
    _predictor(input_mpp=5.0, max_regions=1).predict_slide(tmp_path / "fine.png", tmp_path / "e")
    [line] = scale_lines("fine.png")
    assert line.levelname == "WARNING" and "that size is outside the 0.1-2 um/px of H&E scans" in line.getMessage()
    assert "if it is wrong, give the scan's" in line.getMessage()
    assert scale_lines("coarse.png")[0].levelname == "INFO"


def test_at_the_working_scale_nothing_is_resampled(tmp_path, monkeypatch):
    """A 0.25 um/px file, or one within 2% of it, takes the path it took before resampling existed: its label map
    is the network and watershed of the image as read, and the resampler is never called."""
    truth = make_slide((256, 256), seed=13).labels()
    rgb = _oracle_image(truth)
    predictor = _predictor(region_size=512)  # one region: stitching keeps every nucleus with its id
    expected = predictor.instances(predictor.network.probs(rgb))

    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled at the working scale")

    monkeypatch.setattr(scaling, "F", SimpleNamespace(interpolate=no_resampling))
    for mpp in (0.25, 0.2527, 0.2451):
        _write_tif(tmp_path / f"{mpp}.tif", rgb, mpp)
        result = predictor.predict_slide(tmp_path / f"{mpp}.tif", tmp_path / "o")
        assert result.scale == 1.0 and result.mpp == pytest.approx(mpp)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "o" / f"{mpp}.labels.tif"), expected)


# ---------------------------------------------------------------------------------------------- honest runs


def test_completion_records_name_the_weights_and_settings(tmp_path):
    _write_tiles(tmp_path / "in", n=2)
    out = tmp_path / "out"
    assert _predictor().run(tmp_path / "in", out).ok
    record = json.loads((out / "tile0.done.json").read_text())
    assert record["settings"] == _predictor().settings()
    assert record["settings"]["weights_sha256"] == weights_sha256(Oracle())
    assert record["settings"]["working_mpp"] == 0.25 and record["settings"]["input_mpp"] is None
    assert len(_predictor().run(tmp_path / "in", out).skipped) == 2  # same weights and settings: kept
    assert _predictor().finished(out, "tile0") and not _predictor().finished(out, "tile9")
    stamp = os.stat(out / "tile1.labels.tif").st_mtime_ns

    other = Oracle()
    other.palette[2, 0] += 1  # other weights
    assert weights_sha256(other) != weights_sha256(Oracle())
    with pytest.raises(FileExistsError, match=r"out holds finished outputs of tile0, tile1 made with other weights "
                                              r"or settings \(differing: weights_sha256\); pass --overwrite"):
        _predictor(network=other).run(tmp_path / "in", out)
    with pytest.raises(FileExistsError, match=r"differing: input_mpp, postprocess_params\)"):
        _predictor(postprocess_params={"min_size": 30}, input_mpp=0.5).run(tmp_path / "in", out)
    assert os.stat(out / "tile1.labels.tif").st_mtime_ns == stamp  # refused before anything was redone
    with pytest.raises(FileExistsError, match=r"tile0.done.json: the finished outputs of tile0 were made with other "
                                              r"weights or settings \(differing: max_regions, region_size\)"):
        _predictor(region_size=128, max_regions=3).finished(out, "tile0")

    with pytest.raises(FileExistsError, match=r"made with 256: --set predictor#planner#region_size=256 goes on"):
        _predictor(region_size=128).run(tmp_path / "in", out)  # the region size alone: how to go on with it
    with pytest.raises(FileExistsError, match=r"differing: max_regions, region_size\)") as refused:
        _predictor(region_size=128, max_regions=3).run(tmp_path / "in", out)
    assert "goes on with" not in str(refused.value)  # not the region size alone: no such hint

    replaced = _predictor(network=other, overwrite=True).run(tmp_path / "in", out)
    assert [r.name for r in replaced.done] == ["tile0", "tile1"]
    assert json.loads((out / "tile0.done.json").read_text())["settings"]["weights_sha256"] == weights_sha256(other)

    del record["settings"]  # outputs of a version that recorded no settings
    (out / "tile0.done.json").write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match=r"of tile0 made .*not recorded"):
        _predictor(network=other).run(tmp_path / "in", out)


def test_outputs_of_another_file_of_the_same_name_are_not_taken_for_finished(tmp_path):
    _write_tiles(tmp_path / "in", n=2)
    out = tmp_path / "out"
    assert _predictor().run(tmp_path / "in", out).ok
    shutil.copytree(tmp_path / "in", tmp_path / "moved")  # the same files elsewhere: still finished
    assert len(_predictor().run(tmp_path / "moved", out).skipped) == 2

    (tmp_path / "other").mkdir()
    _, labels = make_tile(96, seed=7)
    skio.imsave(tmp_path / "other" / "tile0.png", _oracle_image(labels), check_contrast=False)
    stamp = os.stat(out / "tile0.labels.tif").st_mtime_ns
    with pytest.raises(FileExistsError, match=r"(?s)tile0 made with other weights or settings \(differing: "
                                              r"source file\).*made from .*in/tile0\.png: another image of the same"):
        _predictor().run(tmp_path / "other", out)
    with pytest.raises(FileExistsError, match=r"differing: source file\)"):
        _predictor().finished(out, "tile0", tmp_path / "other" / "tile0.png")
    assert _predictor().finished(out, "tile0")  # no file to compare with: the settings alone
    assert os.stat(out / "tile0.labels.tif").st_mtime_ns == stamp

    shutil.copy(tmp_path / "other" / "tile0.png", tmp_path / "in" / "tile1.png")  # a file replaced in place
    with pytest.raises(FileExistsError, match=r"of tile1 made .*differing: source file"):
        _predictor().run(tmp_path / "in" / "tile1.png", out)
    redone = _predictor(overwrite=True).run(tmp_path / "in" / "tile1.png", out)
    assert [r.nuclei for r in redone.done] == [len(np.unique(labels)) - 1]


# how a run says to part two images of one output name
RENAME = ("rename one of them, or give nucleiseg predict a slide list that names them (a CSV with columns path and "
          "slide)")


def test_a_second_image_of_a_finished_name_fails_alone_and_refuses_no_run(tmp_path):
    _write_tiles(tmp_path / "in", n=1)
    (tmp_path / "z").mkdir()
    _, labels = make_tile(96, seed=7)
    skio.imsave(tmp_path / "z" / "tile0.png", _oracle_image(labels), check_contrast=False)
    out = tmp_path / "out"
    assert _predictor().run(tmp_path / "in", out).ok
    again = _predictor().run(str(tmp_path / "*" / "tile0.png"), out)  # in/tile0.png first, then z/tile0.png
    assert again.skipped == [str(tmp_path / "in" / "tile0.png")]
    assert again.failed == [(str(tmp_path / "z" / "tile0.png"),
                             f"same output name 'tile0' as {tmp_path / 'in' / 'tile0.png'}; {RENAME}")]
    # a name differing only in case is the same files on macOS's and Windows' file systems
    shutil.copy(tmp_path / "z" / "tile0.png", tmp_path / "z" / "TILE0.png")
    cased = _predictor().run(str(tmp_path / "*" / "*0.png"), out)
    assert cased.skipped == [str(tmp_path / "in" / "tile0.png")] and not cased.done
    assert cased.failed[0] == (str(tmp_path / "z" / "TILE0.png"),
                               f"same output name 'TILE0' as {tmp_path / 'in' / 'tile0.png'}; {RENAME}")


def test_mpp_for_files_that_state_none_leaves_outputs_of_files_that_state_theirs_finished(tmp_path):
    rgb = _oracle_image(make_tile(96, seed=2)[1])
    (tmp_path / "in").mkdir()
    _write_tif(tmp_path / "in" / "tagged.tif", rgb, 0.25)
    skio.imsave(tmp_path / "in" / "untagged.png", rgb, check_contrast=False)
    out = tmp_path / "out"
    assert _predictor().run(tmp_path / "in" / "tagged.tif", out).ok
    assert len(_predictor(input_mpp=0.5).run(tmp_path / "in" / "tagged.tif", out).skipped) == 1
    assert _predictor().run(tmp_path / "in" / "untagged.png", out).ok  # analysed at the assumed 0.25 um/px
    with pytest.raises(FileExistsError, match=r"of untagged made .*\(differing: input_mpp\)"):
        _predictor(input_mpp=0.5).run(tmp_path / "in", out)


def test_test_time_flips_are_a_recorded_setting_and_change_nothing_for_a_flip_equivariant_network(tmp_path):
    """The oracle scores each pixel alone, so its flipped passes agree with the plain one: the labels stay the
    truth's. Outputs made without flips record no flips (as before flips existed), and flips differ from them."""
    _write_tiles(tmp_path / "in", n=1)
    plain = _predictor()
    assert plain.run(tmp_path / "in", tmp_path / "plain").ok and "test_time_flips" not in plain.settings()
    flipped = SlidePredictor(
        InferenceNetwork(Oracle(), MEAN, STD, roi_size=128, overlap=0.25, sw_batch_size=4, test_time_flips=4),
        RegionPlanner(256, 48, 0.25, None, None), OutputOptions(label_tile=128), progress=False)
    assert isinstance(flipped.network.inferer, FlipInferer) and flipped.settings()["test_time_flips"] == 4
    assert flipped.run(tmp_path / "in", tmp_path / "flipped").ok
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "flipped" / "tile0.labels.tif"),
                                  tifffile.imread(tmp_path / "plain" / "tile0.labels.tif"))
    with pytest.raises(FileExistsError, match=r"differing: test_time_flips\)"):
        flipped.run(tmp_path / "in", tmp_path / "plain")


def test_an_output_folder_that_cannot_be_created_is_reported_before_any_image_is_read(tmp_path, monkeypatch):
    _write_tiles(tmp_path / "in", n=2)
    (tmp_path / "taken").write_text("a file where the output folder's parent should be")
    opened = []
    monkeypatch.setattr(inference, "open_image", lambda *args, **kwargs: opened.append(args))
    with pytest.raises(OSError, match=r"cannot create the output folder .*taken/out .*--output_dir"):
        _predictor().run(tmp_path / "in", tmp_path / "taken" / "out")
    assert opened == []


def test_an_image_whose_paths_windows_would_refuse_fails_before_any_image_is_read(tmp_path, monkeypatch, caplog,
                                                                                   windows):
    (tmp_path / "in").mkdir()
    long = "S" * 200  # as a laboratory system's slide names may be
    for name in ("a", long):
        (tmp_path / "in" / f"{name}.png").write_bytes(b"")
    read = []
    monkeypatch.setattr(SlidePredictor, "predict_slide", lambda self, path, *args, **kwargs: read.append(path.name))
    summary = _predictor().run(tmp_path / "in", tmp_path / "out")
    assert read == ["a.png"]
    [(path, error)] = summary.failed
    assert path == str(tmp_path / "in" / f"{long}.png")
    assert error.startswith(f"output name {long!r} needs paths of up to ") and "LongPathsEnabled" in error
    assert f"[1/2] failed on {path}: {error}" in caplog.messages


_RECORDINGS: list[list[str]] = []  # those of the ``_paths_used`` blocks in progress
_PATH_ARGUMENTS = {"open": 1, "os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.link": 2}


def _record_paths(event: str, args: tuple) -> None:
    if _RECORDINGS and event in _PATH_ARGUMENTS:
        _RECORDINGS[-1] += [os.fsdecode(a) for a in args[:_PATH_ARGUMENTS[event]]
                            if isinstance(a, (str, bytes, os.PathLike))]


@functools.cache
def _hooked() -> None:
    sys.addaudithook(_record_paths)  # for the life of the process: a hook cannot be removed


@contextlib.contextmanager
def _paths_used():
    """The paths opened, made, renamed or linked to in the block, by any thread."""
    _hooked()
    _RECORDINGS.append([])
    try:
        yield _RECORDINGS[-1]
    finally:
        _RECORDINGS.pop()


# the parts of the names a run writes that vary, and their longest as ``path_limit.written_paths`` counts them
VARYING = ((re.compile(r"\.pid\d+@(\w*)-[A-Za-z0-9_]{8}\.tmp"), r".pid9999999@\1-xxxxxxxx.tmp"),
           (re.compile(r"^(\.?)r\d+-\d+\.npy"), r"\1r99999-99999.npy"), (re.compile(r"^[0-9a-f]{16}$"), "0" * 16))


def _at_the_longest(path: str, folder: Path) -> str:
    parts = Path(path).relative_to(folder).parts
    for pattern, longest in VARYING:
        parts = [pattern.sub(longest, part) for part in parts]
    return str(folder.joinpath(*parts))


def test_every_path_a_run_writes_is_one_the_path_limit_counts(tmp_path, monkeypatch):
    """What a run opens, makes or renames in its output folder, its varying parts (process id, mkstemp's
    characters, the key's hash, region indices) at their longest, is one of ``path_limit.written_paths`` or a
    folder of theirs: an output added later cannot escape the check."""
    monkeypatch.setattr(outputs, "LEVEL_BUFFER_IN_MEMORY", 0)  # the level buffered in a file, as a slide's is
    _write_tif(tmp_path / "slide.tif", _oracle_image(make_slide((640, 640), seed=3).labels()), 0.25)
    out = tmp_path / "out"
    with _paths_used() as used:
        assert _predictor().run(tmp_path / "slide.tif", out).ok  # 3 x 3 regions: its journal is kept
    written = {_at_the_longest(p, out) for p in used if p.startswith(f"{out}{os.sep}")}
    counted = {str(p) for p in written_paths(out, "slide")}
    assert written - counted - {str(f) for p in written_paths(out, "slide") for f in p.parents} == set()
    assert counted - written == {str(out / "slide.labels.tif.levels")}  # only ever under its temporary name


def test_16_bit_rgb_is_scaled_to_8_bit_and_greyscale_refused(tmp_path, caplog):
    truth = make_slide((128, 128), seed=14).labels()
    rgb = _oracle_image(truth)
    (tmp_path / "in").mkdir()
    _write_tif(tmp_path / "in" / "deep.tif", rgb.astype(np.uint16) * 257, 0.25)
    _write_tif(tmp_path / "in" / "plain.tif", rgb, 0.25)
    skio.imsave(tmp_path / "in" / "grey.png", rgb[..., 0], check_contrast=False)
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.inference")
    summary = _predictor().run(tmp_path / "in", tmp_path / "out")
    assert [r.name for r in summary.done] == ["deep", "plain"] and summary.done[0].nuclei > 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "deep.labels.tif"),
                                  tifffile.imread(tmp_path / "out" / "plain.labels.tif"))
    said = [r.getMessage() for r in caplog.records if "deep.tif" in r.getMessage() and "16-bit" in r.getMessage()]
    assert said == [f"{tmp_path / 'in' / 'deep.tif'}: 16-bit samples scaled to 8 bit (value / 256)"]
    [(path, error)] = summary.failed
    assert path.endswith("grey.png") and "grey.png is a greyscale image" in error and "colour" in error


def test_flat_predictor_ids_of_earlier_configs_name_the_part_that_takes_them():
    assert config_id("predictor#region_size") == "predictor#planner#region_size"
    assert config_id("predictor::roi_size") == "predictor#network#roi_size"
    assert config_id("predictor#label_tile") == "predictor#outputs#label_tile"
    for unchanged in ("predictor#planner#region_size", "predictor#postprocess_params#min_size",
                      "predictor#overwrite", "checkpoint", "postprocess_params#min_size", "predictor#unknown"):
        assert config_id(unchanged) == unchanged
    assert predictor_ids()["network"] == "predictor#network"  # the part, not the torch module it is given


def test_the_default_region_size_follows_the_cpu(monkeypatch):
    """1536 px where the network is most of the time (a CPU without AVX-512), 1024 px elsewhere; the bundles'
    planners take it unless set."""
    from nucleiseg_monai.inference import default_region_size
    for capability, size in (("AVX2", 1536), ("DEFAULT", 1536), ("AVX512", 1024)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert default_region_size("cpu") == size
        assert default_region_size(torch.device("cuda")) == 1024
    bundle = os.path.join(os.path.dirname(__file__), "..", "bundles", "nuclei_unet_small")
    predictor = SlidePredictor.from_bundle(bundle, runtime="eager", int8=False, progress=False, device="cpu")
    assert predictor.planner.region_size == 1024  # the last capability patched in: AVX512


def test_from_bundle_sets_keywords_and_flat_ids_on_the_part_that_takes_them():
    bundle = os.path.join(os.path.dirname(__file__), "..", "bundles", "nuclei_unet_small")
    predictor = SlidePredictor.from_bundle(
        bundle, region_size=1024, max_regions=2, runtime="eager", int8=False, progress=False, device="cpu",
        **{"predictor#roi_size": None, "predictor#label_tile": 256, "predictor#planner#region_margin": 64})
    assert (predictor.planner.region_size, predictor.planner.region_margin, predictor.planner.max_regions) == \
        (1024, 64, 2)
    assert predictor.network.roi_size is None and predictor.network.runtime == "eager"
    assert not predictor.network.int8 and predictor.network.device == torch.device("cpu")
    assert predictor.outputs.label_tile == 256 and predictor.progress is False
    with pytest.raises(TypeError, match="'region_sise' is neither a setting"):
        SlidePredictor.from_bundle(bundle, region_sise=1024)


def test_from_bundle_keywords_that_are_also_top_level_ids_set_what_the_predictor_reads():
    """``overwrite`` is training's top-level id and the predictor's keyword: the keyword redoes outputs. ``device``
    is read by the predictor from the top-level id, so setting that one is the same fact."""
    from nucleiseg_monai.inference import reads

    bundle = os.path.join(os.path.dirname(__file__), "..", "bundles", "nuclei_unet_small")
    predictor = SlidePredictor.from_bundle(bundle, overwrite=True, device="cpu", runtime="eager", int8=False,
                                           progress=False)
    assert predictor.overwrite is True and predictor.network.device == torch.device("cpu")
    assert not SlidePredictor.from_bundle(bundle, runtime="eager", int8=False, progress=False).overwrite
    config = {"predictor": {"a": "@device", "b": "$f(@checkpoint)", "c": "@overwrite_all", "d": "overwrite"},
              "checkpoint": "$g(@ckpt_dir)", "ckpt_dir": "models", "device": "cpu", "overwrite_all": 1, "overwrite": 0}
    assert reads(config, "predictor", "checkpoint") and reads(config, "predictor", "ckpt_dir")  # through checkpoint
    assert not reads(config, "predictor", "overwrite") and not reads(config, "predictor", "predictor")


@pytest.mark.slow
def test_the_predict_command_takes_mpp_and_overwrite(tmp_path, capfd):
    """The shipped small bundle through ``nucleiseg predict``: --mpp sets an untagged tile's pixel size, a re-run
    with other settings stops with one line naming what differs, --overwrite redoes it, --test_time_flips is
    recorded."""
    from nucleiseg_monai.cli import main

    bundle = os.path.join(os.path.dirname(__file__), "..", "bundles", "nuclei_unet_small")
    rgb, _ = make_tile(256, seed=1)
    skio.imsave(tmp_path / "tile.png", downscale_local_mean(rgb, (2, 2, 1)).round().astype(np.uint8),
                check_contrast=False)
    args = ["predict", "--bundle", bundle, "--input", str(tmp_path / "tile.png"), "--output_dir", str(tmp_path / "o")]
    assert main(args + ["--mpp", "0.5"]) == 0
    record = json.loads((tmp_path / "o" / "tile.done.json").read_text())
    assert (record["mpp_source"], record["scale"], record["shape"]) == ("input_mpp", 2.0, [128, 128])
    assert record["settings"]["input_mpp"] == 0.5 and record["nuclei"] > 0
    capfd.readouterr()
    assert main(args) == 2  # a usage error, apart from 1: images that failed
    said = "".join(capfd.readouterr())  # the bundle's logging.conf logs to the console
    assert "made with other weights or settings (differing: input_mpp); pass --overwrite" in said
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "tile.done.json").read_text())["mpp_source"] == "assumed"
    assert main(args + ["--overwrite", "--test_time_flips", "2"]) == 0
    assert json.loads((tmp_path / "o" / "tile.done.json").read_text())["settings"]["test_time_flips"] == 2


def test_a_run_removes_temporaries_left_by_a_killed_one(tmp_path, monkeypatch):
    from nucleiseg_monai import inference
    from nucleiseg_monai.atomic import host_name

    out = tmp_path / "out"
    out.mkdir()
    # a temporary named by atomic.py's rule for a writer process that no longer exists on this machine
    stale = out / f".slide.labels.tif.pid999999999@{host_name()}-abcdefgh.tmp.tif"
    stale.write_bytes(b"half a file")
    monkeypatch.setattr(inference, "find_images", lambda _: [])
    predictor = inference.SlidePredictor.__new__(inference.SlidePredictor)
    predictor.overwrite = True
    predictor.run(tmp_path / "nothing", out)
    assert not stale.exists()


# --- the channel statistics follow the weights -------------------------------------------------------------------

SMALL_BUNDLE = os.path.join(os.path.dirname(__file__), "..", "bundles", "nuclei_unet_small")
TINY_FEATURES = [8, 16, 32, 64]


def _run_weights(folder, stats: dict | None):
    """A random network's weights in ``folder``/model.pt, with ``stats`` beside them as a training run writes them."""
    from conftest import bundle_outputs, saved_random_unet

    saved_random_unet(folder / "model.pt", bundle_outputs(Path(SMALL_BUNDLE)), TINY_FEATURES)
    if stats is not None:
        (folder / "channel_stats.json").write_text(json.dumps(stats))
    return folder / "model.pt"


def _bundle_predictor(**overrides) -> SlidePredictor:
    return SlidePredictor.from_bundle(SMALL_BUNDLE, runtime="eager", int8=False, progress=False, device="cpu",
                                      **{"network_def#features": TINY_FEATURES}, **overrides)


def test_a_checkpoint_brings_the_channel_statistics_beside_it(tmp_path, caplog):
    from nucleiseg_monai.data import load_stats

    own = load_stats(Path(SMALL_BUNDLE) / "models" / "channel_stats.json")
    theirs = {"mean": [200.0, 150.0, 190.0], "std": [30.0, 40.0, 35.0]}
    weights = _run_weights(tmp_path / "ft" / "models", theirs)
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.bundle")
    predictor = _bundle_predictor(checkpoint=str(weights))
    assert predictor.network.mean.flatten().tolist() == theirs["mean"]
    assert predictor.network.std.flatten().tolist() == theirs["std"]
    # the completion record names the statistics, so outputs made with the bundle's are not taken as finished
    settings = predictor.settings()
    assert (settings["channel_mean"], settings["channel_std"]) == (theirs["mean"], theirs["std"])
    assert settings["channel_mean"] != pytest.approx(own["mean"])
    said = [r.getMessage() for r in caplog.records if r.name == "nucleiseg_monai.bundle"]
    assert said == [f"channel statistics {weights.parent.resolve() / 'channel_stats.json'}, beside the weights "
                    f"{weights.resolve()} (not the bundle's "
                    f"{(Path(SMALL_BUNDLE) / 'models' / 'channel_stats.json').resolve()})"]
    _bundle_predictor(checkpoint=str(weights))  # said once per process
    assert len([r for r in caplog.records if r.name == "nucleiseg_monai.bundle"]) == 1


def test_a_checkpoint_without_statistics_keeps_the_bundles_and_warns_once(tmp_path, caplog):
    from nucleiseg_monai.data import load_stats

    own = load_stats(Path(SMALL_BUNDLE) / "models" / "channel_stats.json")
    weights = _run_weights(tmp_path / "loose", None)
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.bundle")
    for _ in range(2):
        predictor = _bundle_predictor(checkpoint=str(weights))
        assert predictor.network.mean.flatten().tolist() == pytest.approx(own["mean"])
        assert predictor.network.std.flatten().tolist() == pytest.approx(own["std"])
    [warning] = [r for r in caplog.records if r.name == "nucleiseg_monai.bundle"]
    assert warning.levelno == logging.WARNING and "bundle's statistics" in warning.getMessage()
    assert str(weights.resolve()) in warning.getMessage()


def test_the_bundles_own_weights_use_its_statistics_silently(caplog):
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.bundle")
    from nucleiseg_monai.bundle import weights_stats_file

    stats = os.path.join(SMALL_BUNDLE, "models", "channel_stats.json")
    assert weights_stats_file(os.path.join(SMALL_BUNDLE, "models", "model.pt"), stats) == stats
    assert weights_stats_file(None, stats) == stats
    assert not [r for r in caplog.records if r.name == "nucleiseg_monai.bundle"]


def test_int8_networks_of_other_statistics_are_not_shared_in_the_process(monkeypatch):
    """The int8 ranges are set on inputs z-scored with the statistics: the same weights with other statistics are
    another model, in the process as on disk (``SyntheticCalibration.key``)."""
    built = []
    monkeypatch.setattr(runtimes, "_prepared", None)
    monkeypatch.setattr(runtimes, "prepare_for_inference", lambda *a, **k: built.append(k["calibration_key"]) or
                        torch.nn.Identity())
    mean, std = torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 40.0)
    args = ("openvino", False, False, (1, 3, 64, 64), "sha", torch.device("cpu"))
    for m in (mean, mean, mean + 20):
        runtimes.prepare_network(torch.nn.Identity(), *args, runtimes.SyntheticCalibration(m, std))
    assert len(built) == 2 and built[0] != built[1]


# --- an interrupted image goes on from its kept regions ----------------------------------------------------------

def _counting(predictor: SlidePredictor, fail_after: int | None = None) -> list:
    """The regions ``predictor``'s network is run on, in order; with ``fail_after`` it raises ("killed") on the
    region after that many."""
    computed, real = [], predictor._predict_region

    def predict_region(plan, timings, ij):
        if len(computed) == fail_after:
            raise RuntimeError("killed")
        computed.append(ij)
        return real(plan, timings, ij)

    predictor._predict_region = predict_region
    return computed


def _killed_after(n: int, path, out, **kw) -> Path:
    """Run ``path`` into ``out`` and kill it after ``n`` regions; returns the image's journal folder."""
    predictor = _predictor(**kw)
    _counting(predictor, n)
    with pytest.raises(RuntimeError, match="killed"):
        predictor.predict_slide(path, out)
    assert not (out / "slide.done.json").exists()
    return out / ".slide.regions"


def _same_outputs(a, b, name="slide") -> None:
    for suffix in (".labels.tif", ".geojson", ".nuclei.csv", ".overlay.png"):
        assert (a / f"{name}{suffix}").read_bytes() == (b / f"{name}{suffix}").read_bytes(), suffix


def test_an_interrupted_image_goes_on_from_its_kept_regions_to_the_same_outputs(seam_slide, tmp_path, caplog):
    folder, *_ = seam_slide
    out = tmp_path / "out"
    journal = _killed_after(7, folder / "slide.tif", out)
    assert len(list(journal.rglob("r*.npy.z"))) == 7 and not (out / "slide.labels.tif").exists()

    again = _predictor()
    computed = _counting(again)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai"):
        result = again.predict_slide(folder / "slide.tif", out)
    assert len(computed) == 12 - 7 and result.regions_processed == 12  # the network ran only where nothing was kept
    assert "7 regions were kept from an interrupted run and taken as they are" in caplog.text
    assert not journal.exists()  # gone once the outputs are committed
    _same_outputs(out, folder / "regions")  # byte for byte an uninterrupted run's, nucleus ids included


def test_overwrite_starts_an_interrupted_image_afresh_and_says_so(seam_slide, tmp_path, caplog):
    folder, *_ = seam_slide
    out = tmp_path / "out"
    journal = _killed_after(7, folder / "slide.tif", out)
    again = _predictor(overwrite=True)
    computed = _counting(again)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai"):
        again.predict_slide(folder / "slide.tif", out)
    assert len(computed) == 12 and not journal.exists()
    assert "slide: starting afresh (overwrite): the regions kept from an interrupted run are discarded" in caplog.text
    _same_outputs(out, folder / "regions")


def test_kept_regions_of_other_settings_are_discarded_and_unreadable_ones_computed_again(seam_slide, tmp_path,
                                                                                          caplog):
    folder, *_ = seam_slide
    path, out = folder / "slide.tif", tmp_path / "out"
    _killed_after(5, path, out, postprocess_params={"min_size": 5})
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai"):
        journal = _killed_after(4, path, out)  # other settings: the 5 kept regions are not taken
    assert "5 regions of an interrupted run with other settings are discarded" in caplog.text
    assert sorted(p.name for p in journal.rglob("r*.npy.z")) == [f"r0-{j}.npy.z" for j in range(4)]

    (next(journal.iterdir()) / "r0-1.npy.z").write_bytes(b"half a region")  # as a power loss may leave it
    again = _predictor()
    computed = _counting(again)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai"):
        again.predict_slide(path, out)
    assert sorted(computed) == [(0, 1), *[(i, j) for i in (1, 2) for j in range(4)]]
    assert "r0-1.npy.z: a kept region could not be read" in caplog.text
    _same_outputs(out, folder / "regions")


def test_without_keep_regions_nothing_is_kept(seam_slide, tmp_path):
    folder, *_ = seam_slide
    assert not _killed_after(3, folder / "slide.tif", tmp_path / "out", keep_regions=False).exists()


def test_overwrite_or_another_runtime_start_afresh_and_a_finished_image_leaves_no_journal(seam_slide, tmp_path,
                                                                                         caplog):
    folder, *_ = seam_slide
    path, out = folder / "slide.tif", tmp_path / "out"
    _killed_after(5, path, out)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai"):
        _killed_after(4, path, out, sw_batch_size=2)  # other windows per batch: not the same computation
    assert "5 regions of an interrupted run with other runtime are discarded" in caplog.text
    overwriting = _predictor(overwrite=True)
    computed = _counting(overwriting)
    overwriting.predict_slide(path, out)
    assert len(computed) == 12  # --overwrite redoes an image from its first region, as it redoes its outputs

    journal = out / ".slide.regions"
    journal.mkdir()  # as a run killed between committing the outputs and deleting its journal leaves it
    summary = _predictor().run(path, out)
    assert summary.skipped == [str(path)] and not journal.exists()


def test_an_image_of_one_region_keeps_nothing(tmp_path):
    tile, out = tmp_path / "tile.tif", tmp_path / "out"
    _write_tif(tile, _oracle_image(make_slide((200, 200), seed=3).labels()), 0.25)
    predictor = _predictor()
    _counting(predictor, 0)
    with pytest.raises(RuntimeError, match="killed"):
        predictor.predict_slide(tile, out)
    assert not (out / ".tile.regions").exists()  # a tile has nothing to go on from


def test_a_run_of_many_images_says_how_far_it_is_and_how_long_is_left(tmp_path, caplog):
    _write_tiles(tmp_path / "in")
    (tmp_path / "in" / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    _predictor().run(tmp_path / "in" / "tile0.png", tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.inference"):
        _predictor().run(tmp_path / "in", tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records]
    assert re.search(r"^\[1/4\] .*broken\.tif", "\n".join(lines), re.M)  # sorted: broken.tif first
    assert any(m.startswith("[2/4] ") and m.endswith("skipped") for m in lines)  # tile0 was finished
    assert any(re.fullmatch(r"\[3/4\] .*tile1\.png: \d+ nuclei in [\d.]+ s; about \d+ s left", m) for m in lines)
    assert any(re.fullmatch(r"\[4/4\] .*tile2\.png: \d+ nuclei in [\d.]+ s", m) for m in lines)
    assert lines[-1].startswith("4 images in ") and lines[-1].endswith(": 2 done, 1 already complete, 1 failed")


def test_waits_read_as_a_person_reads_them():
    assert [inference._duration(s) for s in (4.2, 89, 90, 3000, 3600, 11_100)] == \
        ["4 s", "89 s", "2 min", "50 min", "1 h 00 min", "3 h 05 min"]


def test_image_links_that_point_at_nothing_are_named_not_silently_left_out(tmp_path, caplog):
    _write_tiles(tmp_path / "in", n=1)
    (tmp_path / "in" / "moved.svs").symlink_to(tmp_path / "elsewhere" / "moved.svs")
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.inference"):
        assert [p.name for p in find_images(tmp_path / "in")] == ["tile0.png"]
    assert "1 image link(s)" in caplog.text and "moved.svs" in caplog.text


def test_an_image_in_memory_gets_the_labels_its_file_would(tmp_path, caplog):
    """``segment`` on the array a notebook holds: the same nuclei, pixel for pixel, as ``predict_slide`` on that
    image written as a file stating the same pixel size, in several regions and resampled from 20x alike."""
    truth = make_slide((512, 640), seed=13).labels()
    fine = _oracle_image(truth)
    coarse, _ = _scan_at(fine, truth, 0.5)
    for image, mpp in ((fine, 0.25), (coarse, 0.5)):
        path = tmp_path / f"at_{mpp}.tif"
        _write_tif(path, image, mpp)
        result = _predictor().predict_slide(path, tmp_path / "out")
        assert result.regions > 1
        from_file = tifffile.imread(tmp_path / "out" / f"at_{mpp}.labels.tif")
        in_memory = _predictor().segment(image, mpp=mpp)
        assert in_memory.shape == image.shape[:2] and in_memory.dtype == np.uint32
        assert np.array_equal(in_memory, from_file)
    predictor = _predictor()
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.inference"):
        assumed = predictor.segment(fine)
        predictor.segment(fine[:64, :64])
    assert np.array_equal(assumed, _predictor().segment(fine, mpp=0.25))
    assert caplog.text.count("no mpp given") == 1  # once per predictor, not once per tile of a loop
    assert np.array_equal(_predictor().segment(torch.from_numpy(fine), mpp="0.25"), assumed)

    # what else a notebook hands over: refused by name, or taken as a viewer shows it
    for wrong, match in ((np.moveaxis(fine, -1, 0), "moveaxis"), (fine[None], r"batch .* image\[0\]"),
                         (fine[..., 0], "greyscale"), (fine[..., :1], "greyscale")):
        with pytest.raises(ValueError, match=match):
            _predictor().segment(wrong, mpp=0.25)
    for mpp in (40, True):
        with pytest.raises(ValueError, match="um/px|pixel size"):
            _predictor().segment(fine, mpp=mpp)
    hidden = np.dstack([fine, np.full(fine.shape[:2], 255, np.uint8)])
    hidden[:256, ..., :3], hidden[:256, ..., 3] = 0, 0  # transparent black over the top half
    half = _predictor().segment(hidden, mpp=0.25)
    assert half[:256].max() == 0 and np.array_equal(half[300:] > 0, assumed[300:] > 0)
    with pytest.raises(ValueError, match=r"8- or 16-bit RGB, got float32: convert floats of 0-1 with"):
        _predictor().segment(fine.astype(np.float32) / 255, mpp=0.25)
    with pytest.raises(TypeError, match=r"not a file name .*predict_slide\(path, output_dir\)"):
        _predictor().segment(str(tmp_path / "at_0.25.tif"), mpp=0.25)
    assert np.array_equal(_predictor().segment(Image.fromarray(fine), mpp=0.25), assumed)  # a PIL image
    assert np.array_equal(_predictor().segment(Image.fromarray(fine).convert("P"), mpp=0.25) > 0,
                          _predictor().segment(np.asarray(Image.fromarray(fine).convert("P").convert("RGB")),
                                               mpp=0.25) > 0)


def test_16_bit_tiles_are_scaled_alike_when_their_bits_are_given(caplog):
    """By default a 16-bit array is scaled by the range it reaches, so a tile reaching half the range is read
    twice as bright as its slide's others; ``bits`` scales every tile alike, and the default says so, once."""
    tile = _oracle_image(make_slide((256, 256), seed=3).labels())
    dim = (tile // 2).astype(np.uint16) * 257  # reaches 15 bits of a 16-bit slide
    predictor = _predictor()
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.inference"):
        brightened = predictor.segment(dim, mpp=0.25)
        predictor.segment(dim, mpp=0.25)
    assert caplog.text.count("pass bits= (16 for the full range") == 1
    assert re.search(r"segment: 16-bit samples of a 15-bit range \(maximum \d+\) scaled to 8 bit \(value / 128\), by",
                     caplog.text)
    assert np.array_equal(brightened, _predictor().segment(np.minimum(dim >> 7, 255).astype(np.uint8), mpp=0.25))
    as_slide = _predictor().segment(dim, mpp=0.25, bits=16)
    assert np.array_equal(as_slide, _predictor().segment((dim >> 8).astype(np.uint8), mpp=0.25))
    with pytest.raises(ValueError, match="bits must be a whole number from 8 to 16"):
        _predictor().segment(dim, mpp=0.25, bits=24)


def test_from_bundle_refuses_a_sealed_bundle_edited_after_it_was_packed(tmp_path):
    """The Python API verifies a sealed bundle as ``nucleiseg predict`` does, before any config expression runs."""
    from nucleiseg_monai.packaging import BundleIntegrityError, pack, unpack

    bundle = unpack(pack(SMALL_BUNDLE, tmp_path / "small.zip"), tmp_path / "installed")
    assert _bundle_predictor_of(bundle).planner.region_margin == 128  # intact: it builds
    train = bundle / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["working_mpp"] = 0.5
    train.write_text(json.dumps(config))
    with pytest.raises(BundleIntegrityError, match=r"configs/train\.json"):
        SlidePredictor.from_bundle(bundle, runtime="eager", int8=False, progress=False, device="cpu")
    with pytest.raises(BundleIntegrityError):
        SlidePredictor.config_value(bundle, "working_mpp")


def _bundle_predictor_of(bundle, **overrides) -> SlidePredictor:
    """``bundle``'s predictor with its own weights, eager on the CPU."""
    return SlidePredictor.from_bundle(bundle, **{"runtime": "eager", "int8": False, "progress": False,
                                                 "device": "cpu", **overrides})


def test_booleans_typed_as_text_on_monai_bundles_command_line_are_read_as_booleans():
    """``python -m monai.bundle run inferring --predictor#overwrite false`` hands the predictor the text 'false'."""
    predictor = _bundle_predictor_of(SMALL_BUNDLE, **{
        "predictor#overwrite": "false", "predictor#prefetch": "False", "predictor#network#amp": "false",
        "predictor#network#channels_last": "no", "predictor#keep_regions": "0", "predictor#network#int8": "false"})
    assert predictor.overwrite is False and predictor.prefetch is False and predictor.keep_regions is False
    assert predictor.network.amp is False and predictor.network.int8 is False
    assert _bundle_predictor_of(SMALL_BUNDLE, **{"predictor#overwrite": "true"}).overwrite is True
    with pytest.raises(ValueError, match="predictor#network#int8 'maybe' is not a boolean"):
        InferenceNetwork(Oracle(), MEAN, STD, int8="maybe")
    with pytest.raises(ValueError, match="predictor#overwrite 'yes please' is not a boolean"):
        _predictor(overwrite="yes please")


def test_an_overwrite_run_that_fails_leaves_no_earlier_outputs_looking_current(tmp_path):
    _write_tiles(tmp_path / "in", n=1)
    out = tmp_path / "out"
    assert _predictor().run(tmp_path / "in", out).ok
    assert {p.name for p in out.iterdir()} >= {"tile0.labels.tif", "tile0.geojson", "tile0.nuclei.csv"}
    predictor = _predictor(overwrite=True)
    _counting(predictor, fail_after=0)
    summary = predictor.run(tmp_path / "in", out)
    assert summary.failed and "killed" in summary.failed[0][1]
    assert [p.name for p in out.iterdir() if p.name.startswith("tile0")] == []
    assert [r.name for r in _predictor().run(tmp_path / "in", out).done] == ["tile0"]  # redone, not skipped


def test_a_print_resolution_is_doubted_by_name_and_force_mpp_overrides_what_files_state(tmp_path, caplog):
    """A TIFF saved at 2400 dpi states 10.58 um/px: believed, it would be resampled x42. The line says so as a
    warning with the fix; --mpp with --force_mpp replaces it, and the outputs carry the forced size."""
    truth = make_slide((128, 128), seed=12).labels()
    image = tmp_path / "print.tif"
    tifffile.imwrite(image, _oracle_image(truth), photometric="rgb", resolution=(2400, 2400), resolutionunit="INCH")
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.inference")

    def line_of():
        [line] = [r for r in caplog.records if "print.tif" in r.getMessage() and "um/px" in r.getMessage()]
        caplog.clear()
        return line

    doubted = _predictor(max_regions=1).predict_slide(image, tmp_path / "a")
    line = line_of()
    assert (doubted.mpp_source, round(doubted.mpp, 2)) == ("file", 10.58)
    assert line.levelname == "WARNING" and "10.58 um/px (stated in the resolution tags, 2400 pixels per inch)" in \
        line.getMessage()
    assert "outside the 0.1-2 um/px of H&E scans" in line.getMessage()
    assert "if it is wrong, pass --mpp X --force_mpp" in line.getMessage()

    _predictor(max_regions=1, input_mpp=0.25).predict_slide(image, tmp_path / "b")
    assert "pass --mpp 0.25 --force_mpp" in line_of().getMessage()  # --mpp alone does not apply: it says how

    forced = _predictor(input_mpp=0.25, force_mpp=True).predict_slide(image, tmp_path / "c")
    line = line_of()
    assert (forced.mpp_source, forced.mpp, forced.scale) == ("input_mpp", 0.25, 1.0)
    assert line.levelname == "INFO" and ("0.25 um/px (from --mpp (input_mpp), forced over the 10.58 um/px stated "
                                         "in the resolution tags, 2400 pixels per inch), analysed as read") in \
        line.getMessage()
    record = json.loads((tmp_path / "c" / "print.done.json").read_text())
    assert record["settings"]["force_mpp"] is True and record["mpp"] == 0.25
    with tifffile.TiffFile(tmp_path / "c" / "print.labels.tif") as tif:
        assert tif.pages[0].resolution[0] == pytest.approx(1e4 / 0.25)
    assert all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.0625, abs=1e-3)
               for r in _rows(tmp_path / "c" / "print.nuclei.csv").values())
    # outputs made without forcing are not taken for finished by a forcing run, nor the other way round
    with pytest.raises(FileExistsError, match="force_mpp"):
        _predictor(input_mpp=0.25, force_mpp=True).finished(tmp_path / "b", "print", image)
    with pytest.raises(FileExistsError, match="force_mpp"):
        _predictor(input_mpp=0.25).finished(tmp_path / "c", "print", image)


def test_a_slide_lists_input_mpp_is_named_as_the_source_and_mpp_only_when_given(tmp_path, caplog, monkeypatch):
    from nucleiseg_monai import cohort

    truth = make_slide((256, 256), seed=12).labels()
    fine = _oracle_image(truth)
    coarse, _ = _scan_at(fine, truth, 0.5)
    skio.imsave(tmp_path / "untagged.png", coarse, check_contrast=False)
    _write_tif(tmp_path / "tagged.tif", fine, 0.25)
    factory, base = object(), _predictor()
    monkeypatch.setattr(cohort, "_cache", (factory, base))  # this worker's predictor, already built
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.inference")

    def line(name, input_mpp):
        predictor = cohort.slide_predictor(factory, cohort.Slide(str(tmp_path / name), name, input_mpp), 1)
        predictor.predict_slide(tmp_path / name, tmp_path / "out")
        [said] = [r.getMessage() for r in caplog.records if name in r.getMessage() and "um/px" in r.getMessage()]
        return said

    assert "0.5 um/px (from the slide list's input_mpp column), resampled x2" in line("untagged.png", 0.5)
    said = line("tagged.tif", 0.5)
    assert "the slide list's input_mpp column gives 0.5 um/px only to files that state none" in said
    assert "--mpp" not in said.replace("--force_mpp", "")
    assert "--mpp" not in line_without_list(tmp_path, caplog)
    assert base.input_mpp is None and base.input_mpp_origin == "--mpp (input_mpp)"  # the worker's own is untouched


def line_without_list(tmp_path, caplog) -> str:
    """The pixel-size line of a file stating its size, --mpp not given."""
    caplog.clear()
    _predictor().predict_slide(tmp_path / "tagged.tif", tmp_path / "plain")
    [said] = [r.getMessage() for r in caplog.records if "tagged.tif" in r.getMessage() and "um/px" in r.getMessage()]
    return said


def test_an_image_another_run_is_writing_fails_alone_and_is_left_to_it(tmp_path):
    from nucleiseg_monai.atomic import host_name

    _write_tiles(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".tile1.lock"
    lock.write_text(f"{os.getppid()} {host_name()} 0\n")  # a live process of this host holds it
    summary = _predictor().run(tmp_path / "in", out)
    assert [r.name for r in summary.done] == ["tile0", "tile2"]
    [(path, error)] = summary.failed
    assert path.endswith("tile1.png") and error.startswith("ImageBusy: another run (process ")
    assert lock.exists() and not (out / "tile1.labels.tif").exists()
    writing = out / ".tile1.labels.tif.pid1@elsewhere.ab12.tmp.tif"  # that run's file in the making
    writing.write_bytes(b"")
    assert _predictor().run(tmp_path / "in", out).failed and writing.exists()  # left to the run holding the lock
    lock.unlink()  # that run is gone
    assert [r.name for r in _predictor().run(tmp_path / "in", out).done] == ["tile1"]
    assert not writing.exists()  # what the gone run left, removed under the lock


def test_an_image_another_run_finished_after_this_one_looked_is_not_done_again(tmp_path, monkeypatch):
    _write_tiles(tmp_path / "in")
    out = tmp_path / "out"
    assert len(_predictor().run(tmp_path / "in", out).done) == 3  # the other run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real, looks = SlidePredictor.finished, []

    def looked_too_early(self, output_dir, name, path=None):  # this run's first look came before the other's commit
        looks.append(name)
        return looks.count(name) > 1 and real(self, output_dir, name, path)

    monkeypatch.setattr(SlidePredictor, "finished", looked_too_early)
    summary = _predictor().run(tmp_path / "in", out)
    assert not summary.done and not summary.failed and len(summary.skipped) == 3
    assert sorted(looks) == ["tile0", "tile0", "tile1", "tile1", "tile2", "tile2"]  # asked again under the lock
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
