"""Markdown tables of an evaluation report (eval/<split>/metrics.json), as the model cards show them.

    python scripts/report_tables.py bundles/nuclei_unet_small/eval/test/metrics.json
"""

from __future__ import annotations

import json
import sys

KEYS = ("dice", "count_ape", "recall", "f1", "aji", "pq")
HEAD = "| {} | tiles | pixel Dice | count error % | recall | detection F1 | AJI | PQ |\n|---|---|---|---|---|---|---|---|"


def row(label: str, summary: dict) -> str:
    mean = summary["mean"]
    cells = [f"{mean[k]:.1f}" if k == "count_ape" else f"{mean[k]:.3f}" for k in KEYS]
    return f"| {label} | {summary['n_images']} | " + " | ".join(cells) + " |"


def main(path: str) -> None:
    report = json.loads(open(path, encoding="utf-8").read())
    print(HEAD.format("source (mean over tiles)"))
    for source, methods in report["sources"].items():
        for method, summary in methods.items():
            print(row(f"{source}: {method}", summary))
    for method, summary in report["pooled"].items():
        print(row(f"pooled: {method}", summary))
    for source, methods in report["sources"].items():
        print()
        print(HEAD.format(f"{source}: organ (model)"))
        for organ, part in methods["model"]["per_organ"].items():
            print(row(organ, part))


if __name__ == "__main__":
    main(sys.argv[1])
