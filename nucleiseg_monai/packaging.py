"""Bundles that travel: pack a bundle folder into one zip with a manifest, verify it, unpack it safely.

A bundle config is a program: its ``$`` expressions and ``_target_`` entries run arbitrary Python (``$import os``,
``$os.system(...)``) as soon as MONAI parses them. A bundle from an unknown source is therefore code, to be read
before it is run, like any script. The manifest proves that the files are the ones the packer sealed (nothing was
corrupted, cut off or edited on the way, nothing was added); it does not prove who the packer was. To trust a
bundle, compare the sha256 of the zip (``sha256_file``, printed by ``nucleiseg pack``) with one published by its
author through another channel and pass it to ``unpack(..., sha256=...)``. Weights are data:
``networks.load_weights`` loads them with ``torch.load(weights_only=True)``, which refuses pickled objects.

A bundle holds no Python. MONAI puts the bundle folder on ``sys.path`` when it runs a config, so a module in it
(``imageio/__init__.py``) would shadow the installed one; ``bundle.guard`` takes the folder off again, and here
every entry of a bundle folder is classified:

- bundle files, which the manifest lists with their sha256 and size: everything under ``configs/`` (configs are code,
  so even hidden files count); under ``models/``, ``docs/`` and the top folder every file except hidden names
  (``.*``), editor and temporary files (``*.tmp``, ``*.part``, ``*.swp``, ``*~``), training state
  (``models/checkpoint_*``) and what exporters make from the weights (``models/*.ts``, ``models/*.onnx``);
- outputs, never packed nor checked: the folders ``runs/``, ``eval/`` and ``predictions/`` that training,
  evaluation and inference write into, and the hidden, temporary, checkpoint and exported files above;
- anything else is refused by ``pack`` and ``verify``, naming it: any other folder (``imageio/``), Python source,
  bytecode or extension modules anywhere (``*.py``, ``__pycache__/``, ``*.so``), symbolic links.

What a bundle's configs would run is read too (``config_audit``, parsed, never evaluated): a sealed bundle whose
configs use anything outside the audit's allow-list of what nuclei segmentation bundles use (a shell command,
another module, a download) is refused by ``check_bundle`` unless ``$NUCLEISEG_TRUST_CONFIGS`` says the sender is trusted; ``unpack`` and ``pack``
name such configs in a warning.

``verify`` reports, for a folder or a zip, any bundle file that is missing, not in the manifest or different from
it, and every refused entry. A bundle changed on purpose (``models/model.pt`` retrained) is sealed again with
``write_manifest``.

A zip is checked before anything is written: every member must be listed with the size the zip declares, the listed
sizes may not add up to more than ``MAX_UNPACKED_BYTES``, no large member may compress better than ``MAX_RATIO``:1
(weights barely compress; zip bombs compress a thousandfold), and each member is streamed out only up to its listed
size and hashed on the way. The bundle appears under its final name only once every file matched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from .atomic import (
    StreamTooLong, atomic_path, copy_hashed, remove_if_empty, remove_stale, sha256_file, staging_folder, umask,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: each file's size next to its sha256 (format 1 had no sizes, so no zip-bomb check)
CODE_FOLDERS = ("configs",)
DATA_FOLDERS = ("models", "docs")
OUTPUT_FOLDERS = ("runs", "eval", "predictions")
TEMPORARY_SUFFIXES = (".tmp", ".part", ".swp", "~")
# what ckpt_export and other exporters make from models/model.pt: derived, so never packed nor verified
EXPORT_SUFFIXES = (".ts", ".onnx")
# what Python imports from a folder on sys.path (extension modules end in .so or .pyd)
IMPORTABLE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".so", ".pyd")
MAX_UNPACKED_BYTES = 2 << 30
MAX_RATIO = 100
RATIO_FLOOR = 1 << 20  # smaller members may compress well (configs); they cannot fill a disk
MAX_MANIFEST_BYTES = 4 << 20


TRUST_ENV = "NUCLEISEG_TRUST_CONFIGS"


class BundleIntegrityError(ValueError):
    """A bundle or bundle zip does not match its manifest (or published digest); ``problems`` lists each bad file."""

    def __init__(self, where: str | os.PathLike, problems: list[str], fix: str):
        self.problems = list(problems)
        # one line, each problem ending in "; ", as the command line shows errors
        super().__init__(f"{where} failed verification ({len(self.problems)} problem(s)): "
                         f"{'; '.join(self.problems)}. {fix}")


class UntrustedConfigs(BundleIntegrityError):
    """A sealed bundle matches its manifest, but its configs reach beyond what a bundle needs
    (``config_audit``); ``problems`` lists each line."""

    def __init__(self, where: str | os.PathLike, findings: list[str]):
        self.problems = list(findings)
        ValueError.__init__(self, f"{where}: its configs reach beyond what a bundle needs: {'; '.join(findings)}. "
                            f"They would run before anything else. Read those lines; run it only if you trust "
                            f"whoever sent it, with {TRUST_ENV}=1 set for that command.")


def _kind(relpath: PurePosixPath) -> str:
    """'bundle', 'output' or 'foreign' for a file at ``relpath`` below the bundle root; see the module docstring."""
    parts = relpath.parts
    if len(parts) > 1 and parts[0] in OUTPUT_FOLDERS:
        return "output"
    # lower case: Python imports foo.PY where file names ignore case (macOS, Windows)
    if "__pycache__" in parts or relpath.suffix.lower() in IMPORTABLE_SUFFIXES:
        return "foreign"
    if parts[0] in CODE_FOLDERS:
        return "bundle"
    if any(p.startswith(".") for p in parts) or relpath.name.endswith(TEMPORARY_SUFFIXES):
        return "output"
    if len(parts) > 1 and parts[0] not in DATA_FOLDERS:
        return "foreign"
    if parts[0] == "models" and (relpath.name.startswith("checkpoint_") or relpath.suffix in EXPORT_SUFFIXES):
        return "output"
    return "bundle"


def _packed(relpath: PurePosixPath) -> bool:
    return relpath.parts != (MANIFEST,) and _kind(relpath) == "bundle"


def _scan(root: Path) -> tuple[list[str], list[str]]:
    """The bundle files below ``root`` (sorted POSIX paths) and one line per refused entry (folder, code, link)."""
    files, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in sorted(dirnames):
            rel = here / name
            top_level = len(rel.parts) == 1
            if (top_level and name in OUTPUT_FOLDERS) or (name.startswith(".") and rel.parts[0] not in CODE_FOLDERS):
                dirnames.remove(name)  # outputs and hidden folders (which Python cannot import) are not looked into
            elif top_level and name not in CODE_FOLDERS + DATA_FOLDERS:
                dirnames.remove(name)
                problems.append(f"{rel}/: folder not in {MANIFEST} (a bundle holds no code: remove it)")
            elif name == "__pycache__":
                dirnames.remove(name)
                problems.append(f"{rel}/: Python bytecode (a bundle holds no code: remove it)")
            elif (root / rel).is_symlink():
                dirnames.remove(name)
                problems.append(f"{rel}/: symbolic link")
        for name in filenames:
            rel = here / name
            kind = _kind(rel)
            if rel.parts == (MANIFEST,) or kind == "output":
                continue
            if kind == "foreign":
                problems.append(f"{rel}: not a bundle file (a bundle holds no code: remove it)")
            elif (root / rel).is_symlink():
                problems.append(f"{rel}: symbolic link")
            else:
                files.append(str(rel))
    return sorted(files), sorted(problems)


def bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """The bundle's files as sorted POSIX paths relative to ``bundle_dir`` (the manifest's keys)."""
    return _scan(Path(bundle_dir))[0]


def _metadata_version(bundle_dir: Path) -> str:
    meta_file = bundle_dir / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} is missing: every bundle needs configs/metadata.json (MONAI spec)")
    try:
        version = json.loads(meta_file.read_text(encoding="utf-8")).get("version")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{meta_file} is not a JSON object ({e}); fix it before packing") from e
    if not isinstance(version, str) or not version:
        raise ValueError(f"{meta_file} has no \"version\"; add one (and a changelog entry) before packing")
    return version


def _check_weights(bundle_dir: Path) -> None:
    if not (bundle_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(
            f"{bundle_dir / 'models' / 'model.pt'} is missing: a bundle ships its trained weights; train it first"
        )


def _manifest(bundle_dir: Path, files: dict[str, tuple[str, int]]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "bundle": bundle_dir.name,
        "version": _metadata_version(bundle_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "algorithm": "sha256",
        "files": {f: {"sha256": digest, "size": size} for f, (digest, size) in sorted(files.items())},
    }


def working_copy_problems(bundle_dir: str | os.PathLike) -> list[str]:
    """What ``pack`` would refuse in ``bundle_dir``, one line each: structure only, nothing is hashed."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no bundle folder at {root}")
    problems = []
    for check in (_metadata_version, _check_weights):
        try:
            check(root)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    return problems + _scan(root)[1]


