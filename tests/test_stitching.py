"""RegionStitcher on label maps alone: a known label map cut into overlapping windows, each window labelled as the
instance step would label it (the visible nuclei, ids 1..n in any order), stitched back must be the same map up to
a permutation of ids, whatever the region size and margin, with nuclei on seams, on corners where four cores meet
and on the image border."""

import numpy as np
import pytest

from nucleiseg_monai.stitching import RESCUE_PX, RegionGrid, RegionStitcher
from conftest import same_up_to_ids


def _disc_map(shape, centres, radius) -> np.ndarray:
    """Labels 1..n of discs; a later disc does not overwrite an earlier one (touching, never overlapping)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint32)
    for i, (cy, cx) in enumerate(centres, start=1):
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & (labels == 0)
        labels[disc] = i
    return _dense(labels)


def _dense(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n without gaps (a disc wholly covered by earlier ones leaves none)."""
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(labels.shape).astype(np.uint32)


def _seam_map(shape, size) -> np.ndarray:
    """Discs of radius 5 centred on every seam line, on every corner where four cores meet, on the image border,
    and pairs touching across a seam; plus a few in the cores."""
    h, w = shape
    centres = []
    for y in range(size, h, size):
        for x in range(size, w, size):
            centres += [(y, x), (y - 0.5, x + size // 2), (y + size // 2, x - 0.5)]
        centres += [(y, 3), (y, w - 4)]
    for x in range(size, w, size):
        centres += [(2, x), (h - 3, x)]
    centres += [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0)]
    centres += [(size - 5, size // 3), (size + 5, size // 3)]  # two touching across the first horizontal seam
    centres += [(size // 2, size // 2), (h - size // 3, w - size // 3)]
    return _disc_map(shape, centres, 5)


def _random_map(shape, seed, radii=(3, 5.5), count=200) -> np.ndarray:
    """Discs of radius ``radii`` at random places, many touching, none mostly hidden (margins above 11 px hold the default ones whole)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint32)
    for i in range(1, count + 1):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(*radii)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        if (labels[disc] > 0).mean() < 0.2:  # pressed against its neighbours, not a sliver under them
            labels[disc & (labels == 0)] = i
    return _dense(labels)


def _window_labels(truth: np.ndarray, window, rng) -> np.ndarray:
    """The nuclei visible in a window, with ids 1..n in a random order, as an instance step would number them."""
    wy, wx, wh, ww = window
    crop = truth[wy:wy + wh, wx:wx + ww]
    present = np.unique(crop[crop > 0])
    lookup = np.zeros(int(truth.max()) + 1, np.uint32)
    lookup[present] = rng.permutation(len(present)) + 1
    return lookup[crop]


def _assemble(tiles, shape, tile) -> np.ndarray:
    rows, cols = -(-shape[0] // tile), -(-shape[1] // tile)
    full = np.zeros((rows * tile, cols * tile), np.uint32)
    for k, block in enumerate(tiles):
        r, c = divmod(k, cols)
        full[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = block
    assert k == rows * cols - 1  # every tile handed out exactly once
    return full[: shape[0], : shape[1]]


def _stitch(truth, size, margin, tile=32, todo=None, labeller=None, seed=0):
    """Each region's window labels through the stitcher, tiles collected as they are handed out."""
    rng = np.random.default_rng(seed)
    grid = RegionGrid(truth.shape, size, margin)
    stitcher = RegionStitcher(grid, todo, tile)
    labeller = labeller or (lambda ij, window: _window_labels(truth, window, rng))
    tiles = []
    for ij in np.ndindex(*grid.rows_cols):
        if todo is None or todo[ij]:
            stitcher.add(ij, labeller(ij, grid.window(ij)))
        tiles += list(stitcher.tiles())
    tiles += list(stitcher.tiles())
    return _assemble(tiles, truth.shape, tile), stitcher


@pytest.mark.parametrize("shape, size, margin", [((96, 128), 32, 12), ((100, 130), 40, 20), ((97, 131), 37, 11),
                                                 ((64, 64), 64, 0), ((130, 90), 25, 16)])
def test_windows_stitch_back_to_the_map_they_were_cut_from(shape, size, margin):
    for truth in (_seam_map(shape, size), _random_map(shape, seed=size)):
        stitched, stitcher = _stitch(truth, size, margin)
        assert same_up_to_ids(stitched, truth)
        n = int(truth.max())
        assert stitcher.nuclei == n == len(np.unique(truth)) - 1
        assert np.array_equal(np.unique(stitched), np.arange(n + 1))  # ids 1..N, no gaps
        assert stitcher.truncated == 0


def test_a_margin_smaller_than_a_nucleus_is_reported_as_truncation():
    truth = _disc_map((64, 96), [(32, 30), (32, 60)], 9)  # discs 19 px wide, a core seam at x = 32 and 64
    _, stitcher = _stitch(truth, 32, 4)
    assert stitcher.truncated > 0


def test_skipped_regions_keep_nothing_of_their_own_and_everything_else():
    """A skipped core's nuclei are absent, except those a neighbour rescues (anchor within RESCUE_PX of it)."""
    shape, size = (144, 192), 48
    truth = _random_map(shape, seed=3)
    todo = np.ones((3, 4), bool)
    todo[1, 2] = False
    stitched, stitcher = _stitch(truth, size, 12, todo=todo)
    grid = RegionGrid(shape, size, 12)
    y0, x0, y1, x1 = grid.core((1, 2))
    ys, xs = np.nonzero(truth)
    ids = truth[ys, xs].astype(np.int64)
    n = np.bincount(ids)
    anchor_y, anchor_x = np.bincount(ids, ys) // np.maximum(n, 1), np.bincount(ids, xs) // np.maximum(n, 1)
    skipped = {i for i in range(1, len(n)) if y0 <= anchor_y[i] < y1 and x0 <= anchor_x[i] < x1}
    d = RESCUE_PX
    deep = {i for i in skipped if y0 + d < anchor_y[i] < y1 - 1 - d and x0 + d < anchor_x[i] < x1 - 1 - d}
    assert deep  # the skipped core owned nuclei no neighbour may rescue
    found = {int(i) for i in np.unique(truth[stitched > 0])} - {0}
    assert found >= set(range(1, int(truth.max()) + 1)) - skipped and not found & deep
    assert stitcher.nuclei == len(found)


def test_windows_that_disagree_by_a_pixel_still_give_each_nucleus_once():
    """Each region's labels move by one pixel, in opposite directions in neighbouring regions, so near a seam one
    window puts a nucleus's anchor on one side and the next window on the other."""
    truth = _random_map((192, 240), seed=7, radii=(5, 10), count=120)
    rng = np.random.default_rng(0)

    def shifted(ij, window):
        labels = _window_labels(truth, window, rng)
        dy, dx = (1 if ij[0] % 2 == 0 else -1), (1 if ij[1] % 2 == 0 else -1)
        moved, (h, w) = np.zeros_like(labels), labels.shape
        moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            labels[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return moved

    stitched, stitcher = _stitch(truth, 48, 24, labeller=shifted)
    assert stitcher.nuclei == truth.max()
    overlap = np.zeros((int(truth.max()) + 1, stitcher.nuclei + 1), np.int64)
    np.add.at(overlap, (truth.ravel(), stitched.ravel()), 1)
    best = overlap[1:, 1:].argmax(1)
    assert len(np.unique(best)) == len(best)  # each true nucleus found once, nothing found twice
    share = overlap[1:, 1:].max(1) / overlap[1:].sum(1)
    assert share.min() > 0.4  # a 1 px shift costs small nuclei some overlap


def test_regions_are_added_once_and_with_their_window_shape():
    stitcher = RegionStitcher(RegionGrid((64, 64), 32, 8), tile=32)
    with pytest.raises(ValueError, match="window"):
        stitcher.add((0, 0), np.zeros((32, 32), np.uint32))
    stitcher.add((0, 1), np.zeros((40, 40), np.uint32))
    with pytest.raises(ValueError, match="already added"):
        stitcher.add((0, 1), np.zeros((40, 40), np.uint32))
