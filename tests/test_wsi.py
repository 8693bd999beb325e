import logging
import re
import sys
import tracemalloc
import warnings

import imagecodecs
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import io as skio

from nucleiseg_monai.wsi import ImageError, TiffReader, check_mpp, choose_level, open_image, rgb_uint8, tissue_mask

RNG = np.random.default_rng(0)


def _pyramid(shape=(300, 420)) -> list[np.ndarray]:
    base = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    return [base, base[::2, ::2].copy(), base[::4, ::4].copy()]


def _write_subifds(path, levels, mpp=0.25):
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], tile=(64, 64), subifds=len(levels) - 1, compression="zlib", photometric="rgb",
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        for lv in levels[1:]:
            tw.write(lv, tile=(64, 64), subfiletype=1, compression="zlib", photometric="rgb")


def _write_pages(path, levels, mpp=0.25, reduced=False):
    """One top-level page per pyramid level; ``reduced`` marks levels below 0 as reduced-resolution."""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, lv in enumerate(levels):
            if i == 0:
                extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            else:
                extra = {"subfiletype": 1} if reduced else {}
            tw.write(lv, tile=(32, 32), photometric="rgb", **extra)


def test_pyramid_subifds_read_region_matches_crop(tmp_path):
    levels = _pyramid()
    path = tmp_path / "slide.tif"
    _write_subifds(path, levels)
    with open_image(path) as r:
        assert isinstance(r, TiffReader)
        assert r.n_levels == 3 and r.level == 0
        assert r.level_shapes == [(300, 420), (150, 210), (75, 105)]
        assert r.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert r.mpp == pytest.approx(0.25)
        for lv, img in enumerate(levels):
            np.testing.assert_array_equal(r.read_region(10, 17, 40, 33, level=lv), img[10:50, 17:50])
        # partly outside: the image part is exact, the rest white
        out = r.read_region(-5, 400, 20, 30)
        np.testing.assert_array_equal(out[5:, :20], levels[0][:15, 400:420])
        assert (out[:5] == 255).all() and (out[:, 20:] == 255).all()
        assert (r.read_region(1000, 1000, 8, 8) == 255).all()


def test_series_pyramid_and_level_by_mpp(tmp_path):
    levels = _pyramid()
    path = tmp_path / "pages.tif"
    _write_pages(path, levels)
    with open_image(path, mpp=0.5) as r:
        assert r.n_levels == 3 and r.level == 1 and r.shape == (150, 210)
        assert r.mpp == pytest.approx(0.5) and r.downsample == pytest.approx(2.0)
        np.testing.assert_array_equal(r.read_region(3, 4, 20, 20), levels[1][3:23, 4:24])
    with open_image(path, level=2) as r:
        assert r.shape == (75, 105)
    with pytest.raises(ValueError, match="level 5 does not exist"):
        open_image(path, level=5)


