"""Windows' path limit, checked before a run computes anything.

Where long paths are not enabled (Windows' default), a path of ``MAX_PATH`` (260) characters or more cannot be
opened or made. The names a run writes for an image are longer than the image's own: its name with a suffix, in
hidden temporary names of the writer's process and host (``atomic``), in its region journal's folders. Without a
check, such an image failed with a bare FileNotFoundError as its outputs were opened, hours into a folder or a
cohort, or ran without keeping its regions (a journal that cannot be written is given up with a warning). Data
kept in deep synced or network folders, and slide names from laboratory systems, reach the limit.
``path_too_long`` says so for an image before any is read, from the longest path a run writes for it
(``written_paths``); elsewhere, or with long paths enabled, nothing is checked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .atomic import longest_temporary
from .outputs import ImageLock, level_buffer, manifest_path, output_paths
from .region_journal import KEY_FILE, KEY_HASH_CHARS, journal_folder, region_file

MAX_PATH = 260  # with the terminating NUL: a path has at most 259 characters
# a region index of 5 digits: 100,000 regions along a side is past any slide at any region size worth running
LONGEST_REGION = (99_999, 99_999)
FILE_SYSTEM_KEY = r"SYSTEM\CurrentControlSet\Control\FileSystem"


def long_paths_enabled() -> bool:
    """Whether this Windows takes paths of ``MAX_PATH`` characters or more: its LongPathsEnabled registry value is
    1 (Python declares itself able to use them, so the value alone decides). A key that cannot be read counts as
    not enabled."""
    import winreg  # Windows only

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, FILE_SYSTEM_KEY) as key:
            value, _ = winreg.QueryValueEx(key, "LongPathsEnabled")
    except OSError:
        return False
    return value == 1


def written_paths(output_dir: str | os.PathLike, name: str) -> list[Path]:
    """The paths a run writes for image ``name`` in ``output_dir`` (made absolute, as Windows sees them), at their
    longest: its outputs, completion record and label level buffer, its region journal's key and region files,
    each also under its longest temporary name (``atomic.longest_temporary``), and its lock. The folders made hold
    files at least 12 characters longer than they are, so their own limit there (248) is never the one reached;
    the name a stale lock is renamed to is shorter than the temporary names."""
    out = Path(os.path.abspath(output_dir))
    outputs = output_paths(out, name)
    journal = journal_folder(out, name) / ("0" * KEY_HASH_CHARS)
    files = [*outputs.values(), manifest_path(out, name), level_buffer(outputs["labels"]), journal / KEY_FILE,
             journal / region_file(LONGEST_REGION)]
    return [*files, *map(longest_temporary, files), ImageLock(out, name).path]


def path_too_long(output_dir: str | os.PathLike, name: str) -> str | None:
    """Why Windows here would refuse a path that a run writes for image ``name`` in ``output_dir``, or None: on
    Windows without long paths enabled, the longest of ``written_paths`` has ``MAX_PATH`` characters or more.
    Elsewhere nothing is checked."""
    if sys.platform != "win32" or long_paths_enabled():
        return None
    # Windows counts UTF-16 units: a character beyond the Basic Multilingual Plane (an emoji) takes two
    longest = max(len(str(path).encode("utf-16-le")) // 2 for path in written_paths(output_dir, name))
    if longest < MAX_PATH:
        return None
    return (f"output name {name!r} needs paths of up to {longest} characters in {os.path.abspath(output_dir)} (its "
            f"outputs, their temporary files and its kept regions), {longest - MAX_PATH + 1} more than the "
            f"{MAX_PATH - 1} Windows takes where long paths are not enabled, as here: choose a shorter output "
            "folder, give the image a shorter name (the 'slide' column of a slide list), or enable long paths (the "
            "LongPathsEnabled registry value, as Microsoft's page \"Maximum Path Length Limitation\" describes)")
