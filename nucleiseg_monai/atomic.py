"""Files that appear whole or not at all: write beside the target, fsync, rename (``os.replace``), fsync the folder.
A folder of files is filled under a temporary name beside its target and renamed (``staging_folder``).

Every writer of the project (checkpoints, datalists, label maps, reports, bundle zips) goes through here, so a crash
or an exception never leaves a partial file under the final name, and results get the permissions of any file this
user writes. A process killed mid-write (kill -9, power loss) does leave its temporary file behind; the temporary
names carry the writer's process id and machine, so ``remove_stale`` can later delete the ones no live writer holds.
The SHA-256 of a stream (``copy_hashed``, ``sha256_file``) is here too: copies are hashed from the bytes written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import psutil


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Windows refuses to replace a file another program holds open: an antivirus scanner or the search indexer holds a
# file just written for a moment, so there a replace is tried again for about 2 s before the error is raised
REPLACE_WAITS_S = (0.05, 0.1, 0.25, 0.5, 1.0) if os.name == "nt" else ()


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on ``commit`` and vanishes on ``discard``.

    The temporary name, ``.<name>.pid<writer pid>@<host>-<random>.tmp<suffix>``, keeps the final suffix, so writers
    that pick the format from the name still work, and names its writer for ``remove_stale``.
    """

    def __init__(self, path: str | os.PathLike, make_folder: bool = True):
        self.path = Path(path)
        if make_folder:  # else a missing folder raises FileNotFoundError
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_temporary_prefix(self.path),
                                   suffix=_temporary_suffix(self.path))
        try:
            # mkstemp makes the file private (0600) where modes exist; results are meant to be shared like any file
            # this user writes. Windows has no modes to set, and Python 3.11-3.12 no os.fchmod there
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
        self.tmp = Path(tmp)

    def sync(self) -> None:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())

    def replace(self) -> Path:
        for wait in (*REPLACE_WAITS_S, None):
            try:
                os.replace(self.tmp, self.path)
                return self.path
            except PermissionError:
                if wait is None:
                    raise
                time.sleep(wait)

    def commit(self) -> Path:
        self.sync()
        self.replace()
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def staging_folder(path: str | os.PathLike) -> Path:
    """An empty temporary folder beside ``path``, named as ``AtomicFile`` names its files (so ``remove_stale``
    knows its writer), to fill and then rename to ``path``: a folder of files that appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp"))


def remove_if_empty(folders: list[Path]) -> None:
    """Removes those of ``folders`` (deepest first) that hold nothing: what a failed run made and never wrote in."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # holds something, or is gone
            pass


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


def write_json_atomic(data, path: str | os.PathLike, indent: int = 2, default=None) -> Path:
    """``data`` as indented JSON with a final newline at ``path``, atomically; ``default`` as for ``json.dumps``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n", encoding="utf-8")
    return Path(path)


_CHUNK = 1 << 20


class StreamTooLong(ValueError):
    """A stream held more bytes than ``copy_hashed`` was allowed to write."""


def copy_hashed(src: BinaryIO, dst: BinaryIO | None = None, limit: int | None = None) -> tuple[str, int]:
    """Streams ``src`` into ``dst`` (None: hash only) and returns its SHA-256 hex digest and its size in bytes.

    With ``limit``, at most ``limit`` bytes are written and a longer stream raises StreamTooLong, so a zip member
    whose header understates its size cannot fill the disk.
    """
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK if limit is None else min(_CHUNK, limit - size) or 1):
        if limit is not None and size + len(chunk) > limit:
            raise StreamTooLong(f"holds more than {limit} bytes")
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return copy_hashed(f)[0]


# .<name>.pid<pid>@<host>-<random>.tmp<suffix>; the writer part is absent in names made before it was added
TEMPORARY_NAME = re.compile(r"^\..+\.(?:pid(?P<pid>\d+)@(?P<host>\w*)-)?[A-Za-z0-9_]{8}\.tmp(?:\.[^.]*)?$")


def _temporary_prefix(path: Path, pid: int | None = None) -> str:
    """``.<name>.pid<writer pid>@<host>-``: the start of every temporary name here (``TEMPORARY_NAME`` reads it);
    the writer is this process unless ``pid`` is given."""
    return f".{path.name}.pid{os.getpid() if pid is None else pid}@{host_name()}-"


def _temporary_suffix(path: Path) -> str:
    return f".tmp{path.suffix}"


# Linux's process ids stay below 2**22 (4,194,304), Windows' in practice far below: 7 digits
LONGEST_PID = 9_999_999
RANDOM_CHARS = 8  # what mkstemp puts between the prefix and the suffix


def longest_temporary(path: str | os.PathLike) -> Path:
    """The longest name ``AtomicFile`` may give the temporary file of ``path`` on this host (its name, a 7-digit
    process id): what a path limit must allow for besides ``path`` itself (``path_limit``)."""
    path = Path(path)
    return path.with_name(f"{_temporary_prefix(path, LONGEST_PID)}{'x' * RANDOM_CHARS}{_temporary_suffix(path)}")


def host_name() -> str:
    return re.sub(r"\W", "_", socket.gethostname().split(".")[0])


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (anyone's), on any system: Windows' ``os.kill(pid, 0)`` would
    not ask but terminate the process."""
    return psutil.pid_exists(pid)


def remove_stale(folder: str | os.PathLike, older_than_s: float = 3600.0) -> list[Path]:
    """Deletes the temporary files (and ``staging_folder``s) of writers that died in ``folder`` (not below it) and
    returns their paths.

    A temporary file is stale when the process named in it is gone (a writer on this machine), or when it has not
    been written for ``older_than_s`` (a writer on another machine sharing the folder, or a name without a
    writer). Only files of this user with this module's names are touched; a missing folder holds nothing stale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, host, removed = time.time(), host_name(), []
    uid = os.getuid() if hasattr(os, "getuid") else None  # Windows has no owner ids (st_uid is 0)
    for path in folder.iterdir():
        match = TEMPORARY_NAME.match(path.name)
        if match is None:
            continue
        try:
            info = path.lstat()
        except FileNotFoundError:  # its writer renamed or discarded it meanwhile
            continue
        is_folder = stat.S_ISDIR(info.st_mode)
        if not (stat.S_ISREG(info.st_mode) or is_folder) or (uid is not None and info.st_uid != uid):
            continue
        writer_gone = match["pid"] is not None and match["host"] == host and not process_alive(int(match["pid"]))
        if writer_gone or now - info.st_mtime > older_than_s:
            if is_folder:
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
