"""Tiles on disk: Kaggle-layout discovery (CryoNuSeg, NuInsSeg), validated reading, the organ-stratified split and
channel statistics (sources.py combines several sources into one datalist).

The official Kaggle layout is ``tissue images/<name>.tif`` with ``label masks modify/<name>.tif`` (instance ids)
and ``mask binary/<name>.png`` (0/255). The newer Kaggle archive nests these folders under
``Annotator 1 (biologist)/``; both are accepted. Names look like ``Human_<Organ>_<NN>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio
from skimage.measure import label as connected_components

from .wsi import ImageError, rgb_uint8

logger = logging.getLogger(__name__)

IMAGE_DIR = "tissue images"
INSTANCE_DIR = "label masks modify"
BINARY_DIR = "mask binary"
NESTED_DIR = "Annotator 1 (biologist)"  # newer archives: the first annotation round, the published ground truth
# files a dataset folder holds as tiles and label maps (any other file there, notes or thumbnails, is passed over)
DATASET_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
NAME_PATTERN = re.compile(r"^(?:Human|Mouse)_(?P<organ>[A-Za-z-]+?)_(?P<index>\d+)$")


class DataError(ValueError):
    """A dataset file or folder that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    name: str
    organ: str
    image: Path
    label: Path
    label_kind: str  # "instance" or "binary"

    def record(self, root: Path | None = None) -> dict:
        # "/" whatever system wrote it: a datalist travels in a bundle, and "\\" is part of a name on Linux and macOS
        rel = (lambda p: Path(os.path.relpath(p, root)).as_posix()) if root is not None else str
        return {"image": rel(self.image), "label": rel(self.label), "label_kind": self.label_kind,
                "name": self.name, "organ": self.organ}


def organ_of(name: str) -> str:
    """``Human_AdrenalGland_01`` -> ``AdrenalGland``; names outside the convention count as their own organ."""
    match = NAME_PATTERN.match(name)
    return match.group("organ") if match else name


def dataset_root(path: str | os.PathLike) -> Path:
    """The folder holding ``tissue images``: ``path`` itself or its ``Annotator 1 (biologist)`` subfolder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(
            f"dataset folder {path} does not exist; download CryoNuSeg with `nucleiseg download --dest {path}` "
            "or pass --dataset_dir pointing at the folder that holds 'tissue images'"
        )
    for candidate in (path, path / NESTED_DIR):
        if (candidate / IMAGE_DIR).is_dir():
            return candidate
    raise DataError(
        f"{path} holds no '{IMAGE_DIR}' folder (nor '{NESTED_DIR}/{IMAGE_DIR}'); point --dataset_dir at the "
        "unpacked CryoNuSeg folder"
    )


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Tiles or label maps by file stem; two files of one stem (case02.png and case02.tif) are refused, since
    either could be the one meant."""
    if not folder.is_dir():
        return {}
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in DATASET_IMAGE_SUFFIXES and p.is_file():
            if p.stem in files:
                raise DataError(f"{files[p.stem]} and {p} have the same name {p.stem!r}; tiles and labels pair by "
                                "name, so remove or rename one of them")
            files[p.stem] = p
    return files


def discover(dataset_dir: str | os.PathLike) -> list[Sample]:
    """Pairs every tissue image with its label map by name, preferring instance labels over binary masks."""
    root = dataset_root(dataset_dir)
    images = _files_by_stem(root / IMAGE_DIR)
    if not images:
        raise DataError(f"{root / IMAGE_DIR} holds no images ({', '.join(DATASET_IMAGE_SUFFIXES)})")
    # the newer Kaggle archive keeps 'tissue images' at the top and each annotator's labels in a folder of its own
    label_root = root
    if not any((root / d).is_dir() for d in (INSTANCE_DIR, BINARY_DIR)) and (root / NESTED_DIR).is_dir():
        label_root = root / NESTED_DIR
    instances = _files_by_stem(label_root / INSTANCE_DIR)
    binaries = _files_by_stem(label_root / BINARY_DIR)
    labels, kind = (instances, "instance") if instances else (binaries, "binary")
    if not labels:
        raise DataError(
            f"{root} has neither '{INSTANCE_DIR}' nor '{BINARY_DIR}' with label files; the download is incomplete"
        )
    if kind == "binary":
        warn_binary_labels(f"{root} has no '{INSTANCE_DIR}' folder")
    missing_label = sorted(set(images) - set(labels))
    missing_image = sorted(set(labels) - set(images))
    if missing_label:
        raise DataError(
            f"no label in {label_root / (INSTANCE_DIR if kind == 'instance' else BINARY_DIR)} for image(s) "
            f"{', '.join(str(images[n]) for n in missing_label)}; add the label or remove the image"
        )
    if missing_image:
        raise DataError(
            f"label(s) without an image in {root / IMAGE_DIR}: "
            f"{', '.join(str(labels[n]) for n in missing_image)}; add the image or remove the label"
        )
    return [Sample(n, organ_of(n), images[n], labels[n], kind) for n in sorted(images)]


