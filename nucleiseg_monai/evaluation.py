"""The evaluation report: per-image, per-organ and mean metrics of a model beside the reference method and humans.

``EvaluationReport`` is an ignite handler for the evaluator of a bundle's ``evaluate.json``. For each tile it scores
the model's instances, the reference notebook's method (the same network's foreground map cut into connected
components, so the gain from true instances shows), and each extra human annotation round of the same tile (the
agreement a model can be set against); it writes each predicted instance map as ``<name>.tif`` and an overlay PNG
(truth in green, prediction in yellow), and at the end ``metrics.json``, ``metrics.csv`` and TensorBoard scalars.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from .data import INSTANCE_DIR, read_image, read_instance_labels
from .metrics import instance_metrics, summarize
from .atomic import atomic_path, sha256_file, write_json_atomic
from .outputs import PREDICTION_COLOUR, TRUTH_COLOUR, Overlay, write_label_tiff
from .postprocess import instances_from_foreground
from .transforms import rescan_image

logger = logging.getLogger(__name__)

# Mahbod et al. 2021, Table 4: their U-Net on the CryoNuSeg test protocol (not this split; shown for orientation)
PUBLISHED_BASELINE = {"method": "published CryoNuSeg U-Net (Mahbod 2021)", "aji": 0.525, "pq": 0.477}
OBSERVERS = ("annotator2", "annotator1_round2")
REFERENCE = "reference: binary map + connected components"
TABLE_KEYS = ("dice", "count_ape", "precision", "recall", "f1", "aji", "aji_plus", "pq", "dq", "sq", "missed", "merged",
              "misdrawn")
CSV_KEYS = TABLE_KEYS + ("n_true", "n_pred", "tp", "fp", "fn")


def overlay(image: np.ndarray, true: np.ndarray | None, pred: np.ndarray) -> Overlay:
    """The tile with true outlines in green and predicted outlines in yellow (yellow wins where both fall)."""
    legend = (("truth", TRUTH_COLOUR),) if true is not None else ()
    drawing = Overlay(image, legend=legend + (("prediction", PREDICTION_COLOUR),))
    if true is not None:
        drawing.draw(true, colour=TRUTH_COLOUR)
    drawing.draw(pred)
    return drawing


def _numpy_labels(x) -> np.ndarray:
    return np.squeeze(convert_to_numpy(x)).astype(np.uint32)


class ReferenceInstancesd(MapTransform):
    """The reference notebook's method on the same network's output: foreground map cut into connected components."""

    def __init__(self, keys: KeysCollection = "pred", output_key: str = "pred_cc"):
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = instances_from_foreground(d[key])[None]
        return d


class EvaluationReport:
    """Collects per-tile metrics on an evaluator and writes the report, one section per data source.

    Args:
        output_dir: where ``<source>/<name>.tif``, ``<source>/<name>_overlay.png``, ``metrics.json`` and
            ``metrics.csv`` go.
        observers_dir: folder with ``<observer>/label masks modify/<name>.tif`` (CryoNuSeg's extra annotation
            rounds), scored only for tiles of ``observers_source``; observers whose file for a tile is missing are
            left out of that tile. None: no human rows.
        observers: which subfolders to score.
        pred_key / true_key / reference_key: engine output keys of the model's instances, the truth and the
            reference method's instances (None to skip the reference row).
        split: the split asked for, recorded in the report as ``split``. A tile's own part (its record's
            ``part``: ``sources.evaluation_records`` scores a source's validation tiles where it has none in
            ``split``) names its source's section: ``parts`` in the report, and the log and TensorBoard say it.
        log_dir: TensorBoard folder for the mean metrics (None: none).
        observers_source: the source whose tiles the observers annotated.
        checkpoint / settings: the weights scored and what else decided the figures (post-processing, pixel size,
            statistics...), recorded in the report as ``made_with`` with the weights' SHA-256 and the package version,
            so that a report says what it is a report of.

    A report replaces the one in ``output_dir`` as it starts: the tile maps and overlays of the sources that report
    named, its ``metrics.json``, ``metrics.csv`` and TensorBoard files go, so no tile of an earlier run is left beside
    a new report, and an interrupted run leaves no report of other weights behind.

    The pooled line holds the tiles of every source but derived copies (``sources.evaluation_records`` names a
    rescanned copy ``<source>@<mpp>um``), which are rows of their own.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        observers_dir: str | os.PathLike | None = None,
        observers: Sequence[str] = OBSERVERS,
        pred_key: str = "pred_inst",
        true_key: str = "true_inst",
        reference_key: str | None = "pred_cc",
        split: str = "test",
        log_dir: str | os.PathLike | None = None,
        observers_source: str = "cryonuseg",
        checkpoint: str | os.PathLike | None = None,
        settings: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.observers_dir = Path(observers_dir) if observers_dir and Path(observers_dir).is_dir() else None
        # said when the observers' source is scored: data without it has no human rows to miss
        self._missing_observers = observers_dir if observers_dir and self.observers_dir is None else None
        self.observers = tuple(observers)
        self.observers_source = observers_source
        self.pred_key, self.true_key, self.reference_key = pred_key, true_key, reference_key
        self.split, self.log_dir = split, log_dir
        self.rows: dict[str, dict[str, list[dict]]] = {}
        self.parts: dict[str, str] = {}  # source -> the part its tiles come from
        self.checkpoint, self.settings = checkpoint, dict(settings or {})

    def _clear(self) -> None:
        self.rows.clear()
        self.parts.clear()
        self._remove_previous_report()

    def _remove_previous_report(self) -> None:
        """The files an earlier report wrote into ``output_dir`` (only those: the folder may hold other files)."""
        try:
            previous = json.loads((self.output_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for source in previous.get("sources", {}) if isinstance(previous, dict) else ():
            folder = self.output_dir / str(source).replace("/", "_")
            if folder.is_dir():
                for path in [*folder.glob("*.tif"), *folder.glob("*_overlay.png")]:
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()
        for path in [*self.output_dir.glob("events.out.tfevents.*"), self.output_dir / "metrics.csv",
                     self.output_dir / "metrics.json"]:
            path.unlink(missing_ok=True)
        logger.info("the earlier report in %s is replaced", self.output_dir)

    def attach(self, engine: Engine) -> None:
        from .handlers import quiet_interrupts

        quiet_interrupts(engine)  # Ctrl-C: nucleiseg evaluate says what it left, ignite's empty ERROR lines would not
        engine.add_event_handler(Events.STARTED, lambda _: self._clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _add(self, source: str, method: str, name: str, organ: str, pred: np.ndarray, true: np.ndarray) -> None:
        row = {"name": name, "organ": organ, **instance_metrics(pred, true)}
        self.rows.setdefault(source, {}).setdefault(method, []).append(row)

    def collect(self, engine: Engine) -> None:
        for batch, output in zip(engine.state.batch, engine.state.output):
            name, organ, source = str(batch["name"]), str(batch["organ"]), str(batch.get("source", "tiles"))
            part = str(batch.get("part") or self.split)
            if self.parts.setdefault(source, part) != part:
                raise ValueError(f"EvaluationReport: {source} holds tiles of both {self.parts[source]} and {part}")
            pred, true = _numpy_labels(output[self.pred_key]), _numpy_labels(output[self.true_key])
            self._add(source, "model", name, organ, pred, true)
            if self.reference_key:
                self._add(source, REFERENCE, name, organ, _numpy_labels(output[self.reference_key]), true)
            if self._missing_observers and source == self.observers_source:
                logger.warning("observer annotations not found at %s: the report has no human-agreement rows for %s",
                               self._missing_observers, source)
                self._missing_observers = None
            if self.observers_dir and source == self.observers_source:
                for observer in self.observers:
                    path = self.observers_dir / observer / INSTANCE_DIR / f"{name}.tif"
                    if path.is_file():
                        self._add(source, f"human: {observer}", name, organ, read_instance_labels(path), true)
            folder = self.output_dir / source.replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            write_label_tiff(folder / f"{name}.tif", pred, tile=256)
            image = read_image(batch["image_path"])
            if image.shape[:2] != pred.shape:  # a rescanned copy: draw on the copy's grid
                image = rescan_image(image, pred.shape[0] / image.shape[0])
            with atomic_path(folder / f"{name}_overlay.png") as tmp:
                overlay(image, true, pred).write_png(tmp)

    def write(self, engine: Engine | None = None) -> dict:
        if not self.rows:
            raise RuntimeError("EvaluationReport: no tiles were evaluated")
        sources = {src: {m: summarize(rows) for m, rows in methods.items()} for src, methods in self.rows.items()}
        originals = [src for src in self.rows if "@" not in src]
        pooled_rows: dict[str, list[dict]] = {}
        for src in originals:
            for method in ("model", REFERENCE):
                pooled_rows.setdefault(method, []).extend(self.rows[src].get(method, []))
        pooled = {m: summarize(rows) for m, rows in pooled_rows.items() if rows}
        parts = {src: self.parts.get(src, self.split) for src in sources}
        keys = sources[originals[0]]["model"]["mean"].keys() if originals else ()
        # the headline figure of the model cards: each source's mean over its tiles, then the mean over the sources
        over_sources = {k: float(np.mean([sources[src]["model"]["mean"][k] for src in originals])) for k in keys}
        # the published figure is CryoNuSeg's test split's: beside other data it would read as a reference for them
        published = self.observers_source in sources and parts[self.observers_source] == "test"
        report = {"split": self.split, "parts": parts, "made_with": self._made_with(),
                  **({"published_baseline": PUBLISHED_BASELINE} if published else {}), "sources": sources,
                  "pooled": pooled, "mean_over_sources": over_sources}
        write_json_atomic(report, self.output_dir / "metrics.json", default=float)
        pooled_part = ",".join(sorted({parts[src] for src in originals}))
        with atomic_path(self.output_dir / "metrics.csv") as tmp:
            tmp.write_text(_csv([
                *((src, m, parts[src], v) for src, ms in sources.items() for m, v in ms.items()),
                *(("pooled", m, pooled_part, v) for m, v in pooled.items()),
            ]), encoding="utf-8", newline="")  # the csv module ends its rows; Windows would add a second \r
        for src in originals:
            if parts[src] != self.split:
                logger.info("%s has no %s tiles: its %s tiles are scored, and reported as %s", src, self.split,
                            parts[src], parts[src])
        for src, summaries in sources.items():
            # the published figure is of a test protocol: beside validation tiles it would mislead
            logger.info("%s (%s), mean over tiles:\n%s", src, parts[src],
                        format_table(summaries, baseline=src == self.observers_source and parts[src] == "test"))
        logger.info("pooled over %s, mean over tiles:\n%s", [f"{src} ({parts[src]})" for src in originals],
                    format_table(pooled, baseline=False))
        logger.info("report written to %s", self.output_dir)
        if self.log_dir is not None:
            self._tensorboard(sources, parts, engine)
        return report

    def _made_with(self) -> dict:
        from . import __version__

        made = {"checkpoint": None, "weights_sha256": None}
        if self.checkpoint is not None:
            path = Path(self.checkpoint).expanduser().resolve()
            made = {"checkpoint": str(path), "weights_sha256": sha256_file(path) if path.is_file() else None}
        settings = json.loads(json.dumps(self.settings, default=_plain))
        if isinstance(settings.get("rescans"), dict):  # those made, not those asked of sources this data lacks
            settings["rescans"] = {src: f for src, f in settings["rescans"].items()
                                   if any(row.startswith(f"{src}@") for row in self.rows)}
        return {**made, **settings, "nucleiseg_monai": __version__}

    def _tensorboard(self, sources: dict, parts: dict[str, str], engine: Engine | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = engine.state.epoch if engine is not None else 0
        with SummaryWriter(log_dir=str(self.log_dir)) as writer:
            for src, summaries in sources.items():
                for key in TABLE_KEYS:
                    writer.add_scalar(f"{parts[src]}/{src}/{key}", summaries["model"]["mean"][key], step)


def _plain(value):
    """Settings as JSON: tensors and arrays as lists, anything else as its text."""
    value = convert_to_numpy(value) if hasattr(value, "shape") else value
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _csv(sections: list[tuple[str, str, str, dict]]) -> str:
    """One row per (section, method, the part its tiles come from) and scope: "mean" (per-tile figures averaged),
    "pooled" (counts summed over the tiles first), each organ's mean, each image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("section", "method", "part", "scope", "name", "organ", "n_images") + CSV_KEYS)
    for section, method, part, summary in sections:
        head = [section, method, part]
        for scope in ("mean", "pooled"):
            if scope in summary:
                writer.writerow([*head, scope, "", "", summary["n_images"]]
                                + [summary[scope].get(k, "") for k in CSV_KEYS])
        for organ, group in summary["per_organ"].items():
            writer.writerow([*head, "organ", "", organ, group["n_images"]]
                            + [group["mean"].get(k, "") for k in CSV_KEYS])
        for row in summary["per_image"]:
            writer.writerow([*head, "image", row["name"], row["organ"], 1] + [row.get(k, "") for k in CSV_KEYS])
    return buffer.getvalue()


def format_table(summaries: dict, keys: Sequence[str] = ("dice", "count_ape", "recall", "f1", "aji", "pq"),
                 baseline: bool = True) -> str:
    """A plain-text table of mean metrics, one row per method (with CryoNuSeg's published baseline for orientation)."""
    width = max(len(m) for m in [*summaries, PUBLISHED_BASELINE["method"]]) + 2
    lines = ["method".ljust(width) + "".join(k.rjust(11) for k in keys)]
    for method, summary in summaries.items():
        lines.append(method.ljust(width) + "".join(f"{summary['mean'][k]:11.3f}" for k in keys))
    if baseline:
        lines.append(PUBLISHED_BASELINE["method"].ljust(width)
                     + "".join(f"{PUBLISHED_BASELINE[k]:11.3f}" if k in PUBLISHED_BASELINE else " " * 11 for k in keys))
    return "\n".join(lines)
