"""What an output folder holds of earlier runs, and what a run makes of it: an image's outputs are finished when
they are complete and their completion record (``outputs.manifest_path``) names the settings a run would use now;
finished outputs of other weights or settings are refused, never silently kept or replaced (only ``overwrite``
replaces them). Output names that differ only in case are one, and an image whose name another has taken, or whose
paths Windows would refuse, is refused before any is read; what a killed run left beside a finished image is cleaned
up by whoever skips it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .outputs import ImageLock, manifest_path, outputs_complete, source_fingerprint
from .path_limit import path_too_long
from .region_journal import remove_journal

if TYPE_CHECKING:
    from .inference import SlidePredictor


def record(output_dir: str | os.PathLike, name: str) -> dict:
    """An image's completion record; empty when it cannot be read."""
    try:
        found = json.loads(manifest_path(output_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def recorded_settings(output_dir: str | os.PathLike, name: str) -> dict | None:
    """The settings in an image's completion record, None when it records none (outputs of an older version)."""
    settings = record(output_dir, name).get("settings")
    return settings if isinstance(settings, dict) else None


def differing(predictor: SlidePredictor, output_dir: str | os.PathLike, name: str,
              path: str | os.PathLike | None = None) -> list[str]:
    """What in the completion record of ``name`` differs from ``predictor``'s settings, and "source file" when
    ``path`` is not the file the outputs were made from (another image of the same name, or the same one scanned
    again)."""
    made = record(output_dir, name)
    settings, recorded = predictor.settings(), made.get("settings")
    if not isinstance(recorded, dict):
        return ["not recorded (an older version's outputs)"]
    keys = {k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k)}
    if made.get("mpp_source") == "file" and not predictor.force_mpp:
        # the file stated its pixel size, so --mpp did not touch these outputs, and without --force_mpp it would not
        # touch them now
        keys -= {"input_mpp", "force_mpp"}
    fingerprint = made.get("source_fingerprint")  # absent in records older than it: not compared
    if path is not None and fingerprint is not None and Path(path).is_file() and \
            fingerprint != source_fingerprint(path):
        keys.add("source file")
    return sorted(keys)


def finished(predictor: SlidePredictor, output_dir: str | os.PathLike, name: str,
             path: str | os.PathLike | None = None) -> bool:
    """True when image ``name`` has complete outputs in ``output_dir`` made with ``predictor``'s weights and
    settings, from the file ``path`` when it is given; False when they are missing or incomplete; FileExistsError
    naming what differs when they were made otherwise."""
    if not outputs_complete(output_dir, name):
        return False
    keys = differing(predictor, output_dir, name, path)
    if keys:
        raise FileExistsError(
            f"{manifest_path(output_dir, name)}: the finished outputs of {name} were made with other weights or "
            f"settings (differing: {', '.join(keys)}); pass --overwrite (overwrite=true) to replace them, "
            f"or choose another output_dir{_region_size_hint(output_dir, [name], keys)}"
            f"{_source_hint(output_dir, [name], keys)}"
        )
    return True


def finished_outputs(output_dir: str | os.PathLike, images: Iterable[tuple[str, str | os.PathLike, SlidePredictor]],
                     undecided: Iterable[str] = ()) -> set[str]:
    """The names of ``images`` (output name, file, the predictor that would run it) whose outputs in ``output_dir``
    are complete and made with that predictor's weights and settings; FileExistsError naming all those made with
    other weights or settings at once, before any image is read. Each image has its own predictor because a
    cohort's slide list gives each slide its pixel size. An image whose outputs differ only in settings named in
    ``undecided`` is neither: whoever runs it decides (a cohort's client cannot tell what its remote workers
    resolve)."""
    output_dir = Path(output_dir)
    complete = [(name, path, predictor) for name, path, predictor in images if outputs_complete(output_dir, name)]
    found = {name: keys for name, path, predictor in complete if (keys := differing(predictor, output_dir, name, path))}
    later = {name for name, keys in found.items() if set(keys) <= set(undecided)}
    found = {name: keys for name, keys in found.items() if name not in later}
    if found:
        names = list(found)
        keys = sorted({k for ks in found.values() for k in ks})
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(
            f"{output_dir} holds finished outputs of {listed} made with other weights or settings "
            f"(differing: {', '.join(keys)}); pass --overwrite (overwrite=true) to replace them, or choose "
            f"another output_dir{_region_size_hint(output_dir, names, keys)}{_source_hint(output_dir, names, keys)}"
        )
    return {name for name, _, _ in complete if name not in later}


def _region_size_hint(output_dir: str | os.PathLike, names: list[str], keys: Iterable[str]) -> str:
    """How to go on with the recorded region size, when only it differs: the default follows the CPU
    (``inference.default_region_size``), so outputs begun on another machine differ in it alone."""
    if list(keys) != ["region_size"]:
        return ""
    sizes = sorted({(recorded_settings(output_dir, n) or {}).get("region_size") for n in names} - {None})
    if len(sizes) != 1:
        return ""
    return (f"; region_size is chosen for this CPU unless set, and these were made with {sizes[0]}: "
            f"--set predictor#planner#region_size={sizes[0]} goes on with them")


def _source_hint(output_dir: str | os.PathLike, names: list[str], keys: Iterable[str]) -> str:
    """Which file the outputs were made from, when the input is another (``differing``'s "source file")."""
    if "source file" not in keys:
        return ""
    sources = [s for s in (record(output_dir, n).get("source") for n in names) if s][:3]
    return (f"; the outputs were made from {', '.join(sources)}: another image of the same name, or this one "
            "changed since" if sources else "")


def name_clashes(named: Iterable[tuple[str, object]]) -> dict[int, object]:
    """For each (output name, source) of ``named`` whose name an earlier one has taken: its index -> that earlier
    one's source. Two images would write one set of outputs; names that differ only in case are one, since macOS's
    and Windows' file systems ignore case."""
    first: dict[str, object] = {}
    clashes = {}
    for i, (name, source) in enumerate(named):
        key = name.casefold()
        if key in first:
            clashes[i] = first[key]
        else:
            first[key] = source
    return clashes


def refusals(named: list[tuple[str, object]], output_dir: str | os.PathLike, rename: str) -> dict[int, str]:
    """For each (output name, source) of ``named`` that a run refuses before reading any image: its index -> why.
    A later one of a name taken (``name_clashes``; ``rename`` says how to give it another), and one whose paths in
    ``output_dir`` Windows here would refuse (``path_limit.path_too_long``)."""
    refused = {i: f"same output name {named[i][0]!r} as {first}; {rename}" for i, first in name_clashes(named).items()}
    for i, (name, _) in enumerate(named):
        if i not in refused and (too_long := path_too_long(output_dir, name)):
            refused[i] = too_long
    return refused


def remove_leftovers_of_finished(output_dir: str | os.PathLike, name: str) -> None:
    """What a run killed just after committing image ``name``'s outputs left, for a run that skips the finished
    image (and so takes no lock): its region journal, and its lock where the holder is gone."""
    remove_journal(output_dir, name)
    ImageLock(output_dir, name).remove_if_stale()
