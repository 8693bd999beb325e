"""Where a bundle lives, so its configs can run from any working directory.

``python -m monai.bundle run training --config_file bundles/X/configs/train.json`` does not tell the config its own
path, and model-zoo bundles assume the working directory is the bundle. Here ``bundle_root`` is read from the
``--config_file`` argument (the folder above ``configs/``), so outputs land in the bundle wherever it is run from.
``--bundle_root DIR`` on the command line overrides it, as in every MONAI bundle.

``guard`` is the first expression of each config's ``initialize`` list. MONAI evaluates ``initialize`` (and, just
before it, every ``$import``) when the workflow is created, before any other config expression, and only then, in
``ConfigWorkflow.run``, puts the bundle folder on ``sys.path`` ahead of the installed packages. The guard refuses a
sealed bundle whose files changed since it was packed, and keeps every bundle folder off ``sys.path`` for the rest
of the process, so nothing in a bundle can shadow an installed module. (Entries of an ``imports`` list that are not
``$import`` statements are never evaluated by MONAI, so the guard cannot live there.) A config edited to drop the
guard is not checked by it: ``nucleiseg predict`` / ``evaluate`` / ``tune`` verify the bundle before reading any
config. Run bundles from outside their folder: a folder that is the working directory is importable before any
config is read.
"""

from __future__ import annotations

import ast
import importlib.abc
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .packaging import MANIFEST, BundleIntegrityError, check_bundle, is_bundle_folder

logger = logging.getLogger(__name__)

STATS_NAME = "channel_stats.json"  # what training writes beside its model.pt (the bundle's ``stats_file``)
# what was already said in this process (configs are read more than once per command): (weights, statistics) of
# weights_stats_file, ("report", folder) of evaluation_dir
_said: set[tuple[str, str]] = set()


