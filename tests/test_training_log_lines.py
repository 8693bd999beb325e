"""What a training run logs as it starts and resumes, on MONAI's own trainer and evaluator with the
bundle's handlers, a one-weight network and four samples (two iterations an epoch)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, ValidationHandler

from nucleiseg_monai import handlers

torch.set_num_threads(1)

MISLEADING = "Engine run resuming from iteration 0, epoch 0 "


@pytest.fixture
def log(caplog):
    with caplog.at_level(logging.INFO):
        yield caplog


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
