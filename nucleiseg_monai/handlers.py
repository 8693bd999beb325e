"""Ignite handlers the bundle configs attach to MONAI's engines: atomic checkpoints, resume, a progress bar.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving leaves a truncated
checkpoint; these handlers write to a temporary file and rename it, and the training state can always resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LRScheduler

from .atomic import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "none", "")


def parse_bool(value: bool | int | str | None, setting: str, spelling: str = "--{key} {value}") -> bool:
    """A boolean setting that may arrive as a string from the command line (``--resume false`` is 'false',
    which Python would call true). ``spelling``: how the setting is typed, for the message."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{spelling.format(key=setting, value=repr(value))} is not a boolean; use "
                     f"{spelling.format(key=setting, value='true')} or {spelling.format(key=setting, value='false')}")


def weights_path(path: str | os.PathLike | None) -> Path | None:
    """A weights setting (``--pretrained``) as a path; None where it names none (null, "", "none" typed on the
    command line)."""
    return None if path in (None, "", "None", "none", "null") else Path(path)


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save through ``atomic.atomic_path``: readers never see half a checkpoint, and a failed save (disk full)
    leaves neither a partial file nor a checkpoint-sized temporary one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def _state(objects: dict) -> dict:
    return {name: obj.state_dict() for name, obj in objects.items()}


def _not_resuming_from_start(record: logging.LogRecord) -> bool:
    # ignite calls a run "resuming" whenever the engine's state has max_epochs, which MONAI's workflows set when they
    # are built: every run said "resuming from iteration 0, epoch 0", before Resume had loaded where it goes on
    return not record.getMessage().startswith("Engine run resuming from iteration 0, epoch 0 ")


def _not_empty_on_interrupt(record: logging.LogRecord) -> bool:
    # str(KeyboardInterrupt()) is '', so on Ctrl-C ignite's "Engine run is terminating due to exception: " and MONAI
    # StatsHandler's "Exception: " are ERROR lines that say nothing; LastCheckpoint says what the run left instead.
    # Both are logged while ignite handles the exception: sys.exc_info() holds it (the CLI strips record.exc_info)
    return not (record.levelno >= logging.ERROR and record.getMessage().endswith(": ")
                and isinstance(sys.exc_info()[1], KeyboardInterrupt))


STATS_LOGGER = "monai.handlers.StatsHandler"  # MONAI StatsHandler's own logger, shared by the trainer's and evaluator's


def quiet_interrupts(engine: Engine) -> None:
    """No empty ERROR lines from ``engine`` and MONAI's StatsHandlers on Ctrl-C (the filters are added once)."""
    for log in (engine.logger, logging.getLogger(STATS_LOGGER)):
        log.addFilter(_not_empty_on_interrupt)


SAID = "_nucleiseg_said"  # set on a KeyboardInterrupt whose line LastCheckpoint has logged


def interruption_said(err: BaseException) -> bool:
    """Whether a ``LastCheckpoint`` has logged what the Ctrl-C ``err`` left and how to go on."""
    return bool(getattr(err, SAID, False))


def _handled_after(engine: Engine, handler) -> bool:
    """Whether another EXCEPTION_RAISED handler follows ``handler`` on ``engine``. Ignite raises an exception again
    only where no such handler is attached, and has no public way to list them."""
    handlers = [h for h, _, _ in getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED, [])]
    return bool(handlers) and handlers[-1] != handler