def test_choose_level_rule():
    mpps = [0.25, 0.5, 1.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case below is normal now that inference resamples the level read
        assert choose_level(mpps, target_mpp=0.5) == 1
        assert choose_level(mpps, target_mpp=0.45) == 1  # 0.5 is within 1.2x of 0.45
        assert choose_level(mpps, target_mpp=0.4) == 0  # 0.5 would be 1.25x coarser; 0.25 is 1.6x finer
        assert choose_level([0.25, 2.0], target_mpp=0.9) == 0  # 2.0 is too coarse, 0.25 far too fine
        assert choose_level(mpps, target_mpp=1.9) == 3
        assert choose_level(mpps, level=2, target_mpp=0.25) == 2
        assert choose_level([0.5, 1.0], target_mpp=0.25) == 0  # a 20x scan: all levels coarser
    with pytest.warns(UserWarning, match="pixel size unknown"):
        assert choose_level([None, None], target_mpp=0.5) == 0


def test_reads_only_the_tiles_it_needs(tmp_path):
    path = tmp_path / "big.tif"
    shape = (4096, 4096, 3)

    def tiles():
        for _ in range((shape[0] // 256) * (shape[1] // 256)):
            yield np.full((256, 256, 3), 200, np.uint8)

    tifffile.imwrite(path, tiles(), shape=shape, dtype=np.uint8, tile=(256, 256), compression="zlib",
                     photometric="rgb", bigtiff=True)
    with open_image(path) as r:
        tracemalloc.start()
        patch = r.read_region(1000, 2000, 64, 64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (patch == 200).all()
    assert peak < 4 << 20, f"reading a 64 px patch of a 48 MB image allocated {peak / 2**20:.1f} MB"


def test_mpp_sources(tmp_path):
    img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, img, photometric="rgb", resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    assert open_image(inch).mpp == pytest.approx(0.5)
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(UserWarning, match="implausible"):
        assert open_image(dpi72).mpp is None
    imagej = tmp_path / "imagej.tif"
    tifffile.imwrite(imagej, img, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "um"})
    assert open_image(imagej).mpp == pytest.approx(0.25)
    with pytest.warns(UserWarning, match="implausible"):
        assert open_image(dpi72, input_mpp=0.3).mpp == pytest.approx(0.3)
    # a size the file states wins over the fallback; the reader says which applied
    with open_image(inch, input_mpp=0.3) as r:
        assert r.mpp == pytest.approx(0.5) and r.stated_mpp == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="implausible"), open_image(dpi72, input_mpp=0.3) as r:
        assert r.stated_mpp is None and r.base_mpp == 0.3


def test_png_jpeg_grey_rgba_and_16bit(tmp_path):
    rgb = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    skio.imsave(tmp_path / "a.png", rgb, check_contrast=False)
    with open_image(tmp_path / "a.png") as r:
        assert r.shape == (40, 50) and r.n_levels == 1 and r.mpp is None
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 50), rgb)
    smooth = np.full((40, 50, 3), (180, 90, 160), np.uint8)
    iio.imwrite(tmp_path / "b.jpg", smooth, quality=95)
    assert np.abs(open_image(tmp_path / "b.jpg").read_region(0, 0, 40, 50).astype(int) - smooth).max() <= 4

    grey = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    skio.imsave(tmp_path / "g.png", grey, check_contrast=False)
    out = open_image(tmp_path / "g.png").read_region(0, 0, 20, 30)
    assert out.shape == (20, 30, 3) and all((out[..., c] == grey).all() for c in range(3))

    rgba = np.dstack([rgb, np.full((40, 50), 128, np.uint8)])
    skio.imsave(tmp_path / "rgba.png", rgba, check_contrast=False)
    np.testing.assert_array_equal(open_image(tmp_path / "rgba.png").read_region(0, 0, 40, 50), rgb)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(open_image(tmp_path / "rgba.tif").read_region(0, 0, 40, 50), rgb)
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="minisblack")
    assert (open_image(tmp_path / "grey.tif").read_region(0, 0, 20, 30)[..., 1] == grey).all()

    with open_image(tmp_path / "a.png") as r, open_image(tmp_path / "g.png") as g:
        assert r.conversion is None and not r.greyscale
        assert g.greyscale and g.conversion == "greyscale repeated into three channels"

    # 16-bit samples keep their top byte: 256 k + r reads back as k (and 257 k, the 16-bit copy of k, too)
    deep = rgb.astype(np.uint16) * 256 + RNG.integers(0, 256, rgb.shape).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb", tile=(16, 16))
    with open_image(tmp_path / "deep.tif") as r:
        assert r.conversion == "16-bit samples scaled to 8 bit (value / 256)" and not r.greyscale
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 50), rgb)
        np.testing.assert_array_equal(r.thumbnail(50), rgb)
    iio.imwrite(tmp_path / "deep_grey.png", deep[..., 0])  # Pillow writes 16-bit PNGs in grey only
    tifffile.imwrite(tmp_path / "deep_grey.tif", deep[..., 0], photometric="minisblack")
    for name in ("deep_grey.png", "deep_grey.tif"):
        with open_image(tmp_path / name) as r:
            assert r.greyscale and r.conversion.startswith("16-bit")
            assert (r.read_region(0, 0, 40, 50)[..., 2] == rgb[..., 0]).all()
    tifffile.imwrite(tmp_path / "float.tif", rgb.astype(np.float32), photometric="rgb")
    with pytest.raises(ImageError, match="float.tif.*float32.*8-bit RGB"):
        open_image(tmp_path / "float.tif")


