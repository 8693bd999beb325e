"""Cohorts on a Dask cluster: one task per slide, a predictor built once per worker, one run table.

``predict_cohort`` reads the cohort (a folder, a glob, or a CSV/TSV slide list), starts a ``LocalCluster`` of N
worker processes or joins a running scheduler, and submits one task per slide. Each worker builds its predictor
from the bundle once (``BundlePredictor``) and keeps it for the slides that follow; it runs one slide at a time, so
its memory stays that of one ``SlidePredictor.predict_slide``, and its torch threads are its share of the cores.
Workers write the outputs themselves, atomically, into the output folder (a folder every worker sees). A task
whose worker dies, or that raises, is retried ``retries`` times, then its slide is recorded as failed while the
others finish; a slide whose input fails as it would fail again (a missing or unreadable file, an image that cannot
be used: ``INPUT_ERRORS``) is recorded as failed at once. The client logs each slide's own lines (the pixel size used
and where it came from, as a single-image run gives them) as the slide finishes, and keeps Dask's INFO messages out
of the log. Before any slide is sent out, the client compares the finished outputs in the folder with the weights and
settings each slide would run with (``finished_slides``): outputs of others stop the run, as they stop a
single-process run, and slides whose outputs are finished are skipped unsent (their completion record), so
re-running the same command resumes a run that was killed at any point: only
the regions of the slides in flight that had not finished are computed again (each slide's region journal,
``region_journal``). A slide above ``split_above_mpx`` megapixels is split into region tasks whose
labels one merge task stitches exactly as the whole-slide run does (``region_tasks``), so one huge slide can use
the whole cluster. ``run_bundle_cohort`` is the same run for a bundle config's runner.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
import numpy as np
import psutil
from distributed import Client, LocalCluster, Variable, WorkerPlugin, as_completed, get_client, get_worker
from tqdm.auto import tqdm

from .dicom import folder_slides
from .earlier_outputs import finished_outputs, refusals, remove_leftovers_of_finished
from .errors import root_cause
from .handlers import parse_bool
from .inference import SlidePredictor
from .inputs import dicom_slide_file, find_images, image_name, image_names
from .networks import require_weights
from .outputs import manifest_path, outputs_complete
from .region_journal import remove_journal
from .region_tasks import FetchedLabels, band_labels, bands, claim_journal
from .roi import RoiError, read_roi
from .run_table import FINISHED, RunTable, figures
from .wsi import doubtful_mpp

logger = logging.getLogger(__name__)

SLIDE_LIST_SUFFIXES = {".csv": ",", ".tsv": "\t"}
RUN_TABLE = "run_table.csv"
REGION_SIZE = "predictor#planner#region_size"
# errors of a slide's input or outputs that another attempt would meet again (ImageError is a ValueError; the
# FileExistsError is finished outputs of other settings): retries are for workers that die
INPUT_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, ValueError)


@dataclass(frozen=True)
class Slide:
    """One slide of a cohort: its file, output name and, optionally, the level-0 microns per pixel to use when the
    file states none, or always with the predictor's ``force_mpp`` (the predictor's ``input_mpp`` for this
    slide), and the GeoJSON file of its region of interest (the predictor's ``roi`` for this slide)."""

    path: str
    name: str
    input_mpp: float | None = None
    roi: str | None = None

    def columns(self) -> dict:
        """The slide list's columns of this slide, as every run-table row of it holds them (a run table is itself a
        slide list)."""
        return {"slide": self.name, "path": self.path, "input_mpp": self.input_mpp, "roi": self.roi}


def is_slide_list(source: str | os.PathLike) -> bool:
    path = Path(source)
    return path.suffix.lower() in SLIDE_LIST_SUFFIXES and path.is_file()


def read_slide_list(path: str | os.PathLike) -> list[Slide]:
    """A CSV (.csv) or TSV (.tsv) with a header: ``path`` (relative paths are relative to the list; a DICOM slide's
    folder, or any .dcm file of it), optional ``slide`` (the output name; default ``inputs.image_name``),
    ``input_mpp`` (level-0 microns per pixel for a file that states none) and ``roi`` (a GeoJSON file of the
    slide's region of interest, ``roi.read_roi``; relative to the list too; read here, so a wrong one stops the run
    before any slide is sent out). Other columns are ignored, so a run table is itself a slide list."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=SLIDE_LIST_SUFFIXES[path.suffix.lower()])
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a slide list needs a header with a 'path' column (optional: 'slide', "
                             f"'input_mpp', 'roi'); found {reader.fieldnames}")
        slides = []
        for line, row in enumerate(reader, start=2):
            if not (row["path"] or "").strip():
                raise ValueError(f"{path}, line {line}: empty path")
            file = Path(row["path"].strip()).expanduser()
            file = _slide_file(file if file.is_absolute() else path.parent / file, f"{path}, line {line}")
            mpp = (row.get("input_mpp") or "").strip()
            try:
                input_mpp = float(mpp) if mpp else None
            except ValueError:
                raise ValueError(f"{path}, line {line}: input_mpp {mpp!r} is not a number (microns per pixel)")
            if input_mpp is not None and (doubt := doubtful_mpp(input_mpp, None)):
                logger.warning("%s, line %d: input_mpp %g is %s; a wrong size costs hours of resampling and gives "
                               "wrong nuclei: give the scan's microns per pixel (about 0.25 at 40x, 0.5 at 20x)",
                               path, line, input_mpp, doubt)
            name = (row.get("slide") or "").strip() or image_name(file)
            if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
                raise ValueError(f"{path}, line {line}: slide name {name!r} would put outputs outside the output "
                                 "folder or hide them; give a plain file name (no /, \\ or leading .)")
            if row.get("slide") and (not_portable := _not_portable(name)):  # a name typed, not a file's own
                raise ValueError(f"{path}, line {line}: slide name {name!r} {not_portable}, so its outputs could not "
                                 "be written or copied there; give another name in the 'slide' column")
            slides.append(Slide(_absolute(file), name, input_mpp, _roi_file(row, path, line)))
    if not slides:
        raise ValueError(f"{path} lists no slides")
    return slides


# Windows' file names: none of these characters, none of these device names (with any extension), no trailing dot
# or space. A name of ':' would even write its outputs into a hidden stream of another file there
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                              *(f"LPT{i}" for i in range(1, 10))})


def _roi_file(row: dict, slide_list: Path, line: int) -> str | None:
    """The absolute path of a slide list row's ``roi`` file, checked by reading it; None where it gives none."""
    given = (row.get("roi") or "").strip()
    if not given:
        return None
    file = Path(given).expanduser()
    file = _absolute(file if file.is_absolute() else slide_list.parent / file)
    try:
        read_roi(file)
    except RoiError as err:
        raise RoiError(f"{slide_list}, line {line}: {err}") from None
    return file


def _not_portable(name: str) -> str | None:
    """Why output files named ``name`` could not be written on Windows (or copied there), or None."""
    bad = sorted({c for c in name if c in '<>:"|?*' or ord(c) < 32})
    if bad:
        return f"holds {' '.join(repr(c) for c in bad)}, which Windows does not allow in file names"
    if name.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        return "is a device name on Windows"
    if name.endswith((".", " ")):
        return "ends in a dot or space, which Windows drops from file names"
    return None


def read_cohort(source: str | os.PathLike) -> list[Slide]:
    """The slides of a slide list (CSV/TSV), an image, a folder or a glob (``inputs.find_images``)."""
    if is_slide_list(source):
        return read_slide_list(source)
    images = find_images(source)
    return [Slide(_absolute(p), name) for p, name in zip(images, image_names(images))]


def _slide_file(path: Path, where: str) -> Path:
    """The file a slide list's ``path`` stands for: a DICOM slide's folder, or any of its .dcm files, stands for
    the file of its finest level (``inputs.dicom_slide_file``); other paths for themselves."""
    if not path.is_dir():
        return dicom_slide_file(path) if path.is_file() else path  # a missing file fails as such when opened
    slides = folder_slides(path)
    if not slides:
        raise ValueError(f"{where}: {path} is a folder holding no DICOM slide; a slide list's path is one image file "
                         "or the folder of one DICOM slide: give the image file itself")
    if len(slides) > 1:
        raise ValueError(f"{where}: {path} is a folder holding {len(slides)} DICOM slides; a slide list's path is one "
                         "image file or the folder of one DICOM slide: list one .dcm file of each slide instead")
    return slides[0].base


def _absolute(path: Path) -> str:
    """An absolute path that keeps a link as given (not ``resolve``): the log and the run table name the slide
    as its list or folder does, not the file a link points at. ``..`` stays too: after a linked folder it leads
    where the file system says, which dropping it with the name before it (``os.path.abspath``) need not."""
    return str(Path(path).absolute())


# ---------------------------------------------------------------------------------------------- on the workers


@dataclass(frozen=True)
class BundlePredictor:
    """Builds a bundle's predictor with ``SlidePredictor.from_bundle`` (with config overrides such as
    ``predictor#planner#mpp``), as ``nucleiseg predict`` does; sent to every worker."""

    bundle: str
    overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        # workers need not run in the client's folder: a relative path would name another one there
        object.__setattr__(self, "bundle", _absolute(self.bundle))

    def __call__(self) -> SlidePredictor:
        # one region bar per worker process would garble the terminal; the cohort has one bar over slides
        return SlidePredictor.from_bundle(self.bundle, **{"progress": False, **dict(self.overrides)})

    def settings_predictor(self) -> SlidePredictor:
        """The predictor with its network unprepared (``InferenceNetwork``'s ``prepare``): its ``settings``, which
        the client compares finished outputs with before any slide is sent out, without building what runs."""
        return SlidePredictor.from_bundle(self.bundle, **{"progress": False, **dict(self.overrides), "prepare": False})

    def check(self) -> None:
        """FileNotFoundError, before any worker starts, where the weights are missing: else every slide would
        fail on its own, each retried."""
        checkpoint = SlidePredictor.checkpoint_of(self.bundle, **dict(self.overrides))
        if checkpoint is not None:
            require_weights(checkpoint)

    def pinned(self) -> BundlePredictor:
        """This factory with the region size the config resolves here: its default follows the CPU
        (``inference.default_region_size``), and every worker must cut a slide into the same regions, since a
        split slide's region tasks and its merge run on several of them."""
        size = SlidePredictor.config_value(self.bundle, REGION_SIZE, **dict(self.overrides))
        return replace(self, overrides=(*self.overrides, (REGION_SIZE, size)))


_cache: tuple[Callable[[], SlidePredictor], SlidePredictor] | None = None
_cache_lock = threading.Lock()


def host_share() -> int:
    """This worker's share of its cores (its CPU affinity, so a SLURM allocation's): those cores over the task slots
    of the workers of its host that may run on them too, so they do not oversubscribe them.

    Workers of the host whose cores are all others' (another job's allocation on a shared node) do not count: they
    would halve the share of each of two jobs given a node's two halves. A worker whose cores cannot be asked counts.
    """
    worker, client = get_worker(), get_client()
    workers = client.scheduler_info()["workers"]
    here = [address for address, w in workers.items() if w["host"] == worker.ip]
    mine = set(cpus())
    theirs = client.run(cpus, workers=here, on_error="return") if len(here) > 1 else {}
    sharing = [a for a in here if not isinstance(theirs.get(a), (list, tuple)) or mine & set(theirs[a])]
    return max(1, len(mine) // max(1, sum(workers[a]["nthreads"] for a in sharing)))


def cpus() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def worker_predictor(factory: Callable[[], SlidePredictor], torch_threads: int | None) -> SlidePredictor:
    """This process's predictor for ``factory``, built on first use (network, weights, inference runtime), with
    ``torch_threads`` intra-op threads (default ``host_share()``)."""
    global _cache
    with _cache_lock:
        if _cache is None or _cache[0] != factory:
            import torch

            torch.set_num_threads(torch_threads or host_share())
            _cache = None  # the old network goes before the new one is built
            try:
                _cache = (factory, factory())
            except SystemExit as err:  # a bundle refusing this package's version: it would end the worker process,
                # which Dask counts as a death and restarts, and the reason would stay in the worker's own stderr
                raise RuntimeError(f"on worker {get_worker().address}: {err.code}") from None
        return _cache[1]


def _manifest(output_dir: str | os.PathLike, name: str) -> dict:
    return json.loads(manifest_path(output_dir, name).read_text(encoding="utf-8"))


def slide_predictor(factory: Callable[[], SlidePredictor], slide: Slide, torch_threads: int | None
                    ) -> SlidePredictor:
    """This worker's predictor, with the slide's own ``input_mpp`` and ``roi`` where the slide list gives them."""
    return for_slide(worker_predictor(factory, torch_threads), slide)


def for_slide(predictor: SlidePredictor, slide: Slide) -> SlidePredictor:
    """``predictor`` with the slide's own ``input_mpp`` and ``roi`` where the slide list gives them."""
    if slide.input_mpp is None and slide.roi is None:
        return predictor
    predictor = copy.copy(predictor)  # shares the network; only this slide's pixel size and ROI differ
    if slide.input_mpp is not None:
        predictor.input_mpp = slide.input_mpp
        predictor.input_mpp_origin = "the slide list's input_mpp column"
    if slide.roi is not None:
        predictor.roi = slide.roi
    return predictor


class _TaskLog(logging.Handler):
    """The (logger, level, message) of each record of the package logged by the thread that made this handler."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:  # a worker with several task threads runs other slides beside this one
            self.lines.append((record.name, record.levelno, record.getMessage()))


@contextmanager
def task_log() -> Iterator[list[tuple[str, int, str]]]:
    """The package's log lines of this task, for the client to log (``relay``): a worker process has no logging
    set up, so the lines of a single-image run (the pixel size used and where it came from) would go nowhere, and
    its warnings to the worker's stderr without the slide's context. Where this process logs somewhere already (a
    worker in the client's process) they go there, and the list stays empty."""
    if logging.getLogger().handlers:
        yield []
        return
    package, handler = logging.getLogger(__package__), _TaskLog()
    level = package.level
    package.setLevel(min(package.getEffectiveLevel(), logging.INFO))
    package.addHandler(handler)
    try:
        yield handler.lines
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def relay(lines: list[tuple[str, int, str]]) -> None:
    """A task's log lines (``task_log``) logged here, by the loggers that made them on the worker."""
    for name, level, message in lines:
        logging.getLogger(name).log(level, "%s", message)


def slide_task(task: Callable[..., dict]) -> Callable[..., dict]:
    """``task(factory, slide, ...)``, which returns a slide's run-table row, with the row's ``log`` (``task_log``)
    and, where the slide's input fails as it would fail again (``INPUT_ERRORS``), a failed row instead of the
    exception: Dask would retry the task, and print its traceback, each time for nothing."""

    @functools.wraps(task)
    def run(factory: Callable[[], SlidePredictor], slide: Slide, *args, **kwargs) -> dict:
        with task_log() as lines:
            try:
                row = task(factory, slide, *args, **kwargs)
            except Exception as err:
                if not isinstance(root_cause(err), INPUT_ERRORS):
                    raise
                row = {**slide.columns(), "status": "failed", "error": failure(err), "worker": get_worker().address,
                       "peak_rss_mb": _peak_rss_mb()}
        return {**row, "log": lines}

    return run


class OutputsNotShared(RuntimeError):
    """A worker that does not see the output folder the cohort's client sees."""


SHARED_MARK = ".nucleiseg-cohort-{}"  # written by the client into the output folder while its cohort runs


@contextmanager
def shared_mark(output_dir: Path) -> Iterator[str]:
    """The name of a file this client keeps in ``output_dir`` while the cohort runs, for each worker to look for
    (``check_shared``) before it writes there."""
    mark = output_dir / SHARED_MARK.format(uuid.uuid4().hex)
    mark.write_bytes(b"")
    try:
        yield mark.name
    finally:
        mark.unlink(missing_ok=True)


def check_shared(output_dir: str | os.PathLike, mark: str | None) -> None:
    """OutputsNotShared where ``output_dir`` as this process sees it lacks the client's ``mark``: outputs written
    into a node-local folder of the same name would be reported done and vanish with the job."""
    if mark is not None and not (Path(output_dir) / mark).exists():
        worker = get_worker()
        raise OutputsNotShared(
            f"the output folder {output_dir} as worker {worker.address} sees it is not the one the cohort's client "
            f"writes to (it lacks the client's {mark}): --output_dir must be a folder that the client and every "
            "worker share, not a node-local /tmp, $TMPDIR or /scratch")


@slide_task
def process_slide(factory: Callable[[], SlidePredictor], slide: Slide, output_dir: str,
                  torch_threads: int | None = None, overwrite: bool = False, previous: dict | None = None,
                  split_above_mpx: float | None = None, mark: str | None = None) -> dict:
    """One task: segment a slide, or find its outputs finished, and return its run-table row.

    ``previous``: the slide's row in the last run table; when it holds the figures of the finished outputs they are
    reused (a resumed cohort of thousands does not read thousands of thumbnails again). A slide of more than
    ``split_above_mpx`` megapixels (at the level read) with more than one region to process is not segmented
    here: the row has status "split" and its ``regions``, for the client to send out as region tasks. ``mark``:
    the client's file in ``output_dir`` (``check_shared``).
    """
    check_shared(output_dir, mark)
    predictor = slide_predictor(factory, slide, torch_threads)
    row = {**slide.columns(), "error": None, "worker": get_worker().address}
    redo = overwrite or predictor.overwrite
    if not redo and predictor.finished(output_dir, slide.name, slide.path):
        return {**_skipped_row(row, output_dir, slide, previous), "peak_rss_mb": _peak_rss_mb()}
    if redo:  # redone from the first region, as its outputs are
        remove_journal(output_dir, slide.name)
    if split_above_mpx is not None:
        with predictor.planned(slide.path) as (plan, _):
            height, width = plan.grid.shape
            regions = [ij for ij in np.ndindex(*plan.todo.shape) if plan.todo[ij]]
            split = height * width > split_above_mpx * 1e6 and len(regions) > 1
            if split:
                claim_journal(predictor, plan, output_dir, slide.name)
        if split:
            return {**row, "status": "split", "regions": regions, "megapixels": height * width / 1e6}
    result = predictor.predict_slide(slide.path, output_dir, slide.name, lock_token=_task_key(),
                                     unless_finished=not redo)
    if result is None:  # another run finished it while this task was on its way
        return {**_skipped_row(row, output_dir, slide), "peak_rss_mb": _peak_rss_mb()}
    row.update(status="done", seconds=result.seconds)
    return _finished_row(row, output_dir, slide.name)


def _skipped_row(row: dict, output_dir: str | os.PathLike, slide: Slide, previous: dict | None = None) -> dict:
    """``row`` of a slide whose outputs are finished, as skipped: with the figures of its ``previous`` run-table
    row where that row holds them (a resumed cohort of thousands does not read thousands of nuclei tables again),
    else with those of its outputs."""
    remove_leftovers_of_finished(output_dir, slide.name)
    row = {**row, "status": "skipped", "seconds": None}
    if previous and previous.get("status") in FINISHED and previous.get("path") == slide.path:
        return {**previous, **row}
    return {**row, **_figures(output_dir, slide.name)}


def region_band(factory: Callable[[], SlidePredictor], slide: Slide, output_dir: str, torch_threads: int | None,
                regions: list[tuple[int, int]], mark: str | None = None) -> list:
    """One region task of a split slide: its regions' packed instance labels (``region_tasks.band_labels``), kept
    in the slide's region journal as they are computed."""
    check_shared(output_dir, mark)
    return band_labels(slide_predictor(factory, slide, torch_threads), slide.path, regions, output_dir, slide.name)


@slide_task
def merge_slide(factory: Callable[[], SlidePredictor], slide: Slide, output_dir: str, torch_threads: int | None,
                labels: FetchedLabels, overwrite: bool = False, mark: str | None = None) -> dict:
    """The last task of a split slide: its region tasks' labels stitched and its outputs written (its row); skipped
    where another run finished the slide meanwhile, unless ``overwrite``."""
    check_shared(output_dir, mark)
    predictor = slide_predictor(factory, slide, torch_threads)
    row = {**slide.columns(), "error": None, "worker": get_worker().address}
    result = predictor.predict_slide(slide.path, output_dir, slide.name, labels_from=labels, lock_token=_task_key(),
                                     unless_finished=not (overwrite or predictor.overwrite))
    if result is None:
        return {**_skipped_row(row, output_dir, slide), "peak_rss_mb": _peak_rss_mb()}
    row.update(status="done", seconds=result.seconds)
    return _finished_row(row, output_dir, slide.name)


def _finished_row(row: dict, output_dir: str, name: str) -> dict:
    """``row`` with the figures of the slide's finished outputs and this worker's peak memory."""
    return {**row, **_figures(output_dir, name), "peak_rss_mb": _peak_rss_mb()}


def _figures(output_dir: str | os.PathLike, name: str) -> dict:
    """The run table's figures of a slide's finished outputs (``run_table.figures``), from its completion record."""
    manifest = _manifest(output_dir, name)
    return figures(output_dir, name, manifest["nuclei"], _stated_mpp(manifest), _tissue_mm2(manifest))


def _stated_mpp(manifest: dict) -> float | None:
    """The pixel size of the level read, where the file or the slide list stated it; None where the model's was
    only assumed, so that no column is in um as if it had been measured (as the outputs' own, which leave it out)."""
    return None if manifest.get("mpp_source") == "assumed" else manifest.get("mpp")


def _tissue_mm2(manifest: dict) -> float | None:
    """Tissue area of a slide from its completion record: the share the predictor's tissue mask covered (the mask
    it skipped background by) of the level it read, within the slide's ROI where it had one (its nuclei are those
    of that area); None without a pixel size or in an older version's record."""
    fraction, mpp = (manifest.get("roi") or manifest).get("tissue_fraction"), _stated_mpp(manifest)
    if fraction is None or mpp is None:
        return None
    height, width = manifest["shape"]
    return fraction * height * width * mpp**2 / 1e6


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this worker process so far, MB; None where the system does not say."""
    try:
        import resource  # POSIX only
    except ImportError:  # Windows: its peak working set
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return None if peak is None else peak / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------- on the client


@dataclass
class CohortSummary:
    """The run table's rows (cohort order), where it was written, the peak resident memory (MB) of each worker
    process that ran a slide, by worker address, and the region tasks of each split slide, by slide name."""

    table: Path
    rows: list[dict] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    region_tasks: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def cpu_count() -> int:
    return len(cpus())


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, retries: int = 2,
                dashboard_address: str | None = ":8787") -> Iterator[tuple[object, int | None]]:
    """(client, torch threads per worker): a new ``LocalCluster`` of ``workers`` processes with one task slot each
    and the cores shared out between them, or the running scheduler at ``scheduler`` (None: each worker takes its
    ``host_share``; start such workers with ``--nthreads 1``, one slide at a time each).

    ``retries`` also sets how many worker deaths a local cluster forgives a task (``allowed-failures``) before
    the slide counts as failed; a remote scheduler uses its own setting. Dask's own INFO messages stay out of the
    log until the client and cluster have closed (``quiet_dask``).
    """
    if scheduler:
        with quiet_dask(), Client(scheduler) as client:
            yield client, None
        return
    workers = workers or 1
    with quiet_dask(), without_harmless_noise(), dask.config.set({"distributed.scheduler.allowed-failures": retries}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         dashboard_address=dashboard_address) as cluster, Client(cluster) as client:
        client.register_plugin(QuietWorker())
        yield client, max(1, cpu_count() // workers)


# Two warnings of a local cluster's end that say nothing wrong, by logger. A worker process with torch and OpenVINO
# loaded takes seconds to exit after its worker has closed, and on a busy host more than the 4 s its nanny waits
# (0.8 of Nanny.close's fixed 5 s, which LocalCluster does not let us set): the nanny then kills a process that
# has nothing left to do. On Ctrl-C, the tasks in flight are cancelled, as asked, and each worker says so.
HARMLESS = {"distributed.nanny": re.compile(r"Worker process still alive after [\d.]+ seconds, killing"),
            "distributed.worker.state_machine": re.compile(r"Async instruction for .* ended with CancelledError", re.S)}


def _not_harmless(record: logging.LogRecord) -> bool:
    pattern = HARMLESS.get(record.name)
    return pattern is None or not pattern.fullmatch(record.getMessage())


@contextmanager
def without_harmless_noise() -> Iterator[None]:
    """``HARMLESS`` kept out of this process's log for the duration."""
    loggers = [logging.getLogger(name) for name in HARMLESS]
    for dask_logger in loggers:
        dask_logger.addFilter(_not_harmless)
    try:
        yield
    finally:
        for dask_logger in loggers:
            dask_logger.removeFilter(_not_harmless)


class QuietWorker(WorkerPlugin):
    """``HARMLESS`` kept out of a worker process's log (it logs to the terminal itself)."""

    def setup(self, worker) -> None:
        for name in HARMLESS:
            logging.getLogger(name).addFilter(_not_harmless)


@contextmanager
def quiet_dask() -> Iterator[None]:
    """Dask's loggers (``distributed``) at WARNING for the duration, their level restored after: its INFO messages
    (scheduler and workers starting and closing, connections) would outnumber the slides' own lines. Where debug
    output is asked for (the root or the ``distributed`` logger at DEBUG), they stay as they are."""
    dask_logger = logging.getLogger("distributed")
    if logging.getLogger().isEnabledFor(logging.DEBUG) or dask_logger.isEnabledFor(logging.DEBUG):
        yield
        return
    level = dask_logger.level
    dask_logger.setLevel(max(dask_logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        dask_logger.setLevel(level)


def _runnable(slides: list[Slide], output_dir: Path) -> tuple[list[int], dict[int, str]]:
    """The indices of the slides to run and why each other one is refused before starting: a later one of an
    output name, or one whose outputs' paths in ``output_dir`` Windows would refuse here
    (``earlier_outputs.refusals``)."""
    refused = refusals([(slide.name, slide.path) for slide in slides], output_dir,
                       "give one of them another name (the 'slide' column of a slide list)")
    return [i for i in range(len(slides)) if i not in refused], refused


def _dashboard(client) -> str:
    """The dashboard's address, with the fix where this environment lacks bokeh (the scheduler serves the dashboard
    only with bokeh in its own environment). A client without a cluster object joined a scheduler started apart,
    in an environment this one cannot see; a local or batch-system cluster's scheduler runs in this process."""
    link = client.dashboard_link
    if importlib.util.find_spec("bokeh") is not None:
        return link
    if getattr(client, "cluster", None) is None:
        return f"{link} (where the scheduler's environment has bokeh: pip install bokeh there)"
    return f"{link} once bokeh is installed (pip install nucleiseg-monai[cluster])"


def run_cohort(client, slides: list[Slide], output_dir: str | os.PathLike,
               factory: Callable[[], SlidePredictor], table: str | os.PathLike | None = None,
               retries: int = 2, torch_threads: int | None = None, overwrite: bool = False,
               progress: bool = True, split_above_mpx: float | None = None,
               finished: set[str] | None = None) -> CohortSummary:
    """Segment ``slides`` on the cluster of ``client``, one task per slide, recording each in the run table
    (default ``output_dir/run_table.csv``) as it finishes. Slides with finished outputs of the same weights and
    settings are skipped (unless ``overwrite``), their figures kept from the previous run table; where the factory
    gives its settings (``finished_slides``), they are found here and never sent out, and finished outputs of
    other weights or settings stop the run before anything is sent out or written, as a single-process run stops.
    A later slide of an output name, and one whose outputs' paths Windows would refuse here, fail unsent
    (``_runnable``).

    A slide of more than ``split_above_mpx`` megapixels (None: never) becomes two region tasks per worker thread
    (contiguous bands of its regions) and one merge task that stitches and writes it (``region_tasks``).

    ``finished``: what ``finished_slides`` has just given for the slides to run (``_runnable``; ``predict_cohort``
    asks before it starts a cluster), so that every slide's manifest is not read twice.
    """
    check_factory(factory)
    factory = pin_factory(factory)
    output_dir = Path(output_dir).resolve()
    table_path = Path(table) if table else output_dir / RUN_TABLE
    previous = RunTable.read(table_path)
    waiting, refusals = _runnable(slides, output_dir)
    rows, futures = [], {}
    for i, slide in enumerate(slides):
        row = {**slide.columns(), "status": "pending"}
        if i in refusals:
            row.update(status="failed", error=refusals[i])
            logger.error("failed on %s: %s", slide.path, row["error"])  # one line per failure, as the others get
        rows.append(row)
    local = isinstance(getattr(client, "cluster", None), LocalCluster)
    if finished is None:
        finished = finished_slides(factory, [slides[i] for i in waiting], output_dir, overwrite, local=local)
    output_dir.mkdir(parents=True, exist_ok=True)
    for i in [i for i in waiting if slides[i].name in finished]:
        waiting.remove(i)
        row = {**slides[i].columns(), "error": None, "worker": None}  # none ran it
        rows[i].update(_skipped_row(row, output_dir, slides[i], previous.get(slides[i].name)))
        logger.info("%s: outputs complete, skipped", slides[i].path)
    run_table = RunTable(table_path, rows)
    run_table.flush()
    started = time.time_ns()  # outputs written after it are this run's
    lock = threading.Lock()  # slides are sent from this loop and from the thread that fills workers joining later

    def send() -> None:
        """Slide tasks up to the cluster's threads: a worker holds only slides it runs, since Dask charges a worker's
        death to every task it holds, and a slide merely queued there would be failed with the one that killed it."""
        with lock:  # sent and awaited at once: the loop must not find nothing awaited while slides are on their way
            while waiting and len(futures) < max(1, sum(client.nthreads().values())):
                i = waiting.pop(0)
                future = client.submit(process_slide, factory, slides[i], str(output_dir), torch_threads, overwrite,
                                       previous.get(slides[i].name), split_above_mpx, mark,
                                       key=_key("slide", slides[i].name), retries=retries, pure=False)
                futures[future] = i
                pending.add(future)

    refused = len(slides) - len(waiting) - len(finished)
    workers = len(client.scheduler_info()["workers"])
    logger.info("%d slide%s on %d worker%s%s%s; dashboard %s", len(slides), "s"[:len(slides) != 1], workers,
                "s"[:workers != 1],
                f" ({refused} refused before starting)" if refused else "",
                f" ({len(finished)} already complete)" if finished else "", _dashboard(client))
    several = sorted(address for address, n in client.nthreads().items() if n > 1)
    if several:  # as their own scheduler's workers may be started
        logger.warning("workers %s run several tasks each: slides share their memory, and a worker that dies (out of "
                       "memory) fails every slide it runs; start workers with --nthreads 1", ", ".join(several[:3])
                       + (f" and {len(several) - 3} more" if len(several) > 3 else ""))
    summary = CohortSummary(table_path)
    split: dict[int, tuple[float, list]] = {}  # slide index -> (when it was split, its region tasks' variables)
    pending = as_completed(loop=getattr(client, "loop", None))
    # workers of this machine see its folders; a batch system's may be given a node-local one of the same name
    with contextlib.nullcontext() if local else shared_mark(output_dir) as mark, \
            tqdm(total=len(slides), initial=refused + len(finished), unit="slide", disable=not progress) as bar, \
            _recorded_at_exit(run_table, output_dir, slides, futures, started), _released_at_exit(split), \
            _sending_to_workers_as_they_join(client, send, lambda: bool(waiting)):
        send()
        for future in pending:
            with lock:
                i = futures.pop(future)
            slide = slides[i]
            if future.status != "finished":
                error = failure(future.exception() if future.status == "error" else f"the task was {future.status}")
                row = {**rows[i], "status": "failed", "error": error}
            else:
                row = future.result()
                relay(row.pop("log", []))
                worker, peak = row["worker"], row.pop("peak_rss_mb", None)
                if row["status"] == "split":
                    merge, handed = _submit_regions(client, factory, slide, str(output_dir), torch_threads,
                                                    row["regions"], retries, overwrite, mark)
                    logger.info("%s: %.1f megapixels, above split_above_mpx=%g: %d regions in %d region tasks",
                                slide.path, row["megapixels"], split_above_mpx, len(row["regions"]), len(handed))
                    summary.region_tasks[slide.name] = len(handed)
                    split[i] = (time.perf_counter(), handed)
                    with lock:
                        futures[merge] = i
                        pending.add(merge)
                    future.release()
                    send()
                    continue
                if peak is not None:
                    summary.peak_rss_mb[worker] = max(peak, summary.peak_rss_mb.get(worker, 0.0))
                if i in split and row["status"] == "done":  # its time from the split to its outputs, region tasks too
                    row["seconds"] = round(time.perf_counter() - split[i][0], 3)
            if row["status"] == "failed":
                row = _with_kept_outputs(_seen_here(row, slide), output_dir, slide.name)
                logger.error("failed on %s: %s", slide.path, row["error"])
            elif row["status"] == "done":
                logger.info("%s: %s nuclei in %.1f s", slide.path, row["nuclei"], row["seconds"])
            else:
                logger.info("%s: outputs complete, skipped", slide.path)
            future.release()
            for variable in split.pop(i, (0.0, []))[1]:  # the region tasks' results go with their variables
                variable.delete()
            run_table.update(i, row)
            bar.update(1)
            send()
    summary.rows = run_table.rows
    return summary


# how often the client looks for task slots of workers that joined since (a batch system's jobs leaving its queue),
# and after how long without any worker it says so
JOIN_POLL_S = 5.0
NO_WORKERS_WARNING_S = 300.0


@contextmanager
def _sending_to_workers_as_they_join(client, send: Callable[[], None], waiting: Callable[[], bool]
                                     ) -> Iterator[None]:
    """A thread that sends slides (``send``) every ``JOIN_POLL_S`` while some are ``waiting``: the loop sends them as
    slides finish, so without it a worker that joins later (``cluster.scale(jobs=20)`` with jobs still queued)
    would wait for one to finish. It warns once when the cluster has had no worker for ``NO_WORKERS_WARNING_S``:
    workers that cannot run the tasks (this package missing on them) leave at their first one, and the run would
    wait without a word."""
    stop, every, no_workers = threading.Event(), JOIN_POLL_S, NO_WORKERS_WARNING_S

    def fill() -> None:
        since = None
        while not stop.wait(every) and waiting():
            try:
                slots = sum(client.nthreads().values())
                if slots:
                    send()
            except Exception:  # the client closing as the run ends
                return
            since = None if slots else (since or time.monotonic())
            if since is not None and time.monotonic() - since >= no_workers:
                logger.warning("the cluster has had no worker for %s while slides wait: check that its workers "
                               "start, and their logs (a worker that cannot import nucleiseg_monai leaves at its "
                               "first task)",
                               f"{no_workers:.0f} s" if no_workers < 90 else f"{no_workers / 60:.0f} min")
                since = float("inf")  # once

    thread = threading.Thread(target=fill, name="nucleiseg-cohort-send", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2 * every)  # not forever where the scheduler has gone: the thread is a daemon


@contextmanager
def _released_at_exit(split: dict[int, tuple[float, list]]) -> Iterator[None]:
    """The region tasks' variables of the split slides still in flight deleted when the loop ends early (Ctrl-C):
    on a scheduler that outlives this client, their results would stay in the workers' memory."""
    try:
        yield
    finally:
        for _, handed in split.values():
            for variable in handed:
                try:
                    variable.delete()
                except Exception:  # the scheduler gone too: nothing is held
                    pass


@contextmanager
def _recorded_at_exit(run_table: RunTable, output_dir: Path, slides: list[Slide], in_flight: dict, since: int
                      ) -> Iterator[None]:
    """The run table written when the cohort's loop ends, however it ends (Ctrl-C too), with the slides still in
    flight whose outputs were written since ``since`` (ns) as done: their workers finished them, but their results
    never reached this loop. The table throttles its writes (``RunTable.update``), so it is written here too."""
    try:
        yield
    finally:
        for i in sorted(set(in_flight.values())):
            try:
                if _written_since(output_dir, slides[i].name, since):
                    run_table.update(i, {**run_table.rows[i], "status": "done", "error": None,
                                         **_figures(output_dir, slides[i].name)})
            except (OSError, ValueError, KeyError) as err:  # the table is written anyway; the re-run recovers it
                logger.warning("%s: its outputs could not be read for the run table (%s)", slides[i].path, err)
        run_table.flush()


def _written_since(output_dir: Path, name: str, since: int) -> bool:
    """Whether the slide's outputs are complete and their completion record was written since ``since`` (ns)."""
    try:
        return outputs_complete(output_dir, name) and manifest_path(output_dir, name).stat().st_mtime_ns >= since
    except OSError:
        return False


def _seen_here(row: dict, slide: Slide) -> dict:
    """A failed row whose worker found no slide file, with the file seen here said: the workers' machines see
    another file system than this one."""
    if str(row.get("error") or "").startswith("FileNotFoundError") and Path(slide.path).is_file():
        return {**row, "error": f"{row['error']}; it exists where this command runs, so the workers see another "
                                "file system: put the slides where every worker sees them, under the same path"}
    return row


def _with_kept_outputs(row: dict, output_dir: Path, name: str) -> dict:
    """A failed slide's row with the figures of the finished outputs it has on disk, which the failure left as they
    were (finished outputs of other settings that appeared after the client's check, a redo that failed): the table
    says what the folder holds, and its error why the slide failed."""
    if not outputs_complete(output_dir, name):
        return row
    return {**row, **_figures(output_dir, name),
            "error": f"{row['error']}; its finished outputs on disk are kept, and the figures are theirs"}


# Settings a predictor resolves from the machine it runs on (int8: OpenVINO and NNCF installed, a CPU): a client
# apart from its workers (a remote scheduler, a batch system's nodes) cannot tell what they resolve.
MACHINE_SETTINGS = ("int8",)


def finished_slides(factory: Callable[[], SlidePredictor], slides: list[Slide], output_dir: Path,
                    overwrite: bool = False, local: bool = True) -> set[str]:
    """The names of ``slides`` whose outputs are finished with the weights and settings each would run with (its
    own pixel size from a slide list), for the client to skip them unsent: a worker builds its network before its
    first slide, even one it would skip. FileExistsError naming those of other weights or settings, before any
    slide is sent out, as a single-process run refuses them (``earlier_outputs.finished_outputs``). Empty with
    ``overwrite``, and for a factory that cannot give its settings unbuilt (``BundlePredictor.settings_predictor``):
    its workers check each slide as they take it. Where the workers are not ``local`` (this machine's processes),
    a slide whose outputs differ only in ``MACHINE_SETTINGS`` is sent out too, for its worker to decide."""
    settings_predictor = getattr(factory, "settings_predictor", None)
    if overwrite or settings_predictor is None:
        return set()
    predictor = settings_predictor()
    if predictor.overwrite:
        return set()
    return finished_outputs(output_dir, [(s.name, s.path, for_slide(predictor, s)) for s in slides],
                            undecided=() if local else MACHINE_SETTINGS)


def pin_factory(factory: Callable[[], SlidePredictor]) -> Callable[[], SlidePredictor]:
    """The factory with the settings that would differ between machines fixed (``BundlePredictor.pinned``), where
    it has such; other factories are the caller's to keep the same everywhere."""
    pinned = getattr(factory, "pinned", None)
    return factory if pinned is None else pinned()


def check_factory(factory: Callable[[], SlidePredictor]) -> None:
    """The factory's own check (``BundlePredictor.check``: the weights exist), where it has one."""
    check = getattr(factory, "check", None)
    if check is not None:
        check()


def failure(err: BaseException | str) -> str:
    """A failed task's line in the run table: the exception's type and message, that of its cause where MONAI's
    config wrappers hold one (a predictor that the bundle's config could not build)."""
    if not isinstance(err, BaseException):
        return err
    err = root_cause(err)
    return f"{type(err).__name__}: {err}"


def _task_key() -> str:
    """The running task's key: a retry has its key, so its slide's lock, left by the try whose worker died, is its
    own to take over (``outputs.ImageLock``), on whatever machine the retry runs."""
    return str(get_worker().get_current_task())


def _key(kind: str, name: str) -> str:
    return f"{kind}-{name}-{uuid.uuid4().hex[:8]}"


def _submit_regions(client, factory: Callable[[], SlidePredictor], slide: Slide, output_dir: str,
                    torch_threads: int | None, regions: list, retries: int, overwrite: bool = False,
                    mark: str | None = None):
    """The region tasks of a split slide, two per worker thread so the merge starts early, and its merge task:
    (merge future, the ``Variable`` holding each region task's future for the merge)."""
    parts = bands(regions, 2 * max(1, sum(client.nthreads().values())))
    handed = []
    for part in parts:
        future = client.submit(region_band, factory, slide, output_dir, torch_threads, part, mark,
                               key=_key("regions", slide.name),
                               retries=retries, pure=False)
        variable = Variable(f"nucleiseg-{future.key}", client=client)
        variable.set(future)
        handed.append(variable)
    labels = FetchedLabels(tuple(v.name for v in handed), tuple(tuple(map(tuple, part)) for part in parts))
    merge = client.submit(merge_slide, factory, slide, output_dir, torch_threads, labels, overwrite, mark,
                          key=_key("merge", slide.name), retries=retries, pure=False)
    return merge, handed


def predict_cohort(source: str | os.PathLike, output_dir: str | os.PathLike, factory: Callable[[], SlidePredictor],
                   workers: int | None = None, scheduler: str | None = None, retries: int = 2,
                   table: str | os.PathLike | None = None, overwrite: bool = False,
                   dashboard_address: str | None = ":8787", progress: bool = True,
                   split_above_mpx: float | None = None) -> CohortSummary:
    """``read_cohort(source)`` run by ``run_cohort`` on a new local cluster or the scheduler at ``scheduler``;
    missing weights and finished outputs of other settings (``finished_slides``) are refused before either."""
    slides = read_cohort(source)
    # before a cluster is started in vain: on a batch system its jobs would be queued and waited for first
    check_factory(factory)
    output_dir = Path(output_dir).resolve()
    runnable = [slides[i] for i in _runnable(slides, output_dir)[0]]
    finished = finished_slides(pin_factory(factory), runnable, output_dir, overwrite, local=scheduler is None)
    with dask_client(workers, scheduler, retries, dashboard_address) as (client, torch_threads):
        summary = run_cohort(client, slides, output_dir, factory, table, retries, torch_threads, overwrite, progress,
                             split_above_mpx, finished)
    logger.info("run table %s: %d done, %d skipped, %d failed", summary.table, summary.count("done"),
                summary.count("skipped"), summary.count("failed"))
    return summary


def run_bundle_cohort(bundle: str | os.PathLike, input: str | os.PathLike, output_dir: str | os.PathLike,
                      workers: int | None = None, scheduler: str | None = None, retries: int = 2,
                      split_above_mpx: float | None = None, overrides: dict | None = None,
                      table: str | os.PathLike | None = None) -> CohortSummary:
    """``nucleiseg predict --workers / --scheduler`` as one call, for a bundle config's runner: the cohort
    ``input`` (folder, glob or slide list) segmented by the bundle's predictor on every worker.

    The workers build the predictor from the bundle's files, so settings given to the running config reach them
    only through ``overrides`` (config ids such as ``{"predictor#network#device": "cpu"}``, as ``from_bundle``
    takes them).
    """
    overrides = dict(overrides or {})
    factory = BundlePredictor(str(Path(bundle).resolve()), tuple(overrides.items()))
    # a value typed on monai.bundle's command line arrives as text: 'false' would be truthy
    overwrite = parse_bool(overrides.get("predictor#overwrite"), "predictor#overwrite",
                           "--cohort_overrides \"{{'{key}': {value}}}\"")
    return predict_cohort(input, output_dir, factory, workers=workers, scheduler=scheduler, retries=retries,
                          table=table, overwrite=overwrite,
                          split_above_mpx=split_above_mpx)


def raise_on_failure(summary: CohortSummary) -> CohortSummary:
    """The summary unchanged when no slide failed, else a RuntimeError naming the failed slides and the run table
    (so a bundle runner exits non-zero after every slide was tried)."""
    if summary.failed:
        lines = "\n".join(f"  {row['path']}: {row['error']}" for row in summary.failed)
        raise RuntimeError(f"{len(summary.failed)} slide(s) failed ({summary.count('done')} done, "
                           f"{summary.count('skipped')} already complete; run table {summary.table}):\n{lines}")
    return summary