class LastCheckpoint:
    """Saves the whole training state (network, optimizer, scheduler, trainer counters) when training starts and
    after every epoch.

    A killed run therefore loses at most the epoch in progress; ``Resume`` picks the file up again. Saved at the
    start too (attach it after ``ValidateStart`` and ``Resume``), a run killed in its first epoch can be resumed:
    otherwise a fine-tune's model.pt, written by its validation as epoch 0, would be the only file, which a new run
    refuses to replace and a resumed one cannot start from. The engine it is attached to is saved as "trainer" (a
    config cannot name the trainer inside the trainer's own handlers).

    On Ctrl-C it says, in one line, which epoch the file holds and how to go on, in place of the empty ERROR lines
    of ignite and MONAI's StatsHandler. Attach it before StatsHandler (train.json does): ignite calls the handlers
    of an exception in the order attached, and StatsHandler's raises it again, which ends them.
    """

    def __init__(self, path: str | os.PathLike, save_dict: dict, interval: int = 1):
        self.path, self.save_dict, self.interval = Path(path), dict(save_dict), interval
        self.saved_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.interrupted)
        quiet_interrupts(engine)

    def __call__(self, engine: Engine) -> None:
        save_atomic(_state(self.save_dict), self.path)
        self.saved_epoch = engine.state.epoch

    def interrupted(self, engine: Engine, err: BaseException) -> None:
        """Ctrl-C: one line, and the KeyboardInterrupt raised again. Other exceptions are left to the handlers after
        this one (StatsHandler logs and raises them, as before), or raised again where none follows."""
        if not isinstance(err, KeyboardInterrupt):
            if not _handled_after(engine, self.interrupted):  # else ignite would end the run as if nothing happened
                raise err
            return
        epoch, saved = engine.state.epoch, self.saved_epoch
        if saved is None:  # in a handler of the start that runs before the first save (a resume's loading)
            logger.warning("interrupted (Ctrl-C) before this run saved its state to %s; run the same command again",
                           self.path)
        else:
            when = f"in epoch {epoch}" if epoch > saved else f"after epoch {epoch}"
            kept = f"after epoch {saved}" if saved else "as it started, before its first epoch"
            logger.warning("interrupted (Ctrl-C) %s: %s holds the run %s; run the same command with --resume true to "
                           "go on from there", when, self.path, kept)
        setattr(err, SAID, True)
        raise err