def _check_packable(bundle_dir: Path) -> list[str]:
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"no bundle folder at {bundle_dir}")
    _metadata_version(bundle_dir)
    _check_weights(bundle_dir)
    files, problems = _scan(bundle_dir)
    if problems:
        raise ValueError(f"{bundle_dir} holds what a bundle may not: {'; '.join(problems)}")
    return files


def write_manifest(bundle_dir: str | os.PathLike) -> Path:
    """Seals the bundle's current files into ``bundle_dir/manifest.json`` (after a deliberate change: retraining)."""
    root = Path(bundle_dir)
    files = _check_packable(root)
    manifest = _manifest(root, {f: (sha256_file(root / f), (root / f).stat().st_size) for f in files})
    return write_json_atomic(manifest, root / MANIFEST)


def unstated_licenses(root: str | os.PathLike, datalist: dict | None = None) -> list[str]:
    """The data licenses the bundle's weights learnt under (``models/datalist.json``'s ``provenance``, one per
    source) that its LICENSE does not name: weights carry their training data's terms, and a bundle shared without
    them misleads whoever uses it. Empty when the datalist records no provenance (one made before it did).
    ``datalist``: that file as the caller read it already (``pack`` reads it once for all its checks)."""
    root = Path(root)
    provenance = _provenance(root, datalist)
    try:
        text = (root / "LICENSE").read_text(encoding="utf-8")
    except OSError:
        text = ""  # no LICENSE names none of them
    missing = {}
    for source, facts in provenance.items():
        license_ = (facts or {}).get("license") or ""
        if license_ and license_ not in text:
            missing.setdefault(license_, []).append(source)
    return [f"{license_} ({', '.join(sources)})" for license_, sources in missing.items()]


