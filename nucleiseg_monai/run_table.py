"""A cohort's run table: one CSV row per slide, rewritten atomically as slides finish.

Columns: slide (the output name), path, input_mpp and roi (the slide list's), status (pending, done, skipped =
outputs already complete, failed), error, seconds (this run's time on the slide), mpp (microns per pixel of the
analysed level), tissue_mm2 (low-resolution tissue mask, the one the predictor skips background with; within the
slide's ROI where it has one), nuclei, nuclei_per_mm2 (of tissue), median_nucleus_um2 (from the slide's per-nucleus
CSV) and worker (the address of the Dask worker that ran the slide's task in this run, the merge task of a slide
split into regions: on a batch system, which node). Figures a slide does not have (a failure without finished
outputs, an image without a pixel size, a slide no worker took) are empty cells, never zeros; a failed slide whose
finished outputs are on disk keeps their figures, and its error says so.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .outputs import output_paths

logger = logging.getLogger(__name__)

# input_mpp and roi are the slide list's, so that a run table read back as a slide list gives each slide its own
COLUMNS = ("slide", "path", "input_mpp", "roi", "status", "error", "seconds", "mpp", "tissue_mm2", "nuclei",
           "nuclei_per_mm2", "median_nucleus_um2", "worker")
FINISHED = ("done", "skipped")


def median_nucleus_area(output_dir: str | os.PathLike, name: str) -> float | None:
    """Median ``area_um2`` of the slide's per-nucleus CSV; None when it has no nuclei or no pixel size."""
    with open(output_paths(output_dir, name)["csv"], newline="", encoding="utf-8") as handle:
        areas = [float(row["area_um2"]) for row in csv.DictReader(handle) if row["area_um2"]]
    return float(np.median(areas)) if areas else None


def figures(output_dir: str | os.PathLike, name: str, nuclei: int, mpp: float | None, tissue_mm2: float | None
            ) -> dict:
    """The figure columns of a slide whose outputs are complete."""
    return {
        "mpp": mpp, "tissue_mm2": tissue_mm2, "nuclei": nuclei,
        "nuclei_per_mm2": nuclei / tissue_mm2 if tissue_mm2 else None,
        "median_nucleus_um2": median_nucleus_area(output_dir, name),
    }


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class RunTable:
    """One row per slide in cohort order; ``update`` rewrites the file unless the last write was less than its own
    duration over ``share`` ago, so writing takes at most that share of the time: a small table records each slide
    as it finishes, a cohort of thousands does not rewrite megabytes per slide. ``flush`` writes it now.

    A cohort flushes it when its loop ends, however it ends (Ctrl-C too); a run killed between writes loses only
    rows of slides whose outputs are complete on disk, and the re-run finds those outputs complete and recovers the
    rows from them.
    """

    def __init__(self, path: str | os.PathLike, rows: list[dict], share: float = 0.05):
        self.path = Path(path)
        self.rows = [{c: row.get(c) for c in COLUMNS} for row in rows]
        self.share = share
        self._written, self._cost = -float("inf"), 0.0
        self._held_open = False  # the last write failed for another program's hold on the file (said once)

    @staticmethod
    def read(path: str | os.PathLike) -> dict[str, dict]:
        """A previous run's rows by slide name; empty when there is no table yet."""
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                return {row["slide"]: row for row in csv.DictReader(handle)}
        except FileNotFoundError:
            return {}

    def update(self, index: int, row: dict) -> None:
        self.rows[index] = {c: row.get(c) for c in COLUMNS}
        if time.monotonic() - self._written >= self._cost / self.share:
            start = time.monotonic()
            try:
                self.flush()
            except PermissionError as err:  # Windows: the table open in Excel cannot be replaced; slides go on
                if not self._held_open:
                    logger.warning("%s could not be replaced (%s): close it in the program that holds it open; it "
                                   "is tried again as slides finish, and when the cohort ends", self.path, err)
                self._held_open = True
                # paced as a write: each try may wait out Windows' retries (atomic.REPLACE_WAITS_S)
                self._written = time.monotonic()
                self._cost = max(self._cost, self._written - start)
            else:
                self._held_open = False

    def flush(self) -> Path:
        start = time.monotonic()
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows([_cell(row[c]) for c in COLUMNS] for row in self.rows)
        self._written = time.monotonic()
        self._cost = self._written - start
        return self.path