class BestCheckpoint:
    """Saves the network's weights whenever the evaluator's key metric improves (the bundle's ``model.pt``).

    Its state (the evaluator's best metric and epoch) belongs in the training checkpoint: a resumed run then
    replaces ``model.pt`` only when it beats the best of the run it continues, not at its first validation.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module):
        self.path, self.network = Path(path), network
        self.engine: Engine | None = None
        self._loaded: dict | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.COMPLETED, self)
        quiet_interrupts(engine)  # a Ctrl-C during validation ends the evaluator's run first, then the trainer's
        self._apply()

    def state_dict(self) -> dict:
        if self.engine is None:  # ranks > 0 of a distributed run hold no evaluator; -1 is MONAI's "none yet"
            return dict(self._loaded or {"best_metric": -1.0, "best_metric_epoch": -1})
        return {"best_metric": float(self.engine.state.best_metric),
                "best_metric_epoch": int(self.engine.state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = {"best_metric": float(state["best_metric"]), "best_metric_epoch": int(state["best_metric_epoch"])}
        self._apply()

    def _apply(self) -> None:
        if self.engine is not None and self._loaded is not None:
            self.engine.state.best_metric = self._loaded["best_metric"]
            self.engine.state.best_metric_epoch = self._loaded["best_metric_epoch"]

    def __call__(self, engine: Engine) -> None:
        # MONAI's evaluators run with the trainer's epoch and keep the epoch of the best key metric: save when it is now
        epoch = engine.state.epoch
        if engine.state.best_metric_epoch == epoch:
            save_atomic(self.network.state_dict(), self.path)
            logger.info("epoch %d: best %s %.4f, saved %s", epoch, engine.state.key_metric_name,
                        engine.state.best_metric, self.path)


class TrainingSummary:
    """One line when training completes: the best validation score, its epoch and where its weights are
    (``best``: the run's ``BestCheckpoint``), which ignite's own last line does not say."""

    def __init__(self, best: BestCheckpoint):
        self.best = best

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        best, evaluator = self.best.state_dict(), self.best.engine
        if best["best_metric_epoch"] < 0:  # -1: MONAI's "never validated"
            logger.info("training finished at epoch %d without a validation: no model.pt was written",
                        engine.state.epoch)
            return
        name = getattr(getattr(evaluator, "state", None), "key_metric_name", None) or "metric"
        start = " (the starting weights)" if best["best_metric_epoch"] == 0 else ""
        logger.info("training finished at epoch %d: best validation %s %.4f at epoch %d%s, its weights in %s",
                    engine.state.epoch, name, best["best_metric"], best["best_metric_epoch"], start, self.best.path)


class EarlyStopState:
    """Early stopping's patience counter and best score, for the training checkpoint: without them a resumed run
    started its patience afresh. ``handler`` is MONAI's ``EarlyStopHandler``; where it has no trainer (a multi-GPU
    run, which does not stop early) there is nothing to keep."""

    def __init__(self, handler):
        self.handler = handler

    def state_dict(self) -> dict:
        inner = getattr(self.handler, "_handler", None)
        return dict(inner.state_dict()) if inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        inner = getattr(self.handler, "_handler", None)
        if inner is not None and state:
            inner.load_state_dict(state)


# settings a training run does not record: where the run is, whether it starts or goes on, what a new run starts
# from, the lengths Resume has rules of its own for, and the machine it runs on; not what it trains
NOT_RECORDED = frozenset({"bundle_root", "bundle_dir", "ckpt_dir", "output_dir", "resume", "overwrite", "pretrained",
                          "epochs", "epoch_length", "device", "num_workers"})


class ResumeSettingsError(ValueError):
    """A resumed run given other settings than those it was started with, where they cannot be restored."""


def as_typed(value) -> str:
    """A setting's value as a command line takes it: booleans and None as words, lists as Python literals, quoted
    for the shell where it needs it."""
    import shlex

    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return shlex.quote(value if isinstance(value, str) else repr(value))


def as_flags(settings: dict) -> str:
    return " ".join(f"--{key} {as_typed(value)}" for key, value in settings.items())


def same_setting(a, b) -> bool:
    """Whether two values of a setting are the same as a config takes them: ``true`` typed on MONAI's command line is
    the word, ``nucleiseg train`` makes it True; a tuple is a list."""
    def plain(value):
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(a) == plain(b)


# settings that name files or folders: recorded as absolute paths, since a run may be resumed from another folder
PATH_SETTINGS = frozenset({"data_root", "dataset_dir", "sources_file", "datalist_file", "stats_file",
                           "hard_examples_dir", "teacher"})


def recordable(key: str, value):
    """A setting's value as a run records it: plain JSON (``weights_only`` loads refuse other objects, such as a
    ``Path``, and the whole state with them), and a path setting's relative path made absolute."""
    value = json.loads(json.dumps(value, default=str))
    if key in PATH_SETTINGS and isinstance(value, str) and value and not value.startswith(("$", "@", "%")):
        value = os.path.abspath(os.path.expanduser(value))
    return value


def run_record(path: str | os.PathLike) -> dict | None:
    """What a training state records of its run's start (``RunSettings``: ``given``, ``configs``); None where it
    records nothing (written before it was kept), is no file, or cannot be read (``Resume`` names why as it
    loads)."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the record, not every tensor
    except RuntimeError:  # a file of torch's legacy format cannot be mapped: read whole, as Resume reads it
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
    except Exception:
        return None
    record = state.get("settings") if isinstance(state, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("given"), dict) else None


def config_mismatch(path: str | os.PathLike, recorded: list[str] | None, now: list[str] | None) -> None:
    """ResumeSettingsError where the run whose state is ``path`` was built from other config files than this
    command's (an overlay such as distill.json left out, or added): its settings would land in another workflow."""
    if recorded is None or now is None or list(recorded) == list(now):
        return
    raise ResumeSettingsError(
        f"{path} is the state of a run built from {', '.join(recorded)}, and this command builds "
        f"{', '.join(now) or 'none'}: resume it from the same config files (python -m monai.bundle run training "
        "--config_file \"['.../train.json', ...]\" --resume true, as it was started), or start afresh without "
        "--resume, with --overwrite true"
    )


