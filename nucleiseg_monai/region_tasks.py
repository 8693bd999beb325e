"""One slide as many cluster tasks: contiguous bands of its regions computed anywhere, stitched in one place.

A cohort splits a slide above ``split_above_mpx`` megapixels (``cohort.run_cohort``) so that one huge slide can use
every worker. Its regions to process, in the raster order ``SlidePredictor.predict_slide`` walks them, are cut into
contiguous ``bands``; each band is one task that returns its regions' instance labels (``band_labels``, the
``SlidePredictor.region_labels`` the stitcher takes, compressed). One merge task then runs ``predict_slide`` with
``labels_from=FetchedLabels(...)``: it fetches the bands in order and feeds every region to one ``RegionStitcher``
exactly as the whole-slide run does, so the label map, GeoJSON, CSV and overlay are the same, nucleus ids included,
and they are written once, atomically, by the merge.

Kept regions: the slide task that splits a slide claims its region journal (``region_journal``), and each band
task joins it: a region the journal holds is read back instead of computed, and each one computed is written into
it, so a cohort killed midway and run again computes only the regions it had not finished.

Memory: a band's result stays on the worker that computed it (Dask spills it to disk beyond its memory limit)
until the slide's merge task has finished; the merge holds one band's compressed labels at a time besides what one
``predict_slide`` holds, and reads the windows of kept nuclei again for their measurements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from distributed import Variable, worker_client

from .inference import Plan, SlidePredictor
from .outputs import source_fingerprint
from .region_journal import RegionJournal, pack, unpack

Region = tuple[int, int]


def bands(regions: list[Region], count: int) -> list[list[Region]]:
    """``regions`` cut into at most ``count`` contiguous runs of near-equal length, none empty."""
    count = max(1, min(count, len(regions)))
    bounds = np.linspace(0, len(regions), count + 1).round().astype(int)
    return [list(regions[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def claim_journal(predictor: SlidePredictor, plan: Plan, output_dir: str | os.PathLike, name: str) -> None:
    """Before a split slide's band tasks start: its region journal, emptied where another run's regions are in it."""
    if predictor.keep_regions:
        RegionJournal.claim(output_dir, name, predictor.journal_key(plan, source_fingerprint(plan.reader.path)))


def band_labels(predictor: SlidePredictor, path: str, regions: list[Region],
                output_dir: str | os.PathLike | None = None, name: str | None = None) -> list[tuple[Region, bytes]]:
    """The packed ``region_labels`` of ``regions`` of the image at ``path``, planned as ``predict_slide`` plans it;
    with ``output_dir`` and ``name``, taken from and added to the slide's claimed region journal."""
    with predictor.planned(path) as (plan, _):
        journal = None
        if output_dir is not None and predictor.keep_regions:
            journal = RegionJournal.join(output_dir, name, predictor.journal_key(plan, source_fingerprint(path)))
        band = []
        for ij in regions:
            kept = journal is not None and ij in journal
            packed = journal.load_packed(ij, plan.grid.window(ij)[2:]) if kept else None  # sent on as kept
            if packed is None:
                labels = predictor.region_labels(plan, ij)
                if journal is not None:
                    packed = journal.save(ij, labels)  # packed once, for the journal and the merge alike
                if packed is None:
                    packed = pack(labels)
            band.append((ij, packed))
        return band


@dataclass(frozen=True)
class FetchedLabels:
    """``labels_from`` for ``predict_slide`` on a worker: the results of the band tasks (of ``regions``, band by
    band), fetched one band at a time in order. The client hands each band's future over in a Dask ``Variable``
    named in ``variables``: a future rebuilt from its key alone is not tracked by the scheduler and never resolves.
    """

    variables: tuple[str, ...]
    regions: tuple[tuple[Region, ...], ...]

    def __call__(self, plan: Plan, todo: list[Region]):
        planned = [tuple(ij) for band in self.regions for ij in band]
        if planned != [tuple(ij) for ij in todo]:
            raise RuntimeError(f"{plan.reader.path}: its regions to process differ from those its region tasks "
                               "computed (the file changed during the run?); run the cohort again")
        # seceded from the worker's task slots while waiting, so the bands can run on this worker too
        with worker_client() as client:
            for name, regions in zip(self.variables, self.regions):
                band = Variable(name, client=client).get().result()
                if [tuple(ij) for ij, _ in band] != [tuple(ij) for ij in regions]:
                    raise RuntimeError(f"internal error: region task {name} returned other regions than asked")
                for _, packed in band:
                    yield unpack(packed)
                del band
