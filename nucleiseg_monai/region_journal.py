"""The regions an interrupted image had finished, kept on disk so that running the same command again goes on
from them instead of from the first region.

A whole slide at 40x takes from minutes to hours on a CPU, and its outputs are written at its end (atomically, so
that a killed run leaves nothing half-written under a final name). Without a journal a run killed at 90% (Ctrl-C, a
cluster's wall-time limit, a reboot) starts that slide again from its first region. With one, each region's
instance labels, as the stitcher takes them, go into ``.<name>.regions/`` in the output folder as soon as they are
computed; a later run of the same image with the same weights, settings and plan reads them back and runs the
network and watershed only on the others. Stitching, measurements and writing run again over every region (they
hold no state worth saving), so the outputs are those of an uninterrupted run, nucleus ids included. The folder
goes when the image's outputs are committed.

``key.json`` says what made the regions: the predictor's settings (weights, statistics, post-processing, region
size...), the input file's fingerprint and the plan (level, shape, scale, regions to process). A run whose key
differs empties the folder before writing its own (``claim``), with one log line; a cohort's region tasks of a split
slide only join a journal their slide task claimed (``join``), so they never empty one another's.
"""

from __future__ import annotations

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
    """Delete the journal of ``name``, once its outputs are committed (where there is one)."""
    shutil.rmtree(journal_folder(output_dir, name), ignore_errors=True)


class RegionJournal:
    """The finished regions of image ``name`` in ``output_dir`` made under ``key`` (``RegionJournal.claim`` or
    ``RegionJournal.join``): ``ij in journal``, ``load``, ``save``; ``remove_journal`` deletes it."""

    def __init__(self, folder: Path, key: dict, done: set[Region]):
        self.folder, self.key, self._done = folder, key, done

    @classmethod
    def claim(cls, output_dir: str | os.PathLike, name: str, key: dict) -> RegionJournal:
        """The journal of ``name`` for ``key``: its regions where its key is ``key``; else emptied, with a log line
        saying how many regions of another run went and why."""
        folder, key = journal_folder(output_dir, name), _normalised(key)
        recorded = _read_key(folder)
        if recorded is not None and recorded != key:
            differing = sorted(k for k in recorded.keys() | key.keys() if recorded.get(k) != key.get(k))
            logger.info("%s: %d regions of an interrupted run with other %s are discarded", name,
                        len(_region_files(folder)), ", ".join(differing))
        if folder.exists() and recorded != key:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder)  # region files a killed writer left half-written
        if recorded != key:
            write_json_atomic(key, folder / KEY_FILE)
        done = set(_region_files(folder))
        if done:
            logger.info("%s: %d regions kept from an interrupted run are taken as they are", name, len(done))
        return cls(folder, key, done)

    @classmethod
    def join(cls, output_dir: str | os.PathLike, name: str, key: dict) -> RegionJournal | None:
        """The journal of ``name`` when one was claimed for ``key``; else None (nothing is kept)."""
        folder, key = journal_folder(output_dir, name), _normalised(key)
        if _read_key(folder) != key:
            return None
        return cls(folder, key, set(_region_files(folder)))

    def __contains__(self, ij: Region) -> bool:
        return tuple(ij) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def load(self, ij: Region) -> np.ndarray | None:
        """Region ij's labels, or None when its file cannot be read back (then it is deleted and computed again)."""
        path = self._path(ij)
        try:
            return unpack(path.read_bytes())
        except (OSError, ValueError, EOFError, zlib.error) as err:
            logger.warning("%s: a kept region could not be read (%s); it is computed again", path, err)
            path.unlink(missing_ok=True)
            self._done.discard(tuple(ij))
            return None

    def save(self, ij: Region, labels: np.ndarray) -> None:
        # renamed without fsync: after a power loss a region may be missing or unreadable, and is then computed again
        target = AtomicFile(self._path(ij))
        try:
            target.tmp.write_bytes(pack(labels))
            target.replace()
        except BaseException:
            target.discard()
            raise
        self._done.add(tuple(ij))

    def _path(self, ij: Region) -> Path:
        return self.folder / f"r{int(ij[0])}-{int(ij[1])}.npy.z"


def _normalised(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from key.json


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _region_files(folder: Path) -> list[Region]:
    if not folder.is_dir():
        return []
    return [(int(m[1]), int(m[2])) for m in map(REGION_FILE.match, (p.name for p in folder.iterdir())) if m]