class RunSettings:
    """The settings a training run was given on its command line (``given``: ``bundle.typed_settings``, less
    ``NOT_RECORDED``), kept in its checkpoint_last.pt so a resumed run goes on with them.

    ``nucleiseg train --resume true`` gives a run its own again (``cli``); on ``python -m monai.bundle``'s command
    line the config is built before any handler runs, so ``check`` refuses a resume whose settings differ from the
    run's, naming what to add. ``changed``: settings given knowingly with other values (``nucleiseg train`` warned
    of each), which are not refused. A resumed run records its own settings with this command's over them.
    """

    def __init__(self, given: dict | None = None, changed=(), configs: list[str] | None = None):
        # None: not known (a workflow built in Python), so neither recorded nor compared
        self.given = None if given is None else {k: recordable(k, v) for k, v in given.items()
                                                 if k not in NOT_RECORDED}
        self.changed = set(changed)
        self.configs = None if configs is None else [str(c) for c in configs]

    def state_dict(self) -> dict:
        return {"given": None if self.given is None else dict(self.given), "configs": self.configs}

    def load_state_dict(self, state: dict) -> None:
        recorded = {k: v for k, v in (state.get("given") or {}).items() if k not in NOT_RECORDED}
        self.given = recorded if self.given is None else {**recorded, **self.given}
        self.configs = self.configs if self.configs is not None else state.get("configs")

    def check(self, path: Path) -> None:
        """ResumeSettingsError where the run whose state is ``path`` was built from other config files, or started
        with settings this command does not give as they were."""
        record = run_record(path)
        if record is not None:
            config_mismatch(path, record.get("configs"), self.configs)
        recorded = None if record is None else dict(record["given"])
        if not recorded:
            return
        if self.given is None:
            logger.info("the settings of this resumed run were not compared with those %s records: its workflow was "
                        "built in Python (run it inside nucleiseg_monai.bundle.command(settings) to compare them)",
                        path)
            return
        differ = {key: value for key, value in recorded.items() if key not in NOT_RECORDED | self.changed
                  and not (key in self.given and same_setting(value, self.given[key]))}
        if not differ:
            return
        missing = {key: value for key, value in differ.items() if key not in self.given}
        said = [f"{as_flags(missing)} not given now (the config's defaults would replace them)"] if missing else []
        said += [f"--{key} {as_typed(self.given[key])} given for the run's {as_typed(value)}"
                 for key, value in differ.items() if key not in missing]
        said = "; ".join(said)
        raise ResumeSettingsError(
            f"{path} is the state of a run started with other settings than this command's: {said}; give "
            f"{as_flags(differ)} to go on as it started (nucleiseg train --resume true gives a run its own settings), "
            "or start afresh without --resume, with --overwrite true"
        )