def _read(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)
        else:
            array = skio.imread(path)
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist; check the data folder (--data_root) and the datalist") from err
    except Exception as err:  # every decoder raises its own type; the caller needs the file name
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}); the file is damaged: replace it") from err
    if array.size == 0:  # a TIFF cut after its header reads as an empty float64 array, not an error
        raise DataError(f"{path} holds no pixel data; the file is damaged or truncated: replace it")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) under the reader policy's training rules (``wsi.rgb_uint8``): opaque RGBA loses
    its alpha, 16-bit, grey and transparent images are refused."""
    path = Path(path)
    try:
        return rgb_uint8(_read(path), path, training=True)
    except ImageError as err:
        raise DataError(str(err)) from err


# Lossy compression turns a label map's edges into new values: each would read as a nucleus of a few pixels.
LOSSY_LABEL_SUFFIXES = (".jpg", ".jpeg")
LABEL_SUFFIXES = tuple(s for s in DATASET_IMAGE_SUFFIXES if s not in LOSSY_LABEL_SUFFIXES)


def _read_labels(path: Path) -> np.ndarray:
    """A label file's values: a palette PNG's indices where its index 0 is black (annotation tools write ids so;
    imageio would give the palette's colours), and one channel of a map whose three channels agree (ids copied into
    RGB). A palette whose index 0 is another colour is a colour-coded map saved indexed: its background would read
    as a nucleus, so it is read as colours (and refused, with the line that turns it into ids). An 8-bit map whose
    ids wrapped past 255 is refused (``_refuse_wrapped_ids``)."""
    labels = _label_values(path)
    _refuse_wrapped_ids(path, labels)
    return labels


def _label_values(path: Path) -> np.ndarray:
    """A label file's values as ``_read_labels`` describes, before the check for wrapped ids."""
    if path.suffix.lower() in LOSSY_LABEL_SUFFIXES:
        raise DataError(f"{path} is a JPEG label map: lossy compression changes the ids along every edge; save "
                        "label maps losslessly, as PNG or TIFF, with one integer id per nucleus")
    if path.suffix.lower() == ".png" and path.is_file():
        from PIL import Image

        try:
            with Image.open(path) as image:
                if image.mode == "P" and (image.getpalette() or [0, 0, 0])[:3] == [0, 0, 0]:
                    return np.asarray(image)
        except OSError:
            pass  # _read names the damage
    labels = _read(path)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and (labels[..., :3] == labels[..., :1]).all():
        labels = labels[..., 0]
    return labels


# An 8-bit map of more than 255 nuclei keeps each id modulo 256: nucleus 256 turns background and 257 on share ids
# 1, 2, ... with nuclei elsewhere in the tile. Real annotations also give an id two pieces, but close together (a
# nucleus cut by a thin line, a speck beside it): across the 603 16-bit maps of CryoNuSeg (with its observers),
# MoNuSeg and NuInsSeg no map holds more than one id whose two largest pieces of 10 px or more lie over 4 nucleus
# diameters apart. Wrapped ids lie wherever the tile put the two nuclei, mostly much further, so 3 such ids mark a
# map as wrapped and leave room for a real map's quirks; fewer merged nuclei than that pass unseen.
WRAP_MIN_PIECE = 10  # pixels: smaller pieces are annotation specks, not nuclei
WRAP_FAR = 4  # nucleus diameters (of the id's largest piece) between the centres of its two largest pieces
WRAP_MIN_IDS = 3  # ids so shared that refuse a map