def _argument(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` on a command line, with ``_`` or ``-`` in the name (Fire
    takes both); None where it is not given."""
    spellings = {name, name[:2] + name[2:].replace("_", "-")}
    for i, arg in enumerate(argv):
        if arg in spellings:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.split("=", 1)[0] in spellings and "=" in arg:
            return arg.split("=", 1)[1]
    return None


def _flags(argv: list[str]) -> list[tuple[str, str]]:
    """The ``(name, value)`` of each ``--name value`` and ``--name=value`` on a command line, as typed; a flag
    followed by another flag, or last, is bare, and Fire takes it as true."""
    flags, i = [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--") or len(arg) == 2:
            continue
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i < len(argv) and not argv[i].startswith("--"):
            key, value, i = arg[2:], argv[i], i + 1
        else:
            key, value = arg[2:], "True"
        flags.append((key, value))
    return flags


def typed(names: list[str], argv: list[str] | None = None) -> list[str]:
    """Those of the settings ``names`` given on this process's command line (``--name``, ``_`` or ``-``): a config
    cannot tell a value typed from its default, and some settings mean more when typed (``handlers.Resume``)."""
    if argv is None and _command is not None:
        return [name for name in names if name in _command[0]]
    given = {key for key, _ in _flags(sys.argv if argv is None else argv)}
    return [name for name in names if {name, name.replace("_", "-")} & given]


# arguments of ``python -m monai.bundle run`` itself, not settings of the config
MONAI_ARGUMENTS = frozenset({"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id",
                             "tracking", "workflow_type", "workflow_name", "properties_path"})
# what a caller that builds the workflow itself gives it (``command``): (settings, those changed knowingly, the
# names of its config files)
_command: tuple[dict, frozenset[str], list[str] | None] | None = None


@contextmanager
def command(settings: dict, changed: Iterable[str] = (), configs: Iterable[str | os.PathLike] | None = None
            ) -> Iterator[None]:
    """The config settings of the command that runs a workflow (``nucleiseg train``), for ``typed`` and
    ``typed_settings`` while it runs: its process's ``sys.argv`` need not be that command (a test, a notebook).
    ``changed``: settings given knowingly with other values than those of the run being resumed (it has warned);
    ``configs``: its config files (``config_names``)."""
    global _command
    names = None if configs is None else [Path(c).name for c in configs]
    before, _command = _command, (dict(settings), frozenset(changed), names)
    try:
        yield
    finally:
        _command = before


def typed_settings(argv: list[str] | None = None) -> dict | None:
    """Every config setting given on this command line, ``{id: value}`` (``--network_def::features`` as
    ``network_def#features``, values parsed as MONAI's runner parses them), with those of its ``--args_file`` under
    them, as MONAI merges them; or those of the ``command`` running. None where this process's command line is
    no workflow's and no ``command`` runs (a workflow built in Python): its settings are not known. For what a
    training run records of itself (``handlers.RunSettings``)."""
    from .overrides import parse_value

    if argv is None and _command is not None:
        return dict(_command[0])
    if argv is None and _monai_argument(sys.argv, "config_file") is None:
        return None  # a workflow built in Python (a notebook, a test): what was given is not known
    given = {_setting_id(key): parse_value(value) for key, value in _flags(sys.argv if argv is None else argv)}
    args_file = given.get("args_file")
    if isinstance(args_file, str):
        from monai.bundle import ConfigParser

        try:
            given = {**{_setting_id(k): v for k, v in ConfigParser.load_config_file(args_file).items()}, **given}
        except Exception:  # MONAI reports an unreadable args file itself
            pass
    return {key: value for key, value in given.items() if key not in MONAI_ARGUMENTS}


def config_names(argv: list[str] | None = None) -> list[str] | None:
    """The names of the config files this workflow was built from, in order (``train.json``, an overlay such as
    ``distill.json``): those of the ``command`` running, else of the command line's ``--config_file`` (or its
    ``--args_file``'s); None where not known (a workflow built in Python)."""
    if argv is None and _command is not None:
        return _command[2]
    value = _monai_argument(sys.argv if argv is None else argv, "config_file")
    if value is None:
        return None
    return [Path(f).name for f in _config_files(["--config_file", value])]


def settings_changed() -> frozenset[str]:
    """The settings the ``command`` running gives knowingly with other values than the resumed run's; none on
    ``python -m monai.bundle``'s command line, where a resumed run must be given its own (``handlers.RunSettings``)."""
    return frozenset() if _command is None else _command[1]


def _setting_id(key: str) -> str:
    """A command-line name as the config id MONAI reads: ``-`` as ``_`` (Fire's), ``::`` as ``#``."""
    return key.replace("-", "_").replace("::", "#")


def _monai_argument(argv: list[str], name: str) -> str | None:
    """An argument of a ``python -m monai.bundle`` command: on the command line, else in its ``--args_file``
    (JSON or YAML, which MONAI merges under the command line's)."""
    value = _argument(argv, f"--{name}")
    args_file = _argument(argv, "--args_file")
    if value is None and args_file:
        from monai.bundle import ConfigParser

        try:
            value = ConfigParser.load_config_file(args_file).get(name)
        except Exception:  # MONAI reports an unreadable args file itself
            return None
    return None if value is None else str(value)


def _config_files(argv: list[str]) -> list[str]:
    value = _argument(argv, "--config_file")
    if value is None:
        return []
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return [str(p) for p in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]


def own_folder(bundle: str | os.PathLike) -> dict[str, str]:
    """The settings that tell a bundle's configs where the bundle is, for a caller that knows (``nucleiseg``'s
    commands, the Python API): ``bundle_dir``, where its configs, registry and docs are, and ``bundle_root``, where
    its outputs go, the same folder until ``--bundle_root`` moves them."""
    folder = str(Path(bundle).resolve())
    return {"bundle_dir": folder, "bundle_root": folder}


def bundle_root(argv: list[str] | None = None) -> str:
    """The bundle folder of the first ``--config_file`` given, else the working directory."""
    files = _config_files(sys.argv if argv is None else argv)
    if files:
        config_dir = Path(files[0]).expanduser().resolve().parent
        return str(config_dir.parent if config_dir.name == "configs" else config_dir)
    return os.getcwd()


class _BundleFoldersOffPath(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: before each import looks at ``sys.path``, takes bundle folders off it."""

    def __init__(self):
        self.folders: set[str] = set()  # config folders named on the command line, as absolute paths

    def is_bundle(self, entry: str) -> bool:
        return os.path.abspath(entry) in self.folders or is_bundle_folder(entry or ".")

    def clean(self) -> None:
        sys.path[:] = [entry for entry in sys.path if not self.is_bundle(entry)]

    def find_spec(self, fullname, path=None, target=None):
        self.clean()
        return None  # the import itself is left to the finders after this one


def _finder() -> _BundleFoldersOffPath:
    for finder in sys.meta_path:
        if isinstance(finder, _BundleFoldersOffPath):
            return finder
    finder = _BundleFoldersOffPath()
    sys.meta_path.insert(0, finder)
    return finder


def guard(argv: list[str] | None = None) -> list[str]:
    """Keeps bundle folders off ``sys.path`` from now on and refuses (SystemExit, one line) a sealed bundle that
    no longer matches its manifest; returns the bundle folders it verified.

    The bundles are those of the ``--config_file`` arguments (not ``@bundle_root``, which ``--bundle_root`` moves
    to where outputs go, nor the working directory): the folders the configs are read from. A folder without a
    manifest is a working copy and is not verified. Without ``--config_file`` (``nucleiseg predict`` runs the
    workflow in-process), the caller has verified the bundle before reading its configs.
    """
    finder = _finder()
    files = _config_files(sys.argv if argv is None else argv)
    config_dirs = {Path(os.path.abspath(os.path.expanduser(f))).parent for f in files}
    roots = sorted({d.parent if d.name == "configs" else d for d in config_dirs})
    finder.folders |= {str(d) for d in config_dirs | set(roots)}
    finder.clean()
    for root in roots:
        try:
            check_bundle(root)
        except BundleIntegrityError as err:  # one line, no traceback: MONAI's runner would print one
            raise SystemExit(str(err)) from None
    return [str(root) for root in roots if (root / MANIFEST).is_file()]


def evaluation_dir(bundle_root: str | os.PathLike, checkpoint: str | os.PathLike, ckpt_dir: str | os.PathLike,
                   split: str) -> str:
    """Where an evaluation's report goes unless ``output_dir`` is given: the bundle's ``eval/<split>`` for its own
    weights; beside other weights (``--checkpoint``) otherwise, ``<run>/eval/<split>`` for ``<run>/models/model.pt``,
    so that a report of other weights never replaces the bundle's own."""
    weights = Path(checkpoint).expanduser().resolve()
    if weights == (Path(ckpt_dir) / "model.pt").expanduser().resolve():
        return str(Path(bundle_root) / "eval" / split)
    run = weights.parent.parent if weights.parent.name == "models" else weights.parent
    folder = run / "eval" / split
    if ("report", str(folder)) not in _said:
        _said.add(("report", str(folder)))
        logger.info("the report of %s goes beside those weights: %s", weights, folder)
    return str(folder)


def require_package(root: str | os.PathLike) -> None:
    """SystemExit (one line) where the bundle at ``root`` needs a newer nucleiseg-monai than this one: its metadata's
    ``required_packages_version`` names the release its configs were written for, and an older one fails on a
    setting it does not know, deep inside a config, with a traceback."""
    from . import __version__

    try:
        meta = json.loads((Path(root) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        needed = str(meta["required_packages_version"]["nucleiseg-monai"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no pin (or no readable metadata, which verification reports)
    have = _release(__version__)
    if have is not None and _release(needed) is not None and have < _release(needed):
        raise SystemExit(f"{root} needs nucleiseg-monai {needed} or newer (configs/metadata.json, "
                         f"required_packages_version); this is {__version__}: pip install -U nucleiseg-monai")


def _release(version: str) -> tuple[int, ...] | None:
    """(0, 2, 0) of "0.2.0" or "0.2.0.dev1"; None where the version is not numbered (a source tree: "0+unknown")."""
    parts = re.match(r"^(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in parts[1].split(".")) if parts and version[:2] != "0+" else None


def weights_stats_file(checkpoint: str | os.PathLike | None, stats_file: str | os.PathLike) -> str:
    """The channel statistics that go with the weights ``checkpoint``: the ``channel_stats.json`` in its folder
    where there is one (every training run writes it beside its model.pt), else the bundle's ``stats_file``.

    The configs of evaluation, tuning and inference normalise with this file, so ``--checkpoint`` (or
    ``checkpoint=FILE``) brings its own run's statistics. Statistics other than the bundle's are said in one log
    line; weights whose folder holds none get one warning that the bundle's are assumed."""
    if checkpoint is None:
        return str(stats_file)
    weights = Path(checkpoint).expanduser().resolve()
    own, beside = Path(stats_file).expanduser().resolve(), weights.parent / STATS_NAME
    if beside == own:  # the bundle's (or the run folder's) own weights and statistics
        return str(stats_file)
    key = (str(weights), str(beside if beside.is_file() else own))
    if beside.is_file():
        if key not in _said:
            logger.info("channel statistics %s, beside the weights %s (not the bundle's %s)", beside, weights, own)
        _said.add(key)
        return str(beside)
    if key not in _said:
        logger.warning("no %s beside the weights %s: normalising with the bundle's statistics %s, right only if "
                       "these weights were trained with them (put the run's %s beside its model.pt)",
                       STATS_NAME, weights, own, STATS_NAME)
    _said.add(key)
    return str(stats_file)


def export_stats(stats_file: str | os.PathLike, argv: list[str] | None = None) -> dict[str, list[float]]:
    """The channel statistics ``ckpt_export`` puts inside the exported network (export.json's ``export_stats``):
    those beside its ``--ckpt_file`` weights (``weights_stats_file``: a run's own ``channel_stats.json``; the
    bundle's, with a warning, where there is none), unless ``--stats_file`` is given. The file taken is said on
    stderr.

    ``ckpt_export`` does not show ``--ckpt_file`` to the config, so it is read from the command line or its
    ``--args_file``, as ``bundle_root`` reads ``--config_file``: otherwise another run's weights were exported with
    the bundle's statistics, silently, and the exported network saw every image shifted.
    """
    from .data import load_stats

    argv = sys.argv if argv is None else argv
    checkpoint = _monai_argument(argv, "ckpt_file")
    if checkpoint is not None and _monai_argument(argv, "stats_file") is None:
        stats_file = weights_stats_file(checkpoint, stats_file)
    # ckpt_export sets up no logging, so an INFO line would be lost; these statistics decide everything the exported
    # network sees, so the file is said on stderr whatever the logging
    print(f"nucleiseg-monai: the exported network normalises its input with {stats_file}", file=sys.stderr)
    return load_stats(stats_file)


def training_stats(datalist_stats: dict | None, stats_file: str | os.PathLike,
                   pretrained: str | os.PathLike | None = None, resume: bool | str = False) -> dict[str, list[float]]:
    """The channel statistics a training run normalises with (train.json's ``channel_stats``; the run writes them
    to its ``stats_file``, which validation, evaluation and inference then read).

    A resumed run keeps those it started with (its own ``stats_file``), whatever ``pretrained`` says. A new run
    started from ``pretrained`` weights keeps the statistics those weights learnt with, the ``channel_stats.json``
    beside them (one log line says so); where there is none, it takes the training tiles' (``datalist_stats``)
    with a warning that the start's are unknown. A run from scratch takes the training tiles'. A datalist without
    training tiles (None: one made for evaluation alone) is refused.
    """
    from .data import DataError, load_stats
    from .handlers import parse_bool, weights_path

    if datalist_stats is None:
        raise DataError("the datalist holds no training tiles (no source's split leaves any for training), so there "
                        "is nothing to train on; give a source training tiles in the sources file's split, or pass "
                        "--datalist_file with a datalist that has them")
    own = Path(stats_file)
    if parse_bool(resume, "resume"):
        if own.is_file():
            logger.info("resumed run: channel statistics %s, those it started with", own)
            return load_stats(own)
        logger.warning("resumed run without %s: normalising with the training tiles' statistics %s",
                       own, datalist_stats)
        return datalist_stats
    weights = weights_path(pretrained)
    if weights is None:
        return datalist_stats
    beside = weights.expanduser().parent / STATS_NAME
    if beside.is_file():
        stats = load_stats(beside)
        logger.info("channel statistics %s, beside the pretrained weights %s (not the training tiles' %s)",
                    beside, weights, datalist_stats)
        return stats
    logger.warning("no %s beside the pretrained weights %s: the statistics they learnt with are unknown; "
                   "normalising with the training tiles' %s", STATS_NAME, weights, datalist_stats)
    return datalist_stats
