"""DICOM whole-slide images (DICOM Supplement 145): which .dcm files make one slide, the file that stands for it,
and its output name.

A DICOM slide is a series of files that share a SeriesInstanceUID: one per pyramid level (or several, for
concatenations, focal planes or optical paths), often with label and overview images, usually one folder per
slide. OpenSlide reads a whole series from any one of its files, finding the others in the same folder, so a folder
of .dcm files holds as many images as it holds series with pyramid levels. Headers are read with pydicom, which the
``openslide`` extra installs.

Each slide is opened, and fingerprinted (``outputs.source_fingerprint``), from the file of its finest level, so a run
names the same file whichever of the series' files it was given. Its outputs are named after its slide identifier
(ContainerIdentifier: the barcode or ID of the glass slide), or its SeriesInstanceUID where it has none: the series'
files are named by UIDs or numbers, and a name taken from the folder would change as slides are added to it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DICOM_SUFFIXES = {".dcm"}
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# the header elements read: a pyramid level's file holds megabytes of tile offsets that need not be parsed
TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixRows",
        "TotalPixelMatrixColumns", "ContainerIdentifier"]


@dataclass(frozen=True)
class DicomSlide:
    """One series of whole-slide image files: ``base`` is the file of its finest level, ``files`` all of its files
    (labels and overviews too) and ``name`` the output name."""

    uid: str
    base: Path
    files: tuple[Path, ...]
    name: str


@dataclass(frozen=True)
class _Header:
    path: Path
    series: str
    level: bool  # a pyramid level of a whole-slide image: not its label, overview or thumbnail, nor a CT
    pixels: int  # of the whole level (TotalPixelMatrixRows x Columns): the finest level has the most
    slide_id: str


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def _pydicom(path: Path) -> Any:
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f"{path} is a DICOM file; reading DICOM slides needs OpenSlide and pydicom: pip install "
                          f"'nucleiseg-monai[openslide]'. Import failed with: {err}") from err
    return pydicom


def _read(path: Path) -> Any:
    """The header elements ``TAGS`` of a DICOM file; None when it is not one or cannot be read."""
    pydicom = _pydicom(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    except Exception:  # not DICOM, cut short, unreadable: pydicom raises assorted types
        return None


def _flavor(ds: Any) -> str:
    """The third value of ImageType: VOLUME for a pyramid level, else LABEL, OVERVIEW or THUMBNAIL."""
    values = ds.get("ImageType") or []
    values = [values] if isinstance(values, str) else list(values)  # pydicom gives one value as a string
    return values[2] if len(values) > 2 else ""


def _header(path: Path) -> _Header | None:
    ds = _read(path)
    if ds is None or "SeriesInstanceUID" not in ds:
        return None
    level = ds.get("SOPClassUID") == WSI_SOP_CLASS and _flavor(ds) == "VOLUME"
    pixels = int(ds.get("TotalPixelMatrixRows") or 0) * int(ds.get("TotalPixelMatrixColumns") or 0)
    return _Header(path, str(ds.SeriesInstanceUID), level, pixels, str(ds.get("ContainerIdentifier") or "").strip())


def folder_slides(folder: Path) -> tuple[DicomSlide, ...]:
    """The whole-slide images among the .dcm files of ``folder`` (not its subfolders), one per series with pyramid
    levels, in the order of their names; their paths under ``folder`` as given. Series of a label or overview
    alone, and other DICOM images (CT, MR, ...), are none."""
    files = sorted(p for p in folder.iterdir() if is_dicom(p) and not p.name.startswith(".") and p.is_file())
    # a file added, replaced or removed since changes the key: the headers are read again
    found = _folder_slides(Path(os.path.abspath(folder)), tuple(_stamp(p) for p in files))
    return tuple(DicomSlide(s.uid, folder / s.base.name, tuple(folder / f.name for f in s.files), s.name)
                 for s in found)


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return path.name, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4096)  # a run asks for each image's name several times; the headers are read once
def _folder_slides(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> tuple[DicomSlide, ...]:
    headers = [h for name, _, _ in stamp if (h := _header(folder / name)) is not None]
    series: dict[str, list[_Header]] = {}
    for h in headers:
        series.setdefault(h.series, []).append(h)
    slides = []
    for uid, hs in series.items():
        levels = [h for h in hs if h.level]
        if not levels:
            continue
        base = max(levels, key=lambda h: h.pixels)  # the first in name order among equals
        slides.append(DicomSlide(uid, base.path, tuple(h.path for h in hs), _name(uid, {h.slide_id for h in levels})))
    return tuple(sorted(slides, key=lambda s: (s.name, s.uid)))


# what converters write where the slide identifier, which DICOM requires, was not known
PLACEHOLDER_IDS = frozenset({"", "unknown", "none", "null", "n_a", "na", "_"})


def _name(uid: str, slide_ids: set[str]) -> str:
    """A series' output name, from the slide alone, so that it never changes with what else its folder holds: its
    slide identifier (the glass slide's barcode or ID) made a file name, else its SeriesInstanceUID. Two scans of
    one glass slide share the name, and a run refuses the second as it refuses any name taken."""
    ids = {name for i in slide_ids if (name := _file_name(i)).casefold() not in PLACEHOLDER_IDS}
    return ids.pop() if len(ids) == 1 else uid


def _file_name(text: str) -> str:
    """``text`` made a file name on every system: runs of characters other than letters, digits, '.', '-' and '_'
    become one '_'; no leading or trailing dot (hidden; dropped by Windows)."""
    return re.sub(r"[^\w.-]+", "_", text).strip(".")


def slide_of(path: Path) -> DicomSlide | None:
    """The whole-slide image the .dcm file ``path`` belongs to (as a level, label or overview); None for a file that
    is in none."""
    return next((s for s in folder_slides(path.parent) if path.name in {f.name for f in s.files}), None)


def not_a_slide(path: Path) -> str | None:
    """Why the DICOM file ``path`` opens no slide, in words fit to follow its path; None when its header shows no
    reason (a pyramid level, or no pydicom to read it with)."""
    try:
        ds = _read(path)
    except ImportError:
        return None
    if ds is None:
        return "is not a DICOM file, or is damaged or cut short: export or copy it again"
    if ds.get("SOPClassUID") != WSI_SOP_CLASS:
        modality = f" {ds.Modality}" if ds.get("Modality") else ""
        what = getattr(ds.get("SOPClassUID"), "name", "") or "no SOP class"
        return (f"is a DICOM{modality} image ({what}), not a whole-slide image (VL Whole Slide Microscopy Image "
                "Storage): give the files of a slide scan")
    flavor = _flavor(ds)
    if flavor != "VOLUME":
        return (f"is the {flavor.lower() or 'unmarked'} image of a slide, in a series without pyramid levels: give a "
                "file of the slide's levels, or its folder")
    return None