def unlicensed_sources(root: str | os.PathLike, datalist: dict | None = None) -> list[str]:
    """The sources the bundle's weights learnt from whose license nobody stated (``models/datalist.json``'s
    ``provenance``, and that of the weights they started from): their terms, and so the weights', are unknown."""
    return [source for source, facts in _provenance(Path(root), datalist).items()
            if not ((facts or {}).get("license") or "").strip()]


def non_commercial_sources(root: str | os.PathLike, datalist: dict | None = None) -> list[str]:
    """The sources behind the bundle's weights whose license rules out commercial use."""
    return [source for source, facts in _provenance(Path(root), datalist).items()
            if (facts or {}).get("commercial_use") is False]


def _datalist(root: Path, read: dict | None = None) -> dict:
    """``models/datalist.json``, or {} where it is missing or no JSON object; ``read`` where the caller has it."""
    from .sources import read_record

    if read is not None:
        return read
    record = read_record(root / "models" / "datalist.json")
    return record if isinstance(record, dict) else {}


def _provenance(root: Path, datalist: dict | None = None) -> dict:
    """Every source behind the weights: ``models/datalist.json``'s ``provenance`` and, through ``started_from``,
    that of the weights the run started from (``sources.provenance_chain``); empty where the datalist records none
    (one made before it did)."""
    from .sources import provenance_chain

    return provenance_chain(_datalist(root, datalist))


