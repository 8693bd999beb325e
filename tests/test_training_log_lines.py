"""What a training run logs as it starts, resumes and is interrupted, on MONAI's own trainer and evaluator with the
bundle's handlers, a one-weight network and four samples (two iterations an epoch)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, ValidationHandler

from nucleiseg_monai import cli, handlers

torch.set_num_threads(1)

MISLEADING = "Engine run resuming from iteration 0, epoch 0 "


@pytest.fixture
def log(caplog):
    """caplog, also holding the records of MONAI's StatsHandler, whose logger does not propagate to the root."""
    stats = logging.getLogger(handlers.STATS_LOGGER)
    stats.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        yield caplog
    stats.removeHandler(caplog.handler)


def training(path: Path, epochs: int, resume: bool = False) -> tuple[SupervisedTrainer, SupervisedEvaluator]:
    """A trainer with train.json's handlers in its order: Resume, validation every epoch, then on rank 0
    LastCheckpoint before StatsHandler; its evaluator has a StatsHandler and the BestCheckpoint."""
    network = torch.nn.Linear(1, 1)
    loader = DataLoader([{"image": torch.ones(1), "label": torch.zeros(1)} for _ in range(4)], batch_size=2)
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=loader, network=network, val_handlers=[
        StatsHandler(iteration_log=False), handlers.BestCheckpoint(path.parent / "model.pt", network)])
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    objects = {"network": network, "optimizer": optimizer}
    trainer = SupervisedTrainer(device="cpu", max_epochs=epochs, train_data_loader=loader, network=network,
                                optimizer=optimizer, loss_function=torch.nn.MSELoss(), train_handlers=[
                                    handlers.Resume(path, objects, enabled=resume),
                                    ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
                                    handlers.LastCheckpoint(path, objects),
                                    StatsHandler(tag_name="train_loss", iteration_log=False)])
    return trainer, evaluator


def interrupt(engine: Engine, at: int) -> None:
    def pressed(_):
        raise KeyboardInterrupt  # as Ctrl-C raises it, wherever the run is

    engine.add_event_handler(Events.ITERATION_COMPLETED(once=at), pressed)


def errors(log) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]


def test_no_run_says_it_resumes_from_epoch_0_and_a_resume_says_where_it_goes_on(tmp_path, log):
    path = tmp_path / "checkpoint_last.pt"
    training(path, 1)[0].run()
    resumed, _ = training(path, 2, resume=True)
    resumed.run()
    assert resumed.state.epoch == 2
    trainer_said = [r.getMessage() for r in log.records if r.name == resumed.logger.name]
    assert not [line for line in trainer_said if line.startswith(MISLEADING)]
    assert f"resumed from {path} at epoch 1, iteration 2" in log.text
    # ignite's own resume of a run from where it stopped still says so
    log.clear()
    stopped, _ = training(tmp_path / "other.pt", 2)
    stopped.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())
    stopped.run()
    stopped.run()
    assert stopped.state.epoch == 2
    assert "Engine run resuming from iteration 2, epoch 1 until 2 epochs" in log.text


@pytest.mark.parametrize("where, saved, said", [
    ("training", 2, "interrupted (Ctrl-C) in epoch 2: {path} holds the run after epoch 1; run the same command with "
                    "--resume true to go on from there"),
    ("validation", 0, "interrupted (Ctrl-C) in epoch 1: {path} holds the run as it started, before its first epoch; "
                      "run the same command with --resume true to go on from there"),
])
def test_ctrl_c_ends_in_one_line_saying_what_the_checkpoint_holds(tmp_path, log, where, saved, said):
    path = tmp_path / "checkpoint_last.pt"
    trainer, evaluator = training(path, 3)
    if where == "training":
        interrupt(trainer, 3)  # the first iteration of epoch 2
    else:
        interrupt(evaluator, 1)  # epoch 1's validation, which comes before its checkpoint
    with pytest.raises(KeyboardInterrupt) as raised:
        trainer.run()
    assert errors(log) == []  # ignite's and StatsHandler's, of the evaluator and the trainer, said nothing
    assert [r.getMessage() for r in log.records if r.levelno == logging.WARNING] == [said.format(path=path)]
    assert handlers.interruption_said(raised.value)
    assert torch.load(path, weights_only=True)["trainer"]["iteration"] == saved


def test_ctrl_c_before_the_first_save_says_the_checkpoint_is_untouched(tmp_path, log, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    training(path, 1)[0].run()
    before = path.read_bytes()

    def loading(self, engine):
        raise KeyboardInterrupt

    monkeypatch.setattr(handlers.Resume, "__call__", loading)
    log.clear()
    with pytest.raises(KeyboardInterrupt):
        training(path, 2, resume=True)[0].run()
    assert errors(log) == []
    assert f"interrupted (Ctrl-C) before this run saved its state to {path}; run the same command again" in log.text
    assert path.read_bytes() == before


def test_other_exceptions_are_logged_as_before_and_raised(tmp_path, log):
    trainer, _ = training(tmp_path / "checkpoint_last.pt", 2)

    def fails(_):
        raise RuntimeError("out of memory")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run()
    # ignite's and StatsHandler's lines, once where the iteration failed and once where the run ends, as before
    assert errors(log) == ["Current run is terminating due to exception: out of memory", "Exception: out of memory",
                           "Engine run is terminating due to exception: out of memory", "Exception: out of memory"]
    assert "Ctrl-C" not in log.text


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_a_checkpoint_alone_on_an_engine_lets_every_exception_through(tmp_path, raised):
    engine = Engine(lambda engine, batch: None)
    handlers.LastCheckpoint(tmp_path / "checkpoint_last.pt", {}).attach(engine)

    def fails(_):
        raise raised()

    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), fails)
    with pytest.raises(raised):  # an EXCEPTION_RAISED handler that returned would end the run as if it had finished
        engine.run([0, 1], max_epochs=2)


INTERRUPTED = KeyboardInterrupt()
setattr(INTERRUPTED, handlers.SAID, True)


@pytest.mark.parametrize("raised, said", [
    (INTERRUPTED, []),  # LastCheckpoint's line is the one
    (KeyboardInterrupt(), ["interrupted before training started: nothing was trained; run the same command again"]),
], ids=["in-training", "before-training"])
def test_nucleiseg_train_adds_no_line_to_that_of_an_interrupted_training(monkeypatch, caplog, raised, said):
    def interrupted(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--bundle", "b"]) == 130
    assert [r.getMessage() for r in caplog.records] == said


def test_ctrl_c_during_an_evaluation_leaves_no_empty_error_lines(tmp_path, log):
    from nucleiseg_monai.evaluation import EvaluationReport

    network = torch.nn.Linear(1, 1)
    loader = DataLoader([{"image": torch.ones(1), "label": torch.zeros(1)} for _ in range(4)], batch_size=2)
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=loader, network=network, val_handlers=[
        StatsHandler(iteration_log=False), EvaluationReport(tmp_path / "report")])

    def pressed(_):
        raise KeyboardInterrupt

    evaluator.add_event_handler(Events.ITERATION_STARTED(once=1), pressed)  # before the report reads a batch
    with pytest.raises(KeyboardInterrupt):
        evaluator.run()
    assert errors(log) == []