def test_damaged_and_missing_files(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageError, match="bad.tif"):
        open_image(bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(tmp_path / "nope.png")


def test_openslide_format_without_openslide(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as if not installed
    slide = tmp_path / "case.svs"
    slide.write_bytes(b"\x00" * 16)
    with pytest.raises(ImportError, match=r"case\.svs.*pip install 'nucleiseg-monai\[openslide\]'"):
        open_image(slide)


def test_a_slide_openslide_cannot_read_is_named_with_the_likely_causes(tmp_path):
    pytest.importorskip("openslide", exc_type=ImportError)
    notes, cut = tmp_path / "notes.svs", tmp_path / "cut.svs"
    notes.write_text("not a slide\n")
    img = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "whole.svs", img, tile=(128, 128), photometric="rgb",
                     description="Aperio Image Library|AppMag = 40|MPP = 0.25")
    whole = (tmp_path / "whole.svs").read_bytes()
    cut.write_bytes(whole[:len(whole) // 20])  # a transfer cut short: the first tiles and no directory
    for path in (notes, cut):
        with pytest.raises(ImageError, match=rf"cannot read {re.escape(str(path))} as a \.svs slide \(OpenSlide: "
                                             r".*\): the file is damaged, a copy cut short in transfer"):
            open_image(path)


def test_a_tiff_cut_short_says_so_in_one_warning_naming_the_file_not_in_tifffiles_log_lines(tmp_path, caplog):
    img = RNG.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "whole.tif", bigtiff=True) as tw:
        tw.write(img, tile=(256, 256), photometric="rgb", subifds=1)
        tw.write(img[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    whole = (tmp_path / "whole.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole[:int(len(whole) * 0.6)])  # the directories sit after the tiles: level 0's is lost
    with caplog.at_level(logging.DEBUG), pytest.warns(UserWarning) as said:
        reader = open_image(cut)
    assert len(said) == 1 and re.fullmatch(
        rf"{re.escape(str(cut))}: part of its TIFF structure cannot be read \(TiffFileError\('corrupted tag list @\d+'"
        r"\)\): the file is damaged or a copy cut short in transfer \(compare its size with the original's\); "
        "reading what can be read", str(said[0].message))
    assert not [r for r in caplog.records if r.name == "tifffile"]
    with reader, pytest.raises(ImageError, match=r"cut\.tif is damaged at level 0"):
        reader.read_region(0, 0, 1024, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_image(tmp_path / "whole.tif").close()  # a whole file: nothing said


def test_thumbnail_uses_small_level_and_block_means(tmp_path):
    levels = _pyramid((256, 384))
    path = tmp_path / "slide.tif"
    _write_subifds(path, levels)
    with open_image(path) as r:
        thumb = r.thumbnail(48)  # level 2 (64 x 96) is the smallest >= 48, then 2x2 block means
        assert thumb.shape == (32, 48, 3)
        expected = levels[2].reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
        assert np.abs(thumb.astype(float) - expected).max() <= 0.5 + 1e-9
        assert r.thumbnail(10_000).shape == (256, 384, 3)


def test_tissue_mask_finds_blob_on_white(tmp_path):
    h, w = 400, 600
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - 200) ** 2 / 120**2 + (xx - 250) ** 2 / 180**2 < 1
    image = np.full((h, w, 3), 245, np.uint8)
    image[blob] = (200, 120, 180)  # pink-purple H&E
    image = np.clip(image + RNG.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    image[20:23, 550:553] = (90, 40, 120)  # a speck of dust
    skio.imsave(tmp_path / "t.png", image, check_contrast=False)
    with open_image(tmp_path / "t.png") as r:
        mask = tissue_mask(r, max_side=200)
    assert mask.mask.shape == (134, 200) and mask.downsample == pytest.approx((400 / 134, 3.0))
    small_blob = blob[::3, ::3][: mask.mask.shape[0], : mask.mask.shape[1]]
    iou = (mask.mask & small_blob).sum() / (mask.mask | small_blob).sum()
    assert iou > 0.9
    assert not mask.contains(0, 500, 60, 100)  # the dust is gone
    assert mask.fraction(150, 200, 100, 100) == 1.0
    assert mask.fraction(5000, 5000, 10, 10) == 0.0

    skio.imsave(tmp_path / "white.png", np.full((64, 64, 3), 250, np.uint8), check_contrast=False)
    with open_image(tmp_path / "white.png") as r:
        assert not tissue_mask(r).mask.any()


def test_openslide_reader_matches_the_tiff_reader(tmp_path):
    """A tiled pyramid named .svs goes through OpenSlide (its generic-TIFF driver): same levels, pixel size and
    pixels as tifffile's reader of the same bytes, at every level and across the image border."""
    pytest.importorskip("openslide", exc_type=ImportError)  # the C library may be missing even with the package
    levels = _pyramid()
    tif = tmp_path / "pages.tif"
    _write_pages(tif, levels, reduced=True)  # OpenSlide takes only pages marked reduced-resolution as levels
    svs = tmp_path / "case.svs"
    svs.write_bytes(tif.read_bytes())
    with open_image(svs) as o, open_image(tif) as t:
        assert type(o).__name__ == "OpenSlideReader"
        assert o.level_shapes == t.level_shapes == [(300, 420), (150, 210), (75, 105)]
        assert o.level_downsamples == pytest.approx(t.level_downsamples)
        assert o.mpp == pytest.approx(0.25)
        for lv in range(3):
            np.testing.assert_array_equal(o.read_region(10, 17, 40, 33, level=lv), levels[lv][10:50, 17:50])
        np.testing.assert_array_equal(o.read_region(-5, 400, 20, 30), t.read_region(-5, 400, 20, 30))
    with open_image(svs, mpp=0.5) as o:
        assert o.level == 1 and o.shape == (150, 210)
        np.testing.assert_array_equal(o.read_region(3, 4, 20, 20), levels[1][3:23, 4:24])


def test_one_reader_policy_converts_at_inference_what_training_refuses(tmp_path):
    path = tmp_path / "tile.tif"
    rgb = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    opaque = np.dstack([rgb, np.full((6, 7), 255, np.uint8)])
    for training in (False, True):  # plain and opaque RGBA read the same under both rules
        np.testing.assert_array_equal(rgb_uint8(rgb, path, training), rgb)
        np.testing.assert_array_equal(rgb_uint8(opaque, path, training), rgb)

    transparent = opaque.copy()
    transparent[2, 3, 3] = 0
    deep = rgb.astype(np.uint16) * 257
    grey = rgb[..., 0]
    no_data = rgb.copy()
    no_data[2, 3] = 255  # a fully transparent pixel holds no data: white, not its stored colour
    np.testing.assert_array_equal(rgb_uint8(transparent, path), no_data)
    half = transparent.copy()
    half[2, 3, 3] = 128  # partly transparent: its colour
    np.testing.assert_array_equal(rgb_uint8(half, path), rgb)
    np.testing.assert_array_equal(rgb_uint8(deep, path), rgb)
    np.testing.assert_array_equal(rgb_uint8(grey, path), np.repeat(grey[..., None], 3, axis=-1))
    for pixels, problem in ((transparent, "transparent"), (deep, "uint16, not 8-bit"), (grey, "greyscale")):
        with pytest.raises(ImageError, match=problem) as info:
            rgb_uint8(pixels, path, training=True)
        assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="float32"):  # neither reads what is not 8- or 16-bit
        rgb_uint8(rgb.astype(np.float32), path)


def _bright_field(shape=(40, 48)) -> np.ndarray:
    """A known 8-bit RGB image with white in it, as bright-field H&E always has."""
    rgb = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb[:4, :4] = 255
    return rgb


def test_12bit_samples_in_16bit_containers_read_their_full_range(tmp_path, monkeypatch):
    rgb = _bright_field()
    twelve = rgb.astype(np.uint16) * 16  # 0-4080: a 12-bit camera's samples in 16-bit containers
    said = "16-bit samples of a 12-bit range (maximum 4080) scaled to 8 bit (value / 16)"

    # a pyramid: the range comes from its smallest level, found once on first need, not at open
    levels = [twelve, twelve[::2, ::2].copy(), twelve[::4, ::4].copy()]
    _write_subifds(tmp_path / "twelve.tif", levels)
    scans = []
    find = TiffReader._find_sample_max
    monkeypatch.setattr(TiffReader, "_find_sample_max", lambda self: scans.append(1) or find(self))
    with open_image(tmp_path / "twelve.tif") as r:
        assert scans == []
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 48), rgb)
        np.testing.assert_array_equal(r.read_region(0, 0, 10, 12, level=2), rgb[::4, ::4])
        assert r.conversion == said and r.significant_bits == 12 and len(scans) == 1

    # PNG: 16-bit RGB (Pillow alone would keep only the top byte, i.e. 0-15) and 16-bit grey
    (tmp_path / "twelve.png").write_bytes(imagecodecs.png_encode(twelve))
    iio.imwrite(tmp_path / "twelve_grey.png", twelve[..., 0])
    with open_image(tmp_path / "twelve.png") as r, open_image(tmp_path / "twelve_grey.png") as g:
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 48), rgb)
        assert r.conversion == said
        np.testing.assert_array_equal(g.read_region(0, 0, 40, 48)[..., 1], rgb[..., 0])
        assert g.conversion == f"{said}, greyscale repeated into three channels"

    # an opaque alpha sits at 65535 whatever the colours use, so it does not set the range
    rgba = np.dstack([twelve, np.full(twelve.shape[:2], 65535, np.uint16)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with open_image(tmp_path / "rgba.tif") as r:
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 48), rgb)

    # MaxSampleValue, when the file states more than 8 bits, wins over the data (here only up to 2000)
    dim = (rgb // 2).astype(np.uint16) * 16
    for stated, expected, bits in ((4095, rgb // 2, 12), (255, rgb // 2 * 2, 11)):  # 255: copied from 8 bit
        path = tmp_path / f"stated{stated}.tif"
        tifffile.imwrite(path, dim, photometric="rgb", extratags=[(281, "H", 3, (stated,) * 3, True)])
        with open_image(path) as r:
            np.testing.assert_array_equal(r.read_region(0, 0, 40, 48), expected)
            assert r.significant_bits == bits

    # full-range 16-bit keeps value / 256 and today's wording; a 12-bit range needs value / 16
    full = rgb.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "full.tif", full, photometric="rgb")
    with open_image(tmp_path / "full.tif") as r:
        np.testing.assert_array_equal(r.read_region(0, 0, 40, 48), rgb)
        assert r.conversion == "16-bit samples scaled to 8 bit (value / 256)"
    np.testing.assert_array_equal(rgb_uint8(twelve, tmp_path / "t.tif", bits=12), rgb)
    np.testing.assert_array_equal(rgb_uint8(twelve, tmp_path / "t.tif"), rgb >> 4)
    with pytest.raises(ImageError, match="uint16, not 8-bit"):  # training still refuses 16-bit
        rgb_uint8(twelve, tmp_path / "t.tif", training=True)


def test_12bit_range_of_a_slide_without_pyramid_is_scanned_in_bands(tmp_path):
    """The whole of a single-level file is scanned for its range (white only in the last rows), in bands of rows
    rather than as a 54 MB copy."""
    path = tmp_path / "flat.tif"
    shape = (3072, 3072, 3)

    n_tiles = (shape[0] // 256) * (shape[1] // 256)

    def tiles():
        for i in range(n_tiles):
            tile = np.full((256, 256, 3), 1600, np.uint16)
            if i == n_tiles - 1:  # the bottom-right tile
                tile[-1, -1] = 4080
            yield tile

    tifffile.imwrite(path, tiles(), shape=shape, dtype=np.uint16, tile=(256, 256), photometric="rgb", bigtiff=True)
    with open_image(path) as r:
        tracemalloc.start()
        bits = r.significant_bits
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (bits, r.sample_max) == (12, 4080)
        assert (r.read_region(0, 0, 8, 8) == 100).all()  # 1600 / 16
    assert peak < 28 << 20, f"finding the range of a 54 MB image allocated {peak / 2**20:.1f} MB"


def test_cmyk_jpeg_is_converted_and_cmyk_tiff_refused(tmp_path):
    yy, xx = np.mgrid[:64, :80]
    rgb = np.dstack([200 - yy, 60 + xx, 140 + (yy + xx) // 4]).astype(np.uint8)  # smooth, so JPEG keeps it
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
    with open_image(tmp_path / "cmyk.jpg") as r:
        assert r.conversion == "CMYK converted to RGB"
        assert np.abs(r.read_region(0, 0, 64, 80).astype(int) - rgb).mean() < 8

    cmyk = np.asarray(Image.fromarray(rgb).convert("CMYK"))
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, photometric="separated")
    with pytest.raises(ImageError, match=r"cmyk\.tif is CMYK.*magick in\.tif -colorspace sRGB out\.tif"):
        open_image(tmp_path / "cmyk.tif")


@pytest.mark.parametrize("value", [40, 0, -1, float("nan"), 1e9, float("inf")])
def test_implausible_mpp_is_refused_with_the_magnification_hint(tmp_path, value):
    hint = r"0\.02-20 um/px; it takes microns per pixel, not a magnification: 40x is about 0\.25 um/px, 20x about 0\.5"
    shown = re.escape(f"{value:g}")  # 1e+09
    with pytest.raises(ValueError, match=rf"^--mpp {shown} um/px is outside the plausible pixel sizes {hint}"):
        check_mpp(value)
    skio.imsave(tmp_path / "a.png", _bright_field(), check_contrast=False)
    with pytest.raises(ImageError, match=rf"a\.png: input_mpp {shown} um/px .*{hint}"):
        open_image(tmp_path / "a.png", input_mpp=value)


def test_plausible_mpp_is_accepted(tmp_path):
    assert check_mpp(0.25) == 0.25 and check_mpp("0.5", "slides.csv line 2") == 0.5
    with pytest.raises(ValueError, match=r"^slides\.csv line 2 '40x' is not a number; it takes microns per pixel"):
        check_mpp("40x", "slides.csv line 2")
    skio.imsave(tmp_path / "a.png", _bright_field(), check_contrast=False)
    with open_image(tmp_path / "a.png", input_mpp=0.5) as r:
        assert r.mpp == 0.5


def test_forcing_a_pixel_size_replaces_the_one_the_file_states_and_the_reader_says_both(tmp_path):
    img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    printed = tmp_path / "printed.tif"
    tifffile.imwrite(printed, img, photometric="rgb", resolution=(2400, 2400), resolutionunit="INCH")
    with open_image(printed) as r:
        assert r.mpp == pytest.approx(25400 / 2400) and r.mpp_origin == "the resolution tags, 2400 pixels per inch"
    with open_image(printed, input_mpp=0.25, force_mpp=True) as r:
        assert r.mpp == 0.25 and r.stated_mpp == pytest.approx(25400 / 2400)
    with pytest.raises(ValueError, match=r"printed\.tif: force_mpp needs the pixel size to force: pass --mpp X"):
        open_image(printed, force_mpp=True)


@pytest.mark.parametrize("stated, working, doubt", [
    (0.25, 0.25, None), (0.5, 0.25, None), (0.11, 0.25, None), (1.0, 0.25, None),
    (25400 / 2400, 0.25, "outside the 0.1-2 um/px of H&E scans"), (0.05, None, "outside the 0.1-2 um/px"),
    (1.5, 0.25, "6x away from the model's 0.25 um/px"), (1.5, None, None),
])
def test_a_stated_size_is_doubted_outside_scans_or_far_from_the_model(stated, working, doubt):
    from nucleiseg_monai.wsi import doubtful_mpp

    said = doubtful_mpp(stated, working)
    assert said == doubt if doubt is None else doubt in said


def _damaged_tile_tiff(path, tile_index=5):
    """A 512 px zlib-tiled RGB TIFF whose tile ``tile_index`` (row 1, column 1 of 4 x 4 tiles) is zeroed."""
    img = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[tile_index], tif.pages[0].databytecounts[tile_index]
    data = bytearray(path.read_bytes())
    data[offset + 10:offset + size - 10] = bytes(size - 20)
    path.write_bytes(bytes(data))
    return img


def test_a_damaged_tile_is_named_with_the_file_level_and_region_and_the_rest_still_reads(tmp_path):
    img = _damaged_tile_tiff(tmp_path / "damaged.tif")
    with open_image(tmp_path / "damaged.tif") as r:
        assert np.array_equal(r.read_region(0, 0, 128, 512), img[:128])  # the tiles before it are fine
        with pytest.raises(ImageError, match=r"damaged\.tif is damaged at level 0: the region at y=100, x=100 of "
                                             r"100x50 px cannot be decoded \(DeflateError: .*\)\. Re-export or "
                                             r"re-scan the file"):
            r.read_region(100, 100, 100, 50)

    strips = tmp_path / "cut.tif"  # a strip file cut short in transfer
    tifffile.imwrite(strips, img, photometric="rgb", rowsperstrip=64)
    with tifffile.TiffFile(strips) as tif:
        end = tif.pages[0].dataoffsets[3] + 1000
    strips.write_bytes(strips.read_bytes()[:end])
    with open_image(strips) as r, pytest.raises(ImageError, match=r"cut\.tif is damaged at level 0: the region at "
                                                                  r"y=0, x=0 of 512x512 px .*TiffFileError"):
        r.read_region(0, 0, 512, 512)


def test_failures_that_are_not_the_files_pass_through_and_zarr_2_still_names_the_damage(tmp_path, monkeypatch):
    _damaged_tile_tiff(tmp_path / "damaged.tif")
    with open_image(tmp_path / "damaged.tif") as r:
        monkeypatch.setitem(sys.modules, "zarr.core.sync", None)  # as under zarr 2, which has no such module
        with pytest.raises(ImageError, match="is damaged at level 0"):
            r.read_region(100, 100, 100, 50)
        monkeypatch.undo()

        class Failing:
            def __init__(self, error):
                self.error = error

            def __getitem__(self, index):
                raise self.error

        for error in (MemoryError(), OSError(5, "Input/output error")):  # out of memory, a share gone: retry
            monkeypatch.setattr(r, "_array", lambda level, error=error: Failing(error))
            with pytest.raises(type(error)):
                r.read_region(0, 0, 64, 64)


def test_a_damaged_tile_leaves_no_asyncio_noise_when_the_process_ends_at_once(tmp_path):
    """zarr reads a region's tiles as concurrent tasks; one failing used to leave the others pending, and a process
    exiting right after logged dozens of "Task was destroyed but it is pending!" lines."""
    import subprocess

    _damaged_tile_tiff(tmp_path / "damaged.tif")
    script = ("import sys\nfrom nucleiseg_monai.wsi import open_image, ImageError\n"
              "try:\n    open_image(sys.argv[1]).read_region(0, 0, 512, 512)\n"
              "except ImageError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "damaged.tif")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "is damaged at level 0" in done.stdout
    assert "Task was destroyed" not in done.stderr and "never awaited" not in done.stderr, done.stderr


def test_the_bytes_not_the_suffix_pick_the_reader_and_an_empty_file_says_so(tmp_path):
    img = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    skio.imsave(tmp_path / "tile.png", img, check_contrast=False)
    (tmp_path / "tile.png").rename(tmp_path / "png_named.tif")
    with pytest.warns(UserWarning, match=r"png_named\.tif is a PNG file despite its \.tif suffix; read as PNG "
                                         r"\(rename it to \.png"), open_image(tmp_path / "png_named.tif") as r:
        assert np.array_equal(r.read_region(0, 0, 40, 50), img)
    tifffile.imwrite(tmp_path / "tiff_named.png", img, photometric="rgb", tile=(16, 16))
    with pytest.warns(UserWarning, match=r"is a TIFF file despite its \.png suffix"), \
            open_image(tmp_path / "tiff_named.png") as r:
        assert isinstance(r, TiffReader) and np.array_equal(r.read_region(0, 0, 40, 50), img)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.tif is empty \(0 bytes\)"):
        open_image(tmp_path / "empty.tif")


def test_an_mpp_field_of_a_pipe_separated_description_is_read_also_through_openslide(tmp_path):
    img = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "scanner.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", metadata=None,
                     description="Scanner X 256x256|AppMag = 40|MPP = 0.2527")
    with open_image(path) as r:
        assert r.mpp == pytest.approx(0.2527) and r.mpp_origin == "the image description's MPP field"
    pytest.importorskip("openslide", exc_type=ImportError)
    svs = tmp_path / "scanner.svs"  # OpenSlide's generic TIFF driver states no pixel size for it
    svs.write_bytes(path.read_bytes())
    with open_image(svs) as r:
        assert type(r).__name__ == "OpenSlideReader" and r.stated_mpp == pytest.approx(0.2527)
        assert np.array_equal(r.read_region(0, 0, 256, 256), img)