def local_paths(root: str | os.PathLike, datalist: dict | None = None) -> dict[str, list[str]]:
    """Local paths (``sources.is_local_path``: absolute, drive-relative, under ``~``, or climbing with ``..``) that
    the bundle would publish, by the bundle file that names them: in ``models/datalist.json`` sources' ``root``,
    tiles, and starting weights recorded by path (as datalists did before they were named by bundle and digest); in
    a sources file under ``configs/`` (where a bundle trained on one's own registry keeps it), sources' ``root``;
    in a config, its settings written as such paths (a ``sources_file`` or ``pretrained`` set to a file of one's
    own). Folder names can tell more than their owner means to share. ``datalist``: as ``unstated_licenses``."""
    from .sources import is_local_path, read_record, starts

    root = Path(root)
    datalist = _datalist(root, datalist)
    found = {"models/datalist.json": _roots(datalist.get("sources"))}
    for part in datalist.values():
        records = [r for r in part if isinstance(r, dict)] if isinstance(part, list) else []
        found["models/datalist.json"] += [record.get(key) for record in records for key in ("image", "label")]
    found["models/datalist.json"] += [start.get("weights") for start in starts(datalist.get("started_from"))]
    for config in sorted((root / "configs").glob("*.json")):
        registry = read_record(config)
        if isinstance(registry, dict) and registry and all(isinstance(e, dict) and "root" in e
                                                           for e in registry.values()):
            found[f"configs/{config.name}"] = _roots(registry)
        elif isinstance(registry, dict):  # a config: its expressions ("$...", "@...") name no folder as written
            found[f"configs/{config.name}"] = [value for value in registry.values()
                                               if isinstance(value, str) and not value.startswith(("$", "@", "%"))]
    local = {name: list(dict.fromkeys(p for p in paths if is_local_path(p))) for name, paths in found.items()}
    return {name: paths for name, paths in local.items() if paths}


def claims_its_start(root: str | os.PathLike, datalist: dict | None = None) -> str | None:
    """The "name version" of the bundle's ``configs/metadata.json`` where it is that of the bundle its weights
    started from (``started_from`` in ``models/datalist.json``): a copy whose weights were trained again still
    presenting itself as the bundle it was copied from. None otherwise. ``datalist``: as ``unstated_licenses``."""
    from .sources import read_record

    meta = read_record(Path(root) / "configs" / "metadata.json")
    start = _datalist(Path(root), datalist).get("started_from")
    if isinstance(meta, dict) and isinstance(start, dict):
        own = f"{meta.get('name')} {meta.get('version')}"
        return own if start.get("weights") == own else None
    return None


def _roots(sources) -> list:
    return [facts.get("root") for facts in (sources.values() if isinstance(sources, dict) else ())
            if isinstance(facts, dict)]


