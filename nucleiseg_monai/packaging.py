"""Bundles that travel: pack a bundle folder into one zip with a sha256 manifest, verify it, unpack it safely.

A bundle config is a program: its ``$`` expressions and ``_target_`` entries run arbitrary Python (``$import os``,
``$os.system(...)``) as soon as MONAI parses them. A bundle from an unknown source is therefore code, to be read
before it is run, like any script. The manifest proves that the files are the ones the packer sealed (nothing was
corrupted, cut off or edited on the way, nothing was added); it does not prove who the packer was. To trust a
bundle, compare the sha256 of the zip (``sha256_file``) with one published by its author through another channel
and pass it to ``unpack(..., sha256=...)``. Weights are data: ``networks.load_weights`` loads them with
``torch.load(weights_only=True)``, which refuses pickled objects.

What a bundle holds (``bundle_files``), and so what the manifest lists and ``verify`` checks:

- everything under ``configs/`` and ``scripts/``: they are code, so even hidden files count (only ``__pycache__``,
  which Python writes itself when a bundle's scripts are imported, is skipped everywhere);
- under ``models/``, ``docs/`` and the bundle's top folder: every file except hidden names (``.*``), editor and
  temporary files (``*.tmp``, ``*.part``, ``*.swp``, ``*~``) and training state (``models/checkpoint_*``, such as
  ``checkpoint_last.pt``);
- no other top-level folder: ``runs/``, ``eval/`` and any other output folder are never packed nor checked, so
  training and evaluating inside an unpacked bundle leave it verifiable until they change a packed file.

``verify`` reports, for those files, any that is missing, not in the manifest, or different from it. A bundle
changed on purpose (for example ``models/model.pt`` retrained) is sealed again with ``write_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from .atomic import atomic_path, umask

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CODE_FOLDERS = ("configs", "scripts")
DATA_FOLDERS = ("models", "docs")
TEMPORARY_SUFFIXES = (".tmp", ".part", ".swp", "~")
_CHUNK = 1 << 20


class BundleIntegrityError(ValueError):
    """A bundle or bundle zip does not match its manifest (or published digest); ``problems`` lists each bad file."""

    def __init__(self, where: str | os.PathLike, problems: list[str], fix: str):
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{where} failed verification ({len(self.problems)} problems):\n  {lines}\n{fix}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _packed(relpath: PurePosixPath) -> bool:
    """Whether a file at ``relpath`` (relative to the bundle root) belongs to the bundle; see the module docstring."""
    parts = relpath.parts
    if parts == (MANIFEST,) or "__pycache__" in parts:
        return False
    if parts[0] in CODE_FOLDERS:
        return True
    if len(parts) > 1 and parts[0] not in DATA_FOLDERS:
        return False
    if any(p.startswith(".") for p in parts) or relpath.name.endswith(TEMPORARY_SUFFIXES):
        return False
    return not (parts[0] == "models" and relpath.name.startswith("checkpoint_"))


def bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """The bundle's files as sorted POSIX paths relative to ``bundle_dir`` (the manifest's keys)."""
    root = Path(bundle_dir)
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            relpath = PurePosixPath(Path(dirpath, name).relative_to(root).as_posix())
            if _packed(relpath):
                found.append(str(relpath))
    return sorted(found)


def _metadata_version(bundle_dir: Path) -> str:
    meta_file = bundle_dir / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} is missing: every bundle needs configs/metadata.json (MONAI spec)")
    try:
        version = json.loads(meta_file.read_text()).get("version")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{meta_file} is not a JSON object ({e}); fix it before packing") from e
    if not isinstance(version, str) or not version:
        raise ValueError(f"{meta_file} has no \"version\"; add one (and a changelog entry) before packing")
    return version


def _manifest(bundle_dir: Path, files: dict[str, str]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "bundle": bundle_dir.name,
        "version": _metadata_version(bundle_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "algorithm": "sha256",
        "files": dict(sorted(files.items())),
    }


def _check_packable(bundle_dir: Path) -> list[str]:
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"no bundle folder at {bundle_dir}")
    _metadata_version(bundle_dir)
    if not (bundle_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(
            f"{bundle_dir / 'models' / 'model.pt'} is missing: a bundle ships its trained weights; train it first"
        )
    files = bundle_files(bundle_dir)
    links = [f for f in files if (bundle_dir / f).is_symlink()]
    if links:
        raise ValueError(f"{bundle_dir} holds symbolic links {links}; replace them with the files they point to")
    return files


def write_manifest(bundle_dir: str | os.PathLike) -> Path:
    """Seals the bundle's current files into ``bundle_dir/manifest.json`` (after a deliberate change: retraining)."""
    root = Path(bundle_dir)
    files = _check_packable(root)
    manifest = _manifest(root, {f: sha256_file(root / f) for f in files})
    target = root / MANIFEST
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def pack(bundle_dir: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Writes ``zip_path`` holding ``<name>/...`` (the bundle's files) and ``<name>/manifest.json``.

    Each file is hashed from the very bytes written into the zip, so a file replaced meanwhile (a training run
    saving ``model.pt``) cannot make the manifest disagree with the zip. The zip appears only when complete.
    The bundle folder itself is not changed.
    """
    root = Path(bundle_dir).resolve()
    files = _check_packable(root)
    zip_path = Path(zip_path)
    if zip_path.resolve().is_relative_to(root):
        raise ValueError(f"{zip_path} is inside the bundle {root}; write the zip elsewhere")
    with atomic_path(zip_path) as tmp_name:
        hashes = {}
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for relpath in files:
                digest = hashlib.sha256()
                with open(root / relpath, "rb") as src, zf.open(f"{root.name}/{relpath}", "w", force_zip64=True) as dst:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                hashes[relpath] = digest.hexdigest()
            zf.writestr(f"{root.name}/{MANIFEST}", json.dumps(_manifest(root, hashes), indent=2) + "\n")
    return zip_path


def _safe_relpath(name: str) -> PurePosixPath | None:
    """``name`` as a relative POSIX path with no '..', drive, backslash or empty part; None if it is not one."""
    if not name or "\\" in name or "\0" in name or name.startswith("/") or ":" in name.split("/")[0]:
        return None
    if any(part in ("", ".", "..") for part in name.rstrip("/").split("/")):
        return None
    return PurePosixPath(name)


def _read_manifest(text: str | bytes, where: str) -> dict[str, str]:
    """The manifest's ``files`` mapping, after checking its structure; ValueError naming ``where`` otherwise."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); re-pack the bundle") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{where} has no \"files\" mapping; re-pack the bundle")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("algorithm") != "sha256":
        raise ValueError(f"{where} is not a format-{MANIFEST_FORMAT} sha256 manifest; re-pack with this version")
    files = manifest["files"]
    # only what pack would pack may be listed, so a manifest cannot vouch for (or demand) outputs such as runs/
    bad = [
        k
        for k, v in files.items()
        if _safe_relpath(k) is None or not _packed(PurePosixPath(k)) or not isinstance(v, str)
    ]
    if bad:
        raise ValueError(f"{where} lists unsafe or malformed entries {bad}; refusing the bundle")
    return files


def _compare(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    problems = [f"{f}: missing" for f in sorted(expected.keys() - actual.keys())]
    problems += [f"{f}: not in {MANIFEST}" for f in sorted(actual.keys() - expected.keys())]
    problems += [
        f"{f}: sha256 {actual[f][:12]}... differs from {MANIFEST} {expected[f][:12]}..."
        for f in sorted(expected.keys() & actual.keys())
        if actual[f] != expected[f]
    ]
    return problems


def _zip_entries(zf: zipfile.ZipFile, where: str) -> tuple[str, dict[str, zipfile.ZipInfo], list[str]]:
    """The zip's single top folder, its files by path below that folder, and the problems with its member names."""
    problems, tops, entries = [], set(), {}
    for info in zf.infolist():
        path = _safe_relpath(info.filename)
        if path is None:
            problems.append(f"{info.filename!r}: unsafe path (absolute, '..' or odd characters)")
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            problems.append(f"{info.filename}: symbolic link")
            continue
        tops.add(path.parts[0])
        if info.is_dir():
            continue
        if len(path.parts) < 2:
            problems.append(f"{info.filename}: outside the bundle folder")
            continue
        relpath = str(PurePosixPath(*path.parts[1:]))
        if relpath in entries:
            problems.append(f"{info.filename}: appears twice")
        entries[relpath] = info
    if len(tops) != 1:
        raise BundleIntegrityError(
            where, problems + [f"zip holds {sorted(tops)}, not one bundle folder"], "Refusing it: re-pack the bundle."
        )
    return tops.pop(), entries, problems


def _verify_zip(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        top, entries, problems = _zip_entries(zf, str(zip_path))
        if MANIFEST not in entries:
            raise FileNotFoundError(f"{zip_path} has no {top}/{MANIFEST}: it was not made by packaging.pack")
        expected = _read_manifest(zf.read(entries.pop(MANIFEST)), f"{zip_path}:{top}/{MANIFEST}")
        actual = {}
        for relpath, info in entries.items():
            digest = hashlib.sha256()
            with zf.open(info) as member:
                while chunk := member.read(_CHUNK):
                    digest.update(chunk)
            actual[relpath] = digest.hexdigest()
    return problems + _compare(expected, actual)


def _all_files(root: Path) -> Iterator[str]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath, name).relative_to(root).as_posix()


def _verify_dir(root: Path, every_file: bool) -> list[str]:
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"{manifest_file} is missing: {root} is not a packed bundle (pack it with `nucleiseg pack --bundle "
            f"{root} --output BUNDLE.zip`, or seal this folder with packaging.write_manifest)"
        )
    expected = _read_manifest(manifest_file.read_bytes(), str(manifest_file))
    relpaths = [f for f in _all_files(root) if f != MANIFEST] if every_file else bundle_files(root)
    links = [f for f in relpaths if (root / f).is_symlink()]
    actual = {f: sha256_file(root / f) for f in relpaths if f not in links}
    return [f"{f}: symbolic link" for f in links] + _compare(expected, actual)


def verify(bundle: str | os.PathLike) -> list[str]:
    """Problems of a bundle folder or bundle zip against its manifest, one line per file; [] when it matches.

    A folder is checked on its bundle files (outputs such as ``runs/``, ``eval/`` and ``models/checkpoint_*`` are
    ignored, see the module docstring); a zip on every member. No manifest: FileNotFoundError.
    """
    path = Path(bundle)
    if path.is_dir():
        return _verify_dir(path, every_file=False)
    if zipfile.is_zipfile(path):
        return _verify_zip(path)
    raise FileNotFoundError(f"{path} is neither a bundle folder nor a zip file")


def check_bundle(bundle_dir: str | os.PathLike) -> None:
    """Refuses (BundleIntegrityError) to use a sealed bundle whose files differ from its manifest.

    Call it before reading any config of the bundle. A folder without a manifest is a working copy (what
    ``bundles/`` in the repository holds) and passes unchecked.
    """
    root = Path(bundle_dir)
    if not (root / MANIFEST).is_file():
        return
    problems = verify(root)
    if problems:
        raise BundleIntegrityError(
            root,
            problems,
            "Refusing to run it. Unpack a fresh copy; or, if you changed these files yourself (e.g. retrained), "
            f"seal the folder again with nucleiseg_monai.packaging.write_manifest('{root}').",
        )


def unpack(zip_path: str | os.PathLike, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Extracts a bundle zip into the new folder ``dest`` and returns it, verified, or leaves nothing.

    Refuses member paths that could escape (absolute, '..', links); extracts into a temporary folder beside
    ``dest``; checks every file against the manifest before anything is read as a config; then renames the
    folder into place. ``sha256``: the zip's digest as published by its author, checked first.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise FileNotFoundError(f"no bundle zip at {zip_path}")
    if sha256 is not None and (actual := sha256_file(zip_path)) != sha256.lower():
        raise BundleIntegrityError(zip_path, [f"zip sha256 {actual} != expected {sha256}"], "Refusing it.")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; unpack into a new folder or remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            top, entries, problems = _zip_entries(zf, str(zip_path))
            if problems:
                raise BundleIntegrityError(zip_path, problems, "Refusing it: nothing was extracted.")
            if MANIFEST not in entries:
                raise FileNotFoundError(f"{zip_path} has no {top}/{MANIFEST}: it was not made by packaging.pack")
            for relpath, info in entries.items():
                target = tmp.joinpath(*PurePosixPath(relpath).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        problems = _verify_dir(tmp, every_file=True)
        if problems:
            raise BundleIntegrityError(zip_path, problems, "Refusing it: nothing was unpacked.")
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0o700 would make the bundle private to this user
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
