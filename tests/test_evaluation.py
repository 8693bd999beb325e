"""The evaluation report (``evaluation.EvaluationReport``) without a network: each source's section is named by the
part its tiles come from, so validation tiles scored in a test evaluation are never called test tiles."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from nucleiseg_monai.evaluation import EvaluationReport
from nucleiseg_monai.synthetic import make_tile


def _engine(tmp_path, tiles: list[tuple[str, str, str]]):
    """An engine-like state holding one tile per (source, part, name): prediction = truth."""
    batch, output = [], []
    for i, (source, part, name) in enumerate(tiles):
        image, labels = make_tile(64, seed=i)
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, image)
        record = {"name": name, "organ": "organ", "source": source, "image_path": str(path)}
        if part is not None:
            record["part"] = part
        batch.append(record)
        output.append({"pred_inst": labels[None], "true_inst": labels[None], "pred_cc": (labels > 0)[None]})
    return SimpleNamespace(state=SimpleNamespace(batch=batch, output=output, epoch=1))


def test_a_source_without_test_tiles_is_reported_under_its_own_part(tmp_path, caplog):
    report = EvaluationReport(tmp_path / "eval" / "test", split="test")
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.evaluation")
    report.collect(_engine(tmp_path, [("lab", "test", "a"), ("lab", "test", "b"), ("mylab", "validation", "c"),
                                      ("lab@0.5um", "test", "a")]))
    written = report.write()
    on_disk = json.loads((tmp_path / "eval" / "test" / "metrics.json").read_text())
    assert written["split"] == on_disk["split"] == "test"  # the split asked for
    assert on_disk["parts"] == {"lab": "test", "mylab": "validation", "lab@0.5um": "test"}
    assert on_disk["pooled"]["model"]["n_images"] == 3
    said = [r.getMessage() for r in caplog.records]
    assert "mylab has no test tiles: its validation tiles are scored, and reported as validation" in said
    assert any(m.startswith("mylab (validation), mean over tiles") for m in said)
    assert any(m.startswith("lab (test), mean over tiles") for m in said)
    assert not any(m.startswith("mylab (test)") for m in said)
    assert any(m.startswith("pooled over ['lab (test)', 'mylab (validation)']") for m in said)


def test_the_published_cryonuseg_figure_and_rescans_are_recorded_only_where_they_apply(tmp_path):
    own = EvaluationReport(tmp_path / "own", split="test", settings={"rescans": {"cryonuseg": 0.5}})
    own.collect(_engine(tmp_path, [("mylab", "test", "a")]))
    written = own.write()
    assert "published_baseline" not in written and written["made_with"]["rescans"] == {}
    theirs = EvaluationReport(tmp_path / "cryo", split="test", settings={"rescans": {"cryonuseg": 0.5}})
    theirs.collect(_engine(tmp_path, [("cryonuseg", "test", "a"), ("cryonuseg@0.5um", "test", "a")]))
    written = theirs.write()
    assert written["published_baseline"]["aji"] == 0.525 and written["made_with"]["rescans"] == {"cryonuseg": 0.5}


def test_records_without_a_part_are_of_the_split_asked_for(tmp_path):
    report = EvaluationReport(tmp_path / "out", split="validation")
    report.collect(_engine(tmp_path, [("tiles", None, "a")]))
    assert report.write()["parts"] == {"tiles": "validation"}


def test_a_source_of_two_parts_is_refused(tmp_path):
    report = EvaluationReport(tmp_path / "out", split="test")
    with pytest.raises(ValueError, match="lab holds tiles of both test and validation"):
        report.collect(_engine(tmp_path, [("lab", "test", "a"), ("lab", "validation", "b")]))


def test_tensorboard_tags_name_each_sources_part(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = EvaluationReport(tmp_path / "out", split="test", log_dir=tmp_path / "tb")
    engine = _engine(tmp_path, [("lab", "test", "a"), ("mylab", "validation", "b")])
    report.collect(engine)
    report.write(engine)
    [events] = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"test/lab/aji", "validation/mylab/aji"} <= tags and "test/mylab/aji" not in tags
    assert np.isclose(accumulator.Scalars("validation/mylab/aji")[0].value, 1.0)


def test_a_report_says_what_it_is_of_and_replaces_the_one_in_its_folder(tmp_path, caplog):
    import torch

    from nucleiseg_monai.atomic import sha256_file

    weights = tmp_path / "run" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    out = tmp_path / "run" / "eval" / "test"
    first = EvaluationReport(out, split="test")
    first.collect(_engine(tmp_path, [("lab", "test", "a"), ("lab", "test", "b"), ("mylab", "test", "c")]))
    first.write()
    (out / "notes.txt").write_text("the user's own file")

    report = EvaluationReport(out, split="test", checkpoint=weights,
                              settings={"working_mpp": 0.25, "channel_stats": {"mean": torch.tensor([1.0, 2.0])}})
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.evaluation"):
        report._clear()  # as the evaluator starts
    assert "the earlier report in" in caplog.text
    assert not (out / "metrics.json").exists() and not (out / "lab").exists() and (out / "notes.txt").exists()
    report.collect(_engine(tmp_path, [("lab", "test", "a"), ("other", "test", "d")]))
    written = report.write()
    assert sorted(p.name for p in (out / "lab").iterdir()) == ["a.tif", "a_overlay.png"]  # b's are gone
    assert not (out / "mylab").exists()
    made = written["made_with"]
    assert made["checkpoint"] == str(weights.resolve()) and made["weights_sha256"] == sha256_file(weights)
    assert made["working_mpp"] == 0.25 and made["channel_stats"] == {"mean": [1.0, 2.0]} and made["nucleiseg_monai"]
    # the cards' headline: each source's mean over its tiles, then the mean over the sources
    means = [written["sources"][s]["model"]["mean"]["aji"] for s in ("lab", "other")]
    assert written["mean_over_sources"]["aji"] == pytest.approx(np.mean(means))


def test_other_weights_are_reported_beside_them_never_in_the_bundles_folder(tmp_path):
    from nucleiseg_monai.bundle import evaluation_dir

    bundle = tmp_path / "bundle"
    own = evaluation_dir(bundle, bundle / "models" / "model.pt", bundle / "models", "test")
    assert own == str(bundle / "eval" / "test")
    other = evaluation_dir(bundle, tmp_path / "runs" / "mine" / "models" / "model.pt", bundle / "models", "validation")
    assert other == str((tmp_path / "runs" / "mine" / "eval" / "validation").resolve())
    loose = evaluation_dir(bundle, tmp_path / "w" / "best.pt", bundle / "models", "test")
    assert loose == str((tmp_path / "w" / "eval" / "test").resolve())


def test_the_csv_names_each_sections_part_and_holds_summed_counts_beside_means(tmp_path):
    import csv as csv_module

    report = EvaluationReport(tmp_path / "out", split="test")
    report.collect(_engine(tmp_path, [("lab", "test", "a"), ("mylab", "validation", "b"),
                                      ("mylab", "validation", "c")]))
    written = report.write()
    with open(tmp_path / "out" / "metrics.csv", newline="") as handle:
        rows = list(csv_module.DictReader(handle))
    parts = {(row["section"], row["method"]): row["part"] for row in rows}
    assert parts[("lab", "model")] == "test" and parts[("mylab", "model")] == "validation"
    assert parts[("pooled", "model")] == "test,validation"
    pooled = next(r for r in rows if (r["section"], r["method"], r["scope"]) == ("mylab", "model", "pooled"))
    summed = written["sources"]["mylab"]["model"]["pooled"]  # figures of the counts summed over tiles
    assert float(pooled["aji"]) == pytest.approx(summed["aji"]) and float(pooled["pq"]) == pytest.approx(summed["pq"])


def test_missing_observer_annotations_are_warned_about_only_where_their_source_is_scored(tmp_path, caplog):
    missing = tmp_path / "no_observers"
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.evaluation"):
        EvaluationReport(tmp_path / "a", observers_dir=missing).collect(_engine(tmp_path, [("mylab", "test", "x")]))
    assert caplog.text == ""  # one's own data: no human rows to miss
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.evaluation"):
        EvaluationReport(tmp_path / "b", observers_dir=missing).collect(
            _engine(tmp_path, [("cryonuseg", "test", "y"), ("cryonuseg", "test", "z")]))
    assert caplog.text.count(f"observer annotations not found at {missing}") == 1