def pack(bundle_dir: str | os.PathLike, zip_path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Writes ``zip_path`` holding ``<name>/...`` (the bundle's files) and ``<name>/manifest.json``.

    Each file is hashed and measured from the very bytes written into the zip, so a file replaced meanwhile (a
    training run saving ``model.pt``) cannot make the manifest disagree with the zip. The zip appears only when
    complete. The bundle folder itself is not changed. ``zip_path`` may be a folder (``DIR/<name>.zip`` is
    written); without ``overwrite`` an existing zip is refused (a published one's digest would change).
    """
    root = Path(bundle_dir).resolve()
    files = _check_packable(root)
    _warn_findings(root, config_findings(root), "its configs reach beyond what a bundle needs; receivers will "
                   "see this when they unpack it")
    datalist = _datalist(root)  # once for every check below: each would read it again
    unstated = unstated_licenses(root, datalist)
    if not (root / "LICENSE").is_file():  # one warning, naming the data's licenses where they are known
        logger.warning("%s has no LICENSE: receivers cannot know the terms of its weights and configs; add one "
                       "naming them and the license and citation of the data the weights learnt from%s", root,
                       f" ({'; '.join(unstated)})" if unstated else "")
    elif unstated:
        logger.warning("%s does not name the license of data its weights learnt from: %s (models/datalist.json, "
                       "provenance); state it, with the data's citation, before sharing the zip", root / "LICENSE",
                       "; ".join(unstated))
    unlicensed = unlicensed_sources(root, datalist)
    unknown = [s for s in unlicensed if s.startswith("weights ")]  # started from weights of unrecorded data
    unlicensed = [s for s in unlicensed if s not in unknown]
    if unlicensed:
        logger.warning("%s: the weights learnt from source(s) %s, whose license is not stated (models/datalist.json, "
                       "provenance), so neither are the weights' terms; find it, name it in LICENSE and in the "
                       "sources file (license, citation), then train or make the datalist again", root,
                       ", ".join(unlicensed))
    if unknown:
        logger.warning("%s: the weights started from %s, whose training data is not recorded (no datalist.json "
                       "beside them), so their terms are unknown; find out what those weights learnt from and "
                       "name its license in LICENSE", root, ", ".join(u.removeprefix("weights ") for u in unknown))
    if (claimed := claims_its_start(root, datalist)) is not None:
        logger.warning("%s still names the bundle %s, whose weights these were trained from (models/datalist.json, "
                       "started_from): give it a name and version of its own, and a changelog entry, before "
                       "packing, so that receivers can tell the two apart", root / "configs" / "metadata.json", claimed)
    for name, local in local_paths(root, datalist).items():
        shown = ", ".join(local[:3]) + (f" and {len(local) - 3} more" if len(local) > 3 else "")
        logger.warning("%s names folders of this machine that the zip will publish: %s; if they should stay "
                       "private, replace them before packing (tiles by their path under their source's folder, "
                       "weights by their file name, a source's root by its folder's name in both "
                       "models/datalist.json and the sources file, which must agree: evaluation then takes "
                       "--data_root naming the folder above it; a config's setting by a path under the bundle, "
                       "\"$@bundle_root + '/configs/sources.json'\", or left for the command line)", root / name,
                       shown)
    non_commercial = non_commercial_sources(root, datalist)
    if non_commercial:
        logger.info("%s: the weights learnt from non-commercial data (%s): not for commercial use, as LICENSE and "
                    "metadata.json must say", root, ", ".join(non_commercial))
    if Path(zip_path).is_dir() or str(zip_path).endswith(("/", os.sep)):  # a folder to write the zip into
        zip_path = Path(zip_path) / f"{root.name}.zip"
    zip_path = Path(zip_path)
    if zip_path.exists() and not overwrite:
        raise FileExistsError(f"{zip_path} exists; pass --overwrite to replace it (its SHA-256 will change, so "
                              "publish the new one), or choose another --output")
    if zip_path.resolve().is_relative_to(root):
        raise ValueError(f"{zip_path} is inside the bundle {root}; write the zip elsewhere")
    with atomic_path(zip_path) as tmp_name:
        entries = {}
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for relpath in files:
                with open(root / relpath, "rb") as src, zf.open(f"{root.name}/{relpath}", "w", force_zip64=True) as dst:
                    entries[relpath] = copy_hashed(src, dst)
            zf.writestr(f"{root.name}/{MANIFEST}", json.dumps(_manifest(root, entries), indent=2) + "\n")
    return zip_path


def _safe_relpath(name: str) -> PurePosixPath | None:
    """``name`` as a relative POSIX path with no '..', drive, backslash or empty part; None if it is not one."""
    if not name or "\\" in name or "\0" in name or name.startswith("/") or ":" in name.split("/")[0]:
        return None
    if any(part in ("", ".", "..") for part in name.rstrip("/").split("/")):
        return None
    return PurePosixPath(name)


def zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be unpacked, or None: the one rule for bundle zips and dataset archives alike."""
    if _safe_relpath(info.filename) is None:
        return "unsafe path (absolute, '..' or odd characters)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def _entry(value) -> tuple[str, int] | None:
    """A manifest entry as (sha256, size), or None when it is not ``{"sha256": 64 hex digits, "size": int >= 0}``."""
    if not isinstance(value, dict):
        return None
    digest, size = value.get("sha256"), value.get("size")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return digest, size


def _read_manifest(text: str | bytes, where: str) -> dict[str, tuple[str, int]]:
    """The manifest's files as {path: (sha256, size)}, after checking its structure; ValueError naming ``where``."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e}); re-pack the bundle") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{where} has no \"files\" mapping; re-pack the bundle")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("algorithm") != "sha256":
        raise ValueError(f"{where} is not a format-{MANIFEST_FORMAT} sha256 manifest; re-pack with this version")
    files = {k: _entry(v) for k, v in manifest["files"].items()}
    # only what pack would pack may be listed, so a manifest cannot vouch for (or demand) code or outputs
    bad = [k for k, v in files.items() if _safe_relpath(k) is None or not _packed(PurePosixPath(k)) or v is None]
    if bad:
        raise ValueError(f"{where} lists unsafe or malformed entries {bad}; refusing the bundle")
    return files


def _compare(expected: dict[str, tuple[str, int]], actual: dict[str, tuple[str, int]]) -> list[str]:
    problems = [f"{f}: missing" for f in sorted(expected.keys() - actual.keys())]
    problems += [f"{f}: not in {MANIFEST}" for f in sorted(actual.keys() - expected.keys())]
    for f in sorted(expected.keys() & actual.keys()):
        (want, want_size), (got, got_size) = expected[f], actual[f]
        if got_size != want_size:
            problems.append(f"{f}: {got_size} bytes, {MANIFEST} says {want_size}")
        elif got != want:
            problems.append(f"{f}: sha256 {got[:12]}... differs from {MANIFEST} {want[:12]}...")
    return problems


def _zip_entries(zf: zipfile.ZipFile, where: str) -> tuple[str, dict[str, zipfile.ZipInfo], list[str]]:
    """The zip's single top folder, its files by path below that folder, and the problems with its member names."""
    problems, tops, entries = [], set(), {}
    for info in zf.infolist():
        if problem := zip_member_problem(info):
            problems.append(f"{info.filename!r}: {problem}")
            continue
        path = _safe_relpath(info.filename)
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
    if len(tops) != 1 or next(iter(tops)).startswith("."):
        raise BundleIntegrityError(
            where, problems + [f"zip holds {sorted(tops)}, not one bundle folder"], "Refusing it: re-pack the bundle."
        )
    return tops.pop(), entries, problems


class _Inspected(NamedTuple):
    top: str  # the bundle folder in the zip
    members: dict[str, zipfile.ZipInfo]  # below it, those without a problem
    expected: dict[str, tuple[str, int]]  # the manifest's (sha256, size) per file
    manifest: bytes
    problems: list[str]


def _inspect_zip(zf: zipfile.ZipFile, where: str, max_bytes: int) -> _Inspected:
    """Everything that can be refused without decompressing more than the manifest."""
    top, entries, problems = _zip_entries(zf, where)
    manifest_info = entries.pop(MANIFEST, None)
    if manifest_info is None:
        raise FileNotFoundError(f"{where} has no {top}/{MANIFEST}: it was not made by packaging.pack")
    with zf.open(manifest_info) as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise BundleIntegrityError(where, [f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES} bytes"], "Refusing it.")
    expected = _read_manifest(text, f"{where}:{top}/{MANIFEST}")
    problems += [f"{f}: missing" for f in sorted(expected.keys() - entries.keys())]
    problems += [f"{f}: not in {MANIFEST}" for f in sorted(entries.keys() - expected.keys())]
    sound = {}
    for relpath in sorted(entries.keys() & expected.keys()):
        info, size = entries[relpath], expected[relpath][1]
        if info.flag_bits & 0x1:
            problems.append(f"{relpath}: encrypted")
        elif info.file_size != size:
            problems.append(f"{relpath}: {info.file_size} bytes in the zip, {MANIFEST} says {size}")
        elif size > RATIO_FLOOR and size > MAX_RATIO * info.compress_size:
            ratio = size / max(info.compress_size, 1)
            problems.append(f"{relpath}: compressed {ratio:.0f}:1, more than {MAX_RATIO}:1 (a zip bomb)")
        else:
            sound[relpath] = info
    total = sum(size for _, size in expected.values())
    if total > max_bytes:
        problems.append(
            f"{MANIFEST} lists {total / 2**20:.0f} MiB in all, more than the cap of {max_bytes / 2**20:.0f} MiB "
            "(raise it, e.g. `nucleiseg unpack --max_size_mb`, only for a bundle you trust)"
        )
    return _Inspected(top, sound, expected, text, problems)


@contextmanager
def _readable_zip(zip_path: Path) -> Iterator[zipfile.ZipFile]:
    """Opens ``zip_path``; a corrupt or unsupported zip, wherever it shows, becomes one BundleIntegrityError."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            yield zf
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise BundleIntegrityError(zip_path, [f"corrupt or unsupported zip: {e}"], "Refusing it: fetch it again.") from e


def _verify_zip(zip_path: Path, max_bytes: int) -> list[str]:
    with _readable_zip(zip_path) as zf:
        _, members, expected, _, problems = _inspect_zip(zf, str(zip_path), max_bytes)
        for relpath, info in members.items():
            with zf.open(info) as member:
                try:
                    actual = copy_hashed(member, None, expected[relpath][1])
                except StreamTooLong as e:
                    problems.append(f"{relpath}: {e}, the size {MANIFEST} lists")
                    continue
            problems += _compare({relpath: expected[relpath]}, {relpath: actual})
    return problems


def _verify_dir(root: Path) -> list[str]:
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"{manifest_file} is missing: {root} is not a packed bundle (pack it with `nucleiseg pack --bundle "
            f"{root} --output BUNDLE.zip`, or seal this folder with packaging.write_manifest)"
        )
    expected = _read_manifest(manifest_file.read_bytes(), str(manifest_file))
    files, problems = _scan(root)
    actual = {f: (sha256_file(root / f), (root / f).stat().st_size) for f in files}
    return problems + _compare(expected, actual)


def verify(bundle: str | os.PathLike, max_bytes: int = MAX_UNPACKED_BYTES) -> list[str]:
    """Problems of a bundle folder or bundle zip against its manifest, one line per entry; [] when it matches.

    A folder is checked on every entry (outputs such as ``runs/``, ``eval/`` and ``models/checkpoint_*`` excepted,
    see the module docstring); a zip on every member, with the unpacking limits. No manifest: FileNotFoundError
    (``working_copy_problems`` checks a folder without one).
    """
    path = Path(bundle)
    if path.is_dir():
        return _verify_dir(path)
    if zipfile.is_zipfile(path):
        return _verify_zip(path, max_bytes)
    raise FileNotFoundError(f"{path} is neither a bundle folder nor a zip file")


def check_bundle(bundle_dir: str | os.PathLike) -> None:
    """Refuses to use a sealed bundle whose files differ from its manifest (BundleIntegrityError), or whose configs
    reach beyond what a bundle needs unless ``trusted()`` (UntrustedConfigs).

    Call it before reading any config of the bundle. A folder without a manifest is a working copy (what
    ``bundles/`` in the repository holds) and passes unchecked. Either way a bundle that needs a newer
    nucleiseg-monai than this one is refused (``bundle.require_package``). A folder that passed is not hashed again
    in this process while none of its files' sizes, times or inodes has changed: one command reads a bundle's
    configs several times, and a cohort's predictor is built on every worker.
    """
    from .bundle import require_package

    root = Path(bundle_dir)
    require_package(root)
    if not (root / MANIFEST).is_file():
        return
    key, signature = str(root.resolve()), _signature(root)
    if signature is not None and _checked.get(key) == signature:
        return
    try:
        problems = verify(root)
    except ValueError as e:  # an unreadable manifest
        problems = [str(e)]
    if problems:
        raise BundleIntegrityError(root, problems, refusal(root))
    findings = config_findings(root)
    if findings and not trusted():
        raise UntrustedConfigs(root, findings)
    if signature is not None and not findings:  # with findings, trust is asked every time: the environment may change
        _checked[key] = signature


def _signature(root: Path) -> tuple | None:
    """What a change to any bundle file changes (taken before hashing, so a change during it counts as one); None
    while a file was changed in the last seconds, which a change of the same size could follow within one tick of
    the file system's clock, unseen (git's "racy" files)."""
    if os.name == "nt":  # st_ctime is the creation time there, which a rewrite in place keeps
        return None
    files, problems = _scan(root)
    try:
        stats = [(rel, (root / rel).stat()) for rel in (MANIFEST, *files)]
    except OSError:  # a file removed meanwhile: verification names it
        return None
    if max(max(st.st_mtime, st.st_ctime) for _, st in stats) > time.time() - RACY_S:
        return None
    # the change time too: a file's modification time can be set back, its change time cannot
    return tuple(problems), tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, st in stats)


_checked: dict[str, tuple] = {}  # bundle folder -> its files' signature when it last passed ``check_bundle``
RACY_S = 2.0


def config_findings(root: str | os.PathLike) -> list[str]:
    """``config_audit.audit``'s lines for a bundle folder: what its configs reach beyond a bundle's needs."""
    from .config_audit import audit

    return audit(root)


def trusted() -> bool:
    """Whether ``$NUCLEISEG_TRUST_CONFIGS`` says to run bundles whose configs reach beyond a bundle's needs."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _warn_findings(root: Path, findings: list[str], what: str) -> None:
    if findings:
        logger.warning("%s: %s: %s. Running it will be refused unless %s=1 is set", root, what,
                       "; ".join(findings), TRUST_ENV)


def refusal(root: str | os.PathLike) -> str:
    """What to do about a sealed bundle that no longer matches its manifest."""
    return (
        "Refusing to run it. Unpack a fresh copy; or, if you changed these files yourself (e.g. retrained), "
        f"seal the folder again with nucleiseg_monai.packaging.write_manifest('{root}')."
    )


def is_bundle_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "configs" / "metadata.json").is_file()


def _target(dest: Path, top: str, overwrite: bool, into: bool) -> Path:
    """Where the bundle goes: a folder ``top`` in ``dest`` when ``into`` or ``dest`` is a folder but not a bundle
    folder; else ``dest`` itself."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file; --dest must be a folder (new, or one to unpack into)")
    target = dest / top if (into or dest.is_dir()) and not is_bundle_folder(dest) else dest
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; unpack elsewhere, or replace it with --overwrite")
        if not is_bundle_folder(target) and any(target.iterdir()):
            raise FileExistsError(f"{target} is not a bundle folder (no configs/metadata.json); refusing to replace it")
    return target


def _into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = staging_folder(target)  # a writer's temporary folder: a kill between the renames leaves it to remove_stale
    old = aside / target.name
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # what stays behind is removed by a later unpack (remove_stale)


def unpack(
    zip_path: str | os.PathLike,
    dest: str | os.PathLike,
    sha256: str | None = None,
    overwrite: bool = False,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> Path:
    """Extracts a bundle zip and returns the bundle folder, verified, or leaves nothing.

    ``dest``: a new folder becomes the bundle folder; an existing folder, or one written with a trailing separator
    (``bundles/``), receives ``<bundle name>/`` (the zip's top folder), unless it is a bundle folder itself. An existing bundle folder is refused, or replaced with
    ``overwrite`` (outputs such as ``runs/`` included). ``sha256``: the zip's digest as published by its author,
    checked first. Member names, sizes and compression ratios are checked against the manifest and the caps before
    anything is written (see the module docstring); members are then streamed into a temporary folder beside the
    target, each hashed on the way, and the folder is renamed into place only when every file matched.
    """
    into = str(dest).endswith(("/", os.sep))  # Path() drops the separator that says "a folder to unpack into"
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise FileNotFoundError(f"no bundle zip at {zip_path}")
    if sha256 is not None:
        sha256 = published_digest(sha256)
        if (actual := sha256_file(zip_path)) != sha256:
            raise BundleIntegrityError(zip_path, [f"zip sha256 {actual} != expected {sha256}"], "Refusing it.")
    with _readable_zip(zip_path) as zf:
        top, members, expected, manifest, problems = _inspect_zip(zf, str(zip_path), max_bytes)
        if problems:
            raise BundleIntegrityError(zip_path, problems, "Refusing it: nothing was extracted.")
        target = _target(dest, top, overwrite, into)
        made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # removed again on refusal
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent)  # what unpacks (and other writers) killed midway left
        tmp = staging_folder(target)
        try:
            for relpath, info in members.items():
                out = tmp.joinpath(*PurePosixPath(relpath).parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "xb") as dst:
                    try:
                        actual = copy_hashed(src, dst, expected[relpath][1])
                    except StreamTooLong as e:
                        raise BundleIntegrityError(
                            zip_path, [f"{relpath}: {e}, the size {MANIFEST} lists"], "Refusing it: nothing was unpacked."
                        ) from e
                problems = _compare({relpath: expected[relpath]}, {relpath: actual})
                if problems:
                    raise BundleIntegrityError(zip_path, problems, "Refusing it: nothing was unpacked.")
            (tmp / MANIFEST).write_bytes(manifest)
            tmp.chmod(0o777 & ~umask())  # mkdtemp's 0o700 would make the bundle private to this user
            findings = config_findings(tmp)
            _into_place(tmp, target)
            _warn_findings(target, findings, "its configs reach beyond what a bundle needs, read those lines")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            remove_if_empty(made)  # only what this call created, and only where it stayed empty
            raise
    return target


def published_digest(text: str) -> str:
    """A SHA-256 as published: 64 hex digits, any case, or a ``sha256sum`` line (digest, then the file name)."""
    digest = text.strip().split()[0].lower() if text.strip() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"--sha256 takes the zip's SHA-256, 64 hex digits as nucleiseg pack prints it, got {text!r}")
    return digest
