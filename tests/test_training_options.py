"""benchmarks/training_options.py picks the weights a variant is scored with from its run folder: the best epoch's
model.pt, or the last epoch's network where no epoch beat the starting weights (kept in model.pt as epoch 0); and
it re-scores a report made with other weights."""

import json
import sys
from pathlib import Path

import torch

from nucleiseg_monai.packaging import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import training_options  # noqa: E402


def _run(tmp_path: Path, best_epoch: int, iteration: int, epoch_length: int = 50) -> Path:
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    network = {"w": torch.arange(4.0)}
    torch.save(network, models / "model.pt")
    torch.save({"network": {"w": torch.full((4,), 7.0)},
                "best_model": {"best_metric_epoch": best_epoch, "best_metric": 0.5},
                "trainer": {"iteration": iteration, "epoch_length": epoch_length}}, models / "checkpoint_last.pt")
    # a log that starts afresh on resume names another best epoch: the checkpoint's counts
    (tmp_path / "run" / "train.log").write_text("val_aji best value: 0.4 at epoch: 3\n")
    return tmp_path / "run"


def test_a_run_that_beat_its_start_is_scored_on_its_best_epoch(tmp_path):
    run = _run(tmp_path, best_epoch=12, iteration=800)
    assert training_options.trained_weights(run) == (run / "models" / "model.pt", 12, 12)


def test_a_run_that_never_beat_its_start_is_scored_on_its_last_epoch(tmp_path):
    run = _run(tmp_path, best_epoch=0, iteration=800)
    weights, epoch, best = training_options.trained_weights(run)
    assert (weights, epoch, best) == (run / "models" / "last.pt", 16, 0)
    assert torch.equal(torch.load(weights, weights_only=True)["w"], torch.full((4,), 7.0))


def test_a_report_of_other_weights_is_made_again(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    report = tmp_path / "metrics.json"
    assert not training_options.scored_with(report, weights)
    report.write_text(json.dumps({"made_with": {"weights_sha256": sha256_file(weights)}}))
    assert training_options.scored_with(report, weights)
    torch.save({"w": torch.ones(2)}, weights)
    assert not training_options.scored_with(report, weights)
