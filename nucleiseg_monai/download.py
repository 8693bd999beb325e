"""Fetch the official CryoNuSeg archive (Kaggle) or take a local zip, verify it and unpack it atomically.

The result is always the flat layout the data layer reads: `tissue images/`, `mask binary/` and, when the archive
has them, `label masks modify/` directly under dest. The newer Kaggle archive keeps `tissue images/` at the top
and the labels of each annotator in their own folder (`Annotator 1 (biologist)/...`, `Annotator 2
(bioinformatician)/Annotator 2 (bioinformatician)/...`); older copies are flat. Labels are taken from
`Annotator 1 (biologist)` (first round, the published ground truth) wherever it is nested, else from the folder
beside `tissue images`.

Nothing is written to dest until the copy is complete: the archive is unpacked into a temporary folder beside
dest and renamed into place, so a failure leaves dest as it was.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .atomic import sha256_file, write_json_atomic
from .data import BINARY_DIR, IMAGE_DIR, INSTANCE_DIR, NESTED_DIR
from .packaging import zip_member_problem

KAGGLE_DATASET = "ipateam/segmentation-of-nuclei-in-cryosectioned-he-images"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
MANIFEST = "download.json"

_log = logging.getLogger(__name__)

MANUAL_STEPS = f"""\
To download through the Kaggle API:
  1. pip install "nucleiseg-monai[kaggle]"
  2. Create an API token at kaggle.com > Settings > API > "Create New Token" (this saves kaggle.json).
  3. Move it to ~/.kaggle/kaggle.json and run: chmod 600 ~/.kaggle/kaggle.json
     (or set KAGGLE_USERNAME and KAGGLE_KEY in the environment).
  4. Run `nucleiseg download` again.
Or download the archive by hand:
  1. Sign in to Kaggle, open {KAGGLE_URL} and click Download (a zip file).
  2. Run: nucleiseg download --dest DIR --archive PATH.zip"""


class KaggleUnavailableError(RuntimeError):
    """The Kaggle API cannot be used here (package or credentials missing); the message says what to do."""


def download(
    dest: str | Path,
    archive: str | Path | None = None,
    sha256: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Put a complete CryoNuSeg copy in dest (flat layout) and return dest.

    archive: a local zip to unpack instead of downloading. sha256: expected hex digest of the archive (refused
    on mismatch). force: replace an existing dest, even a complete one. Does nothing (but say so) when dest is
    already complete. Raises KaggleUnavailableError with the manual steps when no archive is given and the
    Kaggle API cannot be used.
    """
    say = log or _log.info
    dest = Path(dest).expanduser()
    if not force and is_complete(dest):
        say(f"{dest} already holds a complete CryoNuSeg copy ({_count_images(dest)} images); nothing to do")
        return dest
    _refuse_occupied(dest, force)
    if archive is not None:
        return unpack_archive(archive, dest, sha256=sha256, force=force, log=say)
    api = _kaggle_api()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fetched = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".kaggle", dir=dest.parent))
    try:
        say(f"Downloading {KAGGLE_DATASET} from Kaggle into {fetched}")
        try:
            api.dataset_download_files(KAGGLE_DATASET, path=str(fetched), unzip=False, quiet=False)
        except Exception as err:  # the Kaggle client raises its own HTTP/network errors; add the way out
            raise RuntimeError(f"Kaggle download of {KAGGLE_DATASET} failed: {err}\n"
                               f"If Kaggle asks, accept the dataset's terms at {KAGGLE_URL}.\n{MANUAL_STEPS}") from err
        zips = sorted(fetched.glob("*.zip"))
        if len(zips) != 1:
            raise RuntimeError(f"Kaggle download into {fetched} gave {len(zips)} zip files, expected one; "
                               f"download the archive by hand instead.\n{MANUAL_STEPS}")
        return unpack_archive(zips[0], dest, sha256=sha256, force=force, log=say)
    finally:
        shutil.rmtree(fetched, ignore_errors=True)


def unpack_archive(
    archive: str | Path,
    dest: str | Path,
    sha256: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Verify a CryoNuSeg zip and unpack it atomically into dest in the flat layout; return dest."""
    say = log or _log.info
    archive, dest = Path(archive).expanduser(), Path(dest).expanduser()
    if not force and is_complete(dest):
        say(f"{dest} already holds a complete CryoNuSeg copy ({_count_images(dest)} images); nothing to do")
        return dest
    _refuse_occupied(dest, force)
    digest = verify_archive(archive, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_space(archive, dest.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        raw = staging / "archive"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(raw)
        images, labels = _locate(raw, archive)
        out = staging / "dataset"
        out.mkdir()
        os.replace(images, out / IMAGE_DIR)
        os.replace(labels / BINARY_DIR, out / BINARY_DIR)
        if (labels / INSTANCE_DIR).is_dir():
            os.replace(labels / INSTANCE_DIR, out / INSTANCE_DIR)
        missing = missing_files(out)
        if missing:
            raise ValueError(f"{archive} is incomplete: {len(missing)} files missing, e.g. {missing[:3]}; "
                             "download the archive again")
        write_json_atomic({
            "dataset": KAGGLE_DATASET,
            "archive": archive.name,
            "sha256": digest,
            "images_from": images.relative_to(raw).as_posix(),
            "labels_from": labels.relative_to(raw).as_posix(),
            "images": _count_images(out),
        }, out / MANIFEST)
        _swap_in(out, dest, staging, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    labels_note = "instance labels and binary masks" if (dest / INSTANCE_DIR).is_dir() else "binary masks only"
    say(f"CryoNuSeg unpacked to {dest}: {_count_images(dest)} images, {labels_note}")
    return dest


def verify_archive(archive: str | Path, sha256: str | None = None) -> str:
    """Check that archive is a sound zip with only safe member names (and the expected SHA-256 when given).

    Returns its SHA-256 hex digest. Raises FileNotFoundError, or ValueError naming the file and the problem.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} not found; download it from {KAGGLE_URL}")
    digest = sha256_file(archive)
    if sha256 is not None and digest != sha256.strip().lower():
        raise ValueError(f"{archive} has SHA-256 {digest}, expected {sha256.strip().lower()}; "
                         "the file is damaged or a different version: download it again")
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                problem = zip_member_problem(info)
                if problem:
                    raise ValueError(f"{archive}: refusing to unpack member {info.filename!r}: {problem}")
            bad = zf.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive} is not a readable zip archive ({err}); download it again") from err
    if bad is not None:
        raise ValueError(f"{archive} is corrupt: member {bad!r} fails its CRC check; download it again")
    return digest


