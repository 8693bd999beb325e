"""Markdown tables of an evaluation report (eval/<split>/metrics.json), as the model cards show them; with
``--against OTHER``, the differences of every mean from another report of the same split (a change that should not
move any figure, such as a restructure, shows 0), then a summary: the model's AJI, PQ and recall per source, pooled
and over sources, in both, and the largest change.

    python scripts/report_tables.py bundles/nuclei_unet_small/eval/test/metrics.json
    python scripts/report_tables.py NEW/metrics.json --against OLD/metrics.json
"""

from __future__ import annotations

import argparse
import json

KEYS = ("dice", "count_ape", "recall", "f1", "aji", "pq", "missed", "merged")
HEAD = ("| {} | tiles | pixel Dice | count error % | recall | detection F1 | AJI | PQ | missed | merged |\n"
        "|---|---|---|---|---|---|---|---|---|---|")


def cell(mean: dict, key: str) -> str:
    if key not in mean:  # a report written before the key existed
        return "-"
    return f"{mean[key]:.1f}" if key == "count_ape" else f"{mean[key]:.3f}"


def exact(mean: dict, key: str) -> str:
    return f"{mean[key]:.6g}" if key in mean else "-"


def row(label: str, summary: dict) -> str:
    mean = summary["mean"]
    cells = [cell(mean, k) for k in KEYS]
    return f"| {label} | {summary['n_images']} | " + " | ".join(cells) + " |"


def summaries(report: dict):
    """(label, summary) of every source's and the pooled line's methods, and of each source's organs."""
    for source, methods in report["sources"].items():
        for method, summary in methods.items():
            yield f"{source}: {method}", summary
            for organ, part in summary.get("per_organ", {}).items():
                yield f"{source}: {method}: {organ}", part
    for method, summary in report["pooled"].items():
        yield f"pooled: {method}", summary


def differences(report: dict, other: dict) -> list[str]:
    """One line per mean that differs between the reports, and per line one report lacks."""
    ours, theirs = dict(summaries(report)), dict(summaries(other))
    lines = []
    for key in ("split", "parts"):  # reports of other tiles differ everywhere, for that reason alone
        if report.get(key) != other.get(key):
            lines.append(f"not the same tiles: {key} {report.get(key)} against {other.get(key)}")
    weights = [(r.get("made_with") or {}).get("weights_sha256") for r in (report, other)]
    if None not in weights and weights[0] != weights[1]:
        lines.append(f"other weights: {weights[0][:12]}... against {weights[1][:12]}...")
    lines += [f"{label}: only in one report" for label in sorted(set(ours) ^ set(theirs))]
    for label in sorted(set(ours) & set(theirs)):
        a, b = ours[label], theirs[label]
        if a["n_images"] != b["n_images"]:
            lines.append(f"{label}: {a['n_images']} tiles against {b['n_images']}")
        lines += [f"{label}: {key} {exact(a['mean'], key)} against {exact(b['mean'], key)}"
                  for key in KEYS if a["mean"].get(key) != b["mean"].get(key)]
    return lines


SUMMARY_KEYS = ("aji", "pq", "recall")


def model_rows(report: dict) -> dict[str, dict]:
    """The model's means per source, pooled and (where the report has it) over sources: the cards' headline rows."""
    rows = {source: methods["model"]["mean"] for source, methods in report["sources"].items() if "model" in methods}
    if "model" in report["pooled"]:
        rows["pooled"] = report["pooled"]["model"]["mean"]
    if "mean_over_sources" in report:
        rows["mean over sources"] = report["mean_over_sources"]
    return rows


def summary(report: dict, other: dict) -> list[str]:
    """The model's headline figures in both reports side by side, and the largest change of any of its AJIs (a
    source's, an organ's or the pooled one)."""
    ours, theirs = model_rows(report), model_rows(other)
    lines = ["| model | " + " | ".join(f"{key} (this, other, change)" for key in SUMMARY_KEYS) + " |",
             "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for label in [label for label in ours if label in theirs]:
        cells = []
        for key in SUMMARY_KEYS:
            a, b = ours[label].get(key), theirs[label].get(key)
            cells.append("-" if a is None or b is None else f"{a:.3f}, {b:.3f}, {a - b:+.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    a_rows, b_rows = dict(summaries(report)), dict(summaries(other))
    shared = [k for k in a_rows if k in b_rows and k.split(": ")[1] == "model"
              and "aji" in a_rows[k]["mean"] and "aji" in b_rows[k]["mean"]]
    changes = [(abs(a_rows[k]["mean"]["aji"] - b_rows[k]["mean"]["aji"]), k) for k in shared]
    size, label = max(changes, default=(0.0, None))
    if size > 0:
        change = a_rows[label]["mean"]["aji"] - b_rows[label]["mean"]["aji"]
        lines.append(f"largest AJI change: {label} {change:+.3f}")
    return lines


def named(report: dict, source: str) -> str:
    """A source's name, with the part its tiles come from when that is not the report's split (a source without
    test tiles is scored on its validation tiles, and its rows must not pass for held-out ones)."""
    part = report.get("parts", {}).get(source)
    return f"{source} ({part})" if part and part != report.get("split") else source


def tables(report: dict) -> None:
    print(HEAD.format("source (mean over tiles)"))
    for source, methods in report["sources"].items():
        for method, summary in methods.items():
            print(row(f"{named(report, source)}: {method}", summary))
    for method, summary in report["pooled"].items():
        print(row(f"pooled: {method}", summary))
    for source, methods in report["sources"].items():
        print()
        print(HEAD.format(f"{named(report, source)}: organ (model)"))
        for organ, part in methods["model"]["per_organ"].items():
            print(row(organ, part))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="an evaluation's metrics.json")
    parser.add_argument("--against", help="another metrics.json of the same split: print where their means differ")
    args = parser.parse_args(argv)
    report = json.loads(open(args.report, encoding="utf-8").read())
    if args.against is None:
        tables(report)
        return 0
    other = json.loads(open(args.against, encoding="utf-8").read())
    lines = differences(report, other)
    if not lines:
        print(f"every mean of {args.report} equals {args.against}'s")
        return 0
    print("\n".join(lines + ["", f"{len(lines)} difference(s); summary:"] + summary(report, other)))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
