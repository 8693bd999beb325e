"""What a run is given: the images at a path, a folder or a glob, and the name each one's outputs take.

Most images are one file each, named by its stem. A DICOM slide is a series of .dcm files (``dicom``): it is one
image however many files it has, the file of its finest level stands for it, and its outputs are named after its
folder or slide identifier, since its files are named by UIDs or numbers.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from . import dicom
from .outputs import OUTPUT_SUFFIXES
from .wsi import OPEN_IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


def find_images(source: str | os.PathLike) -> list[Path]:
    """One image path, a folder (its images, not recursive) or a glob -> sorted image paths.

    Files that are outputs of this module (``*.labels.tif``, ``*.overlay.png``) are left out, so an output folder
    inside the input folder is not segmented on the next run. A DICOM slide is one image however many .dcm files
    it has: the file of its finest level stands for it (``dicom``).
    """
    text = str(source)
    path = Path(text)
    if path.is_file():
        return [dicom_slide_file(path)]
    if path.is_dir():
        found = list(path.iterdir())
    elif any(c in text for c in "*?["):
        found = [Path(p) for p in glob.glob(text, recursive=True)]
    else:
        raise FileNotFoundError(f"{text} does not exist; give an image file, a folder of images or a glob")
    candidates = [p for p in found if p.is_file()]
    # a link whose target is gone (a slide moved or an unmounted share) would otherwise vanish from the run unsaid
    broken = sorted(p for p in found if p.is_symlink() and not p.exists() and p.suffix.lower() in OPEN_IMAGE_SUFFIXES)
    if broken:
        logger.warning("%d image link(s) at %s point at nothing and are left out: %s", len(broken), text,
                       ", ".join(str(p) for p in broken[:5]) + (" ..." if len(broken) > 5 else ""))
    images = sorted(
        p for p in candidates
        if p.suffix.lower() in OPEN_IMAGE_SUFFIXES and not p.name.startswith(".")
        and not any(p.name.endswith(s) for s in OUTPUT_SUFFIXES.values())
    )
    images = _one_per_dicom_slide(images, text)
    if not images:
        raise FileNotFoundError(
            f"no images found at {text}; expected files ending in {', '.join(sorted(OPEN_IMAGE_SUFFIXES))}"
            + (f" (a folder's subfolders are not searched: give a glob such as '{_glob_hint(path)}')"
               if path.is_dir() else "")
        )
    return images


def _glob_hint(folder: Path) -> Path:
    """A glob that finds the images below ``folder``: its slides' DICOM files where its subfolders hold DICOM
    slides, as archives keep them (one folder per slide), else any .svs below it."""
    try:
        dicom_files = (f for sub in folder.iterdir() if sub.is_dir() for f in sub.iterdir() if dicom.is_dicom(f))
        found = next(dicom_files, None)
    except OSError:  # an unreadable subfolder (lost+found): the hint is not worth an error of its own
        found = None
    return folder / "*" / f"*{found.suffix}" if found else folder / "**" / "*.svs"


def dicom_slide_file(path: Path) -> Path:
    """The file that stands for the DICOM slide the .dcm file ``path`` belongs to: its finest level's; ``path``
    itself for any other file, and for a .dcm in no slide, whose opening then says what it is."""
    slide = dicom.slide_of(path) if dicom.is_dicom(path) else None
    return path if slide is None else slide.base


def _one_per_dicom_slide(paths: list[Path], where: str) -> list[Path]:
    """``paths`` with the .dcm files of each DICOM slide replaced by the file that stands for it, once; a .dcm file
    of no slide (another kind of DICOM image, a label or overview alone) is left out, and said. Without pydicom,
    DICOM files beside other images are left out, and said, rather than stopping the run."""
    try:
        slides = _dicom_slides(paths)
    except ImportError as err:
        if all(dicom.is_dicom(p) for p in paths):
            raise
        left_out = [p for p in paths if dicom.is_dicom(p)]
        logger.warning("%d DICOM file(s) at %s are left out: %s", len(left_out), where, err)
        return [p for p in paths if not dicom.is_dicom(p)]
    kept = {slides[p].base if p in slides else p for p in paths if p in slides or not dicom.is_dicom(p)}
    left_out = [p for p in paths if dicom.is_dicom(p) and p not in slides]
    if left_out:
        logger.warning("%d DICOM file(s) at %s belong to no whole-slide image and are left out: %s %s%s", len(left_out),
                       where, left_out[0], dicom.not_a_slide(left_out[0]) or "",
                       f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else "")
    return sorted(kept)


def image_names(paths: list[Path]) -> list[str]:
    """The output name of each image of ``paths``: the file's stem, or a DICOM slide's name (``dicom``), the headers
    of each folder's .dcm files read once for all of its slides."""
    slides = _dicom_slides([p for p in paths if p.is_file()])
    return [slides[p].name if p in slides else p.stem for p in paths]


def _dicom_slides(paths: list[Path]) -> dict[Path, dicom.DicomSlide]:
    """Each file of a DICOM slide in the folders of the .dcm files of ``paths`` -> the slide, each folder's headers
    read once."""
    slides = {}
    for folder in {p.parent for p in paths if dicom.is_dicom(p)}:
        slides |= {file: slide for slide in dicom.folder_slides(folder) for file in slide.files}
    return slides


def image_name(path: Path) -> str:
    """The output name of the image at ``path`` (``image_names``)."""
    return image_names([path])[0]
