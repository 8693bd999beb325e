"""The regions an interrupted image had finished, kept on disk so that running the same command again goes on
from them instead of from the first region.

A whole slide at 40x takes from minutes to hours on a CPU, and its outputs are written at its end (atomically, so
that a killed run leaves nothing half-written under a final name). Without a journal a run killed at 90% (Ctrl-C, a
cluster's wall-time limit, a reboot) starts that slide again from its first region. With one, each region's
instance labels, as the stitcher takes them, go into ``.<name>.regions/<key>/`` in the output folder as soon as they
are computed; a later run of the same image under the same key reads them back and runs the network and watershed
only on the others. Stitching, measurements and writing run again over every region (they hold no state worth
saving), so the outputs are those of an uninterrupted run, nucleus ids included. The folder goes when the image's
outputs are committed, or when it is found finished; deleting it by hand is always safe.

The key is what made the regions (``SlidePredictor.journal_key``: weights, settings, runtime and versions, the input
file, the plan); ``key.json`` in its folder holds it, and the folder's name is its hash, so a writer of another key
(a run killed on another machine, a cohort's task still running on a cluster) only ever writes into its own folder.
``claim`` deletes the folders of other keys, with one log line naming the parts of the key that differed (settings,
runtime, versions, the source file's fingerprint or time, the plan); a cohort's region tasks of a
split slide only ``join`` the folder their slide task claimed. Keeping regions only saves time: a journal that
cannot be written (a full disk) is given up with one warning and the image goes on without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np

from .atomic import AtomicFile, remove_stale, write_json_atomic

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".regions"
KEY_FILE = "key.json"
KEY_HASH_CHARS = 16  # of the key's hash, in hex: the name of its folder
REGION_FILE = re.compile(r"^r(\d+)-(\d+)\.npy\.z$")

Region = tuple[int, int]


def pack(labels: np.ndarray) -> bytes:
    """Instance labels as zlib-compressed .npy bytes: uint16 where the ids fit, which halves them before zlib."""
    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(labels, dtype), allow_pickle=False)
    return zlib.compress(buffer.getvalue(), 1)


def unpack(packed: bytes) -> np.ndarray:
    return np.load(io.BytesIO(zlib.decompress(packed)), allow_pickle=False).astype(np.uint32)


def journal_folder(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / f".{name}{JOURNAL_SUFFIX}"


def remove_journal(output_dir: str | os.PathLike, name: str) -> None:
    """Delete every kept region of ``name``: once its outputs are committed, or found finished."""
    shutil.rmtree(journal_folder(output_dir, name), ignore_errors=True)


class RegionJournal:
    """The finished regions of image ``name`` in ``output_dir`` made under ``key`` (``RegionJournal.claim`` or
    ``RegionJournal.join``): ``ij in journal``, ``load``, ``save``."""

    def __init__(self, folder: Path, done: set[Region]):
        self.folder, self._done, self.active = folder, done, True

    @classmethod
    def claim(cls, output_dir: str | os.PathLike, name: str, key: dict) -> RegionJournal | None:
        """The journal of ``name`` for ``key``, the regions of other keys deleted (one log line says what differed);
        None, with a warning, where it cannot be made."""
        key = _normalised(key)
        parent = journal_folder(output_dir, name)
        folder = parent / _key_hash(key)
        try:
            if parent.is_dir():
                for other in parent.iterdir():
                    if other != folder:
                        _discard(other, key, name)
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale(folder)  # region files a killed writer left half-written
            if _read_key(folder) != key:
                write_json_atomic(key, folder / KEY_FILE)
        except OSError as err:
            logger.warning("%s: finished regions cannot be kept in %s (%s); the image goes on without them", name,
                           parent, err)
            return None
        done = set(_region_files(folder))
        if done:
            logger.info("%s: %s kept from an interrupted run and taken as %s", name,
                        "1 region was" if len(done) == 1 else f"{len(done)} regions were",
                        "it is" if len(done) == 1 else "they are")
        return cls(folder, done)

    @classmethod
    def join(cls, output_dir: str | os.PathLike, name: str, key: dict) -> RegionJournal | None:
        """The journal of ``name`` when one was claimed for ``key``; else None (nothing is kept)."""
        key = _normalised(key)
        folder = journal_folder(output_dir, name) / _key_hash(key)
        if _read_key(folder) != key:
            return None
        return cls(folder, set(_region_files(folder)))

    def __contains__(self, ij: Region) -> bool:
        return tuple(ij) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def load(self, ij: Region, shape: tuple[int, int]) -> np.ndarray | None:
        """Region ij's labels, or None when its file cannot be read back or is not ``shape`` (then it is deleted
        and the region computed again)."""
        read = self._read(ij, shape)
        return None if read is None else read[0]

    def load_packed(self, ij: Region, shape: tuple[int, int]) -> bytes | None:
        """Region ij's labels as kept (``pack``ed), checked as ``load`` checks them: for a caller that sends them on
        packed, which then need not be compressed again."""
        read = self._read(ij, shape)
        return None if read is None else read[1]

    def _read(self, ij: Region, shape: tuple[int, int]) -> tuple[np.ndarray, bytes] | None:
        path = self._path(ij)
        try:
            packed = path.read_bytes()
            labels = unpack(packed)
            if labels.shape != tuple(shape):
                raise ValueError(f"{labels.shape[0]}x{labels.shape[1]} px where the region is {shape[0]}x{shape[1]}")
            return labels, packed
        except (OSError, ValueError, EOFError, zlib.error) as err:
            logger.warning("%s: a kept region could not be read (%s); it is computed again", path, err)
            path.unlink(missing_ok=True)
            self._done.discard(tuple(ij))
            return None

    def save(self, ij: Region, labels: np.ndarray) -> bytes | None:
        """Keep region ij's labels and return them packed as written (``pack``), for a caller that sends them on;
        None once nothing is kept: after a failure to write (the folder deleted meanwhile, a full disk) nothing more
        is, and the run goes on."""
        if not self.active:
            return None
        target = None
        try:
            # in the key's own folder, never recreated: a folder deleted meanwhile (claimed by another key, or its
            # image finished) means this writer's regions are no longer wanted
            target = AtomicFile(self._path(ij), make_folder=False)
            packed = pack(labels)
            target.tmp.write_bytes(packed)
            target.replace()  # without fsync: after a power loss a region may be unreadable, and is computed again
        except OSError as err:
            self.active = False
            if target is not None:
                target.discard()
            if self.folder.is_dir():
                logger.warning("%s: finished regions can no longer be kept (%s); the image goes on without them",
                               self.folder.parent, err)
            return None
        except BaseException:
            if target is not None:
                target.discard()
            raise
        self._done.add(tuple(ij))
        return packed

    def _path(self, ij: Region) -> Path:
        return self.folder / region_file(ij)


def region_file(ij: Region) -> str:
    """The name of region ij's file in a key's folder (``REGION_FILE`` reads it)."""
    return f"r{int(ij[0])}-{int(ij[1])}.npy.z"


def _normalised(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from key.json


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:KEY_HASH_CHARS]


def _discard(folder: Path, key: dict, name: str) -> None:
    """Delete the kept regions of another key, saying how many and what differed."""
    count = len(_region_files(folder))
    if count:
        recorded = _read_key(folder) or {}
        differing = sorted(k for k in recorded.keys() | key.keys() if recorded.get(k) != key.get(k))
        logger.info("%s: %d regions of an interrupted run with other %s are discarded", name, count,
                    ", ".join(differing) or "settings")
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    else:
        folder.unlink()


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _region_files(folder: Path) -> list[Region]:
    if not folder.is_dir():
        return []
    return [(int(m[1]), int(m[2])) for m in map(REGION_FILE.match, (p.name for p in folder.iterdir())) if m]
