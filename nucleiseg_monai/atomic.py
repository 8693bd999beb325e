"""Files that appear whole or not at all: write beside the target, fsync, rename (``os.replace``), fsync the folder.

Every writer of the project (checkpoints, datalists, label maps, reports, bundle zips) goes through here, so a crash
or an exception never leaves a partial file under the final name, and results get the permissions of any file this
user writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on ``commit`` and vanishes on ``discard``.

    The temporary name keeps the final suffix, so writers that pick the format from the name still work.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=f".tmp{self.path.suffix}")
        # mkstemp makes the file private (0600); results are meant to be shared like any file this user writes
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        self.tmp = Path(tmp)

    def sync(self) -> None:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())

    def replace(self) -> Path:
        os.replace(self.tmp, self.path)
        return self.path

    def commit(self) -> Path:
        self.sync()
        self.replace()
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path``, on an exception it is deleted."""
    target = AtomicFile(path)
    try:
        yield target.tmp
        target.commit()
    except BaseException:
        target.discard()
        raise
