"""Tile and whole-slide inference: the predictor's loop over regions, and the parts it is given: the network made
ready for inference (``InferenceNetwork``), the regions planned (``RegionPlanner``) and how the outputs are written
(``outputs.OutputOptions``); within the loop the windows are stitched (``stitching.RegionStitcher``) and the
outputs written (``outputs.SlideOutputs``). A bundle's configs/inference.json builds the parts (``predictor#network``,
``predictor#planner``, ``predictor#outputs``), and ``SlidePredictor.from_bundle`` builds a predictor from it.

A slide is cut into square *cores* that partition the read pyramid level. Each core is read with a margin of
context on every side (cut at the image's edge, and padded to the network's multiple by mirroring), the network runs
over that window (in one pass, as shipped, or in MONAI's gaussian-blended sliding windows: ``inferers``), and
``postprocess.instances_from_probs`` turns the softmax into instances. The stitcher decides which window keeps
each nucleus (exact at seams; see ``stitching``); kept nuclei are measured and written whole, and finished tile
rows of the label map are streamed to the BigTIFF writer, so memory is bounded by region size x slide width, never
by slide area. With ``prefetch`` the network already runs on the next region (in a second
thread) while this one is post-processed and written.

Within a region of interest (the predictor's ``roi``, from QuPath's GeoJSON: ``roi``), only the regions whose core
it may reach are analysed, and the stitcher keeps only the nuclei whose centroid lies inside it, so every output
holds the whole-image run's nuclei of that area and no others.

One physical scale: the network and the watershed work at the model's pixel size (``mpp``, the *working* scale).
The level closest to it is read, and each window resampled to the working scale where the level's pixel size
differs, its labels mapped back before stitching (``scaling``), so the label map, GeoJSON, CSV and overlay are all on
the input's own grid, with its own pixel size. ``region_size`` and ``region_margin`` are working pixels, converted
to read pixels per image, so a region costs the same whatever the file's scale and the margin still covers the
largest nucleus.

Each slide's result holds the seconds spent per phase (``PHASES``), measured by the predictor itself.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_numpy
from tqdm.auto import tqdm

from . import __version__, earlier_outputs
from .atomic import remove_stale
from .bundle import own_folder
from .data import load_stats
from .earlier_outputs import finished_outputs, refusals, remove_leftovers_of_finished
from .handlers import parse_bool
from .inferers import window_inferer
from .inputs import dicom_slide_file, find_images, image_name, image_names
from .networks import load_weights, weights_sha256
from .openvino_cache import RUNTIME_LIBRARIES, library_version
from .outputs import ImageLock, OutputOptions, Overlay, SlideOutputs, remove_temporaries, source_fingerprint
from .postprocess import activate, instances_from_probs
from .region_journal import RegionJournal, journal_folder, remove_journal
from .roi import Roi, read_roi
from .runtimes import EXAMPLE_SIDE, SyntheticCalibration, int8_available, prepare_network
from .scaling import SCALE_TOLERANCE, lattice_scale, to_read_grid, to_working_scale
from .stitching import RegionGrid, RegionStitcher
from .wsi import (ArrayReader, ImageError, SlideReader, TissueMask, check_mpp, doubtful_mpp, open_image,
                  tissue_mask)

logger = logging.getLogger(__name__)

# The phases whose seconds each slide's result records: "watershed" is the instance step, "measurements" the
# per-nucleus measurements with their GeoJSON / CSV lines and overlay drawing, "writing" the label BigTIFF and the
# final moves into place.
PHASES = ("read", "tissue_mask", "network", "watershed", "stitching", "measurements", "writing")


@dataclass
class SlideResult:
    """What one image produced. ``mpp``: microns per pixel of the read level (None when unknown), from
    ``mpp_source`` ("file", "input_mpp", "assumed" or "unknown"); ``scale``: working pixels per read pixel
    (1.0: analysed as read); ``tissue_fraction``: the share of the image the low-resolution tissue mask covers;
    ``timings``: seconds per phase (``PHASES``). With ``prefetch``, read and network run beside the other phases,
    so the phases can sum to more than ``seconds``."""

    path: str
    name: str
    nuclei: int
    seconds: float
    shape: tuple[int, int]
    level: int
    mpp: float | None
    mpp_source: str
    scale: float
    regions: int
    regions_processed: int
    truncated: int
    tissue_fraction: float
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Results of ``SlidePredictor.run``: finished, skipped (outputs already complete) and failed images."""

    done: list[SlideResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def lookahead(fn: Callable, items: Iterable, enabled: bool = True) -> Iterator:
    """``map(fn, items)``, computing the next result in a background thread while the caller uses this one.

    For the network on region k + 1 while region k is post-processed and written: the network's operators release
    the GIL and use every core, the post-processing mostly one, so the two overlap. One result is held ahead, and
    an exception from ``fn`` is raised in the caller at the item it belongs to. Close the generator (``closing``)
    to stop early; a running call is waited for, queued ones are cancelled.
    """
    if not enabled:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="nucleiseg-lookahead")
    try:
        pending: Future | None = None
        for item in items:
            future = pool.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {output_dir} ({err.strerror or err}); "
                      "choose another output_dir (nucleiseg predict --output_dir)") from err
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OSError(f"the output folder {output_dir} is not writable; choose another output_dir "
                      "(nucleiseg predict --output_dir) or fix its permissions")