class Resume:
    """With ``enabled``, loads the last checkpoint into the objects before the first epoch.

    Ignite then continues from the stored epoch and iteration; optimizer and scheduler continue where they were,
    the schedule stretched to the new length when more epochs are asked for than the checkpoint's run had.
    Without a checkpoint the run fails at once, naming the file, rather than silently starting again. The engine
    it is attached to is loaded as "trainer".

    With ``seed`` (the run's), the random generators are seeded again from it and the iteration resumed at: the
    run's start seeded them with ``seed`` alone, so a resumed run would draw the patches and augmentations of its
    first epochs again. The draws go on as a new stream, the same for every resume from one checkpoint; the state
    of data-loading workers cannot be saved, so they are not those an uninterrupted run would have drawn.

    ``given``: the settings of ``epochs`` and ``epoch_length`` the user typed (``bundle.typed``); None: all. A
    resumed run is lengthened only to ``epochs`` typed, never to the config's default: resuming a 10-epoch run
    without ``--epochs`` would otherwise train 90, the schedule stretched to them, without a word.
    """

    def __init__(self, path: str | os.PathLike, load_dict: dict, enabled: bool | str = True, map_location=None,
                 seed: int | str | None = None, given: list[str] | None = None):
        self.path, self.load_dict, self.map_location = Path(path), dict(load_dict), map_location
        self.enabled = parse_bool(enabled, "resume")
        self.seed = None if seed is None else int(seed)
        self.given = None if given is None else set(given)

    def attach(self, engine: Engine) -> None:
        self.load_dict["trainer"] = engine
        engine.logger.addFilter(_not_resuming_from_start)  # the line after loading says where the run goes on
        quiet_interrupts(engine)  # every rank's trainer: rank 0's LastCheckpoint says what a Ctrl-C left
        if not self.enabled:
            if self.path.exists() and not _rank():  # another rank may have written this run's own already
                logger.warning("starting a new run; %s will be overwritten (pass --resume true to continue it)", self.path)
            return
        if not self.path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.path}; run without --resume to start training")
        for obj in self.load_dict.values():
            if isinstance(obj, RunSettings):  # before anything is written or trained
                obj.check(self.path)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        checkpoint = torch.load(self.path, map_location=self.map_location or "cpu", weights_only=True)
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        run_epochs = checkpoint.get("trainer", {}).get("max_epochs") or 0
        if self.given is not None and "epochs" not in self.given and (max_epochs or 0) > run_epochs:
            logger.info("the resumed run in %s keeps its %d epochs; pass --epochs N to lengthen it", self.path,
                        run_epochs)
            max_epochs = run_epochs  # the trainer's state, loaded below, holds the run's own
        if self.given is not None and "epoch_length" not in self.given:
            epoch_length = None  # the config's default, not asked for: the run's own is kept without a word
        longer = (max_epochs or 0) > run_epochs
        if longer:
            logger.warning("the resumed run in %s is lengthened from %d to %d epochs (--epochs), its learning-rate "
                           "schedule stretched to them", self.path, run_epochs, max_epochs)
        for name, obj in self.load_dict.items():
            if name not in checkpoint and isinstance(obj, BestCheckpoint):
                # checkpoints written before the best metric was saved with them
                logger.warning("%s holds no %r state: the first validation will replace model.pt", self.path, name)
                continue
            if name not in checkpoint and isinstance(obj, EarlyStopState):  # written before it was saved
                logger.warning("%s holds no %r state: early stopping's patience starts again", self.path, name)
                continue
            if name not in checkpoint and isinstance(obj, RunSettings):  # written before they were kept
                logger.info("%s does not record the settings its run was started with (it was written before they "
                            "were kept): it goes on with this command's, recorded from now on", self.path)
                continue
            if name not in checkpoint:
                raise KeyError(f"{self.path} holds no {name!r} state (it has {sorted(checkpoint)}); it was written "
                               "by another configuration: resume with that one, or start anew without --resume")
            if isinstance(obj, LRScheduler) and longer:
                _stretch_schedule(obj, checkpoint[name])
            else:
                obj.load_state_dict(checkpoint[name])
        # a resumed run may be asked for more epochs than it first had
        engine.state.max_epochs = max(max_epochs or 0, engine.state.max_epochs or 0)
        logger.info("resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)
        _say_settings_kept(self.path, max_epochs, epoch_length, engine.state)
        if self.seed is not None:
            _reseed(engine, self.seed, engine.state.iteration)
        if engine.state.epoch >= engine.state.max_epochs:  # ignite would end at once, without a word
            logger.warning("%s has finished its %d epochs: nothing to train; pass --epochs N with N above %d to go "
                           "on", self.path, engine.state.epoch, engine.state.epoch)


class BeginRun:
    """Writes a training run's own files into its folder when training starts, on rank 0 alone: with ``overwrite``
    (not ``resume``) it first removes the folder's ``model.pt`` and ``checkpoint_last.pt``, those of the run this
    one replaces (never the ``pretrained`` file itself); then it writes the channel statistics the run normalises
    with (``stats_file``) and the datalist it uses, with what its weights start from (``sources.record_start``).

    Not before: the datalist, the cached tiles and the pretrained weights have all been read by then, so a mistake
    in any of them leaves the earlier run whole, its statistics and datalist included. Not later: a run from scratch
    writes model.pt only at its first validation, so one killed before it would leave the earlier run's weights
    beside its own state, and ``predict`` would take them for this run's. Attach it after ``InitialWeights`` and
    before ``ValidateStart``, which writes the new model.pt; only rank 0 writes, so no rank removes what rank 0 has
    just written.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, stats_file: str | os.PathLike, channel_stats: dict,
                 datalist: dict, overwrite: bool | str = False, resume: bool | str = False,
                 pretrained: str | os.PathLike | None = None):
        self.ckpt_dir, self.stats_file, self.channel_stats, self.datalist = ckpt_dir, stats_file, channel_stats, datalist
        self.resume = parse_bool(resume, "resume")
        self.replace = parse_bool(overwrite, "overwrite") and not self.resume
        self.pretrained = pretrained

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        from .sources import record_start

        if _rank():
            return
        start = weights_path(self.pretrained)
        for old in (Path(self.ckpt_dir) / "checkpoint_last.pt", Path(self.ckpt_dir) / "model.pt"):
            if self.replace and old.is_file() and not (start is not None and start.is_file() and old.samefile(start)):
                old.unlink()
                logger.info("removed %s, left by the run that --overwrite replaces", old)
        write_json_atomic(self.channel_stats, self.stats_file)
        record_start(self.datalist, self.ckpt_dir, self.pretrained, self.resume)


class InitialWeights:
    """Starts a new run from another model's weights (``path``; None: from scratch).

    Tensors whose shapes differ (a head widened from 3 to 4 outputs) keep the new network's values where the
    checkpoint has none and take the checkpoint's where it has them, so a 3-class model starts a 4-output one
    with its classes intact and a fresh distance channel. A resumed run ignores it: the run's own checkpoint
    already holds the network.
    """

    def __init__(self, path: str | os.PathLike | None, network: torch.nn.Module, resume: bool | str = False):
        self.path = weights_path(path)
        self.network, self.resume = network, parse_bool(resume, "resume")

    def attach(self, engine: Engine) -> None:
        if self.path is None or self.resume:
            return
        if not self.path.is_file():
            raise FileNotFoundError(f"--pretrained: no weights at {self.path}; give a model.pt or leave it null")
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        loaded = torch.load(self.path, map_location="cpu", weights_only=True)
        state = self.network.state_dict()
        unknown = sorted(set(loaded) - set(state))
        if unknown:
            raise KeyError(f"{self.path} is not weights of this network: it has {unknown[:3]}... that it lacks")
        widened = []
        for name, value in loaded.items():
            mine = state[name]
            if value.shape != mine.shape:
                if value.ndim != mine.ndim or any(a > b for a, b in zip(value.shape, mine.shape)):
                    raise ValueError(f"{self.path}: {name} is {tuple(value.shape)}, cannot start "
                                     f"{tuple(mine.shape)} from it")
                widened.append(name)
                grown = mine.clone()
                grown[tuple(slice(0, n) for n in value.shape)] = value
                value = grown
            state[name] = value
        self.network.load_state_dict(state)
        logger.info("started from %s (%d tensors; widened: %s)", self.path, len(loaded), widened or "none")


def _rank() -> int:
    """This process's rank in a multi-GPU run; 0 outside one."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _say_settings_kept(path: Path, asked_epochs: int | None, asked_length: int | None, state) -> None:
    """Warns where a resumed run keeps its checkpoint's length rather than the one asked for: fewer epochs than the
    run had (its schedule spans its own), or another epoch length (iterations are counted in the run's)."""
    if asked_epochs and asked_epochs < state.max_epochs:
        logger.warning("--epochs %d is fewer than the %d of the run in %s: it goes on to epoch %d, as its "
                       "learning-rate schedule does; start a new run for a shorter one", asked_epochs,
                       state.max_epochs, path, state.max_epochs)
    if asked_length and state.epoch_length and asked_length != state.epoch_length:
        logger.warning("--epoch_length %d differs from the %d of the run in %s: a resumed run keeps its own; start "
                       "a new run for another", asked_length, state.epoch_length, path)


def _reseed(engine: Engine, seed: int, iteration: int) -> None:
    """Seeds every generator training draws from (Python's, numpy's, torch's, the dataset's transforms in this
    process; workers take theirs from torch's when they start) from ``seed`` and ``iteration`` together."""
    import numpy as np
    from monai.data.utils import set_rnd
    from monai.utils import set_determinism

    derived = int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])
    set_determinism(seed=derived)
    dataset = getattr(getattr(engine.state, "dataloader", None), "dataset", None)
    if dataset is not None:
        set_rnd(dataset, derived)