def is_complete(root: str | Path) -> bool:
    """True when root holds images with a binary mask each (and an instance label each, if that folder exists)."""
    root = Path(root)
    return _count_images(root) > 0 and not missing_files(root)


def missing_files(root: str | Path) -> list[str]:
    """Masks and labels (relative paths) that the images under root/tissue images lack."""
    root = Path(root)
    stems = sorted(p.stem for p in (root / IMAGE_DIR).glob("*.tif"))
    missing = [f"{BINARY_DIR}/{s}.png" for s in stems if not (root / BINARY_DIR / f"{s}.png").is_file()]
    if (root / INSTANCE_DIR).is_dir():
        missing += [f"{INSTANCE_DIR}/{s}.tif" for s in stems if not (root / INSTANCE_DIR / f"{s}.tif").is_file()]
    return missing


def kaggle_credentials() -> str | None:
    """Where Kaggle credentials were found (env vars or a token file), or None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    config_dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    config_dirs += [Path.home() / ".kaggle",
                    Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"]
    for folder in config_dirs:
        for name in ("kaggle.json", "access_token"):
            if (folder / name).is_file():
                return str(folder / name)
    return None


def _kaggle_api():
    """The authenticated `kaggle.api` object, or KaggleUnavailableError saying what is missing and what to do."""
    problems = []
    if not _kaggle_installed():
        problems.append("the `kaggle` package is not installed")
    if kaggle_credentials() is None:
        problems.append("no Kaggle API credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
    if problems:
        raise KaggleUnavailableError(f"Cannot download CryoNuSeg from Kaggle: {'; '.join(problems)}.\n{MANUAL_STEPS}")
    try:
        import kaggle  # authenticates on import
    except Exception as err:  # ImportError, or the client's own error for unusable credentials
        raise KaggleUnavailableError(f"Cannot use the Kaggle API: {err}\n{MANUAL_STEPS}") from err
    return kaggle.api


def _kaggle_installed() -> bool:
    if "kaggle" in sys.modules:  # find_spec would fail on a module without a spec
        return sys.modules["kaggle"] is not None
    return importlib.util.find_spec("kaggle") is not None


def _locate(raw: Path, archive: Path) -> tuple[Path, Path]:
    """(images folder, folder holding the chosen annotator's `mask binary`) inside the unpacked archive."""
    folders = sorted([raw, *(p for p in raw.rglob("*") if p.is_dir())],
                     key=lambda p: (len(p.relative_to(raw).parts), str(p)))
    images = next((p for p in folders if p.name == IMAGE_DIR and any(p.glob("*.tif"))), None)
    if images is None:
        raise ValueError(f"{archive} has no '{IMAGE_DIR}' folder with .tif images; is it the CryoNuSeg archive "
                         f"from {KAGGLE_URL}?")
    candidates = [p for p in folders if (p / BINARY_DIR).is_dir()]
    preferred = [p for p in candidates if NESTED_DIR in p.relative_to(raw).parts]
    preferred += [p for p in candidates if p == images.parent]
    if not preferred:
        found = [p.relative_to(raw).as_posix() for p in candidates] or "none"
        raise ValueError(f"{archive} has no '{BINARY_DIR}' folder of '{NESTED_DIR}' or beside "
                         f"'{IMAGE_DIR}' (folders with masks: {found}); is it the CryoNuSeg archive?")
    return images, preferred[0]


def _refuse_occupied(dest: Path, force: bool) -> None:
    if force or not dest.exists():
        return
    if dest.is_dir() and not any(dest.iterdir()):
        return
    missing = missing_files(dest) if dest.is_dir() else []
    detail = f" ({len(missing)} files missing, e.g. {missing[:2]})" if missing else ""
    raise FileExistsError(f"{dest} exists but is not a complete CryoNuSeg copy{detail}; remove it, choose "
                          "another destination, or pass force=True to replace it")


def _swap_in(new: Path, dest: Path, staging: Path, force: bool) -> None:
    """Rename the finished copy onto dest; an old dest (force) is moved aside first and restored on failure."""
    previous = None
    if dest.exists() or dest.is_symlink():
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        elif force:
            previous = staging / "previous"
            os.replace(dest, previous)
        else:
            raise FileExistsError(f"{dest} appeared while unpacking; remove it and try again")
    try:
        os.replace(new, dest)
    except OSError:
        if previous is not None:
            os.replace(previous, dest)
        raise


def _check_space(archive: Path, folder: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        need = sum(info.file_size for info in zf.infolist())
    free = shutil.disk_usage(folder).free
    if need * 1.05 > free:
        raise OSError(f"unpacking {archive} needs {need / 1e6:.0f} MB but {folder} has {free / 1e6:.0f} MB free")


def _count_images(root: Path) -> int:
    folder = root / IMAGE_DIR
    return sum(1 for _ in folder.glob("*.tif")) if folder.is_dir() else 0