class InferenceNetwork:
    """A network made ready for inference, with the channel statistics it was trained with and its inferer
    (``inferers.window_inferer``): an RGB window in, probabilities at the working scale out.

    Args:
        network: torch module, z-scored float (N, 3, H, W) -> (N, 3 or 4, H, W) logits (background, interior,
            boundary, and optionally the distance map: ``postprocess.activate``); put in eval mode here.
        channel_mean, channel_std: per-channel statistics on the 0-255 scale; or ``channel_stats``, a JSON file.
        checkpoint: optional state-dict file to load into ``network`` (raw, or under "network"/"model"/...).
        roi_size, overlap, sw_batch_size: the network's windows inside each region: None runs each region in one
            pass (padded to the network's multiple), else gaussian-blended windows of ``roi_size`` px (a multiple of
            2**depth for the U-Net). padding_mode: how that padding is filled (``inferers.pad_centred``).
        device: torch device; CUDA when available by default.
        amp: bf16 (autocast for "eager", bf16 weights or inference precision for the others), else float32;
            channels_last: channels-last memory layout for "eager" (the other runtimes choose their own).
        runtime: "eager" (the network as trained), or a fast inference copy from
            ``runtimes.prepare_for_inference``: "openvino" (CPU), "torch" (batch norm folded, any device) or
            "auto" (OpenVINO on a CPU where it is installed, else "torch").
        int8: OpenVINO with int8 weights and activations (NNCF post-training quantisation, its ranges set on fixed
            synthetic tiles: ``synthetic_inputs``). With runtime "auto" it applies where OpenVINO and NNCF
            are installed and the device is a CPU (else ``amp`` decides, and one log line says so); "openvino"
            requires NNCF; the other runtimes refuse it.
        test_time_flips: 1, or 2 or 4 to average the outputs over the region and its flips
            (``inferers.FlipInferer``): that many network passes.
        prepare: False builds only what ``SlidePredictor.settings`` reads (the weights' hash, the statistics, the
            options), not the network that runs: a cohort's client compares finished outputs with these settings
            without the seconds an OpenVINO model takes, nor a GPU's memory. Such a network refuses to run.
    """

    def __init__(self, network: torch.nn.Module, channel_mean: Sequence[float] | None = None,
                 channel_std: Sequence[float] | None = None, channel_stats: str | os.PathLike | None = None,
                 checkpoint: str | os.PathLike | None = None, roi_size: int | None = 512, overlap: float = 0.25,
                 sw_batch_size: int = 4, padding_mode: str = "reflect", device: str | torch.device | None = None,
                 amp: bool = False, channels_last: bool = False, runtime: str = "eager", int8: bool = False,
                 test_time_flips: int = 1, prepare: bool = True):
        if channel_stats is not None:
            stats = load_stats(channel_stats)
            channel_mean, channel_std = stats["mean"], stats["std"]
        if channel_mean is None or channel_std is None:
            raise ValueError("InferenceNetwork needs channel_mean and channel_std, or channel_stats (a JSON file)")
        if len(channel_mean) != 3 or len(channel_std) != 3 or min(channel_std) <= 0:
            raise ValueError(f"channel stats must be 3 means and 3 positive stds, got {channel_mean}, {channel_std}")
        # ``monai.bundle run ... --predictor#network#int8 false`` hands over the text 'false', which is truthy
        amp, channels_last, int8, prepare = (
            parse_bool(value, f"predictor#network#{name}") for name, value in
            (("amp", amp), ("channels_last", channels_last), ("int8", int8), ("prepare", prepare)))
        if checkpoint is not None:
            load_weights(network, checkpoint)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights_sha256 = weights_sha256(network)
        self.runtime = runtime
        # unprepared, nothing goes to the device: a client on a GPU machine would hold a CUDA context for nothing
        device = self.device if prepare else torch.device("cpu")
        self.mean = torch.as_tensor(channel_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(channel_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        example = roi_size or EXAMPLE_SIDE
        if int8 and runtime == "auto" and not int8_available(self.device):
            logger.info("int8 needs OpenVINO and NNCF on a CPU (pip install 'nucleiseg-monai[cpu-runtimes]'); "
                        "running %s instead", "bf16" if amp else "float32")
            int8 = False
        calibration = SyntheticCalibration(self.mean, self.std) if int8 else None
        self.network = prepare_network(network.to(self.device).eval(), runtime, amp, channels_last,
                                       (sw_batch_size, 3, example, example), self.weights_sha256, self.device,
                                       calibration) if prepare else None
        self.inferer = window_inferer(roi_size, overlap, getattr(network, "multiple", 1), sw_batch_size,
                                      padding_mode, self.device, test_time_flips)
        self.roi_size, self.overlap, self.amp, self.int8 = roi_size, overlap, amp, int8
        self.sw_batch_size, self.padding_mode = sw_batch_size, padding_mode
        self.test_time_flips = int(test_time_flips)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).float()

    def probs(self, rgb: np.ndarray, scale: Fraction = Fraction(1)) -> np.ndarray:
        """Probabilities (``postprocess.activate``: 3 or 4, floor(h * scale), floor(w * scale)) float32 of an RGB
        uint8 window (h, w, 3), resampled by ``scale`` first (``to_working_scale``)."""
        if self.network is None:
            raise RuntimeError("this InferenceNetwork was built with prepare=False, for its settings only; build it "
                               "with prepare=True (predictor#network#prepare, the default) to run it")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
            x = (to_working_scale(x, scale) - self.mean) / self.std
            probs = activate(self.inferer(x, self._forward), inplace=True)[0]
            return probs.cpu().numpy()


@dataclass(frozen=True)
class Plan:
    """One image as the predictor walks it: its reader, working pixels per read pixel (``scale``), the region grid
    in read pixels, the regions to process (``todo``), the share of the image that is tissue, where the pixel
    size came from ("file", "input_mpp", "assumed" or "unknown"), and with an ROI the shares of the image inside it
    and of tissue inside it (at the tissue mask's resolution)."""

    reader: SlideReader
    scale: Fraction
    grid: RegionGrid
    todo: np.ndarray
    tissue_fraction: float
    mpp_source: str
    roi_fraction: float | None = None
    roi_tissue_fraction: float | None = None


def default_region_size(device: torch.device | str) -> int:
    """The core side, in working pixels, for a network on ``device``: 1536 on a CPU without AVX-512, 1024 elsewhere.

    Each core is read with its margins (``RegionPlanner``), so the network computes (1 + 2 margin / core)^2 pixels
    per image pixel: 1.56 at 1024 px, 1.36 at 1536 px. Where the network is most of the time, as with int8 on an
    AVX2-only CPU (no VNNI), the larger core pays for its memory; on AVX-512 CPUs, where the watershed and the
    measurements take most of the time, larger regions were slower, and 1024 px stays (the model card's Speed)."""
    device = torch.device(device)
    if device.type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return 1536
    return 1024


class RegionPlanner:
    """Which regions of an image to analyse, and at which scale.

    Args:
        region_size: core side in working pixels; memory grows with region_size**2 and with region_size x slide
            width.
        region_margin: context on each side of a core, in working pixels; must exceed the largest nucleus radius
            plus the width over which the network's output depends on the window border.
        mpp: the working pixel size (microns per pixel; the bundle's ``microns_per_pixel``): the pyramid level
            closest to it is read and each region resampled to it (module docstring). None analyses images as read.
        tissue_threshold: regions whose core has at most this tissue share (low-resolution saturation mask) are
            skipped; None processes every region. Images that fit in one region are never skipped.
        max_regions: process at most this many tissue regions per image (previews, benchmarks); the outputs
            still cover the whole image.
    """

    def __init__(self, region_size: int = 2048, region_margin: int = 128, mpp: float | None = None,
                 tissue_threshold: float | None = 0.0, max_regions: int | None = None):
        if region_size < 1 or region_margin < 0:
            raise ValueError(f"region_size must be >= 1 and region_margin >= 0, got {region_size}, {region_margin}")
        self.region_size, self.region_margin = int(region_size), int(region_margin)
        self.mpp = None if mpp is None else float(mpp)
        self.tissue_threshold, self.max_regions = tissue_threshold, max_regions

    def plan(self, reader: SlideReader, thumbnail: np.ndarray, input_mpp: float | None, roi: Roi | None = None
             ) -> Plan:
        """The image's scale against the working pixel size, its region grid in read pixels (multiples of the
        scale's denominator: every window starts on a whole working pixel) and the regions to process: tissue
        present (for multi-region images; the mask is built from ``thumbnail``), touching the ``roi`` where one is
        given, at most ``max_regions``."""
        if reader.base_mpp is None:
            source = "unknown"
        elif reader.stated_mpp is not None and reader.base_mpp == reader.stated_mpp:
            source = "file"
        else:  # the file states none, or a forced input_mpp replaced what it states
            source = "input_mpp" if input_mpp is not None else "assumed"
        scale = Fraction(1)
        if self.mpp is not None and reader.mpp is not None:
            scale = lattice_scale(reader.mpp / self.mpp)
        p, q = scale.numerator, scale.denominator
        size = q * max(1, round(self.region_size / p))
        grid = RegionGrid(reader.shape, size, q * math.ceil(self.region_margin / p))
        mask = tissue_mask(reader, thumbnail=thumbnail)
        todo = np.ones(grid.rows_cols, bool)
        if self.tissue_threshold is not None and todo.size > 1:
            for i, j in np.ndindex(*todo.shape):
                todo[i, j] = mask.fraction(i * size, j * size, size, size) > self.tissue_threshold
        roi_fraction = roi_tissue_fraction = None
        if roi is not None:
            # level-0 pixels per pixel of the tissue mask, the grid both ROI masks are drawn on
            per_pixel = (mask.downsample[0] * reader.downsample, mask.downsample[1] * reader.downsample)
            todo &= _touching(roi, reader, mask, per_pixel, grid)
            inside = roi.mask(mask.mask.shape, per_pixel)
            roi_fraction, roi_tissue_fraction = float(inside.mean()), float((inside & mask.mask).mean())
        if self.max_regions is not None:
            keep = np.flatnonzero(todo.ravel())[: self.max_regions]
            todo = np.zeros_like(todo)
            todo.ravel()[keep] = True
        return Plan(reader, scale, grid, todo, mask.fraction(0, 0, *reader.shape), source, roi_fraction,
                    roi_tissue_fraction)


def _touching(roi: Roi, reader: SlideReader, mask: TissueMask, per_pixel: tuple[float, float], grid: RegionGrid
              ) -> np.ndarray:
    """Which regions of ``grid`` have a core the ROI may reach, from a generous mask at the tissue mask's
    resolution: a region kept for nothing costs its seconds, one left out would lose nuclei. ImageError where the
    ROI misses the image altogether (coordinates of another image, or of another level than level 0)."""
    if reader.bounds is not None:
        x, y, width, height = reader.bounds
        raise ImageError(f"{reader.path} states a scanned area of {width} x {height} px at ({x}, {y}) within level 0 "
                         "(OpenSlide's bounds), and QuPath shows such a slide cropped to it, so an ROI drawn there is "
                         f"offset by ({x}, {y}) px from this file's pixels: ROIs on such slides are not supported yet; "
                         "run without --roi (the roi column)")
    near = TissueMask(roi.mask(mask.mask.shape, per_pixel, touched=True), mask.downsample)
    if not near.mask.any():
        height, width = reader.level_shapes[0]
        raise ImageError(f"{reader.path}: the ROI ({roi.describe()}) lies outside the image ({width} x {height} "
                         "level-0 px); its coordinates must be this image's level-0 pixels, as QuPath exports "
                         "annotations drawn on it")
    size = grid.size
    return np.array([[near.contains(i * size, j * size, size, size) for j in range(grid.rows_cols[1])]
                     for i in range(grid.rows_cols[0])], bool)


class SlidePredictor:
    """Segment nuclei in tiles and whole slides and write labels, GeoJSON, CSV and an overlay per image.

    Build it from a bundle with ``SlidePredictor.from_bundle(path, **overrides)``: the ``predictor`` section of the
    bundle's configs/inference.json builds its parts, and the predictor keeps the loop: plan, read, network,
    instances, stitching, measurements, writing, with the seconds of each phase in each slide's result.

    Args:
        network: the network with its statistics, runtime and windows (``InferenceNetwork``).
        planner: the regions to analyse and the working pixel size (``RegionPlanner``).
        outputs: how the outputs are written (``outputs.OutputOptions``).
        postprocess_params: keyword arguments of ``postprocess.instances_from_probs``.
        level: read this pyramid level instead of the one closest to the working pixel size (still resampled to
            it).
        input_mpp: level-0 pixel size of files that state none (``nucleiseg predict --mpp``); without it such
            files are assumed to be at the working pixel size. A size the file states wins unless ``force_mpp``.
            Each image logs which applied, and warns where a stated size looks wrong (``wsi.doubtful_mpp``).
        force_mpp: ``input_mpp`` applies to every file, also those that state a size (``nucleiseg predict --mpp X
            --force_mpp``), for files whose stated size is wrong (a print resolution such as 2400 dpi).
        overwrite: redo images whose outputs are complete, and start unfinished ones from their first region (their
            kept regions are deleted). Without it, finished outputs are kept when their
            completion record names these weights and settings (``settings``), and a run whose output folder holds
            finished outputs of other weights or settings is refused before any image is read.
        progress: a tqdm bar over regions per image.
        prefetch: run the network on the next region in a background thread while this one is post-processed
            and written (see ``lookahead``); holds one more region's probabilities in memory.
        keep_regions: keep each finished region's labels in the output folder until the image's outputs are
            written (``region_journal``), so that an interrupted image goes on from its last region when run again.

    ``roi``, an attribute as ``input_mpp`` is an argument, since both belong to one image: the region of interest
    (``roi.Roi``, or a GeoJSON file's path, read on assignment) whose nuclei alone are wanted, or None (the default)
    for the whole image. It is per image data, not a model setting, so a bundle's config has none; a cohort's slide
    list gives each slide its own (``cohort.for_slide``), and ``run`` refuses it for more than one image. Regions
    its generous low-resolution mask does not touch are skipped, and nuclei whose centroid lies outside its
    polygons (a hole is outside) are left out of every output (``stitching.RegionStitcher``'s ``where``). It applies
    to files, not to ``segment``'s arrays.
    """

    _roi: Roi | None = None  # also for a predictor made without __init__, as some tests make a bare one

    def __init__(
        self,
        network: InferenceNetwork,
        planner: RegionPlanner,
        outputs: OutputOptions = OutputOptions(),
        postprocess_params: dict | None = None,
        level: int | None = None,
        input_mpp: float | None = None,
        force_mpp: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        prefetch: bool = True,
        keep_regions: bool = True,
    ):
        self.network, self.planner, self.outputs = network, planner, outputs
        self.postprocess_params = dict(postprocess_params or {})
        self.level = level
        self.input_mpp = None if input_mpp is None else float(input_mpp)
        self.force_mpp = parse_bool(force_mpp, "predictor#force_mpp")
        # where input_mpp came from, for the log: a cohort's slide list sets it per slide
        self.input_mpp_origin = "--mpp (input_mpp)"
        # ``monai.bundle run inferring --predictor#overwrite false`` hands over the text 'false', which is truthy
        self.overwrite, self.progress, self.prefetch, self.keep_regions = (
            parse_bool(value, f"predictor#{name}") for name, value in
            (("overwrite", overwrite), ("progress", progress), ("prefetch", prefetch), ("keep_regions", keep_regions)))
        self.timings: dict[str, float] = {}  # the last slide's seconds per phase
        self._said_assumed = False  # segment's warning that an array without mpp is at the working pixel size
        self._said_bits = False  # segment's warning that 16-bit arrays are scaled by the range each reaches

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike, **overrides) -> SlidePredictor:
        """The ``predictor`` of a bundle's configs/inference.json (alone where it has "imports", else as an overlay
        over configs/train.json, as ``--config_file "['configs/train.json','configs/inference.json']"`` runs it).

        ``overrides``: config ids (a top-level id such as ``checkpoint`` or ``device``, or a path such as
        ``predictor#planner#region_size``; pass those with ``**{...}``), or keyword arguments of this class or of
        its parts, which set them where the config builds them (``region_size=1024``, ``progress=False``:
        ``predictor_ids``). A flat ``predictor#<name>`` id of earlier configs is taken as the part's
        (``config_id``). A name that is both a top-level id and a keyword sets the top-level id where the
        predictor reads it from there (``checkpoint``, ``device``), else the keyword: ``overwrite=True`` redoes
        finished outputs, it does not reach training's ``overwrite``.

        A sealed bundle (one with a manifest.json) is verified first, as ``nucleiseg predict`` verifies it: one edited
        since it was packed raises ``packaging.BundleIntegrityError`` before any config is evaluated.
        """
        parser, files = cls._parser(bundle, overrides)
        predictor = parser.get_parsed_content("predictor")
        if not isinstance(predictor, cls):
            raise TypeError(f"'predictor' of {files[-1]} builds a {type(predictor).__name__}, not a {cls.__name__}")
        return predictor

    @classmethod
    def checkpoint_of(cls, bundle: str | os.PathLike, **overrides) -> str | None:
        """The weights file ``from_bundle`` would load with these ``overrides`` (None where the config names
        none), found without building anything: a cohort checks it once before it starts its workers."""
        checkpoint = cls.config_value(bundle, "checkpoint", **overrides)
        return None if checkpoint is None else str(checkpoint)

    @classmethod
    def config_value(cls, bundle: str | os.PathLike, id_: str, **overrides):
        """The value of config id ``id_`` as ``from_bundle`` would parse it with these ``overrides`` (None where
        the config has no such id), found without building the predictor."""
        parser, _ = cls._parser(bundle, overrides)
        return parser.get_parsed_content(id_) if id_ in parser else None

    @classmethod
    def _parser(cls, bundle: str | os.PathLike, overrides: dict):
        from monai.bundle import ConfigParser

        from .overrides import load_config
        from .packaging import check_bundle

        # a sealed bundle edited since it was packed is refused before any of its configs is read: its expressions
        # run as they are parsed, so checking after building would be too late (``nucleiseg predict`` checks too)
        check_bundle(bundle)
        files = inference_configs(bundle)
        config = load_config(files)
        keywords = predictor_ids()
        settings = {}
        for key, value in overrides.items():
            if key in keywords and not reads(config, "predictor", key):
                settings[keywords[key]] = value
            elif "#" in key or "::" in key or key in config:
                settings[config_id(key)] = value
            else:
                raise TypeError(f"{key!r} is neither a setting of {', '.join(map(str, files))} nor an argument of "
                                f"SlidePredictor or its parts ({', '.join(sorted(keywords))})")
        parser = ConfigParser(config)
        meta = Path(files[0]).parent / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
        parser.update({**own_folder(bundle), **settings})
        if "imports" in parser:
            parser.get_parsed_content("imports")
        return parser, files

    @property
    def mpp(self) -> float | None:
        return self.planner.mpp

    @property
    def roi(self) -> Roi | None:
        return self._roi

    @roi.setter
    def roi(self, value: Roi | str | os.PathLike | None) -> None:
        self._roi = value if value is None or isinstance(value, Roi) else read_roi(value)

    @property
    def weights_sha256(self) -> str:
        return self.network.weights_sha256

    def settings(self) -> dict:
        """What decides an image's outputs besides the image: written into its completion record, and compared
        with the record of finished outputs before they are kept (``finished``)."""
        net, plan = self.network, self.planner
        record = {
            "weights_sha256": net.weights_sha256, "channel_mean": net.mean.flatten().tolist(),
            "channel_std": net.std.flatten().tolist(), "postprocess_params": self.postprocess_params,
            "working_mpp": plan.mpp, "input_mpp": self.input_mpp, "level": self.level, "roi_size": net.roi_size,
            "overlap": net.overlap, "amp": net.amp, "int8": net.int8, "region_size": plan.region_size,
            "region_margin": plan.region_margin, "tissue_threshold": plan.tissue_threshold,
            "max_regions": plan.max_regions,
        }
        if net.test_time_flips != 1:  # only when set, so outputs made before flips existed still count as finished
            record["test_time_flips"] = net.test_time_flips
        if self.force_mpp:  # the same: only when set
            record["force_mpp"] = True
        if self.roi is not None:  # the same; the geometry's digest, so a renamed file of the same areas still counts
            record["roi"] = self.roi.sha256
        return json.loads(json.dumps(record, sort_keys=True, default=str))  # as it reads back from the record

    def finished(self, output_dir: str | os.PathLike, name: str, path: str | os.PathLike | None = None) -> bool:
        """True when image ``name`` has complete outputs in ``output_dir`` made with this predictor's weights and
        settings (its completion record), from the file ``path`` when it is given; False when they are missing or
        incomplete; FileExistsError naming what differs when they were made otherwise (only ``overwrite`` replaces
        them; ``earlier_outputs.finished``)."""
        return earlier_outputs.finished(self, output_dir, name, path)

    # ------------------------------------------------------------------------------------------ one window

    def instances(self, probs: np.ndarray) -> np.ndarray:
        """Instance labels (h, w) uint32, ids 1..N, from one window's probabilities."""
        return np.asarray(instances_from_probs(probs, **self.postprocess_params), dtype=np.uint32)

    # ------------------------------------------------------------------------------------------ one image

    @contextmanager
    def planned(self, path: str | os.PathLike, timings: dict[str, float] | None = None
                ) -> Iterator[tuple[Plan, np.ndarray]]:
        """Image ``path`` opened and planned as ``predict_slide`` walks it: (plan, thumbnail), the reader closed on
        exit; for region tasks that compute ``region_labels`` of one image elsewhere."""
        clock = functools.partial(_timed, dict.fromkeys(PHASES, 0.0) if timings is None else timings)
        fallback_mpp = self.input_mpp if self.input_mpp is not None else self.mpp
        # forced only with a size to force: a cohort slide without an input_mpp keeps the one its file states
        forced = self.force_mpp and self.input_mpp is not None
        with clock("read"):
            reader = open_image(path, level=self.level, mpp=self.mpp, input_mpp=fallback_mpp, force_mpp=forced)
        with reader:
            if reader.greyscale:
                raise ImageError(f"{path} is a greyscale image; the model segments H&E colour (RGB) images. "
                                 "Export the image in colour and retry.")
            if reader.conversion:
                logger.info("%s: %s", path, reader.conversion)
            with clock("read"):
                thumb = reader.thumbnail(self.outputs.overlay_max_side)
            with clock("tissue_mask"):
                plan = self.planner.plan(reader, thumb, self.input_mpp, self.roi)
            yield plan, thumb

    def journal_key(self, plan: Plan, fingerprint: str) -> dict:
        """What a region's labels depend on (``region_journal``): the settings of the completion record, and what
        that leaves out because it does not change finished outputs enough to redo them but would mix two kinds of
        regions in one image: the runtime the network runs in, the device, the code and library versions, the
        input file's modification time, and the plan."""
        net, reader = self.network, plan.reader
        return {
            "settings": self.settings(), "source_fingerprint": fingerprint,
            "source_mtime_ns": os.stat(reader.path).st_mtime_ns, "level": reader.level, "shape": list(reader.shape),
            "scale": str(plan.scale), "regions": [list(plan.todo.shape),
                                                  hashlib.sha256(np.packbits(plan.todo).tobytes()).hexdigest()],
            "runtime": [net.runtime, type(net.network).__name__, net.device.type, net.sw_batch_size,
                        net.padding_mode],
            "versions": [__version__, *(library_version(p) for p in RUNTIME_LIBRARIES)],
        }

    def region_labels(self, plan: Plan, ij: tuple[int, int]) -> np.ndarray:
        """Instance labels (ids 1..n) of region ij's window on the read grid, as ``predict_slide`` hands them to the
        stitcher."""
        window, _, probs = self._predict_region(plan, dict.fromkeys(PHASES, 0.0), ij)
        return to_read_grid(self.instances(probs), window[2:], plan.scale)

    def segment(self, rgb: np.ndarray, mpp: float | None = None, bits: int | None = None) -> np.ndarray:
        """Nuclei of an RGB image held in memory ((H, W, 3), 8 or 16 bit, a numpy array, torch tensor or PIL image:
        a tile a notebook has loaded), as (H, W) uint32 instance ids 1..N on the image's own grid: the labels
        ``predict_slide`` gives the same pixels in a file (regions, resampling to the working pixel size, seams),
        with nothing written.

        ``mpp``: the image's pixel size in um/px; without it the predictor's ``input_mpp``, else the model's own
        (a warning says so, once), as for a file that states none. ``bits``: the significant bits of 16-bit
        samples (16: the full range; 12: a 12-bit camera's); without it they are scaled as a file's are, by the
        range each image reaches, so tiles of one slide reaching different ranges would be scaled differently (a
        warning says so, once). Fully transparent pixels are taken for white.
        """
        if isinstance(rgb, (str, os.PathLike)):
            raise TypeError(f"segment takes pixels, not a file name ({rgb!s}): for a file use predict_slide(path, "
                            "output_dir), which also reads its pixel size, or pass skimage.io.imread(path)")
        if hasattr(rgb, "mode") and hasattr(rgb, "convert"):  # a PIL image: palette and CMYK as the RGB they show
            rgb = np.asarray(rgb if rgb.mode in ("RGB", "RGBA", "L", "LA", "I", "I;16", "F") else rgb.convert("RGB"))
        pixels = convert_to_numpy(rgb)
        if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 1):
            raise ValueError(f"segment: a greyscale image {pixels.shape}; the model segments H&E colour: pass the "
                             "RGB image")
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            raise ValueError(f"segment takes one image, got a batch of shape {pixels.shape}: pass image[0]")
        if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4) or 0 in pixels.shape:
            hint = "; a channels-first array goes in as np.moveaxis(image, 0, -1)" if pixels.ndim == 3 else ""
            raise ValueError(f"segment takes an RGB image of shape (height, width, 3), got {pixels.shape}{hint}")
        if pixels.dtype.kind == "f":
            raise ValueError(f"segment takes 8- or 16-bit RGB, got {pixels.dtype}: convert floats of 0-1 with "
                             "skimage.util.img_as_ubyte, floats of 0-255 with np.clip(image, 0, 255).astype(np.uint8)")
        where = Path("<array>")
        reader = ArrayReader(where, pixels, base_mpp=None if mpp is None else check_mpp(mpp, "mpp"), bits=bits)
        if mpp is None:
            reader.base_mpp = self.input_mpp if self.input_mpp is not None else self.mpp
            if self.input_mpp is None and self.mpp is not None and not self._said_assumed:
                self._said_assumed = True  # once per predictor: a loop over a thousand tiles needs one warning
                logger.warning("segment: no mpp given, so images are taken to be at the model's %g um/px; pass "
                               "mpp= if they are not", self.mpp)
        if bits is not None and pixels.dtype != np.uint16:
            logger.warning("segment: bits=%s applies to 16-bit samples; this image is %s, read as it is", bits,
                           pixels.dtype)
        if pixels.dtype == np.uint16 and bits is None and not self._said_bits:
            self._said_bits = True
            logger.warning("segment: %s, by the range this image reaches; tiles of one slide that reach different "
                           "ranges would be scaled differently: pass bits= (16 for the full range, 12 for a 12-bit "
                           "camera)", reader.conversion)
        elif reader.conversion:
            logger.info("segment: %s", reader.conversion)
        with reader:
            plan = self.planner.plan(reader, reader.thumbnail(self.outputs.overlay_max_side), self.input_mpp)
            todo = [ij for ij in np.ndindex(*plan.todo.shape) if plan.todo[ij]]
            stitcher = RegionStitcher(plan.grid, plan.todo, self.outputs.label_tile)
            with closing(self._regions(plan, todo, dict.fromkeys(PHASES, 0.0))) as regions:
                for ij, (_, _, labels) in zip(todo, regions):
                    stitcher.add(ij, labels)
            tiles = list(stitcher.tiles())
        self._say_truncated("segment", stitcher)
        cols = math.ceil(reader.shape[1] / self.outputs.label_tile)
        rows = [np.concatenate(tiles[r:r + cols], axis=1) for r in range(0, len(tiles), cols)]
        return np.concatenate(rows)[: reader.shape[0], : reader.shape[1]]

    def predict_slide(self, path: str | os.PathLike, output_dir: str | os.PathLike, name: str | None = None,
                      labels_from: Callable[[Plan, list[tuple[int, int]]], Iterator[np.ndarray]] | None = None,
                      lock_token: str | None = None, unless_finished: bool = False) -> SlideResult | None:
        """Segment one image and write its outputs under ``output_dir`` (named ``name``, by default ``image_name``).

        ``labels_from(plan, regions)``: each region's ``region_labels``, in the order given, computed elsewhere (a
        cohort's region tasks) instead of here; the windows of nuclei kept are read again for their measurements.
        While it runs, the image is locked (``outputs.ImageLock``): another run on the same output folder fails on
        it (``ImageBusy``) instead of computing its regions again; ``lock_token`` names the caller (a cohort's task),
        whose later tries may take the lock over. ``unless_finished``: None, nothing done, when the image's outputs
        are found finished once the lock is held (``finished``).
        """
        path = dicom_slide_file(Path(path))  # a DICOM slide is opened and recorded from its finest level's file
        name = name or image_name(path)
        with ImageLock(output_dir, name, lock_token):
            # asked again under the lock: a run that checked before another one committed would redo its image
            if unless_finished and self.finished(output_dir, name, path):
                return None
            remove_temporaries(output_dir, name)  # under the lock: never those of a run still writing them
            return self._predict_slide(path, output_dir, name, labels_from)

    def _predict_slide(self, path: Path, output_dir: str | os.PathLike, name: str,
                       labels_from: Callable[[Plan, list[tuple[int, int]]], Iterator[np.ndarray]] | None
                       ) -> SlideResult:
        start = time.perf_counter()
        timings = dict.fromkeys(PHASES, 0.0)
        clock = functools.partial(_timed, timings)
        with self.planned(path, timings) as (plan, thumb):
            fingerprint = source_fingerprint(path)  # before the regions are read: a file replaced meanwhile differs
            reader = plan.reader
            height, width = reader.shape
            overlay = Overlay(thumb, (thumb.shape[0] / height, thumb.shape[1] / width))
            self._log_scale(path, plan, f"{int(plan.todo.sum())} of {plan.todo.size} regions to process")
            if reader.bounds is not None:
                x, y, width, height = reader.bounds
                logger.warning("%s states a scanned area of %d x %d px at (%d, %d) within level 0, and QuPath shows "
                               "such a slide cropped to it: the outputs are in this file's level-0 pixels, so the "
                               "GeoJSON lands (%d, %d) px off in QuPath unless shifted by (-%d, -%d)", path, width,
                               height, x, y, x, y, x, y)
            where = None
            if self.roi is not None:
                logger.info("%s: ROI of %s, %.1f%% of the image; nuclei outside it are left out", path,
                            self.roi.describe(), 100 * plan.roi_fraction)
                where = self.roi.keeps(reader.downsample)
            if self.overwrite and labels_from is None:  # redone from the first region, as the outputs are
                if journal_folder(output_dir, name).is_dir():
                    logger.info("%s: starting afresh (overwrite): the regions kept from an interrupted run are "
                                "discarded", name)
                remove_journal(output_dir, name)
            journal = None
            if self.keep_regions and labels_from is None and plan.todo.sum() > 1:  # one region: nothing to go on from
                journal = RegionJournal.claim(output_dir, name, self.journal_key(plan, fingerprint))
            # an assumed pixel size is not written into the outputs as if it were measured
            out_mpp = reader.mpp if plan.mpp_source != "assumed" else None
            with SlideOutputs(output_dir, name, reader.shape, out_mpp, reader.downsample, overlay,
                              self.outputs.label_tile, self.outputs.compression) as out:
                stitcher = RegionStitcher(plan.grid, plan.todo, self.outputs.label_tile, where)
                out.write_labels(self._label_tiles(plan, stitcher, out, name, timings, labels_from, journal))
                info = {
                    "source": str(path), "source_fingerprint": fingerprint, "level": reader.level,
                    "mpp": reader.mpp, "mpp_source": plan.mpp_source,
                    "working_mpp": self.mpp, "scale": float(plan.scale), "shape": [height, width],
                    "downsample": reader.downsample, "regions": int(plan.todo.size),
                    "regions_processed": int(plan.todo.sum()), "truncated": stitcher.truncated,
                    "tissue_fraction": plan.tissue_fraction, "region_size": self.planner.region_size,
                    "region_margin": self.planner.region_margin, "settings": self.settings(),
                }
                if self.roi is not None:
                    info["roi"] = {"file": self.roi.path, "sha256": self.roi.sha256, "polygons": len(self.roi),
                                   "fraction": plan.roi_fraction, "tissue_fraction": plan.roi_tissue_fraction}
                with clock("writing"):
                    paths = out.commit(info)
        remove_journal(output_dir, name)  # also one a cohort's region tasks filled, or an earlier run left
        self._say_truncated(path, stitcher)
        self.timings = {k: round(v, 4) for k, v in timings.items()}
        return SlideResult(
            str(path), name, out.count, round(time.perf_counter() - start, 3), (height, width), reader.level,
            reader.mpp, plan.mpp_source, float(plan.scale), int(plan.todo.size), int(plan.todo.sum()),
            stitcher.truncated, plan.tissue_fraction, {k: str(p) for k, p in paths.items()}, dict(self.timings),
        )

    def _say_truncated(self, what: str | os.PathLike, stitcher: RegionStitcher) -> None:
        if stitcher.truncated:
            logger.warning("%s: %d nuclei were cut by a region window; increase region_margin (now %d)",
                           what, stitcher.truncated, self.planner.region_margin)

    def _log_scale(self, path: Path, plan: Plan, message: str) -> None:
        """The one line per image that says which pixel size was used, where it came from, and the scale; a
        warning when the file's own size looks wrong (``wsi.doubtful_mpp``), with the way to override it."""
        reader, source, mpp = plan.reader, plan.mpp_source, self.mpp
        head = f"{path}: {reader.shape[0]}x{reader.shape[1]} px at level {reader.level}"
        if source == "unknown":
            logger.info("%s, pixel size unknown, analysed as read; %s", head, message)
            return
        if source == "assumed":
            logger.warning("%s: the file states no usable pixel size, so %g um/px (the model's) is assumed; pass --mpp "
                           "(input_mpp) if it differs. An assumed size is not a measurement: area_um2 in the CSV, the "
                           "label map's resolution and, in a cohort's run table, mpp, nuclei_per_mm2 and "
                           "median_nucleus_um2 stay empty unless --mpp is given; %s", head, reader.mpp, message)
            return
        if plan.scale == 1:
            how = "analysed as read" if mpp is None else f"analysed as read (model: {mpp:g} um/px)"
        else:
            fraction = f" ({plan.scale})" if plan.scale.denominator > 1 else ""
            how = f"resampled x{float(plan.scale):.4g}{fraction} to the model's {mpp:g} um/px"
        stated = reader.stated_mpp
        if source == "file":
            origin = f"stated in {reader.mpp_origin}" if reader.mpp_origin else "stated in the file"
        else:
            origin = f"from {self.input_mpp_origin}"
            if stated is not None:  # forced over the file's own
                origin += f", forced over the {stated:.4g} um/px stated in {reader.mpp_origin or 'the file'}"
        doubt = doubtful_mpp(stated if source == "file" else reader.base_mpp, mpp)
        if source == "file" and self.input_mpp is not None and abs(stated / self.input_mpp - 1.0) > SCALE_TOLERANCE:
            origin += (f"; {self.input_mpp_origin} gives {self.input_mpp:g} um/px only to files that state none "
                       "(--force_mpp: to every file)")
        if doubt is None:
            logger.info("%s, %.4g um/px (%s), %s; %s", head, reader.mpp, origin, how, message)
            return
        if source != "file":  # a size given for the file: a typo (5 for 0.5) resamples for hours
            logger.warning("%s, %.4g um/px (%s), %s; %s; that size is %s: if it is wrong, give the scan's (about "
                           "0.25 at 40x, 0.5 at 20x)", head, reader.mpp, origin, how, message, doubt)
            return
        fix = f"--mpp {self.input_mpp:g} --force_mpp" if self.input_mpp is not None else "--mpp X --force_mpp"
        logger.warning("%s, %.4g um/px (%s), %s; %s; that size is %s: if it is wrong, pass %s (X the scan's um/px: "
                       "about 0.25 at 40x, 0.5 at 20x)", head, reader.mpp, origin, how, message, doubt, fix)

    def _label_tiles(self, plan: Plan, stitcher: RegionStitcher, out: SlideOutputs, name: str,
                     timings: dict[str, float], labels_from: Callable | None = None,
                     journal: RegionJournal | None = None) -> Iterator[np.ndarray]:
        """Process regions in raster order and yield the label map's tiles as soon as their rows are final; the
        time the writer takes between tiles counts as "writing"."""
        clock = functools.partial(_timed, timings)
        todo = [ij for ij in np.ndindex(*plan.todo.shape) if plan.todo[ij]]
        regions = self._regions(plan, todo, timings, journal) if labels_from is None else \
            _windows_of(plan, todo, labels_from(plan, todo))
        with closing(regions), \
                tqdm(total=len(todo), desc=name, unit="region", disable=not self.progress, leave=False) as bar:
            for ij in [*todo, None]:
                if ij is not None:
                    (wy, wx, wh, ww), rgb, labels = next(regions)
                    with clock("stitching"):
                        kept = stitcher.add(ij, labels)
                    if kept is not None:
                        if rgb is None:
                            with clock("read"):
                                rgb = plan.reader.read_region(wy, wx, wh, ww)
                        with clock("measurements"):
                            out.add_nuclei(kept, rgb, (wy, wx))
                    bar.update(1)
                for tile in stitcher.tiles():
                    with clock("writing"):
                        yield tile

    def _regions(self, plan: Plan, todo: list[tuple[int, int]], timings: dict[str, float],
                 journal: RegionJournal | None = None
                 ) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray | None, np.ndarray]]:
        """(window, rgb, instance labels on the read grid) of each region in ``todo``; with ``prefetch`` the
        network already runs on the next region while the caller stitches and measures this one. The watershed
        stays in this thread: moved to the network's, it ran slower end to end (the network's threads and the
        watershed then queue on the same core while this thread idles). A region the ``journal`` holds comes
        from it (rgb None: the caller reads what it measures); the others go into it as they are computed."""
        kept = {ij for ij in todo if journal is not None and ij in journal}
        computed = [ij for ij in todo if ij not in kept]
        predicted = lookahead(functools.partial(self._predict_region, plan, timings), computed, self.prefetch)
        with closing(predicted):
            for ij in todo:
                labels = None
                if ij in kept:
                    with _timed(timings, "read"):
                        labels = journal.load(ij, plan.grid.window(ij)[2:])
                if labels is not None:
                    yield plan.grid.window(ij), None, labels
                    continue
                # a kept region that could not be read back is computed here, outside the lookahead's order
                window, rgb, probs = self._predict_region(plan, timings, ij) if ij in kept else next(predicted)
                with _timed(timings, "watershed"):
                    labels = to_read_grid(self.instances(probs), window[2:], plan.scale)
                if journal is not None:
                    with _timed(timings, "writing"):
                        journal.save(ij, labels)
                yield window, rgb, labels

    def _predict_region(self, plan: Plan, timings: dict[str, float], ij: tuple[int, int]
                        ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
        """Read region ij's window and run the network on it at the working scale: (window, rgb, probabilities).
        Runs in the prefetch thread: it records only its own phases."""
        window = plan.grid.window(ij)
        with _timed(timings, "read"):
            rgb = plan.reader.read_region(*window)
        with _timed(timings, "network"):
            return window, rgb, self.network.probs(rgb, plan.scale)

    # ------------------------------------------------------------------------------------------ many images

    def run(self, input: str | os.PathLike, output_dir: str | os.PathLike) -> RunSummary:
        """Segment every image of ``input`` (a file, folder or glob) into ``output_dir``.

        Before any image is read, the output folder is created (or the run refused, once) and finished outputs
        there are checked against this predictor's ``settings``: outputs of other weights or settings refuse the
        run unless ``overwrite``. An image whose output name an earlier one has taken, or whose outputs' paths
        Windows would refuse here, fails without being read (``earlier_outputs.refusals``). Images
        whose outputs are complete are then skipped (unless ``overwrite``); an image that fails is logged with its
        path and error and the others go on. ``summary.failed`` lists failures, so a caller can exit non-zero.
        """
        output_dir = Path(output_dir)
        images = find_images(input)
        if self.roi is not None and len(images) > 1:
            raise ValueError(f"an ROI belongs to one image, and {input} holds {len(images)}: give each slide its own "
                             "in the roi column of a slide list (a CSV with columns path, roi)")
        _make_output_dir(output_dir)
        for path in remove_stale(output_dir):
            logger.info("removed %s, left by an interrupted earlier run", path)
        # each image's name once: the checks and the loop must agree on it, while a DICOM folder may change
        named = list(zip(image_names(images), images))
        # later images of a name, and images whose paths Windows would refuse here, fail below
        refused = refusals(named, output_dir, "rename one of them, or give nucleiseg predict a slide list that names "
                           "them (a CSV with columns path and slide)")
        if not self.overwrite:
            finished_outputs(output_dir, [(name, path, self) for i, (name, path) in enumerate(named)
                                          if i not in refused])
        summary = RunSummary()
        start, total, busy = time.perf_counter(), len(images), 0.0
        for index, (name, path) in enumerate(named, 1):
            # with many images, each line says how far the run is (the region bar covers one image)
            at = f"[{index}/{total}] " if total > 1 else ""
            if index - 1 in refused:
                logger.error("%sfailed on %s: %s", at, path, refused[index - 1])
                summary.failed.append((str(path), refused[index - 1]))
                continue
            try:
                result = None
                if self.overwrite or not self.finished(output_dir, name, path):
                    result = self.predict_slide(path, output_dir, name, unless_finished=not self.overwrite)
            except Exception as err:  # one bad image must not stop a folder; the error is reported with its path
                logger.error("%sfailed on %s: %s: %s", at, path, type(err).__name__, err,
                             exc_info=logger.isEnabledFor(logging.DEBUG))
                summary.failed.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            if result is None:
                logger.info("%s%s: outputs complete in %s, skipped", at, path, output_dir)
                remove_leftovers_of_finished(output_dir, name)
                summary.skipped.append(str(path))
                continue
            summary.done.append(result)
            busy += result.seconds
            left = ""
            if index < total:  # the images done so far, at their mean time, for the ones still to come
                left = f"; about {_duration(busy / len(summary.done) * (total - index))} left"
            logger.info("%s%s: %d nuclei in %.1f s%s", at, path, result.nuclei, result.seconds, left)
        if total > 1:
            logger.info("%d images in %s: %d done, %d already complete, %d failed", total,
                        _duration(time.perf_counter() - start), len(summary.done), len(summary.skipped),
                        len(summary.failed))
        return summary


def _windows_of(plan: Plan, todo: list[tuple[int, int]], labels: Iterator[np.ndarray]
                ) -> Iterator[tuple[tuple[int, int, int, int], None, np.ndarray]]:
    """(window, None, labels) of each region in ``todo``, its labels made elsewhere (its pixels not read yet)."""
    try:
        for ij in todo:
            yield plan.grid.window(ij), None, next(labels)
    finally:
        if hasattr(labels, "close"):  # a generator fetching them stops when the slide stops early
            labels.close()


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait: "40 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] += time.perf_counter() - start


# the parts of a predictor, each under its name in the ``predictor`` section of a bundle's inference.json
PARTS = {"network": InferenceNetwork, "planner": RegionPlanner, "outputs": OutputOptions}


def predictor_ids() -> dict[str, str]:
    """Each keyword argument of ``SlidePredictor`` and of its parts -> its id in a bundle's config
    (``prefetch`` -> ``predictor#prefetch``, ``region_size`` -> ``predictor#planner#region_size``). The predictor's
    own win over a part's of the same name: ``network`` is the part, not the torch module it is given."""
    ids = {name: f"predictor#{part}#{name}"
           for part, cls in PARTS.items() for name in inspect.signature(cls).parameters}
    return {**ids, **{name: f"predictor#{name}" for name in inspect.signature(SlidePredictor).parameters}}


def reads(config: dict, section: str, key: str) -> bool:
    """Whether ``config[section]`` reads the top-level id ``key``, directly (``@key``, alone or in an expression) or
    through the top-level ids it reads, as MONAI's resolver finds references."""
    from monai.bundle.reference_resolver import ReferenceResolver

    seen, todo = set(), [section]
    while todo:
        item = todo.pop()
        if item in seen or item not in config:
            continue
        seen.add(item)
        todo += [ref.replace("::", "#").split("#")[0] for ref in ReferenceResolver.find_refs_in_config(config[item], item)]
    return key != section and key in seen


def config_id(key: str) -> str:
    """A config id as this version's configs hold it: a flat ``predictor#<name>`` of the configs before the
    predictor had parts, as users still type it (``nucleiseg predict --set predictor#region_size=1024``), moves to
    the part that takes ``name`` (``predictor#planner#region_size``); any other id is unchanged."""
    head, _, rest = key.replace("::", "#").partition("#")
    name, _, deeper = rest.partition("#")
    ids = predictor_ids()
    if head != "predictor" or name not in ids:
        return key
    return "#".join([ids[name], deeper]) if deeper else ids[name]


def inference_configs(bundle: str | os.PathLike) -> list[Path]:
    """configs/inference.json alone where it is a whole config (it has "imports"), else as an overlay over
    configs/train.json, the way ``nucleiseg evaluate`` runs evaluate.json."""
    from .overrides import read_config

    configs = Path(bundle) / "configs"
    inference = configs / "inference.json"
    if not inference.is_file():
        raise FileNotFoundError(f"{inference} not found: the bundle must be a folder holding configs/inference.json")
    if "imports" in read_config(inference):
        return [inference]
    train = configs / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{inference} is an overlay (it has no \"imports\") but {train} is missing")
    return [train, inference]

def raise_on_failure(summary: RunSummary) -> RunSummary:
    """The summary unchanged when every image succeeded, else a RuntimeError listing the failures.

    For bundle configs, whose ``run`` must fail (non-zero exit) when any image failed, after all were tried.
    """
    if summary.failed:
        lines = "\n".join(f"  {path}: {error}" for path, error in summary.failed)
        raise RuntimeError(f"{len(summary.failed)} image(s) failed ({len(summary.done)} done, "
                           f"{len(summary.skipped)} already complete):\n{lines}")
    return summary