def _stretch_schedule(scheduler: LRScheduler, state: dict) -> None:
    """For a run resumed with more epochs: the saved position in the schedule, the config's shape of it.

    A cosine schedule's T_max is ``--epochs``; the saved T_max would cycle the learning rate back up to its maximum
    after the first run's last epoch. Schedulers without a closed form are restored as saved. The optimizer must be
    loaded first: it holds the learning rate set here.
    """
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is None:
        scheduler.load_state_dict(state)
        return
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": state["last_epoch"],
                               "_step_count": state.get("_step_count", state["last_epoch"] + 1)})
    for group, lr in zip(scheduler.optimizer.param_groups, closed_form()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class ProgressBar:
    """A tqdm bar over each epoch's iterations showing the running loss."""

    def __init__(self, output_key: str = "loss"):
        self.output_key = output_key

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        def loss(output):
            out = output[0] if isinstance(output, list) else output
            value = float(out[self.output_key])
            return {self.output_key: value if math.isfinite(value) else float("nan")}

        IgniteProgressBar(persist=False).attach(engine, output_transform=loss)


class LearningRateLogger:
    """Writes each parameter group's learning rate to TensorBoard after every epoch (MONAI's handlers only print it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, log_dir: str | os.PathLike, tag: str = "learning_rate"):
        self.optimizer, self.log_dir, self.tag = optimizer, str(log_dir), tag
        self.writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.writer is not None and self.writer.close())

    def __call__(self, engine: Engine) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        for i, group in enumerate(self.optimizer.param_groups):
            self.writer.add_scalar(self.tag if i == 0 else f"{self.tag}_{i}", group["lr"], engine.state.epoch)
        self.writer.flush()


def check_new_run(ckpt_dir: str | os.PathLike, resume: bool | str, overwrite: bool | str,
                  bundle_dir: str | os.PathLike | None = None) -> None:
    """Refuses a new training run whose folder already holds trained weights, before anything is trained.

    A run writes model.pt at its first validation; without this, a second run in a bundle folder would quietly
    replace the weights it ships with. With ``overwrite`` they stay until training starts (``BeginRun``).
    ``bundle_dir``: the bundle's folder, whose own ``models/`` holds the weights it ships with: there the refusal
    sends the user to a folder of their own, not to ``--overwrite``.
    """
    resume, overwrite = parse_bool(resume, "resume"), parse_bool(overwrite, "overwrite")
    if resume or overwrite:
        return
    model, state = Path(ckpt_dir) / "model.pt", Path(ckpt_dir) / "checkpoint_last.pt"
    if not model.exists() and state.exists() and _iteration(state) == 0:  # saved at the start, killed before epoch 1
        raise FileExistsError(
            f"{state} holds the state of a run stopped before its first epoch ended; continue it with --resume true, "
            "or start again with --overwrite true"
        )
    existing = [p for p in (model, state) if p.exists()]
    shipped = bundle_dir is not None and _same_folder(ckpt_dir, Path(bundle_dir) / "models")
    if existing and shipped and not state.exists():  # no run was trained here: these are the bundle's own
        raise FileExistsError(
            f"{model} holds trained weights, those the bundle {bundle_dir} ships with; train into a folder of your "
            f"own with --bundle_root runs/NAME (--pretrained {model} starts from them); --overwrite true would "
            "replace the bundle's own weights"
        )
    if existing:
        raise FileExistsError(
            f"{existing[0]} holds trained weights from an earlier run; train into a folder of your own with "
            "--bundle_root runs/NAME, continue that run with --resume true, or replace it with --overwrite true"
        )


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _iteration(checkpoint: Path) -> int | None:
    """The trainer iteration a training state was saved at; None where it cannot be read."""
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["trainer"]["iteration"])
    except Exception:  # unreadable or of another layout: the general refusal says what to do
        return None


class ValidateAtEnd:
    """Validates once more when training completes on an epoch that the validation interval skipped, so the last
    weights are always scored (and kept as model.pt if they are the best)."""

    def __init__(self, validator, interval: int):
        self.validator, self.interval = validator, int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self.validator.run(engine.state.epoch)


class FreezeBatchNorm:
    """Keeps every batch norm of ``network`` normalising with its running statistics while the network trains,
    and no batch updates them: they stay those of the weights training started from, while the convolutions and
    the batch norms' own scale and shift learn. For fine-tuning good weights: otherwise the statistics are measured
    again on augmented training patches, which lowered the shipped weights' validation AJI when done alone
    (``scripts/recalibrate_bn.py``)."""

    def __init__(self, network: torch.nn.Module, enabled: bool | str = False,
                 pretrained: str | os.PathLike | None = None, resume: bool | str = False):
        self.network, self.enabled = network, parse_bool(enabled, "freeze_batch_norm")
        if self.enabled and weights_path(pretrained) is None and not parse_bool(resume, "resume"):
            raise ValueError("--freeze_batch_norm true keeps the statistics of the weights training starts from, and a "
                             "run from scratch has none (it would normalise nothing); give --pretrained WEIGHTS, or "
                             "leave --freeze_batch_norm false")

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        norms = [m for m in self.network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for module in norms:
            module.register_forward_pre_hook(_eval_mode)  # the trainer calls network.train() every iteration
        logger.info("batch norm frozen: %d layers keep their running statistics", len(norms))


def _eval_mode(module: torch.nn.Module, args) -> None:
    module.training = False


class ValidateStart:
    """Validates a new run's starting weights (``pretrained``) once before the first epoch, as epoch 0, so the
    best-metric checkpoint keeps them as model.pt when no later epoch beats them. Attach it after
    ``InitialWeights``: both run when the trainer starts, in the order attached.

    A run from scratch (no ``pretrained``) and a resumed run (its model.pt and best metric are its own) skip it.
    The random number generators are put back as they were, so training draws what it would have drawn unvalidated.
    """

    def __init__(self, validator, pretrained: str | os.PathLike | None, resume: bool | str = False):
        self.validator = validator
        self.enabled = weights_path(pretrained) is not None and not parse_bool(resume, "resume")

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        import random

        import numpy as np

        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        logger.info("validating the pretrained weights before the first epoch (as epoch 0)")
        self.validator.run(0)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class ValidationImages:
    """TensorBoard pictures of the first validation tile each time the evaluator runs: the H&E input as it looks
    (the z-score undone), the true classes and the predicted classes, under readable tags.

    Classes are drawn as everywhere else in this project: truth green, prediction yellow, nucleus rims white.
    """

    def __init__(self, log_dir: str | os.PathLike, mean, std, tag: str = "validation"):
        self.log_dir, self.tag = str(log_dir), tag
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._remember)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _remember(self, engine: Engine) -> None:
        item, out = engine.state.batch[0], engine.state.output[0]
        self._image = (torch.as_tensor(item["image"]).float().cpu() * self.std + self.mean).clamp(0, 255) / 255
        self._truth = torch.as_tensor(item["label"]).cpu()[0]
        self._pred = torch.as_tensor(out["pred"]).float().cpu()[:3].argmax(0)  # the classes, not the maps after them

    @staticmethod
    def _classes(classes: torch.Tensor, colour) -> torch.Tensor:
        picture = torch.zeros(3, *classes.shape)
        for channel, value in enumerate(colour):
            picture[channel][classes == 1] = value / 255
        picture[:, classes == 2] = 1.0
        return picture

    def __call__(self, engine: Engine) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from .outputs import PREDICTION_COLOUR, TRUTH_COLOUR

        if not hasattr(self, "_image"):
            return
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        step = engine.state.epoch
        self._writer.add_image(f"{self.tag}/H&E input", self._image, step)
        self._writer.add_image(f"{self.tag}/true classes (green: nucleus, white: rim)",
                               self._classes(self._truth, TRUTH_COLOUR), step)
        self._writer.add_image(f"{self.tag}/predicted classes (yellow: nucleus, white: rim)",
                               self._classes(self._pred, PREDICTION_COLOUR), step)
        self._writer.flush()
