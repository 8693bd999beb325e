"""scripts/report_tables.py: the model cards' tables, and the differences between two evaluation reports."""

import copy
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report_tables.py"
spec = importlib.util.spec_from_file_location("report_tables", SCRIPT)
report_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_tables)


def summary(aji: float, n: int = 2, organs: dict | None = None) -> dict:
    mean = {"dice": 0.8, "count_ape": 12.5, "recall": 0.7, "f1": 0.75, "aji": aji, "pq": 0.5, "missed": 0.1,
            "merged": 0.15}
    return {"n_images": n, "mean": mean, **({"per_organ": organs} if organs else {})}


REPORT = {
    "sources": {"cryonuseg": {"model": summary(0.58, organs={"Skin": summary(0.5, n=1), "Thymus": summary(0.66, n=1)}),
                              "human: annotator2": summary(0.576)}},
    "pooled": {"model": summary(0.58)},
}


def test_tables_print_each_source_method_and_organ(capsys):
    report_tables.tables(REPORT)
    out = capsys.readouterr().out.splitlines()
    assert "| cryonuseg: model | 2 | 0.800 | 12.5 | 0.700 | 0.750 | 0.580 | 0.500 | 0.100 | 0.150 |" in out
    assert "| cryonuseg: human: annotator2 | 2 | 0.800 | 12.5 | 0.700 | 0.750 | 0.576 | 0.500 | 0.100 | 0.150 |" in out
    assert "| pooled: model | 2 | 0.800 | 12.5 | 0.700 | 0.750 | 0.580 | 0.500 | 0.100 | 0.150 |" in out
    assert "| Thymus | 1 | 0.800 | 12.5 | 0.700 | 0.750 | 0.660 | 0.500 | 0.100 | 0.150 |" in out


def test_a_source_scored_on_another_part_than_the_split_says_so(capsys):
    report = {**copy.deepcopy(REPORT), "split": "test", "parts": {"cryonuseg": "test", "mylab": "validation"}}
    report["sources"]["mylab"] = {"model": summary(0.61, organs={"Lung": summary(0.61)})}
    report_tables.tables(report)
    out = capsys.readouterr().out.splitlines()
    assert "| mylab (validation): model | 2 | 0.800 | 12.5 | 0.700 | 0.750 | 0.610 | 0.500 | 0.100 | 0.150 |" in out
    assert any(line.startswith("| mylab (validation): organ (model) |") for line in out)
    assert any(line.startswith("| cryonuseg: model |") for line in out)  # its own split: no label


def test_a_report_from_before_missed_and_merged_shows_dashes(capsys):
    old = copy.deepcopy(REPORT)
    for source in old["sources"]["cryonuseg"].values():
        for part in [source, *source.get("per_organ", {}).values()]:
            del part["mean"]["missed"], part["mean"]["merged"]
    assert report_tables.row("x", old["sources"]["cryonuseg"]["model"]).endswith("| 0.500 | - | - |")
    assert "cryonuseg: model: merged 0.15 against -" in report_tables.differences(REPORT, old)


def test_against_names_every_differing_mean_and_nothing_else(tmp_path, capsys):
    other = copy.deepcopy(REPORT)
    other["sources"]["cryonuseg"]["model"]["per_organ"]["Skin"]["mean"]["aji"] = 0.49
    other["pooled"]["model"]["n_images"] = 3
    del other["sources"]["cryonuseg"]["human: annotator2"]
    assert report_tables.differences(REPORT, REPORT) == []
    assert report_tables.differences(REPORT, other) == [
        "cryonuseg: human: annotator2: only in one report",
        "cryonuseg: model: Skin: aji 0.5 against 0.49",
        "pooled: model: 2 tiles against 3",
    ]
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(REPORT))
    old.write_text(json.dumps(other))
    assert report_tables.main([str(new), "--against", str(new)]) == 0
    assert "every mean" in capsys.readouterr().out
    assert report_tables.main([str(new), "--against", str(old)]) == 1
    out = capsys.readouterr().out
    assert "3 difference(s); summary:" in out
    assert "| pooled | " in out and "largest AJI change: cryonuseg: model: Skin +0.010" in out


def test_against_says_first_when_the_reports_are_of_other_tiles_or_other_weights():
    test = {**copy.deepcopy(REPORT), "split": "test"}
    validation = {**copy.deepcopy(REPORT), "split": "validation"}
    assert report_tables.differences(test, validation)[0] == "not the same tiles: split test against validation"
    ours, theirs = copy.deepcopy(REPORT), copy.deepcopy(REPORT)
    ours["made_with"], theirs["made_with"] = {"weights_sha256": "a" * 64}, {"weights_sha256": "b" * 64}
    assert report_tables.differences(ours, theirs) == ["other weights: aaaaaaaaaaaa... against bbbbbbbbbbbb..."]