def _far_apart_ids(labels: np.ndarray) -> int:
    """How many ids hold two pieces of WRAP_MIN_PIECE pixels or more whose centres lie over WRAP_FAR diameters
    apart (pieces: 8-connected regions of one id). In arrays, not per piece: a greyscale image saved as labels has
    hundreds of thousands of pieces."""
    pieces = connected_components(labels, connectivity=2).ravel()
    area = np.bincount(pieces)
    rows, cols = np.divmod(np.arange(pieces.size), labels.shape[1])
    centre_y, centre_x = (np.bincount(pieces, weights=rows) / np.maximum(area, 1),
                          np.bincount(pieces, weights=cols) / np.maximum(area, 1))
    id_of = np.zeros(area.size, np.int64)
    id_of[pieces] = labels.ravel()
    kept = np.flatnonzero((area >= WRAP_MIN_PIECE) & (id_of > 0))
    kept = kept[np.lexsort((-area[kept], id_of[kept]))]  # by id, each id's largest piece first
    ids = id_of[kept]
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # each id's largest piece
    has_second = first + 1 < kept.size
    first = first[has_second]
    first = first[ids[first + 1] == ids[first]]
    largest, second = kept[first], kept[first + 1]
    distance = np.hypot(centre_y[largest] - centre_y[second], centre_x[largest] - centre_x[second])
    diameter = np.sqrt(4 * area[largest] / np.pi)  # of a disc of the largest piece's area
    return int(np.count_nonzero(distance > WRAP_FAR * diameter))


def _refuse_wrapped_ids(path: Path, labels: np.ndarray) -> None:
    """Refuses an 8-bit label map whose ids seem to have wrapped at 255. Only a uint8 map whose ids reach 255 can
    have wrapped, so other maps cost at most one max; a binary 0/255 mask (one id of many pieces) is no wrapped map."""
    if labels.dtype != np.uint8 or labels.ndim != 2 or labels.max() < 255:
        return
    if np.count_nonzero(np.bincount(labels.ravel(), minlength=256)[1:]) < WRAP_MIN_IDS:
        return
    if (far := _far_apart_ids(labels)) >= WRAP_MIN_IDS:
        raise DataError(
            f"{path} is an 8-bit label map whose ids seem to have wrapped at 255: {far} ids each mark nuclei far "
            "apart (a map of more than 255 nuclei saved as uint8 keeps each id modulo 256, so distinct nuclei share "
            "an id and nucleus 256 becomes background). The wrapped file cannot be repaired reliably: save the "
            "original annotation's ids again as 16-bit, e.g. tifffile.imwrite(\"labels.tif\", ids.astype(np.uint16)) "
            "or imageio.imwrite(\"labels.png\", ids.astype(np.uint16)), ids being its (H, W) array of ids"
        )


def read_instance_labels(path: str | os.PathLike, kind: str = "instance") -> np.ndarray:
    """An int32 instance map (H, W), 0 = background; binary masks become connected components."""
    path = Path(path)
    labels = _read_labels(path)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and kind == "binary":
        labels = labels[..., 0]
    if labels.ndim != 2:
        colours = (" of different colours per pixel: if it colour-codes the nuclei (one colour each, black "
                   "background), turn it into ids with np.unique(rgb[..., :3].reshape(-1, 3), axis=0, "
                   "return_inverse=True)[1].reshape(rgb.shape[:2]) (0 must stay the background)"
                   if labels.ndim == 3 and labels.shape[-1] in (3, 4) else "")
        raise DataError(f"{path} has shape {labels.shape}{colours}; a label map must be a single-channel (H, W) "
                        "image of integer ids: save it as a 16-bit greyscale PNG or a TIFF")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise DataError(f"{path} has {labels.dtype} values; label maps must hold integer ids")
    if kind == "binary":
        return connected_components(labels > 0, connectivity=1).astype(np.int32)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path} holds negative ids (down to {labels.min()}); a label map holds 0 for background "
                        "and a positive id per nucleus")
    if labels.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path} holds ids above 2**31; relabel it with skimage.segmentation.relabel_sequential")
    return labels.astype(np.int32)


def warn_binary_labels(what: str) -> None:
    """The one warning for label maps that are binary masks, whichever layout they come from."""
    logger.warning(
        "%s: instance labels are derived from the binary masks by connected components, so touching nuclei count "
        "as one (a binary mask cannot separate them); give label maps with one id per nucleus where you have them",
        what,
    )


