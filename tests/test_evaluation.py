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