def is_binary_mask(path: str | os.PathLike) -> bool:
    """Whether a label map is a binary mask (0/255, 0/1, bool: only 0 and one other value) of several pieces.

    Read as instance ids it would be one nucleus per tile. A map of one piece reads the same either way (a tile
    with one nucleus), so it is not counted; an RGB mask counts where its channels agree.
    """
    labels = _read_labels(Path(path))
    if labels.ndim != 2:
        return False  # read_instance_labels names the shape
    values = np.unique(labels)
    if len(values) != 2 or values[0] != 0:
        return False
    return int(connected_components(labels > 0, connectivity=1).max()) > 1


def check_sample(sample: Sample) -> bool:
    """Reads both files of a sample and checks they agree, so a bad file fails before training starts. Returns
    whether the label map holds any nucleus (an all-zero map may be a failed export: the caller says so)."""
    image = read_image(sample.image)
    labels = read_instance_labels(sample.label, sample.label_kind)
    if image.shape[:2] != labels.shape:
        raise DataError(
            f"size mismatch: {sample.image} is {image.shape[1]}x{image.shape[0]} but {sample.label} is "
            f"{labels.shape[1]}x{labels.shape[0]}; they must be the same tile"
        )
    return bool(labels.any())


def check_sizes(pairs: Iterable[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Refuses (DataError, naming every one) image and label files whose sizes differ, from their headers alone:
    a fast look at every tile before a long run starts (an evaluation, which replaces its earlier report as it
    starts), where reading them all would take as long as the run. Files whose header cannot be read are left to
    the reading that follows, which names their damage."""
    wrong = []
    for image, label in pairs:
        sizes = [_header_size(Path(image)), _header_size(Path(label))]
        if None not in sizes and sizes[0] != sizes[1]:
            (ih, iw), (lh, lw) = sizes
            wrong.append(f"{image} is {iw}x{ih} but {label} is {lw}x{lh}")
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise DataError(f"size mismatch in {len(wrong)} tile(s): {shown}; an image and its label map must be the "
                        "same tile")


def _header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file, read from its header; None where it cannot be."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # every decoder raises its own type; the full read names the damage
        return None


def _stable_rank(name: str, seed: int) -> str:
    """An order that is the same on every machine and Python (unlike hash())."""
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split(
    samples: Sequence[Sample], val_fraction: float = 0.15, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, list[Sample]]:
    """Deterministic organ-stratified train / validation / test split.

    Each organ gives ``round(n * test_fraction)`` tiles to test (at least one where it has three or more and
    test_fraction > 0; never its last); validation takes ``round(N * val_fraction)`` tiles, at most one per
    organ in turn, never an organ's last training tile: every organ stays in training.
    """
    by_organ: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: _stable_rank(s.name, seed)):
        by_organ[s.organ].append(s)
    parts: dict[str, list[Sample]] = {"training": [], "validation": [], "test": []}
    remaining: dict[str, list[Sample]] = {}
    for organ, group in sorted(by_organ.items()):
        n_test = max(int(round(len(group) * test_fraction)), 1 if len(group) >= 3 and test_fraction > 0 else 0)
        n_test = min(n_test, len(group) - 1)  # a large test_fraction must not take an organ's last tile
        parts["test"] += group[:n_test]
        remaining[organ] = group[n_test:]
    n_val = int(round(len(samples) * val_fraction))
    organs = sorted(remaining, key=lambda o: _stable_rank(o, seed))
    while n_val > 0 and any(len(g) > 1 for g in remaining.values()):
        for organ in organs:
            if n_val > 0 and len(remaining[organ]) > 1:
                parts["validation"].append(remaining[organ].pop(0))
                n_val -= 1
    for group in remaining.values():
        parts["training"] += group
    return {k: sorted(v, key=lambda s: s.name) for k, v in parts.items()}


def channel_stats(images: Iterable[str | os.PathLike]) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation over all pixels of the given images, on the 0-255 scale."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in images:
        pixels = read_image(path).reshape(-1, 3).astype(np.float64)
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    if count == 0:
        raise DataError("no training images to compute channel statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std]}


def load_stats(stats_file: str | os.PathLike) -> dict[str, list[float]]:
    """The channel mean and std JSON written by training ({"mean": [r, g, b], "std": [r, g, b]}, 0-255 scale)."""
    path = Path(stats_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"channel statistics {path} are missing; they are written by training next to the checkpoint "
            "(or run `nucleiseg datalist --data_root DIR --output models/datalist.json --stats models/channel_stats.json`)"
        )
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"cannot read channel statistics from {path} ({err}); expected JSON {{\"mean\": [r, g, b], "
            "\"std\": [r, g, b]}} on the 0-255 scale, as written by training"
        ) from err
